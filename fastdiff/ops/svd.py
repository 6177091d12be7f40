"""Batched singular values and the energy rank ``rank_eta(A)`` (seed 002 eq. 12; docs/math.md)."""
from __future__ import annotations

from typing import Tuple

from fastdiff.ops.table import ANY_DTYPE, CPU, CUDA, TORCH, Impl, Op

__all__ = ["ROW"]


def _triton_fits(m: int = 1, n: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.svd import MAX_DIM

    if max(m, n) > MAX_DIM:
        return False, f"backend='triton': the SVD kernel takes m, n <= {MAX_DIM}, got ({m}, {n})"
    return True, ""


ROW = Op("svd", what="SVD", impls=(
    Impl("triton", CUDA, ANY_DTYPE, triton_module="svd", fits=_triton_fits, limit="m, n <= 256"),
    Impl("cpp", CPU, ANY_DTYPE, cpp_symbol="svdvals_rank", limit="float32 / float64"),
    TORCH),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})

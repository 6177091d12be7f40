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


# auto's limit: the kernel holds the whole (M_PAD, N_PAD) tile (powers of two of max(m, n) and
# min(m, n)) in registers; above 128 x 64 it spills (ptxas -v, bench/results/triton-resources.md:
# 128 x 64 none; 128 x 128 556 B/thread of spill stores at sm_80, 552 B at sm_90; 256 x 256 11872 B
# / 12020 B), so auto runs torch there while a forced backend="triton" still takes up to 256
AUTO_MAX_TILE = 128 * 64


def _triton_prefer(m: int = 1, n: int = 1, **_) -> Tuple[bool, str]:
    tile = (1 << (max(m, n) - 1).bit_length()) * (1 << (min(m, n) - 1).bit_length())
    if tile > AUTO_MAX_TILE:
        return False, (f"triton: ({m}, {n}) pads to a tile over 128 x 64 elements: the 128 x 128 variant spills "
                       "552 B/thread at sm_90, 256 x 256 12020 B (bench/results/triton-resources.md)")
    return True, ""


ROW = Op("svd", what="SVD", impls=(
    Impl("triton", CUDA, ANY_DTYPE, triton_module="svd", fits=_triton_fits, prefer=_triton_prefer,
         limit="m, n <= 256; auto: padded m x n <= 128 x 64 (larger ones spill)"),
    Impl("cpp", CPU, ANY_DTYPE, cpp_symbol="svdvals_rank", limit="float32 / float64"),
    TORCH),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})

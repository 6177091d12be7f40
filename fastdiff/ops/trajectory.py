"""A whole MoLRG sampling trajectory in one kernel: the table of per-step affine coefficients
(:func:`fastdiff.sampling.trajectory_table`) applied with the MoLRG posterior in between, the
noise drawn in the kernel (docs/math.md)."""
from __future__ import annotations

from typing import Tuple

from fastdiff.ops.molrg import CPP_MAX_K
from fastdiff.ops.table import ALL, ANY_DTYPE, CPU, CUDA, Impl, Op

__all__ = ["ROW"]


def _cpp_fits(K: int = 1, **_) -> Tuple[bool, str]:
    if K > CPP_MAX_K:
        return False, f"the C++ trajectory kernel takes K <= {CPP_MAX_K} components, got {K}"
    return True, ""


def _triton_fits(n: int = 1, D: int = 1, K: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.trajectory import fits

    return fits(n, D, K)


ROW = Op("trajectory", what="trajectory", fallback="loop", soft=("all",), impls=(
    Impl("triton", CUDA, triton_module="trajectory", fits=_triton_fits,
         limit="K <= 32, n x sum d_k in registers"),
    Impl("cpp", CPU, cpp_symbol="molrg_trajectory", fits=_cpp_fits, limit=f"K <= {CPP_MAX_K}"),
    Impl("torch", ALL, ANY_DTYPE, limit="the step-by-step loop")),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})

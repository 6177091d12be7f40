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


# auto's limit: the kernel holds U (n x sum d_k, each padded to a power of two >= 16) and the
# sample tiles in registers; above 32 x 16 it spills (ptxas -v, bench/results/triton-resources.md:
# 32 x 32 with K 32 248 B/thread of spill stores at sm_90; the benchmark's 64 x 32 576 B; 128 x 32
# 11704 B), so auto runs the step-by-step loop there; a forced backend="triton" still runs
AUTO_MAX_TILE = 32 * 16


def _triton_prefer(n: int = 1, D: int = 1, **_) -> Tuple[bool, str]:
    tile = max(16, 1 << (n - 1).bit_length()) * max(16, 1 << (D - 1).bit_length())
    if tile > AUTO_MAX_TILE:
        return False, (f"triton: n x sum d_k = {n} x {D} pads to a tile over 32 x 16 elements: the 32 x 32 variant "
                       "spills 248 B/thread at sm_90, 64 x 32 576 B (bench/results/triton-resources.md)")
    return True, ""


ROW = Op("trajectory", what="trajectory", fallback="loop", soft=("all",), impls=(
    Impl("triton", CUDA, triton_module="trajectory", fits=_triton_fits, prefer=_triton_prefer,
         limit="K <= 32, n x sum d_k in registers; auto: padded n x sum d_k <= 32 x 16 (larger ones spill)"),
    Impl("cpp", CPU, cpp_symbol="molrg_trajectory", fits=_cpp_fits, limit=f"K <= {CPP_MAX_K}"),
    Impl("torch", ALL, ANY_DTYPE, limit="the step-by-step loop")),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})

"""The MoLRG posterior mean ``x0_hat = E[x0 | x_t]`` of a mixture of low-rank Gaussians, its CFG
form and its backward (seed 002 eq. 8; docs/math.md).
"""
from __future__ import annotations

from typing import Tuple

from fastdiff.ops.table import ALL, ANY_DTYPE, CPU, CUDA, Impl, Op

__all__ = ["ROW", "CPP_FUSED_MAX_ND", "CPP_FUSED_MAX_ND_GRAD", "CPP_MAX_K"]

# fused per-row C++ MoLRG kernels up to this many multiply-adds per row (n * D); torch GEMMs above
# (bench/test_bench_crossovers.py measures the crossover across both thresholds)
CPP_FUSED_MAX_ND = 1 << 15
CPP_FUSED_MAX_ND_GRAD = 1 << 13
# the C++ MoLRG kernels keep per-row logits in fixed stack buffers
CPP_MAX_K = 1024


def _cpp_fits(K: int = 1, **_) -> Tuple[bool, str]:
    if K > CPP_MAX_K:
        return False, f"the C++ MoLRG kernels take K <= {CPP_MAX_K} components, got {K}"
    return True, ""


def _cpp_prefer(n: int = 0, D: int = 0, grad: bool = False, **_) -> Tuple[bool, str]:
    limit = CPP_FUSED_MAX_ND_GRAD if grad else CPP_FUSED_MAX_ND
    if n * D > limit:
        return False, f"n * sum d_k = {n * D} > {limit}: the GEMM form is faster"
    return True, ""


def _triton_fits(D: int = 0, K: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.molrg import MAX_D, MAX_K

    if D > MAX_D or K > MAX_K:
        return False, f"the Triton MoLRG kernel takes sum d_k <= {MAX_D} and K <= {MAX_K}, got {D}, {K}"
    return True, ""


# forced float64 and oversized problems run the GEMM form in torch ops (the call still works)
ROW = Op("molrg", what="MoLRG", soft=("dtype", "fits"), impls=(
    Impl("triton", CUDA, triton_module="molrg", fits=_triton_fits, limit="sum d_k <= 512, K <= 32"),
    Impl("cpp", CPU, cpp_symbol="molrg_forward", fits=_cpp_fits, prefer=_cpp_prefer,
         limit=f"K <= {CPP_MAX_K}; auto: n*sum d_k <= {CPP_FUSED_MAX_ND} ({CPP_FUSED_MAX_ND_GRAD} with grad)"),
    Impl("torch", ALL, ANY_DTYPE, limit="GEMM form, any size")),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})

"""The fused step: ``out = sum_j c_j in_j + c_k z`` in one pass over memory.

Every solver step of :mod:`fastdiff.steps` is this affine map of its inputs (docs/math.md), with
per-row coefficients ``c`` (host-side, :mod:`fastdiff.coefficients`) and the noise ``z`` a tensor
or the in-kernel Philox stream.
"""
from __future__ import annotations

from fastdiff.ops.table import CPU, CUDA, TORCH, Impl, Op

__all__ = ["ROW"]

ROW = Op("fused_step", what="fused-step", impls=(
    Impl("triton", CUDA), Impl("cuda", CUDA), Impl("cpp", CPU), TORCH),
    auto={"cuda": ("triton", "cuda"), "cpu": ("cpp",)})

"""Triton kernels of fastdiff, one file per op (installed as ``fastdiff.kernels``).

``AOT_KERNELS`` collects every kernel variant that ``tests/test_aot.py`` compiles ahead of
time for sm_80 and sm_90 (no GPU needed), so a kernel that only breaks in the compiler
(not in the interpreter) fails CI.
"""
from .fused_step import AOT_KERNELS as _FUSED_STEP_AOT
from .molrg import AOT_KERNELS as _MOLRG_AOT
from .svd import AOT_KERNELS as _SVD_AOT
from .trajectory import AOT_KERNELS as _TRAJECTORY_AOT

AOT_KERNELS = [*_FUSED_STEP_AOT, *_MOLRG_AOT, *_SVD_AOT, *_TRAJECTORY_AOT]

__all__ = ["AOT_KERNELS"]

"""The launchers of fastdiff's kernels, one file per op (installed as ``fastdiff.kernels``): the
Triton kernels (``<op>.py``) and every ``fastdiff._C`` call (``cpp.py``).

``AOT_KERNELS`` collects every Triton kernel variant that ``tests/test_aot.py`` compiles ahead of
time for sm_80 and sm_90 (no GPU needed), so a kernel that only breaks in the compiler (not in
the interpreter) fails CI.  It is built on first access: importing ``fastdiff.kernels.cpp`` (the
C++ backend) must not import Triton, which is optional on CPU.
"""
__all__ = ["AOT_KERNELS"]


def __getattr__(name):
    if name == "AOT_KERNELS":
        from .discrete_langevin import AOT_KERNELS as discrete_langevin
        from .empirical import AOT_KERNELS as empirical
        from .fused_step import AOT_KERNELS as fused_step
        from .molrg import AOT_KERNELS as molrg
        from .svd import AOT_KERNELS as svd
        from .trajectory import AOT_KERNELS as trajectory

        return [*fused_step, *molrg, *svd, *trajectory, *discrete_langevin, *empirical]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

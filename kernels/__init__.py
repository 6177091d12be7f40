"""The kernels' launchers, installed as ``fastdiff.kernels``: one Triton file per op, and
``cpp.py``, every ``fastdiff._C`` launcher.

``AOT_KERNELS`` collects every kernel variant that ``tests/test_aot.py`` compiles ahead of
time for sm_80 and sm_90 (no GPU needed), so a kernel that only breaks in the compiler
(not in the interpreter) fails CI.  It is assembled on first access: importing this package
(for :mod:`.cpp`, which the CPU paths call) must not import Triton, an optional dependency.
"""

__all__ = ["AOT_KERNELS"]


def __getattr__(name: str):
    if name == "AOT_KERNELS":
        from .fused_step import AOT_KERNELS as fused_step
        from .molrg import AOT_KERNELS as molrg
        from .svd import AOT_KERNELS as svd
        from .trajectory import AOT_KERNELS as trajectory

        return [*fused_step, *molrg, *svd, *trajectory]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

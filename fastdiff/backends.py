"""The backends themselves: their names, whether each runs here (probes), and the CPU GEMM choice.

Backends: ``"triton"`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``"cuda"`` (CUDA C++ compiled at run time with NVRTC through CuPy), ``"cpp"`` (the
``fastdiff._C`` OpenMP kernels, CPU tensors) and ``"torch"`` (pure torch, any device, any
float dtype).  Which backend runs an op is :mod:`fastdiff.dispatch`'s table (its rows are
declared by ``fastdiff/ops/<op>.py``); this module only answers "does backend X run here"
(:func:`available`, :func:`has_kernel`), for the dispatcher and for ``fastdiff info``.

:func:`mm` is here too: it picks between two GEMM libraries of this torch build (oneDNN or MKL)
for one product, the same kind of question one level down, and every op that multiplies
matrices on the CPU shares it.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["BACKENDS", "available"]

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled kernels take


# --------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=None)
def _probe(name: str) -> Tuple[bool, str]:
    if name == "torch":
        return True, f"torch {torch.__version__}"
    if name == "cpp":
        try:
            from fastdiff import _C  # noqa: F401
        except ImportError as e:  # not built
            return False, f"fastdiff._C not importable ({e}); run `pip install -e .`"
        return True, f"OpenMP threads={_C.num_threads()}, simd={_C.simd()}"
    if name == "triton":
        try:
            import triton
        except ImportError:
            return False, "triton is not installed"
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if not torch.cuda.is_available() and not interp:
            return False, f"triton {triton.__version__} installed, but no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
        return True, f"triton {triton.__version__}" + (" (interpreter)" if interp else "")
    if name == "cuda":
        try:
            from fastdiff import _cuda
        except ImportError as e:
            return False, f"fastdiff._cuda not importable ({e})"
        return _cuda.available()
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def _works(name: str) -> bool:
    """Whether ``name`` runs here; a constant to torch.compile (it never traces the probe)."""
    return _probe(name)[0]


# What ``torch.compiler.assume_constant_result`` does, without its ``import torch._dynamo``: that
# import alone took ~0.9 s of every ``import fastdiff`` (and so of ``fastdiff --help``).
# tests/test_compile.py checks that the decorator still only sets this flag.
_works._dynamo_marked_constant = True


def has_kernel(name: str, cpp_symbol: str, triton_module: str) -> bool:
    """Whether backend ``name`` runs here and has the op: ``fastdiff._C.<cpp_symbol>`` for "cpp",
    the module ``fastdiff.kernels.<triton_module>`` for "triton" (an older build may lack either)."""
    if not _works(name):
        return False
    if name == "cpp":
        from fastdiff import _C

        return hasattr(_C, cpp_symbol)
    if name == "triton":
        import importlib

        try:
            importlib.import_module(f"fastdiff.kernels.{triton_module}")
        except ImportError:
            return False
        return True
    return False


def available() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (works_here, detail)}`` for every concrete backend."""
    return {name: _probe(name) for name in BACKENDS[1:]}


# --------------------------------------------------------------------------- CPU GEMM
# torch.mm sends float32 CPU products to MKL's sgemm; the oneDNN build bundled with x86 torch
# (``torch.ops.mkldnn._linear_pointwise``, the op inductor lowers linear layers to) runs the same
# products 1.2-1.3x faster on this project's 2-core AMD EPYC (bench/RESULTS.md: 200 vs 150 GFLOP/s
# at (256, 3072) x (3072, 640)).  Its ~15 us call overhead loses below a few million multiply-adds.
ONEDNN_MIN_MACS = 1 << 22


@functools.lru_cache(maxsize=None)
def _onednn_linear() -> Optional[Callable]:
    """oneDNN's ``a @ w.T`` if this torch build has it and it runs here (probed once), else None."""
    if os.environ.get("FASTDIFF_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a, w = torch.arange(6.0).reshape(2, 3), torch.arange(12.0).reshape(4, 3)
        if not torch.equal(op(a, w, None, "none", [None], ""), a @ w.T):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors, on the fastest GEMM this build has for them.

    Large float32 CPU products with a row-major ``a`` and a row- or column-major ``b`` go to
    oneDNN; everything else (other dtypes and devices, small or strided operands, tensors that
    autograd is tracking, code being traced by torch.compile) is plain ``a @ b``.  Results agree to
    float32 rounding (the two libraries sum in different orders).
    """
    if (a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.shape[0] * a.shape[1] * b.shape[1] >= ONEDNN_MIN_MACS
            and a.is_contiguous() and (b.is_contiguous() or b.T.is_contiguous())
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and not torch.compiler.is_compiling()):
        op = _onednn_linear()
        if op is not None:
            return op(a, b.T, None, "none", [None], "")
    return a @ b

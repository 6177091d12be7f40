"""Backend probes and the fused affine step (which backend runs an op: :mod:`fastdiff.dispatch`).

Backends: ``"triton"`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``"cuda"`` (CUDA C++ compiled at run time with NVRTC through CuPy), ``"cpp"`` (the
``fastdiff._C`` OpenMP kernels, CPU tensors) and ``"torch"`` (pure torch, any device, any
float dtype).  For the fused step ``"auto"`` picks Triton (then CUDA C++) for CUDA tensors, C++
for CPU tensors, and torch where neither works (or for float64, which the compiled kernels do not
take); the table is :data:`fastdiff.dispatch.OPS`.

Every backend implements the same primitive, the fused affine step (one pass over memory)::

    out[i] = sum_j c[b, j] * in_j[i] + c[b, k] * z[i],      b = i // inner

with ``z`` absent, an explicit noise tensor, or the Philox stream at ``offset + i``.  Each
reverse-step API in :mod:`fastdiff.steps` reduces to it by computing the per-sample
coefficients ``c`` from its schedule (in float64, on the host for scalar timesteps).

The primitive is registered as the ``torch.library`` op ``fastdiff::fused_step_`` (with a
fake implementation) so ``torch.compile(fullgraph=True)`` traces code that calls it; in
eager mode the op layer is skipped and the backend is called directly.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["BACKENDS", "available"]

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_INPUTS = 6
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2

Coefs = Union[Sequence[float], torch.Tensor]


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


# --------------------------------------------------------------------------- implementations
# Each takes (out, ins, coefs, inner, noise_mode, noise, seed, offset[, start]) on flat contiguous
# tensors; ``start`` (kernel backends) is the global index of out[0] within a larger logical tensor.
def _fused_step_torch(out, ins, coefs, inner, noise_mode, noise, seed, offset):
    """Pure torch: computes in float32 (float64 for float64 tensors) and writes ``out``."""
    ctype = torch.float64 if out.dtype == torch.float64 else torch.float32
    n = out.numel()
    if isinstance(coefs, torch.Tensor):
        rows = coefs.to(ctype)
        c = [rows[:, j].repeat_interleave(inner)[:n] for j in range(rows.shape[1])]
    else:
        c = [float(v) for v in coefs]
    acc = torch.zeros(n, dtype=ctype, device=out.device)
    for j, t in enumerate(ins):
        acc += c[j] * t.to(ctype)
    if noise_mode == NOISE_TENSOR:
        acc += c[len(ins)] * noise.to(ctype)
    elif noise_mode == NOISE_PHILOX:
        from fastdiff.reference.rng import randn_torch

        acc += c[len(ins)] * randn_torch(seed, offset, n, out.device).to(ctype)
    out.copy_(acc)


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fused_step_cpp(out, ins, coefs, inner, noise_mode, noise, seed, offset, start=0):
    from fastdiff import _C

    if isinstance(coefs, torch.Tensor):
        coef_ptr, scalars = coefs.data_ptr(), []
    else:
        coef_ptr, scalars = 0, [float(v) for v in coefs]
    _C.fused_step(
        out.data_ptr(), [t.data_ptr() for t in ins], _DTYPE_CODE[out.dtype], out.numel(), inner, start,
        coef_ptr, scalars, noise_mode, noise.data_ptr() if noise is not None else 0, seed, offset,
    )


def _fused_step_triton(*args, **kwargs):
    from fastdiff.kernels.fused_step import fused_step as launch

    launch(*args, **kwargs)


def _fused_step_cuda(*args, **kwargs):
    from fastdiff._cuda import fused_step as launch

    launch(*args, **kwargs)


_IMPLS: Dict[str, Callable] = {
    "torch": _fused_step_torch,
    "cpp": _fused_step_cpp,
    "triton": _fused_step_triton,
    "cuda": _fused_step_cuda,
}


def _run(out, ins, coefs, noise_mode, noise, seed, offset, backend):
    rows = coefs.shape[0] if isinstance(coefs, torch.Tensor) else 1
    inner = max(out.numel() // rows, 1)
    _IMPLS[backend](out, list(ins), coefs, inner, noise_mode, noise, seed, offset)


# --------------------------------------------------------------------------- autograd
class _FusedStepFunction(torch.autograd.Function):
    """The fused step on a compiled backend, differentiable.  The step is affine, so with
    ``g = dL/d out`` and ``c_j`` row ``b``'s coefficient expanded over its elements::

        dL/d in_j = c_j * g,   dL/d noise = c_k * g,   dL/d c[b, j] = sum_{i in row b} g[i] in_j[i]

    (``in_k`` being the noise: the tensor, or the Philox draws regenerated by the same kernel).
    The inputs are saved only when the coefficients need a gradient."""

    @staticmethod
    def forward(ctx, backend, like, coefs, scalars, noise_mode, noise, seed, offset, *ins):
        res = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        _run(res, ins, coefs if coefs is not None else scalars, noise_mode, noise, seed, offset, backend)
        ctx.backend, ctx.scalars, ctx.noise_mode, ctx.seed, ctx.offset = backend, scalars, noise_mode, seed, offset
        ctx.n_ins, ctx.has_coefs, ctx.has_noise = len(ins), coefs is not None, noise is not None
        ctx.coefs_grad = coefs is not None and coefs.requires_grad
        saved = [coefs] if coefs is not None else []
        if ctx.coefs_grad:
            saved += list(ins) + ([noise] if noise is not None else [])
        ctx.save_for_backward(*saved)
        return res

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        coefs = saved[0] if ctx.has_coefs else None
        n, k = g.numel(), ctx.n_ins
        ctype = torch.float64 if g.dtype == torch.float64 else torch.float32
        gc = g.to(ctype)
        if coefs is not None:
            R = coefs.shape[0]
            inner = max(n // R, 1)
            cols = coefs.detach().to(ctype)
            col = lambda j: cols[:, j].repeat_interleave(inner)[:n]  # noqa: E731
        else:
            col = lambda j: ctx.scalars[j]  # noqa: E731
        need = ctx.needs_input_grad
        grad_ins = [(col(j) * gc).to(g.dtype) if need[8 + j] else None for j in range(k)]
        grad_noise = (col(k) * gc).to(g.dtype) if ctx.has_noise and need[5] else None
        grad_coefs = None
        if ctx.coefs_grad and need[2]:
            R = coefs.shape[0]
            inner = max(n // R, 1)
            row = (torch.arange(n, device=g.device) // inner).clamp(max=R - 1)
            terms = list(saved[1:1 + k])
            if ctx.noise_mode == NOISE_TENSOR:
                terms.append(saved[1 + k])
            elif ctx.noise_mode == NOISE_PHILOX:  # the very draws the forward used
                z = torch.empty(n, dtype=g.dtype, device=g.device)
                _run(z, [], [1.0], NOISE_PHILOX, None, ctx.seed, ctx.offset, ctx.backend)
                terms.append(z)
            grad_coefs = torch.zeros(coefs.shape, dtype=ctype, device=g.device)
            for j, t in enumerate(terms):
                grad_coefs[:, j].index_add_(0, row, gc * t.detach().to(ctype))
            grad_coefs = grad_coefs.to(coefs.dtype)
        return (None, None, grad_coefs, None, None, grad_noise, None, None, *grad_ins)


def _needs_grad(out, ins, coefs, noise) -> bool:
    if not torch.is_grad_enabled():
        return False
    if out.requires_grad or (noise is not None and noise.requires_grad):
        return True
    if isinstance(coefs, torch.Tensor) and coefs.requires_grad:
        return True
    for t in ins:
        if t.requires_grad:
            return True
    return False


# --------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("fastdiff::fused_step_", mutates_args=("out",))
def _fused_step_op(
    out: torch.Tensor,
    ins: List[torch.Tensor],
    coefs: Optional[torch.Tensor],
    scalar_coefs: List[float],
    noise_mode: int,
    noise: Optional[torch.Tensor],
    seed: int,
    offset: int,
    backend: str,
) -> None:
    _run(out, ins, coefs if coefs is not None else scalar_coefs, noise_mode, noise, seed, offset, backend)


@_fused_step_op.register_fake
def _(out, ins, coefs, scalar_coefs, noise_mode, noise, seed, offset, backend) -> None:
    return None


def _fused_step(
    out: torch.Tensor,
    ins: Sequence[torch.Tensor],
    coefs: Coefs,
    *,
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
    philox: bool = False,
    backend: str,
) -> torch.Tensor:
    """``out = sum_j coefs[:, j] * ins[j] + coefs[:, k] * z`` in one pass (see the module docstring).

    ``out``, ``ins`` and ``noise`` are flat contiguous tensors of one dtype and device (callers in
    :mod:`fastdiff.steps` validate and flatten); ``coefs`` is a list of ``k+1`` floats or a float32
    ``(R, k+1)`` tensor on the same device (row ``b`` applies to elements ``[b*n/R, (b+1)*n/R)``).
    ``z`` is ``noise`` if given, else the Philox stream ``(seed, offset + i)`` if ``philox``.
    ``backend`` is a concrete one, already chosen by :func:`fastdiff.dispatch.choose` (which reads
    this module's probes: the choice is the caller's, so the two modules do not import each other).

    Private on purpose: the compiled kernels read and write through raw pointers, and only the
    public steps check shapes, dtypes, contiguity and lengths (a misuse here reads past the end of
    a buffer).  Public code calls :mod:`fastdiff.steps` instead.
    """
    if len(ins) > MAX_INPUTS:
        raise ValueError(f"ins: at most {MAX_INPUTS} inputs, got {len(ins)}")
    noise_mode = NOISE_TENSOR if noise is not None else (NOISE_PHILOX if philox else NOISE_NONE)
    if noise_mode == NOISE_PHILOX and offset % 4:
        raise ValueError(f"offset: the Philox window must start on a quad (multiple of 4), got {offset}")
    if torch.compiler.is_compiling() and _needs_grad(out, ins, coefs, noise):
        # the registered op has no autograd formula: traced code that needs a gradient runs the
        # pure torch step, which torch differentiates
        rows = coefs.shape[0] if isinstance(coefs, torch.Tensor) else 1
        _fused_step_torch(out, list(ins), coefs, max(out.numel() // rows, 1), noise_mode, noise, seed, offset)
        return out
    if backend != "torch" and _needs_grad(out, ins, coefs, noise):
        # the kernels write through raw pointers, invisible to autograd: run them inside an
        # autograd.Function, then copy into out, so out= joins the graph exactly as the torch
        # backend's out.copy_ does
        tensor_coefs = coefs if isinstance(coefs, torch.Tensor) else None
        scalars = [] if tensor_coefs is not None else [float(v) for v in coefs]
        res = _FusedStepFunction.apply(backend, out.detach(), tensor_coefs, scalars, noise_mode, noise, seed, offset,
                                       *ins)
        out.copy_(res)
        return out
    if torch.compiler.is_compiling():
        tensor_coefs = coefs if isinstance(coefs, torch.Tensor) else None
        scalars = [] if tensor_coefs is not None else [float(v) for v in coefs]
        _fused_step_op(out, list(ins), tensor_coefs, scalars, noise_mode, noise, seed, offset, backend)
    else:
        _run(out, ins, coefs, noise_mode, noise, seed, offset, backend)
        if backend != "torch":
            # the kernel wrote through a raw pointer, which autograd never sees: bump the version
            # counter as an in-place torch op would, so a tensor saved for backward and then
            # overwritten makes backward raise instead of using the new values
            torch.autograd.graph.increment_version(out)
    return out

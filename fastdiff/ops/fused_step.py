"""The fused step: ``out = sum_j c_j in_j + c_k z`` in one pass over memory.

Every solver step of :mod:`fastdiff.steps` is this affine map of its inputs (docs/math.md), with
per-row coefficients ``c`` (host-side, :mod:`fastdiff.coefficients`) and the noise ``z`` a tensor
or the in-kernel Philox stream::

    out[i] = sum_{j<k} c[b, j] * in_j[i] + c[b, k] * z[i],      b = i // inner,  i in [0, n)

Contract (every backend; the public steps check it, nothing here does):

- ``out``, ``ins`` (0..``MAX_INPUTS`` of them) and ``noise``: contiguous tensors of ``n`` elements
  each, one device and one dtype (float32 / float16 / bfloat16 for the kernels, float64 too for
  torch); their shapes are ignored (read and written as flat).  ``out`` may be one of ``ins``
  exactly (the map is elementwise), never a partial overlap.
- ``coefs``: ``k + 1`` Python floats (one row for every element), or an ``(R, k + 1)`` float32
  (float64 for float64 tensors) contiguous tensor on the device: row ``b`` for the elements
  ``[b inner, (b + 1) inner)``, ``inner = n // R``.
- ``z``, by noise mode: :data:`NOISE_NONE` no term; :data:`NOISE_TENSOR` ``noise[i]``;
  :data:`NOISE_PHILOX` the normal Philox stream at ``(seed, offset + i)`` (fastdiff/reference/rng.py),
  ``offset % 4 == 0``.
- Per-sample seeds (:data:`NOISE_PHILOX` with ``seed`` an int64 ``(B,)`` contiguous tensor on the
  device, each entry a u64 seed's bits, ``n % B == 0``): the ``n`` elements are ``B`` samples of
  ``per = n // B`` and ``z[b per + j] = philox_normal(key = seed[b], counter = offset + j)``, i.e.
  element ``j`` of sample ``b``'s own stream, the same whatever ``B`` and position.  A sample's
  region starts at ``j = 0`` on a quad (``offset % 4 == 0``), but ``per`` need not be a multiple of 4:
  the kernels, which generate whole Philox quads, split a quad that straddles two samples (two
  keys) by element.  64-bit index math; the seeds are read through their pointer (no sync).
- Math in float32 (float64 for float64 tensors), one rounding on the store.

The layers, top to bottom: :func:`_fused_step` (the entry :mod:`fastdiff.steps` calls, with a
backend :func:`fastdiff.dispatch.choose` already picked); in traced code the ``torch.library`` op
``fastdiff::fused_step_`` (with a fake implementation, so ``torch.compile(fullgraph=True)`` traces
it); where autograd needs a graph through a compiled kernel :class:`_FusedStepFunction`; then one
launcher per backend (:data:`LAUNCHERS`): :func:`_fused_step_torch` here,
``fastdiff.kernels.cpp.fused_step`` (C++), ``fastdiff.kernels.fused_step.fused_step`` (Triton),
``fastdiff._cuda.fused_step`` (CUDA C++ through NVRTC).  Every launcher takes
``(out, ins, coefs, inner, noise_mode, noise, seed, offset[, start])`` (``seed`` an int or the
per-sample seed tensor); ``start`` (the kernel launchers) is the global index of ``out[0]`` within
a larger logical tensor (per-sample: of the ``B * per`` elements the seeds cover).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from fastdiff.ops.table import CPU, CUDA, TORCH, Impl, Launchers, Op

__all__ = ["ROW", "MAX_INPUTS", "NOISE_NONE", "NOISE_TENSOR", "NOISE_PHILOX"]

ROW = Op("fused_step", what="fused-step", impls=(
    Impl("triton", CUDA), Impl("cuda", CUDA), Impl("cpp", CPU), TORCH),
    auto={"cuda": ("triton", "cuda"), "cpu": ("cpp",)})

MAX_INPUTS = 6
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2

Coefs = Union[Sequence[float], torch.Tensor]


# --------------------------------------------------------------------------- the pure-torch form
def _fused_step_torch(out, ins, coefs, inner, noise_mode, noise, seed, offset):
    """Pure torch: computes in float32 (float64 for float64 tensors) and writes ``out``; any
    device, any float dtype, differentiable by torch itself."""
    ctype = torch.float64 if out.dtype == torch.float64 else torch.float32
    n = out.numel()
    if isinstance(coefs, torch.Tensor):
        rows = coefs.to(ctype)
        c = [rows[:, j].repeat_interleave(inner)[:n] for j in range(rows.shape[1])]
    else:
        c = [float(v) for v in coefs]
    acc = torch.zeros(n, dtype=ctype, device=out.device)
    for j, t in enumerate(ins):
        acc += c[j] * t.reshape(-1).to(ctype)
    if noise_mode == NOISE_TENSOR:
        acc += c[len(ins)] * noise.reshape(-1).to(ctype)
    elif noise_mode == NOISE_PHILOX:
        from fastdiff.reference.rng import randn_torch

        acc += c[len(ins)] * randn_torch(seed, offset, n, out.device).to(ctype)
    out.copy_(acc.view(out.shape))


# --------------------------------------------------------------------------- the launchers
LAUNCHERS = Launchers("fused-step", {"cpp": "fastdiff.kernels.cpp:fused_step",
                                     "triton": "fastdiff.kernels.fused_step:fused_step",
                                     "cuda": "fastdiff._cuda:fused_step"}, torch=_fused_step_torch)
"""``{backend: launcher}``, each ``(out, ins, coefs, inner, noise_mode, noise, seed, offset[, start])``."""


def _inner(out, coefs) -> int:
    """Elements per coefficient row: ``n // R`` (all of them for scalar coefficients)."""
    return max(out.numel() // coefs.shape[0], 1) if isinstance(coefs, torch.Tensor) else max(out.numel(), 1)


def _run(out, ins, coefs, noise_mode, noise, seed, offset, backend):
    LAUNCHERS[backend](out, ins, coefs, _inner(out, coefs), noise_mode, noise, seed, offset)


# --------------------------------------------------------------------------- autograd
class _FusedStepFunction(torch.autograd.Function):
    """The fused step on a compiled backend, differentiable (flat tensors).  The step is affine,
    so with ``g = dL/d out`` and ``c_j`` row ``b``'s coefficient expanded over its elements::

        dL/d in_j = c_j * g,   dL/d noise = c_k * g,   dL/d c[b, j] = sum_{i in row b} g[i] in_j[i]

    (``in_k`` being the noise: the tensor, or the Philox draws regenerated by the same kernel).
    The inputs are saved only when the coefficients need a gradient."""

    @staticmethod
    def forward(ctx, backend, like, coefs, scalars, noise_mode, noise, seed, offset, *ins):
        res = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        _run(res, list(ins), coefs if coefs is not None else scalars, noise_mode, noise, seed, offset, backend)
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
    seeds: Optional[torch.Tensor],
    offset: int,
    backend: str,
) -> None:
    _run(out, ins, coefs if coefs is not None else scalar_coefs, noise_mode, noise,
         seeds if seeds is not None else seed, offset, backend)


@_fused_step_op.register_fake
def _(out, ins, coefs, scalar_coefs, noise_mode, noise, seed, seeds, offset, backend) -> None:
    return None


def _split(coefs: Coefs):
    """(tensor coefficients or None, scalar coefficients): the op's two typed arguments."""
    if isinstance(coefs, torch.Tensor):
        return coefs, []
    return None, [float(v) for v in coefs]


# --------------------------------------------------------------------------- the entry
def _fused_step(
    out: torch.Tensor,
    ins: Sequence[torch.Tensor],
    coefs: Coefs,
    *,
    noise: Optional[torch.Tensor] = None,
    seed: Union[int, torch.Tensor] = 0,
    offset: int = 0,
    philox: bool = False,
    backend: str,
) -> torch.Tensor:
    """``out = sum_j coefs[:, j] * ins[j] + coefs[:, k] * z`` in one pass (the module's contract).

    ``z`` is ``noise`` if given, else the Philox stream ``(seed, offset + i)`` if ``philox``
    (``seed`` a per-sample seed tensor: each sample's own stream, see the module's contract).
    ``backend`` is a concrete one, already chosen by :func:`fastdiff.dispatch.choose` (the choice is
    the caller's: an op module never imports the dispatcher, which imports the op modules).

    Private on purpose: the compiled kernels read and write through raw pointers, and only the
    public steps check shapes, dtypes, contiguity and lengths (a misuse here reads past the end of
    a buffer).  Public code calls :mod:`fastdiff.steps` instead.
    """
    if len(ins) > MAX_INPUTS:
        raise ValueError(f"ins: at most {MAX_INPUTS} inputs, got {len(ins)}")
    noise_mode = NOISE_TENSOR if noise is not None else (NOISE_PHILOX if philox else NOISE_NONE)
    if noise_mode == NOISE_PHILOX and offset % 4:
        raise ValueError(f"offset: the Philox window must start on a quad (multiple of 4), got {offset}")
    grad = _needs_grad(out, ins, coefs, noise)
    if torch.compiler.is_compiling():
        if grad:
            # the registered op has no autograd formula: traced code that needs a gradient runs the
            # pure torch step, which torch differentiates
            _fused_step_torch(out, ins, coefs, _inner(out, coefs), noise_mode, noise, seed, offset)
        else:
            seeds = seed if isinstance(seed, torch.Tensor) else None
            _fused_step_op(out, list(ins), *_split(coefs), noise_mode, noise, 0 if seeds is not None else seed,
                           seeds, offset, backend)
        return out
    if grad and backend != "torch":
        # the kernels write through raw pointers, invisible to autograd: run them inside an
        # autograd.Function on flat views (differentiable), then copy into out, so out= joins the
        # graph exactly as the torch backend's out.copy_ does
        flat = [t.view(-1) for t in ins]
        res = _FusedStepFunction.apply(backend, out.detach(), *_split(coefs), noise_mode,
                                       noise.view(-1) if noise is not None else None, seed, offset, *flat)
        out.copy_(res.view(out.shape))
        return out
    _run(out, ins, coefs, noise_mode, noise, seed, offset, backend)
    if backend != "torch":
        # the kernel wrote through a raw pointer, which autograd never sees: bump the version
        # counter as an in-place torch op would, so a tensor saved for backward and then
        # overwritten makes backward raise instead of using the new values
        torch.autograd.graph.increment_version(out)
    return out

"""The discrete Langevin flip: draw ``y' in {-1, 1}^n``, coordinates independent, in one pass.

Every move of the discrete samplers (:mod:`fastdiff.discrete`, docs/math.md section 7) is a product
proposal ``P(y'_i = +1) = sigmoid(l_i)`` with a logit affine in two tensors::

    out[i] = +1 if u_i < sigmoid(l_i) else -1,      l_i = a * score[i] + b * anchor[i],   i in [0, n)

with ``u_i`` the Philox *uniform* stream at ``(seed, offset + i)`` (fastdiff/reference/rng.py: word
``g % 4`` of quad ``g // 4``, Triton's ``tl.rand4x`` map).  The three users:

- one-stage discrete Langevin (Zhang et al. 2022): ``anchor = y``, ``score = s(y)``, ``a = 1``, ``b = 2 / eta``;
- the second stage of two-stage discrete Langevin: ``anchor = z``, ``score = s(z)``, ``a = 2``, ``b = 2 / eta``;
- binary-flip noise ``y = x o eps``, ``P(eps_i = +1) = sigmoid(2 alpha)``: ``anchor = x``, no score, ``b = 2 alpha``.

Contract (every backend; the public functions check it, nothing here does):

- ``out``, ``anchor``, ``score`` (or None: no score term): contiguous, ``n`` elements each, one device
  and one dtype (float32 for the kernels; any float dtype for torch), read and written as flat;
  ``out`` may be ``anchor`` or ``score`` exactly (elementwise), never a partial overlap.
- ``a``, ``b``: Python floats; ``offset % 4 == 0``; ``seed`` an int (no per-sample seeds).
- Math in float32 (the logit in float64 for float64 tensors under torch): ``sigmoid(l) = 1 / (1 + exp(-l))``.
  A NaN logit gives -1 (``u < NaN`` is false).  The uniforms are bitwise the same on every backend;
  ``sigmoid`` may differ by an ulp between them, so two backends can disagree only where ``u_i``
  lies within float rounding of ``sigmoid(l_i)`` (probability ~1e-7 per element).
- Every launcher returns ``bad``, the number of ``anchor`` entries not in {-1, +1}, counted in the
  same pass (an int, or a 0-d int tensor on the device for Triton): the public functions whose
  anchor is a state ``y`` or data ``x`` validate it without a second read of memory.

Layers: :func:`_discrete_flip` (the entry, a concrete backend already chosen), then one launcher
per backend (:data:`LAUNCHERS`): :func:`_flip_torch` here, ``fastdiff.kernels.cpp.discrete_flip``
(C++, csrc/discrete_langevin.cpp) and ``fastdiff.kernels.discrete_langevin.discrete_flip`` (Triton),
each ``(out, anchor, score, a, b, seed, offset)``.  No autograd: the output is a sample of a discrete law.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fastdiff.ops.table import CPU, CUDA, TORCH, Impl, Launchers, Op

__all__ = ["ROW", "LAUNCHERS"]

ROW = Op("discrete_langevin", what="discrete-Langevin flip", impls=(
    Impl("triton", CUDA, (torch.float32,), triton_module="discrete_langevin", limit="float32"),
    Impl("cpp", CPU, (torch.float32,), cpp_symbol="discrete_flip", limit="float32"),
    TORCH),
    auto={"cuda": ("triton",), "cpu": ("cpp",)}, soft=("dtype",),
    names=("auto", "triton", "cpp", "torch"))


def _flip_torch(out, anchor, score, a, b, seed, offset):
    """Pure torch, any device and float dtype: the contract's formula with the torch uniform stream."""
    from fastdiff.reference.rng import rand_torch

    ctype = torch.float64 if out.dtype == torch.float64 else torch.float32
    v = anchor.reshape(-1)
    bad = torch.count_nonzero((v != 1) & (v != -1))
    logit = float(b) * v.to(ctype)
    if score is not None:
        logit = logit + float(a) * score.reshape(-1).to(ctype)
    u = rand_torch(seed, offset, out.numel(), out.device).to(ctype)
    p = 1.0 / (1.0 + torch.exp(-logit))
    one = torch.ones((), dtype=out.dtype, device=out.device)
    out.copy_(torch.where(u < p, one, -one).view(out.shape))
    return bad


LAUNCHERS = Launchers("discrete-Langevin", {"cpp": "fastdiff.kernels.cpp:discrete_flip",
                                            "triton": "fastdiff.kernels.discrete_langevin:discrete_flip"},
                      torch=_flip_torch)
"""``{backend: launcher}``, each ``(out, anchor, score, a, b, seed, offset)``."""


def _discrete_flip(out: torch.Tensor, anchor: torch.Tensor, score: Optional[torch.Tensor], a: float, b: float,
                   *, seed: int, offset: int, backend: str, check: Optional[str] = None) -> torch.Tensor:
    """``out[i] = +1 if u_i < sigmoid(a score[i] + b anchor[i]) else -1`` (the module's contract).

    ``check``: an argument name: raise a ValueError naming it if ``anchor`` had entries not in
    {-1, +1} (counted by the kernel in its pass; ``out`` is then unspecified).  Private: the
    compiled kernels read and write through raw pointers; :mod:`fastdiff.discrete` checks shapes,
    dtypes, contiguity and the generator first."""
    if offset % 4:
        raise ValueError(f"offset: the Philox window must start on a quad (multiple of 4), got {offset}")
    if out.numel():
        bad = LAUNCHERS[backend](out, anchor, score, float(a), float(b), int(seed), int(offset))
        if check is not None and int(bad):
            raise ValueError(f"{check}: expected binary entries in {{-1, +1}}, got {int(bad)} other value(s)")
    return out

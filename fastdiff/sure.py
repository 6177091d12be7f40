"""Stein's unbiased risk estimate of a denoiser's error from noisy data alone (seed 004 eq. 7.6.1;
docs/math.md §8d).

For ``y = x + sigma g`` (``g ~ N(0, I_n)``) and any weakly differentiable ``f: R^n -> R^n``::

    E_g ||x - f(y)||^2 = E_g [ ||y - f(y)||^2 + 2 sigma^2 div f(y) ] - sigma^2 n

so ``SURE(y) = ||y - f(y)||^2 + 2 sigma^2 div f(y) - sigma^2 n`` is, per sample, an unbiased estimate
of the squared error, computed without ``x``.  The divergence ``div f = tr(df/dy)`` is either

- Hutchinson's estimate ``E_v[v^T (df/dy) v]`` with Rademacher probes ``v`` (``probes`` of them per
  sample), each ``v^T J v`` one vector-Jacobian product through ``f`` for the whole batch at once
  (``f`` acts row by row, so the gradient of ``sum_b <f(y)_b, v_b>`` is every row's ``v_b^T J_b``):
  matrix-free, any differentiable ``f``; or
- exact (``exact=True``) for the analytic denoisers: Gaussian ``sum_i alpha l_i / (alpha^2 l_i + sigma^2)``
  (here alpha = 1); MoLRG ``n A + <M, Ucat^T Ucat>`` from its closed-form Jacobian
  ``J = A I + Ucat M Ucat^T`` (docs/math.md §3), O(B D^2) with ``D = sum d_k``, never an n x n matrix.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastdiff._args import check_positive
from fastdiff.denoisers import Gaussian, MoLRG
from fastdiff.linalg.molrg_jacobian import _molrg_m, _molrg_parts

__all__ = ["sure", "SureResult", "divergence"]


class SureResult(NamedTuple):
    """``estimate`` (the mean of ``per_sample``), ``stderr`` (its standard error over the batch) and
    ``per_sample`` (B,) SURE values, each an unbiased estimate of that sample's ``||x - f(y)||^2``."""
    estimate: float
    stderr: float
    per_sample: torch.Tensor


def _exact_divergence(denoiser, y: torch.Tensor, sigma: float) -> torch.Tensor:
    if isinstance(denoiser, Gaussian):
        lam = denoiser.eigenvalues.to(y.device)
        return (lam / (lam + sigma * sigma)).sum().expand(y.shape[0]).to(torch.float64)
    if isinstance(denoiser, MoLRG):
        A, terms, U, _, _, dims = _molrg_parts(y, denoiser.bases, 1.0, sigma, denoiser.pi, denoiser.tau,
                                               denoiser.delta, denoiser.mode, None, None, "x0")
        M = _molrg_m(terms, dims)                                   # (B, D, D)
        G = U.T @ U                                                 # (D, D) cross Gram of the bases
        return y.shape[1] * A.expand(y.shape[0]) + (M * G).sum((1, 2))
    raise TypeError(f"denoiser: exact=True needs an analytic fastdiff.denoisers.Gaussian or MoLRG (a closed-form "
                    f"Jacobian trace), got {type(denoiser).__name__}; use the Hutchinson estimate (exact=False)")


def divergence(denoiser, y: torch.Tensor, sigma: float, *, probes: int = 1, exact: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``div f(y)`` (B,) float64 of ``f(y) = denoiser(y, 1, sigma)``: Hutchinson with ``probes`` Rademacher
    probes per sample (all samples in one vector-Jacobian product per probe), or exact (module docstring)."""
    if exact:
        return _exact_divergence(denoiser, y, sigma)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes: expected a positive int (Rademacher probes per sample), got {probes!r}")
    total = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    with torch.enable_grad():
        yi = y.detach().requires_grad_(True)
        out = denoiser(yi, 1.0, sigma)
        for p in range(probes):
            v = torch.randint(0, 2, y.shape, generator=generator, dtype=torch.int8).to(y.device, y.dtype) * 2 - 1
            (vj,) = torch.autograd.grad(out, yi, v, retain_graph=p + 1 < probes)
            total += (vj * v).sum(1).double()
    return total / probes


def sure(denoiser, y: torch.Tensor, sigma: float, *, probes: int = 1, exact: bool = False,
         generator=None) -> SureResult:
    """SURE (seed 004 eq. 7.6.1) of ``f(y) = denoiser(y, 1, sigma)`` on noisy data ``y = x + sigma g`` (B, n).

    denoiser: any callable ``denoiser(x, alpha, sigma)`` differentiable in x (Hutchinson), or a
    :class:`fastdiff.denoisers.Gaussian` / :class:`~fastdiff.denoisers.MoLRG` with ``exact=True``.
    probes: Rademacher probes per sample (their variance is part of ``stderr``).  generator: a
    ``torch.Generator`` or an int seed for the probes.  Returns :class:`SureResult`; its ``estimate``
    estimates ``E ||x - f(y)||^2`` (per sample, summed over the n coordinates).
    """
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.ndim != 2:
        raise ValueError(f"y: expected a floating-point (B, n) tensor of noisy samples, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.shape[0] < 2:
        raise ValueError(f"y: expected at least 2 samples (the standard error needs them), got {y.shape[0]}")
    sigma = check_positive("sigma", sigma)
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable denoiser(x, alpha, sigma), got {type(denoiser).__name__}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    with torch.no_grad():
        f = denoiser(y, 1.0, sigma)
    if not isinstance(f, torch.Tensor) or f.shape != y.shape:
        raise ValueError(f"denoiser: expected an output of shape {tuple(y.shape)}, got {getattr(f, 'shape', None)}")
    div = divergence(denoiser, y, sigma, probes=probes, exact=exact, generator=generator)
    n = y.shape[1]
    per = (y.double() - f.double()).square().sum(1) + 2 * sigma * sigma * div - sigma * sigma * n
    return SureResult(float(per.mean()), float(per.std() / math.sqrt(per.numel())), per)

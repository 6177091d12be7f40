"""Conditional denoisers in closed form for the analytic models (seed 004 Sec. 7.3-7.5; docs/math.md §8c):
classifier guidance with the exact class posterior, the ambient-diffusion consistency step, and the
denoising process driven by linear measurements only.

Each is a denoiser ``den(x, alpha, sigma) -> x0`` that :func:`fastdiff.sample` runs on its one loop
(its progress bar and :class:`fastdiff.Generator`), e.g. ``fastdiff.sample(ClassifierGuided(m, y, 2.0), x,
schedule, "ddim")``; the VE Euler step ``x' = (s'/s) x + (1 - s'/s) D(x)`` *is* eq. 7.3.8 with
``gamma_t = sigma_{t-s} / sigma_t`` when ``D`` is :class:`AmbientDenoiser`, and is eq. 7.5.8 when
``D`` is :class:`LinearMeasurementDenoiser`.

- Classifier guidance (eq. 7.4.10): ``x0_CG = E[x0 | x_t] + gamma (sigma^2/alpha) grad log p(y | x_t)``
  with the exact class posterior ``p(y | x_t)`` of a MoLRG or Gaussian mixture as the classifier, its
  gradient by autograd.  By eq. 7.4.14 it equals ``(1 - gamma) E[x0 | x_t] + gamma E[x0 | x_t, y]``.
- Ambient diffusion (eq. 7.3.8): ``E[X_0 | A X_t, A]`` for mixture components ``N(mu_k, Sigma_k)``::

      S_k = alpha^2 A Sigma_k A^T + sigma^2 A A^T,  r_k = A x - alpha A mu_k
      w   = softmax_k(log pi_k + log N(r_k; 0, S_k)),  E = sum_k w_k (mu_k + alpha Sigma_k A^T S_k^{-1} r_k)

  ``A`` a (p, n) matrix, or a boolean mask (n,) / per-sample (B, n) (observed coordinates): the
  masked rows then carry an identity block, which leaves the weights and means unchanged.
- Linear measurements only (eq. 7.5.8): ``x <- x + s t A^+ grad log p_t(A x)``, ``p_t`` the law of
  ``y_t = A x_0 + t g``.  With ``D_y`` the posterior-mean denoiser of ``y_0 = A x_0`` (for an analytic
  model: :func:`measurement_prior`) Tweedie gives ``t^2 grad log p_t(y) = D_y(y) - y``, so the x-space
  denoiser ``D(x) = x + A^+ (D_y(A x) - A x)`` turns the Euler step into eq. 7.5.8.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fastdiff._args import _check_x, _per_sample
from fastdiff.denoisers import MoLRG
from fastdiff.denoisers.gmm import GaussianMixture, mixture_components
from fastdiff.denoisers.molrg import molrg_params
from fastdiff.ops.molrg import segment_ops

__all__ = ["class_log_posterior", "ClassifierGuided", "ambient_posterior_mean", "AmbientDenoiser",
           "consistency_step", "measurement_prior", "LinearMeasurementDenoiser"]


# =========================================================================== classifier guidance
def class_log_posterior(den, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """``log p(k | x_t)`` (B, K) of a MoLRG (the softmax of its posterior, seed 002 eq. 9) or a
    :class:`fastdiff.denoisers.GaussianMixture`; differentiable in ``x`` (the exact classifier)."""
    if isinstance(den, GaussianMixture):
        return den.log_posterior(x, alpha, sigma)
    if isinstance(den, MoLRG):
        x = _check_x(x)
        K = den.K
        params = molrg_params(alpha, sigma, den.dims, den.pi, den.tau, den.delta, "x0", None, x.shape[0], x.device)
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        reduce, _ = segment_ops(den.dims, x.device)
        e = reduce((x.to(ct) @ den.ucat.to(x.device, ct)).square())                 # ||U_k^T x||^2 (B, K)
        logits = params[:, K:2 * K].to(ct) + params[:, :K].to(ct) * e
        return torch.log_softmax(logits, dim=-1)
    raise TypeError(f"denoiser: expected a fastdiff.denoisers.MoLRG or GaussianMixture (an exact class posterior), "
                    f"got {type(den).__name__}")


class ClassifierGuided:
    """Classifier guidance (seed 004 eq. 7.4.10) with inverse temperature ``gamma`` and the exact class
    posterior as the classifier: ``den(x) + gamma sigma^2/alpha grad_x log p(labels | x_t)``.

    den: a MoLRG or GaussianMixture.  labels: (B,) ints or one int.  gamma >= 0 (1: eq. 7.4.9, the
    exact conditional posterior mean ``E[x0 | x_t, y]``)."""

    def __init__(self, den, labels, gamma: float = 1.0):
        if not isinstance(den, (MoLRG, GaussianMixture)):
            raise TypeError(f"den: expected a fastdiff.denoisers.MoLRG or GaussianMixture, got {type(den).__name__}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma: expected a finite inverse temperature >= 0, got {gamma!r}")
        lab = torch.as_tensor(labels).reshape(-1)
        if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.numel() == 0 or \
                bool(((lab < 0) | (lab >= den.K)).any()):
            raise ValueError(f"labels: expected integer class labels in [0, {den.K}), got {labels!r}")
        self.den, self.labels, self.gamma = den, lab.long(), float(gamma)
        self.n = den.n

    def guidance_gradient(self, x, alpha, sigma) -> torch.Tensor:
        """``grad_x log p(labels | x_t)`` (B, n)."""
        lab = self.labels.to(x.device).expand(x.shape[0]) if self.labels.numel() == 1 else self.labels.to(x.device)
        if lab.numel() != x.shape[0]:
            raise ValueError(f"labels: expected one label or {x.shape[0]} (one per sample), got {lab.numel()}")
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            lp = class_log_posterior(self.den, xi, alpha, sigma)
            (g,) = torch.autograd.grad(lp.gather(1, lab[:, None]).sum(), xi)
        return g

    def __call__(self, x, alpha, sigma, **kwargs):
        B = x.shape[0]
        a = _per_sample("alpha", alpha, B, x.device)[:, None]
        s = _per_sample("sigma", sigma, B, x.device)[:, None]
        with torch.no_grad():
            x0 = self.den(x, alpha, sigma)
        if self.gamma == 0.0:
            return x0
        return x0 + (self.gamma * s * s / a).to(x.dtype) * self.guidance_gradient(x, alpha, sigma).to(x.dtype)


# =========================================================================== ambient diffusion
def _operator(A, x: torch.Tensor, n: int):
    """``("matrix", A (p, n) float64)`` or ``("mask", m (B or 1, n) float64)``, validated."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a (p, n) matrix or a boolean mask (n,) / (B, n), got {type(A).__name__}")
    if A.dtype == torch.bool:
        m = A.reshape(1, -1) if A.ndim == 1 else A
        if m.ndim != 2 or m.shape[1] != n or m.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"A: expected a boolean mask of shape ({n},) or ({x.shape[0]}, {n}), got {tuple(A.shape)}")
        return "mask", m.to(x.device, torch.float64)
    if not A.is_floating_point() or A.ndim != 2 or A.shape[1] != n or A.shape[0] < 1:
        raise ValueError(f"A: expected a floating-point (p, {n}) measurement matrix (n = {n} columns, like x), "
                         f"got {A.dtype} of shape {tuple(A.shape)}")
    return "matrix", A.detach().to(x.device, torch.float64)


def ambient_posterior_mean(den, x: torch.Tensor, A, alpha, sigma) -> torch.Tensor:
    """``E[X_0 | A X_t, A]`` (B, n) at ``X_t = x`` (B, n) for ``X_t = alpha X_0 + sigma G`` and an analytic
    model ``den`` (Gaussian, MoLRG or GaussianMixture): the closed form of the module docstring, in float64.
    A: (p, n) full-row-rank matrix, or a boolean mask (n,) / (B, n) of observed coordinates."""
    x = _check_x(x)
    pi, mu, covs = mixture_components(den)
    B, n = x.shape
    if mu.shape[1] != n:
        raise ValueError(f"x: expected shape (B, {mu.shape[1]}) for this model, got {tuple(x.shape)}")
    kind, op = _operator(A, x, n)
    dev = x.device
    pi, mu, covs = pi.to(dev), mu.to(dev), covs.to(dev)
    a = _per_sample("alpha", alpha, B, dev)[:, None, None]           # (R, 1, 1)
    s = _per_sample("sigma", sigma, B, dev)[:, None, None]
    x64 = x.double()
    logits, means = [], []
    for k in range(pi.numel()):
        if kind == "matrix":
            ASA = op @ covs[k] @ op.T                                  # (p, p)
            S = a * a * ASA + s * s * (op @ op.T)                      # (R, p, p)
            r = x64 @ op.T - (a[:, :, 0] * (op @ mu[k]))               # (B, p)
            SAt = covs[k] @ op.T                                       # (n, p)
        else:
            D = op[:, :, None] * op[:, None, :]                        # (M, n, n): D Sigma D's support
            # unobserved coordinates get an identity block: r is 0 there, so neither w nor the means move
            S = a * a * covs[k] * D + s * s * torch.diag_embed(op) + torch.diag_embed(1 - op)
            r = op * (x64 - a[:, :, 0] * mu[k])                        # (B, n), 0 where unobserved
            SAt = None
        S = S.expand(B, *S.shape[1:]) if S.shape[0] == 1 else S
        L = torch.linalg.cholesky(S)
        sol = torch.cholesky_solve(r[:, :, None], L)[:, :, 0]          # S^{-1} r
        logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
        logits.append(torch.log(pi[k]) - 0.5 * logdet - 0.5 * (r * sol).sum(1))
        if kind == "matrix":
            means.append(mu[k] + a[:, :, 0] * (sol @ SAt.T))
        else:
            means.append(mu[k] + a[:, :, 0] * ((op * sol) @ covs[k].T))
    w = torch.softmax(torch.stack(logits, 1), 1)                        # (B, K)
    out = (w[:, :, None] * torch.stack(means, 1)).sum(1)
    return out.to(x.dtype)


class AmbientDenoiser:
    """``x -> E[X_0 | A x, A]`` (:func:`ambient_posterior_mean`) as a denoiser: an Euler run of
    :func:`fastdiff.sample` over it is the ambient-diffusion sampler of seed 004 eq. 7.3.8."""

    def __init__(self, den, A):
        mixture_components(den)  # a TypeError for a model without a closed form
        self.den, self.A = den, A
        self.n = den.n

    def __call__(self, x, alpha, sigma, **kwargs):
        return ambient_posterior_mean(self.den, x, self.A, alpha, sigma)


def consistency_step(x: torch.Tensor, den, A, sigma: float, sigma_next: float) -> torch.Tensor:
    """One step of seed 004 eq. 7.3.8 on the VE path: ``gamma x + (1 - gamma) E[X_0 | A x, A]`` with
    ``gamma = sigma_next / sigma`` (the DDIM / Euler coefficient of the step sigma -> sigma_next)."""
    if not (isinstance(sigma, (int, float)) and isinstance(sigma_next, (int, float)) and sigma > 0
            and 0 <= sigma_next < sigma and math.isfinite(sigma)):
        raise ValueError(f"sigma, sigma_next: expected 0 <= sigma_next < sigma, got {sigma!r}, {sigma_next!r}")
    g = sigma_next / sigma
    return g * x + (1 - g) * ambient_posterior_mean(den, x, A, 1.0, sigma)


# =========================================================================== linear measurements only
def measurement_prior(den, A: torch.Tensor) -> GaussianMixture:
    """The law of ``y_0 = A x_0`` for an analytic model: ``sum_k pi_k N(A mu_k, A Sigma_k A^T)`` (its
    posterior-mean denoiser is the ``D_y`` of eq. 7.5.8)."""
    pi, mu, covs = mixture_components(den)
    if not isinstance(A, torch.Tensor) or A.ndim != 2 or A.shape[1] != mu.shape[1] or not A.is_floating_point():
        raise ValueError(f"A: expected a floating-point (p, {mu.shape[1]}) measurement matrix, got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    A64 = A.detach().double().cpu()
    cov_y = A64 @ covs @ A64.T
    return GaussianMixture(mu @ A64.T, (cov_y + cov_y.transpose(1, 2)) / 2, pi)


class LinearMeasurementDenoiser:
    """The x-space denoiser ``D(x) = x + A^+ (D_y(A x) - A x)`` of seed 004 eq. 7.5.8 (VE, alpha = 1):
    an Euler run of :func:`fastdiff.sample` over it moves ``x`` by ``s t A^+ grad log p_t(A x)`` per step.

    A: (p, n) full row rank.  y_denoiser: ``D_y(y, alpha, sigma)`` on (B, p) measurements (learned
    from measurements alone, or :func:`measurement_prior` of an analytic model)."""

    def __init__(self, A: torch.Tensor, y_denoiser: Callable):
        if not isinstance(A, torch.Tensor) or A.ndim != 2 or not A.is_floating_point() or A.shape[0] > A.shape[1]:
            raise ValueError(f"A: expected a floating-point (p, n) matrix with p <= n (under-determined), got "
                             f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
        if not callable(y_denoiser):
            raise TypeError(f"y_denoiser: expected a callable D_y(y, alpha, sigma), got {type(y_denoiser).__name__}")
        self.A = A.detach().double()
        self.pinv = torch.linalg.pinv(self.A)                           # (n, p)
        self.y_denoiser, self.n = y_denoiser, A.shape[1]

    def __call__(self, x, alpha, sigma, **kwargs):
        if isinstance(alpha, torch.Tensor) or alpha != 1.0:
            raise ValueError(f"alpha: eq. 7.5.8 is a VE process (alpha = 1), got {alpha!r}")
        x = _check_x(x)
        if x.shape[1] != self.n:
            raise ValueError(f"x: expected shape (B, {self.n}) (A has {self.n} columns), got {tuple(x.shape)}")
        A, P = self.A.to(x.device, x.dtype), self.pinv.to(x.device, x.dtype)
        y = x @ A.T
        return x + (self.y_denoiser(y, 1.0, sigma) - y) @ P.T

"""The Gaussian-mixture denoiser: posterior mean of ``sum_k pi_k N(mu_k, Sigma_k)`` data (docs/math.md §7).

For ``x_t = alpha x_0 + sigma eps`` each component is a Gaussian denoiser, and the components are
mixed by the exact class posterior (Bayes' rule on the Gaussian marginals of ``x_t``)::

    M_k      = alpha^2 Sigma_k + sigma^2 I                         (the covariance of x_t | k)
    logit_k  = log pi_k + log N(x; alpha mu_k, M_k)
    mean_k   = mu_k + alpha Sigma_k M_k^{-1} (x - alpha mu_k)      (E[x_0 | x_t, k])
    x0_hat   = sum_k softmax(logit)_k mean_k

computed in each component's eigenbasis ``Sigma_k = V_k diag(l_k) V_k^T`` (once, at construction).
:func:`mixture_components` gives the same ``(pi, mu, Sigma)`` description of a
:class:`fastdiff.denoisers.Gaussian` or :class:`fastdiff.denoisers.MoLRG`, so the closed forms of
:mod:`fastdiff.conditional` and :mod:`fastdiff.multimeasurement` take any of the three.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from fastdiff._args import OUTPUTS, _check_finite, _check_x, _per_sample, _torch_generator
from fastdiff._interop import accepts_arrays
from fastdiff.denoisers.gaussian import Gaussian, psd_eigenvalues
from fastdiff.denoisers.molrg import MoLRG

__all__ = ["GaussianMixture", "mixture_components"]


class GaussianMixture:
    """``sum_k pi_k N(mu_k, Sigma_k)`` in ``R^n``, callable as its posterior-mean denoiser.

    means: (K, n).  cov: a number (every ``Sigma_k = cov I``, the talk's ``tau^2 I``), (K,) per-component
    variances (``Sigma_k = cov_k I``) or (K, n, n) covariances.  pi: (K,) weights summing to 1
    (uniform).  Computed in float64 when ``x`` is float64, else float32 (the coefficients in float64).
    """

    def __init__(self, means, cov=1.0, pi=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[0] < 1:
            raise ValueError(f"means: expected shape (K, n), got {tuple(means.shape)}")
        _check_finite("means", means)
        K, n = means.shape
        cov = torch.as_tensor(cov, dtype=torch.float64)
        _check_finite("cov", cov)
        if cov.ndim == 0 or (cov.ndim == 1 and cov.numel() == K):
            v = cov.reshape(-1).expand(K)
            if not bool((v > 0).all()):
                raise ValueError("cov: expected positive component variances")
            covs = v[:, None, None] * torch.eye(n, dtype=torch.float64)
        elif cov.shape == (K, n, n):
            if not torch.allclose(cov, cov.transpose(1, 2)):
                raise ValueError("cov: expected symmetric (K, n, n) covariances")
            covs = cov.clone()
        else:
            raise ValueError(f"cov: expected a number, ({K},) variances or ({K}, {n}, {n}) covariances, "
                             f"got shape {tuple(cov.shape)}")
        if pi is None:
            pi = torch.full((K,), 1.0 / K, dtype=torch.float64)
        pi = torch.as_tensor(pi, dtype=torch.float64).reshape(-1)
        if pi.numel() != K:
            raise ValueError(f"pi: expected {K} mixing weights (one per component), got {pi.numel()}")
        if not bool(torch.isfinite(pi).all()) or bool((pi < 0).any()) or abs(float(pi.sum()) - 1.0) > 1e-6:
            raise ValueError("pi: expected finite non-negative mixing weights summing to 1")
        self.means, self.covs, self.pi = means, covs, pi
        self.K, self.n = K, n
        lam, V = torch.linalg.eigh(covs)
        self.eigenvalues = torch.stack([psd_eigenvalues(l_k) for l_k in lam])
        self.eigenvectors = V
        # isotropic components (the talk's tau^2 I) need no change of basis: c = x - alpha mu
        self.isotropic = bool((covs == covs[:, :1, :1] * torch.eye(n, dtype=torch.float64)).all())
        if self.isotropic:
            self.eigenvalues = covs[:, 0, 0][:, None].expand(K, n).clone()

    # ------------------------------------------------------------------ the posterior
    def _terms(self, x, alpha, sigma):
        """(logits (B, K), component means (B, K, n)) in x's compute dtype."""
        x = _check_x(x)
        if x.shape[1] != self.n:
            raise ValueError(f"x: expected shape (B, {self.n}) for this mixture, got {tuple(x.shape)}")
        B, dev = x.shape[0], x.device
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        a = _per_sample("alpha", alpha, B, dev)[:, None, None]                # (R, 1, 1)
        s = _per_sample("sigma", sigma, B, dev)[:, None, None]
        lam = self.eigenvalues.to(dev)[None]                                   # (1, K, n)
        var = a * a * lam + s * s                                              # (R, K, n)
        gain = (a * lam / var).to(ct)
        mu = self.means.to(dev, ct)
        r = x.to(ct)[:, None, :] - a.to(ct) * mu[None]                         # (B, K, n)
        if self.isotropic:
            c = r
        else:
            V = self.eigenvectors.to(dev, ct)
            c = torch.bmm(r.transpose(0, 1), V).transpose(0, 1)                # eigen-coordinates
        logits = (torch.log(self.pi.to(dev))[None] - 0.5 * torch.log(2 * math.pi * var).sum(-1)).to(ct) \
            - 0.5 * (c * c / var.to(ct)).sum(-1)
        gc = gain * c
        if not self.isotropic:
            gc = torch.bmm(gc.transpose(0, 1), V.transpose(1, 2)).transpose(0, 1)
        return logits, mu[None] + gc

    def _isotropic_mean(self, x, alpha, sigma):
        """(posterior weights (B, K), E[x_0 | x_t] (B, n)) for isotropic components without any (B, K, n)
        intermediate: ``||x - alpha mu_k||^2 = ||x||^2 - 2 alpha <x, mu_k> + alpha^2 ||mu_k||^2`` (one GEMM)
        and ``E = (sum_k w_k g_k) x + sum_k w_k (1 - alpha g_k) mu_k`` (another), g_k = alpha l_k / v_k."""
        x = _check_x(x)
        if x.shape[1] != self.n:
            raise ValueError(f"x: expected shape (B, {self.n}) for this mixture, got {tuple(x.shape)}")
        B, dev, n = x.shape[0], x.device, self.n
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        a = _per_sample("alpha", alpha, B, dev)[:, None]                       # (R, 1)
        s = _per_sample("sigma", sigma, B, dev)[:, None]
        lam = self.eigenvalues[:, 0].to(dev)[None]                             # (1, K)
        v = a * a * lam + s * s                                                # (R, K)
        gain = a * lam / v
        mu = self.means.to(dev, ct)
        xc = x.to(ct)
        sq = (xc * xc).sum(1, keepdim=True)                                    # (B, 1)
        cross = xc @ mu.T                                                      # (B, K)
        mu2 = (self.means.to(dev) ** 2).sum(1)[None]                           # (1, K)
        logits = (torch.log(self.pi.to(dev))[None] - 0.5 * n * torch.log(2 * math.pi * v)).to(ct) \
            - (sq - 2 * a.to(ct) * cross + (a * a * mu2).to(ct)) / (2 * v).to(ct)
        w = torch.softmax(logits, dim=-1)
        out = (w * (1 - a * gain).to(ct)) @ mu
        out.addcmul_((w * gain.to(ct)).sum(1, keepdim=True), xc)
        return w, out

    def log_posterior(self, x, alpha, sigma) -> torch.Tensor:
        """``log p(k | x_t)`` (B, K): the exact classifier of the noisy data (differentiable in x)."""
        logits, _ = self._terms(x, alpha, sigma)
        return torch.log_softmax(logits, dim=-1)

    @accepts_arrays
    def __call__(self, x, alpha, sigma, *, labels=None, guidance=None, output: str = "x0",
                 return_weights: bool = False, **kwargs):
        """``E[x_0 | x_t]`` (B, n); with ``labels`` (B,) and ``guidance`` w the guided mean
        ``(1 - w) E[x_0 | x_t] + w E[x_0 | x_t, y]`` (seed 004 eq. 7.4.14)."""
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        if self.isotropic and labels is None:
            w, out = self._isotropic_mean(x, alpha, sigma)
        else:
            logits, means = self._terms(x, alpha, sigma)
            w = torch.softmax(logits, dim=-1)
            out = (w[..., None] * means).sum(1)
        if labels is not None:
            if guidance is None:
                raise ValueError("guidance: required with labels (the guidance weight w)")
            lab = torch.as_tensor(labels, device=x.device).reshape(-1).long()
            if lab.numel() not in (1, x.shape[0]) or bool(((lab < 0) | (lab >= self.K)).any()):
                raise ValueError(f"labels: expected (B,) integers in [0, {self.K})")
            cond = means[torch.arange(x.shape[0], device=x.device), lab.expand(x.shape[0])]
            gw = _per_sample("guidance", guidance, x.shape[0], x.device, positive=False)[:, None].to(out.dtype)
            out = (1 - gw) * out + gw * cond
        out = out.to(x.dtype)
        if output != "x0":
            B = x.shape[0]
            a = _per_sample("alpha", alpha, B, x.device)[:, None].to(x.dtype)
            s = _per_sample("sigma", sigma, B, x.device)[:, None].to(x.dtype)
            eps = (x - a * out) / s
            out = eps if output == "eps" else -eps / s
        return (out, w.detach()) if return_weights else out

    def component_mean(self, x, alpha, sigma, labels) -> torch.Tensor:
        """``E[x_0 | x_t, y]`` (B, n): the posterior mean of component ``labels`` (B,) alone."""
        _, means = self._terms(x, alpha, sigma)
        lab = torch.as_tensor(labels, device=x.device).reshape(-1).long().expand(x.shape[0])
        return means[torch.arange(x.shape[0], device=x.device), lab].to(x.dtype)

    def sample(self, N: int, generator=None, *, return_labels: bool = False):
        """``N`` draws (N, n) float64 (and their components with ``return_labels``)."""
        if isinstance(N, bool) or not isinstance(N, int) or N < 0:
            raise ValueError(f"N: expected a non-negative int, got {N!r}")
        gen = _torch_generator(generator, "cpu")
        labels = torch.multinomial(self.pi, N, replacement=True, generator=gen) if N else \
            torch.zeros(0, dtype=torch.long)
        z = torch.randn(N, self.n, generator=gen, dtype=torch.float64)
        root = self.eigenvectors * self.eigenvalues.sqrt()[:, None, :]           # V diag(sqrt l)
        x = self.means[labels] + torch.einsum("bm,bnm->bn", z, root[labels])
        return (x, labels) if return_labels else x

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, n={self.n})"


def mixture_components(den) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pi (K,), mu (K, n), Sigma (K, n, n))`` float64 of a Gaussian, MoLRG or GaussianMixture
    (MoLRG component k: ``Sigma_k = tau_k^2 U_k U_k^T + delta^2 I``, mean 0)."""
    if isinstance(den, GaussianMixture):
        return den.pi, den.means, den.covs
    if isinstance(den, Gaussian):
        return torch.ones(1, dtype=torch.float64), den.mean[None], den.cov[None]
    if isinstance(den, MoLRG):
        eye = torch.eye(den.n, dtype=torch.float64)
        covs = torch.stack([float(t) ** 2 * (U.double().cpu() @ U.double().cpu().T) + den.delta ** 2 * eye
                            for U, t in zip(den.bases, den.tau)])
        return den.pi.double().cpu(), torch.zeros(den.K, den.n, dtype=torch.float64), covs
    raise TypeError(f"denoiser: expected a fastdiff.denoisers.Gaussian, MoLRG or GaussianMixture (an analytic "
                    f"model with a closed form), got {type(den).__name__}")


def as_mixture(den) -> GaussianMixture:
    """Any analytic model as a :class:`GaussianMixture` (itself if it is one)."""
    if isinstance(den, GaussianMixture):
        return den
    pi, mu, covs = mixture_components(den)
    return GaussianMixture(mu, covs, pi)

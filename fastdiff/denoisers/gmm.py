"""Gaussian mixtures with full, diagonal or low-rank-plus-isotropic covariances: the exact posterior.

Data ``x_0 ~ sum_k pi_k N(mu_k, Sigma_k)`` observed as ``x_t = alpha x_0 + sigma eps``.  Then
``x_t | k ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` and, per component, in the eigenbasis
``Sigma_k = V_k diag(lam_k) V_k^T + delta_k^2 (I - V_k V_k^T)`` (V_k: n x r_k orthonormal; a full
covariance has r_k = n, a low-rank-plus-isotropic one r_k = r and floor delta_k), with
``r = x - alpha mu_k``, ``z = V_k^T r``, ``c = alpha^2 lam + sigma^2``, ``f = alpha^2 delta^2 + sigma^2``:

    log N_k(x) = -(1/2) [ sum_j z_j^2 / c_j + (||r||^2 - ||z||^2) / f + sum_j log c_j + (n - r_k) log f + n log 2 pi ]
    w_k(x)     = softmax_k( log pi_k + log N_k(x) )                      (the responsibilities)
    E[x_0 | x, k] = mu_k + V_k (alpha lam / c * z) + (alpha delta^2 / f) (r - V_k z)
    x0_hat     = sum_k w_k E[x_0 | x, k],   log p_t(x) = LSE_k(log pi_k + log N_k(x)),
    score      = (alpha x0_hat - x) / sigma^2                            (Tweedie)

(docs/math.md section 2; the MoLRG of seed 002 is the case mu = 0, lam = tau^2, delta the floor.)
The eigendecomposition is done once, when the mixture is built; a call is two batched GEMMs
(B, K, n) x (K, n, r) and elementwise work, where the formulation a user writes (a
``MultivariateNormal`` per component, a Cholesky of ``alpha^2 Sigma_k + sigma^2 I`` and a solve
per call) refactors every covariance at every noise level.  A diagonal mixture is all elementwise.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastdiff._args import OUTPUTS, _check_x, _per_sample, _torch_generator
from fastdiff._interop import accepts_arrays
from fastdiff.denoisers.gaussian import Gaussian
from fastdiff.denoisers.molrg import MoLRG

__all__ = ["GaussianMixture", "MixturePosterior", "mixture_components", "as_mixture"]


class MixturePosterior(NamedTuple):
    x0: torch.Tensor              # (B, n) posterior mean
    score: torch.Tensor           # (B, n) grad log p_t(x)
    logp: torch.Tensor            # (B,) log p_t(x)
    responsibilities: torch.Tensor  # (B, K) posterior component probabilities


def _check_matrix(name, t, shape_text, ndim):
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor {shape_text}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values")


class GaussianMixture:
    """``sum_k pi_k N(mu_k, Sigma_k)`` with exactly one covariance form:

    - ``covs`` (K, n, n): full symmetric PSD covariances (eigendecomposed once, float64);
    - ``diag`` (K, n): diagonal covariances;
    - ``bases`` (K, n, r) orthonormal columns with ``eigenvalues`` (K, r) and an isotropic ``floor``
      delta (a scalar or (K,)): ``U diag(lam) U^T + delta^2 (I - U U^T)``.

    ``covs`` may also be a number (every ``Sigma_k = v I``) or (K,) per-component variances.
    ``means`` (K, n); ``pi`` (K,) mixing weights, normalised here (default uniform).  Callable as
    ``gmm(x, alpha, sigma, output="x0")``; :meth:`posterior` returns every output at once;
    :meth:`sample` draws ``x_0``.
    """

    def __init__(self, means, covs=None, pi=None, *, diag=None, bases=None, eigenvalues=None, floor=0.0):
        means = torch.as_tensor(means) if not isinstance(means, torch.Tensor) else means
        if not means.is_floating_point():
            means = means.double()
        _check_matrix("means", means, "(K, n)", 2)
        K, n = means.shape
        if covs is not None and not (isinstance(covs, torch.Tensor) and covs.ndim == 3):
            # a number (every Sigma_k = v I, seed 003's tau^2 I) or (K,) per-component variances
            v = torch.as_tensor(covs, dtype=torch.float64).reshape(-1)
            if v.numel() not in (1, K) or not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise ValueError(f"covs: expected a variance >= 0, ({K},) variances or ({K}, {n}, {n}) covariances, "
                                 f"got {tuple(v.shape)}")
            covs, diag = None, v.expand(K)[:, None].expand(K, n).to(means.dtype)
        given = [v is not None for v in (covs, diag, bases)]
        if sum(given) != 1:
            raise ValueError("covariance: expected exactly one of covs=, diag= or bases= (with eigenvalues=)")
        f64 = torch.float64
        self.means = means.to(f64)
        self.dtype = means.dtype
        self.K, self.n = K, n
        if covs is not None:
            _check_matrix("covs", covs, f"(K, n, n) = ({K}, {n}, {n})", 3)
            if covs.shape != (K, n, n):
                raise ValueError(f"covs: expected shape ({K}, {n}, {n}), got {tuple(covs.shape)}")
            c = covs.to(f64)
            if not torch.allclose(c, c.mT, rtol=1e-6, atol=1e-8 * float(c.abs().max().clamp(min=1e-300))):
                raise ValueError("covs: expected symmetric matrices")
            lam, V = torch.linalg.eigh((c + c.mT) / 2)
            tol = max(1e-10, 4 * n * torch.finfo(covs.dtype).eps) * lam.abs().amax(-1, keepdim=True)
            if bool((lam < -tol).any()):
                raise ValueError(f"covs: expected positive semi-definite matrices (an eigenvalue is {float(lam.min()):.3g})")
            self.form, self.V, self.lam, self.floor = "eigen", V, lam.clamp(min=0), torch.zeros(K, dtype=f64)
        elif diag is not None:
            _check_matrix("diag", diag, f"(K, n) = ({K}, {n})", 2)
            if diag.shape != (K, n) or bool((diag < 0).any()):
                raise ValueError(f"diag: expected non-negative variances of shape ({K}, {n}), got {tuple(diag.shape)}")
            self.form, self.V, self.lam, self.floor = "diag", None, diag.to(f64), torch.zeros(K, dtype=f64)
        else:
            _check_matrix("bases", bases, f"(K, n, r) with K = {K}, n = {n}", 3)
            if bases.shape[:2] != (K, n) or bases.shape[2] > n:
                raise ValueError(f"bases: expected shape ({K}, {n}, r) with r <= {n}, got {tuple(bases.shape)}")
            U = bases.to(f64)
            eye = torch.eye(U.shape[2], dtype=f64)
            if not torch.allclose(U.mT @ U, eye.expand_as(U.mT @ U), atol=1e-5):
                raise ValueError("bases: expected orthonormal columns (U^T U = I)")
            if eigenvalues is None:
                raise ValueError("eigenvalues: expected (K, r) variances along the bases")
            lam = torch.as_tensor(eigenvalues, dtype=f64)
            if lam.shape != U.shape[::2] or bool((lam < 0).any()) or not bool(torch.isfinite(lam).all()):
                raise ValueError(f"eigenvalues: expected finite non-negative values of shape ({K}, {U.shape[2]}), "
                                 f"got {tuple(lam.shape)}")
            fl = torch.as_tensor(floor, dtype=f64).expand(K).clone()
            if bool((fl < 0).any()) or not bool(torch.isfinite(fl).all()):
                raise ValueError("floor: expected a finite delta >= 0 (a scalar or (K,))")
            self.form, self.V, self.lam, self.floor = "eigen", U, lam, fl
        # every Sigma_k = v_k I: the posterior needs no (B, K, n) intermediate (one GEMM, _isotropic)
        self.isotropic = self.form == "diag" and bool((self.lam == self.lam[:, :1]).all())
        if pi is None:
            w = torch.full((K,), 1.0 / K, dtype=f64)
        else:
            w = torch.as_tensor(pi, dtype=f64).reshape(-1)
            if w.shape != (K,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or abs(float(w.sum()) - 1) > 1e-6:
                raise ValueError(f"pi: expected {K} finite non-negative mixing weights summing to 1 (one per component), "
                                 f"got {w.tolist()}")
        self.pi = w / w.sum()
        self.log_weights = self.pi.log()     # -inf for an empty component: it never wins the softmax
        self._cast = {}

    @property
    def covs(self) -> torch.Tensor:
        """The covariances (K, n, n), float64 (assembled from the stored form)."""
        if self.form == "diag":
            return torch.diag_embed(self.lam)
        V, lam = self.V, self.lam
        dense = V @ torch.diag_embed(lam) @ V.mT
        if V.shape[2] < self.n:
            dense = dense + (self.floor ** 2)[:, None, None] * (torch.eye(self.n, dtype=torch.float64) - V @ V.mT)
        return dense

    # ---------------------------------------------------------------------------------- helpers
    def _params(self, dtype, device):
        key = (dtype, device)
        if key not in self._cast:
            cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
            self._cast[key] = (cast(self.means), cast(self.V), cast(self.lam), cast(self.floor), cast(self.log_weights))
        return self._cast[key]

    def _levels(self, x, alpha, sigma):
        x = _check_x(x)
        B, n = x.shape
        if n != self.n:
            raise ValueError(f"x: expected n = {self.n} columns (the mixture's dimension), got {n}")
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        a = _per_sample("alpha", alpha, B, x.device).to(ct).reshape(-1, 1, 1)
        s2 = (_per_sample("sigma", sigma, B, x.device).to(ct) ** 2).reshape(-1, 1, 1)
        return x, ct, a, s2

    def _terms(self, x, alpha, sigma):
        """(logits log pi_k + log N_k(x) (B, K), E[x_0 | x, k] (B, K, n), a, s^2) in x's compute dtype."""
        x, ct, a, s2 = self._levels(x, alpha, sigma)
        n = self.n
        mu, V, lam, floor, logw = self._params(ct, x.device)
        r = x.to(ct)[:, None, :] - a * mu[None]                              # (B, K, n)
        c = a * a * lam[None] + s2                                          # (B, K, r)
        if self.form == "diag":
            quad = (r * r / c).sum(-1)
            logdet = c.log().sum(-1)
            cond = mu[None] + (a * lam[None] / c) * r
        else:
            z = torch.einsum("bkn,knr->bkr", r, V)
            f = a * a * (floor * floor)[None, :, None] + s2                 # (B, K, 1)
            rest = ((r * r).sum(-1) - (z * z).sum(-1)).clamp(min=0) if V.shape[2] < n else torch.zeros_like(r[..., 0])
            quad = (z * z / c).sum(-1) + rest / f[..., 0]
            logdet = c.log().sum(-1) + (n - V.shape[2]) * f[..., 0].log()
            g = a * lam[None] / c                                           # gain along the basis
            cond = mu[None] + torch.einsum("bkr,knr->bkn", g * z, V)
            if V.shape[2] < n:                                              # the isotropic complement
                h = a * (floor * floor)[None, :, None] / f
                cond = cond + h * (r - torch.einsum("bkr,knr->bkn", z, V))
        logits = logw[None] - 0.5 * (quad + logdet + n * math.log(2 * math.pi))   # (B, K)
        return logits, cond, a, s2

    def _isotropic(self, x, alpha, sigma):
        """(logits (B, K), x0_hat (B, n), a, s^2) for Sigma_k = v_k I without a (B, K, n) intermediate:
        ``||x - alpha mu_k||^2 = ||x||^2 - 2 alpha x.mu_k + alpha^2 ||mu_k||^2`` (one GEMM) and
        ``x0_hat = (sum_k w_k g_k) x + sum_k w_k (1 - alpha g_k) mu_k`` (another), g_k = alpha v_k / c_k."""
        x, ct, a, s2 = self._levels(x, alpha, sigma)
        n = self.n
        mu, _, lam, _, logw = self._params(ct, x.device)
        a2, s22 = a[:, :, 0], s2[:, :, 0]                                   # (R, 1)
        c = a2 * a2 * lam[None, :, 0] + s22                                 # (R, K)
        gain = a2 * lam[None, :, 0] / c
        xc = x.to(ct)
        sq = (xc * xc).sum(1, keepdim=True)
        d2 = sq - 2 * a2 * (xc @ mu.T) + a2 * a2 * (mu * mu).sum(1)[None]
        logits = logw[None] - 0.5 * (d2 / c + n * torch.log(2 * math.pi * c))
        w = torch.softmax(logits, -1)
        x0 = (w * (1 - a2 * gain)) @ mu
        x0 = x0.addcmul_((w * gain).sum(1, keepdim=True), xc)
        return logits, x0, a, s2

    def _mean(self, x, alpha, sigma):
        """(logits (B, K), responsibilities (B, K), x0_hat (B, n), a, s^2) in x's compute dtype."""
        if self.isotropic:
            logits, x0, a, s2 = self._isotropic(x, alpha, sigma)
            w = torch.softmax(logits, -1)
        else:
            logits, cond, a, s2 = self._terms(x, alpha, sigma)
            w = torch.softmax(logits, -1)
            x0 = torch.einsum("bk,bkn->bn", w, cond)
        return logits, w, x0, a, s2

    @accepts_arrays
    def posterior(self, x, alpha, sigma) -> MixturePosterior:
        """Posterior mean, score, ``log p_t(x)`` and responsibilities (module docstring) for x (B, n)."""
        logits, w, x0, a, s2 = self._mean(x, alpha, sigma)
        logp = torch.logsumexp(logits, -1)
        score = (a[:, 0] * x0 - x.to(x0.dtype)) / s2[:, 0]
        return MixturePosterior(x0.to(x.dtype), score.to(x.dtype), logp, w)

    def log_posterior(self, x, alpha, sigma) -> torch.Tensor:
        """``log p(k | x_t)`` (B, K): the exact classifier of the noisy data (differentiable in x)."""
        logits = (self._isotropic if self.isotropic else self._terms)(x, alpha, sigma)[0]
        return torch.log_softmax(logits, -1)

    def component_mean(self, x, alpha, sigma, labels) -> torch.Tensor:
        """``E[x_0 | x_t, k = labels]`` (B, n): the posterior mean of one component per sample."""
        _, cond, _, _ = self._terms(x, alpha, sigma)
        lab = self._labels(labels, x.shape[0], x.device)
        return cond[torch.arange(x.shape[0], device=x.device), lab].to(x.dtype)

    def _labels(self, labels, B, device) -> torch.Tensor:
        lab = torch.as_tensor(labels, device=device).reshape(-1)
        if lab.dtype.is_floating_point or lab.numel() not in (1, B) or bool(((lab < 0) | (lab >= self.K)).any()):
            raise ValueError(f"labels: expected (B,) integers in [0, {self.K})")
        return lab.long().expand(B)

    @accepts_arrays
    def __call__(self, x, alpha, sigma, *, labels=None, guidance=None, output: str = "x0",
                 return_weights: bool = False, **kwargs):
        """``E[x_0 | x_t]`` (B, n) (or its eps / score form); with ``labels`` (B,) and ``guidance`` w the
        guided mean ``(1 - w) E[x_0 | x_t] + w E[x_0 | x_t, y]`` (seed 004 eq. 7.4.14)."""
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        if labels is None:  # the posterior mean alone: no score or log p_t (a third of a call's time)
            _, w, out, _, _ = self._mean(x, alpha, sigma)
            out = out.to(x.dtype)
        else:
            if guidance is None:
                raise ValueError("guidance: required with labels (the guidance weight w)")
            logits, cond, _, _ = self._terms(x, alpha, sigma)
            w = torch.softmax(logits, -1)
            lab = self._labels(labels, x.shape[0], x.device)
            gw = _per_sample("guidance", guidance, x.shape[0], x.device, positive=False)[:, None].to(cond.dtype)
            out = ((1 - gw) * torch.einsum("bk,bkn->bn", w, cond)
                   + gw * cond[torch.arange(x.shape[0], device=x.device), lab]).to(x.dtype)
        if output != "x0":
            B = x.shape[0]
            a = _per_sample("alpha", alpha, B, x.device)[:, None].to(x.dtype)
            s = _per_sample("sigma", sigma, B, x.device)[:, None].to(x.dtype)
            eps = (x - a * out) / s
            out = eps if output == "eps" else -eps / s
        return (out, w.detach()) if return_weights else out

    def sample(self, N: int, generator=None, *, return_labels: bool = False):
        """N draws (N, n) of x_0, float64 (and their components with ``return_labels``); ``generator``
        a ``torch.Generator`` or an int seed."""
        if isinstance(N, bool) or not isinstance(N, int) or N < 0:
            raise ValueError(f"N: expected a non-negative int, got {N!r}")
        gen = _torch_generator(generator, "cpu")
        k = torch.multinomial(self.pi, N, replacement=True, generator=gen) if N else torch.zeros(0, dtype=torch.long)
        z = torch.randn(N, self.n, dtype=torch.float64, generator=gen)
        if self.form == "diag":
            x = self.means[k] + self.lam[k].sqrt() * z
        else:
            V, lam = self.V[k], self.lam[k]
            zb = torch.einsum("bnr,bn->br", V, z)
            along = torch.einsum("bnr,br->bn", V, lam.sqrt() * zb)
            perp = z - torch.einsum("bnr,br->bn", V, zb)
            x = self.means[k] + along + self.floor[k][:, None] * perp
        return (x, k) if return_labels else x

    def clone_agreement(self, alpha: float, sigma: float, N: int = 10000, *,
                        generator: Optional[torch.Generator] = None) -> float:
        """``phi = E_{x_t}[ sum_k w_k(x_t)^2 ]``, x_t = alpha x_0 + sigma eps: the probability that two
        samples of the exact reverse process started from the same x_t end in the same component
        (each is a draw of x_0 | x_t).  Near 1 before the speciation time, ``sum_k pi_k^2`` after it
        (G. Biroli, T. Bonnaire, V. de Bortoli and M. Mezard, *Dynamical regimes of diffusion models*,
        2024: ``t_S = (1/2) log Lambda`` for the OU process, Lambda the top eigenvalue of the data
        covariance).  Monte Carlo over N draws, float64."""
        x0 = self.sample(N, generator)
        xt = alpha * x0 + sigma * torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        w = self.posterior(xt, alpha, sigma).responsibilities
        return float((w * w).sum(-1).mean())

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, n={self.n}, form={self.form!r})"


def mixture_components(den):
    """``(pi (K,), mu (K, n), Sigma (K, n, n))`` float64 of a Gaussian, MoLRG or GaussianMixture
    (MoLRG component k: ``Sigma_k = tau_k^2 U_k U_k^T + delta^2 I``, mean 0)."""
    if isinstance(den, GaussianMixture):
        return den.pi, den.means, den.covs
    if isinstance(den, Gaussian):
        return torch.ones(1, dtype=torch.float64), den.mean[None].double(), den.cov[None].double()
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

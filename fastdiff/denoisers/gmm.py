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

from fastdiff._args import OUTPUTS, _check_x, _per_sample
from fastdiff._interop import accepts_arrays

__all__ = ["GaussianMixture", "MixturePosterior"]


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
        if pi is None:
            w = torch.full((K,), 1.0 / K, dtype=f64)
        else:
            w = torch.as_tensor(pi, dtype=f64).reshape(-1)
            if w.shape != (K,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
                raise ValueError(f"pi: expected {K} finite non-negative mixing weights (one per component), got {tuple(w.shape)}")
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

    @accepts_arrays
    def posterior(self, x, alpha, sigma) -> MixturePosterior:
        """Posterior mean, score, ``log p_t(x)`` and responsibilities (module docstring) for x (B, n)."""
        x = _check_x(x)
        B, n = x.shape
        if n != self.n:
            raise ValueError(f"x: expected n = {self.n} columns (the mixture's dimension), got {n}")
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        mu, V, lam, floor, logw = self._params(ct, x.device)
        a = _per_sample("alpha", alpha, B, x.device).to(ct).reshape(-1, 1, 1)
        s2 = (_per_sample("sigma", sigma, B, x.device).to(ct) ** 2).reshape(-1, 1, 1)
        xc = x.to(ct)
        r = xc[:, None, :] - a * mu[None]                                   # (B, K, n)
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
        logp = torch.logsumexp(logits, -1)
        w = torch.softmax(logits, -1)
        x0 = torch.einsum("bk,bkn->bn", w, cond)
        score = (a[:, 0] * x0 - xc) / s2[:, 0]
        return MixturePosterior(x0.to(x.dtype), score.to(x.dtype), logp, w)

    def __call__(self, x, alpha, sigma, *, output: str = "x0"):
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        post = self.posterior(x, alpha, sigma)
        if output == "x0":
            return post.x0
        if output == "score":
            return post.score
        s = _per_sample("sigma", sigma, x.shape[0], x.device).to(x.dtype)[:, None]
        return -s * post.score                                              # eps = -sigma score

    def sample(self, N: int, *, generator: Optional[torch.Generator] = None, return_labels: bool = False):
        """N draws of x_0 (float64 math, returned in the means' dtype) and optionally their components."""
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"N: expected a positive int, got {N!r}")
        k = torch.multinomial(self.pi, N, replacement=True, generator=generator)
        z = torch.randn(N, self.n, dtype=torch.float64, generator=generator)
        if self.form == "diag":
            x = self.means[k] + self.lam[k].sqrt() * z
        else:
            V, lam = self.V[k], self.lam[k]
            zb = torch.einsum("bnr,bn->br", V, z)
            along = torch.einsum("bnr,br->bn", V, lam.sqrt() * zb)
            perp = z - torch.einsum("bnr,br->bn", V, zb)
            x = self.means[k] + along + self.floor[k][:, None] * perp
        x = x.to(self.dtype)
        return (x, k) if return_labels else x

    def clone_agreement(self, alpha: float, sigma: float, N: int = 10000, *,
                        generator: Optional[torch.Generator] = None) -> float:
        """``phi = E_{x_t}[ sum_k w_k(x_t)^2 ]``, x_t = alpha x_0 + sigma eps: the probability that two
        samples of the exact reverse process started from the same x_t end in the same component
        (each is a draw of x_0 | x_t).  Near 1 before the speciation time, ``sum_k pi_k^2`` after it
        (G. Biroli, T. Bonnaire, V. de Bortoli and M. Mezard, *Dynamical regimes of diffusion models*,
        2024: ``t_S = (1/2) log Lambda`` for the OU process, Lambda the top eigenvalue of the data
        covariance).  Monte Carlo over N draws, float64."""
        x0 = self.sample(N, generator=generator).double()
        xt = alpha * x0 + sigma * torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        w = self.posterior(xt, alpha, sigma).responsibilities
        return float((w * w).sum(-1).mean())

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, n={self.n}, form={self.form!r})"

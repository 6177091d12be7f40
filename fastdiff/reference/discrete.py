"""Float64 references for the discrete models and samplers (docs/math.md section 7), written from the
formulas by enumeration of ``{-1, 1}^d`` (so ``d`` small): nothing here is fast or streamed.

``states(d)`` (2^d, d); the posterior by brute force; the fused flip's formula; the one-stage
discrete Langevin transition matrix (unadjusted and Metropolis-adjusted) and the unadjusted
two-stage one (a Gaussian integral, by tensor Gauss-Hermite quadrature), a chain's stationary law
and Dobrushin coefficient; the total-variation sampling bound the statistical tests use.
"""
from __future__ import annotations

import math

import torch

__all__ = ["states", "mixture_pmf", "posterior_brute", "flip", "one_stage_matrix", "two_stage_matrix", "stationary",
           "dobrushin", "tv", "tv_sampling_bound", "one_stage_step_eager"]


def states(d: int) -> torch.Tensor:
    """All of ``{-1, 1}^d`` (2^d, d) float64; state ``j``'s coordinate ``i`` is bit ``i`` of ``j``."""
    j = torch.arange(1 << d)
    return (2 * ((j[:, None] >> torch.arange(d)) & 1) - 1).double()


def index(y: torch.Tensor) -> torch.Tensor:
    """The state index of each row of ``y`` (B, d) in {-1, 1}: ``sum_i [y_i > 0] 2^i``."""
    return ((y > 0).long() << torch.arange(y.shape[1], device=y.device)).sum(1)


def mixture_pmf(weights, means) -> torch.Tensor:
    """``p(x) = sum_k pi_k prod_i (1 + mu_ki x_i) / 2`` at every state (2^d,)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    mu = means.double()
    X = states(mu.shape[1])
    return (w * ((1 + mu[None] * X[:, None, :]) / 2).prod(-1)).sum(-1)


def posterior_brute(pmf: torch.Tensor, y: torch.Tensor, alpha: float):
    """``(log q(y) (B,), E[x | y] (B, d))`` by summing over all ``x``: ``q(y) = (2 cosh alpha)^-d
    sum_x p(x) exp(alpha x.y)``, ``E[x | y] = sum_x x p(x) e^{alpha x.y} / sum_x p(x) e^{alpha x.y}``."""
    d = y.shape[1]
    X = states(d)
    logw = torch.log(pmf)[None, :] + alpha * y.double() @ X.T          # (B, 2^d)
    lz = torch.logsumexp(logw, 1)
    E = torch.softmax(logw, 1) @ X
    return lz - d * math.log(2 * math.cosh(alpha)), E


def flip(anchor, score, a: float, b: float, u) -> torch.Tensor:
    """The fused flip's formula: ``+1 if u < sigmoid(a score + b anchor) else -1`` (float64 logit)."""
    logit = b * anchor.double() + (a * score.double() if score is not None else 0.0)
    return torch.where(u.double() < torch.sigmoid(logit), 1.0, -1.0)


def one_stage_matrix(logq: torch.Tensor, score: torch.Tensor, eta: float, metropolis: bool) -> torch.Tensor:
    """The one-stage discrete Langevin chain on ``{-1, 1}^d`` as a (2^d, 2^d) row-stochastic matrix.

    ``logq`` (2^d,), ``score`` (2^d, d): ``log q`` and ``s`` at every state.  Proposal
    ``t(y' | y) = prod_i sigmoid(y'_i (s_i(y) + 2 y_i / eta))``; with ``metropolis`` each move is
    accepted w.p. ``min(1, q(y') t(y | y') / (q(y) t(y' | y)))``, the rest stays on the diagonal."""
    X = states(score.shape[1])
    logit = score.double() + (2.0 / eta) * X                            # (S, d)
    logt = torch.nn.functional.logsigmoid(X[None, :, :] * logit[:, None, :]).sum(-1)  # [y, y']
    if not metropolis:
        return torch.exp(logt)
    logr = logq[None, :] - logq[:, None] + logt.T - logt
    T = torch.exp(logt + torch.clamp(logr, max=0.0))
    T.fill_diagonal_(0.0)
    T += torch.diag(1.0 - T.sum(1))
    return T


def two_stage_matrix(score_fn, d: int, eta: float, nodes: int = 12) -> torch.Tensor:
    """The unadjusted two-stage discrete Langevin chain on ``{-1, 1}^d`` as a (2^d, 2^d) matrix::

        P(y, y') = E_{z ~ N(y, eta I)} prod_i sigmoid(2 y'_i (s_i(z) + z_i / eta))

    (docs/math.md 7e: ``z = y + sqrt(eta) xi``, then ``y'`` from ``q(y | z)`` linearised at ``z``).
    ``score_fn(z) -> s(z)`` (M, d) -> (M, d) float64, evaluated off the cube.  The expectation is a
    d-dimensional Gaussian integral of a smooth integrand: tensor Gauss-Hermite quadrature with
    ``nodes`` points a coordinate (``nodes^d`` evaluations a row; exact for polynomials of degree
    ``2 nodes - 1`` in each ``xi_i``).  The caller checks convergence by comparing two ``nodes``."""
    import numpy as np

    t, w = np.polynomial.hermite_e.hermegauss(nodes)                    # weight e^{-t^2 / 2}
    t = torch.from_numpy(t)
    w = torch.from_numpy(w / w.sum())                                   # N(0, 1) quadrature weights
    grid = torch.cartesian_prod(*([t] * d)).reshape(-1, d)              # (nodes^d, d)
    weight = torch.cartesian_prod(*([w] * d)).reshape(-1, d).prod(1)    # (nodes^d,)
    X = states(d)
    P = torch.empty(1 << d, 1 << d, dtype=torch.float64)
    for j in range(1 << d):
        z = X[j] + math.sqrt(eta) * grid                                # (M, d)
        logit = 2.0 * (score_fn(z).double() + z / eta)                  # (M, d)
        logt = torch.nn.functional.logsigmoid(X[None, :, :] * logit[:, None, :]).sum(-1)  # (M, 2^d)
        P[j] = weight @ torch.exp(logt)
    return P


def stationary(T: torch.Tensor) -> torch.Tensor:
    """The stationary law ``pi T = pi`` of an irreducible chain (least squares with ``sum pi = 1``)."""
    S = T.shape[0]
    A = torch.cat([T.T - torch.eye(S, dtype=T.dtype), torch.ones(1, S, dtype=T.dtype)])
    rhs = torch.zeros(S + 1, dtype=T.dtype)
    rhs[-1] = 1.0
    return torch.linalg.lstsq(A, rhs[:, None]).solution[:, 0]


def dobrushin(T: torch.Tensor) -> float:
    """Dobrushin's coefficient ``delta(T) = max_{y, y'} TV(T[y], T[y'])``: ``TV(mu T, nu T) <= delta TV(mu, nu)``."""
    return float(0.5 * torch.cdist(T, T, p=1).max())


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(0.5 * (p.double() - q.double()).abs().sum())


def tv_sampling_bound(p: torch.Tensor, n: int, fail: float = 1e-6) -> float:
    """A bound on ``TV(empirical of n iid draws from p, p)`` that holds w.p. ``>= 1 - fail``:
    ``E TV <= 1/2 sum_k sqrt(p_k (1 - p_k) / n)`` (Cauchy-Schwarz per cell), plus McDiarmid's
    ``sqrt(log(1 / fail) / (2 n))`` (one draw moves TV by at most ``1 / n``)."""
    p = p.double()
    return float(0.5 * torch.sqrt(p * (1 - p) / n).sum() + math.sqrt(math.log(1.0 / fail) / (2 * n)))


def one_stage_step_eager(y, score, eta: float):
    """The one-stage proposal as a user writes it in eager torch (the benchmark's baseline):
    ``where(rand_like(y) < sigmoid(s + 2 y / eta), 1, -1)``."""
    return torch.where(torch.rand_like(y) < torch.sigmoid(score + (2.0 / eta) * y), 1.0, -1.0)

"""Exact Gaussian analysis of any sampler table: the law of its output for Gaussian data.

For data ``N(mu, Sigma)``, ``Sigma = V diag(lam) V^T``, the exact denoiser (seed 001, seed 004 Ex. 7.4)
``D(x; alpha, sigma) = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu)`` is, per eigenmode,
the affine ``D = g x + (1 - alpha g) mu`` with ``g = alpha lam / (alpha^2 lam + sigma^2)``.  Every row of
a trajectory table (:class:`fastdiff.solvers.Step`) is then affine in the state, the remembered pushes
and fresh normal draws, so per mode the window ``w_i = (x_i, h_{i-1}, ..., h_{i-K})`` (``K``:
:func:`fastdiff.solvers.history_length`) stays jointly Gaussian and one row is ``w <- A w + c + B z``:
its mean and its ``(K+1) x (K+1)`` covariance follow ``m <- A m + c``, ``P <- A P A^T + B B^T``
(``docs/math.md``, "Exact Gaussian analysis of a sampler table").  Modes are independent (every row
acts on them separately and the draws are isotropic), so the output law is ``N(V m, V diag(v) V^T)``.

- :func:`gaussian_sampler_law`: per-mode mean and variance of the output, any row kind (float64,
  vectorised over modes); :func:`gaussian_sampler_variance`: the zero-mean single-step recursion
  (``v <- m^2 v + s^2``) it generalises, unchanged.
- :func:`initial_law`: x_T as :func:`fastdiff.sample` draws it from a shape.
- :func:`exact_flow_law`: what the exact probability-flow ODE gives between the table's first and last
  level (the reference of the discretisation error); :func:`w2`, :func:`kl`: distances between
  Gaussians with commuting covariances.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from fastdiff.solvers import Step, history_length

__all__ = ["gaussian_sampler_variance", "gaussian_sampler_law", "initial_law", "exact_flow_law", "w2", "kl",
           "nfe", "table_levels"]


def _modes(name, values, like=None) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if like is not None:
        if t.numel() not in (1, like.numel()):
            raise ValueError(f"{name}: expected a scalar or {like.numel()} values (one per mode), got shape "
                             f"{tuple(t.shape)}")
        t = t.reshape(-1).expand(like.numel()).clone()
    else:
        t = t.reshape(-1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values")
    return t


def gaussian_sampler_variance(eigenvalues, table: Sequence[Step], init_var=1.0) -> torch.Tensor:
    """Exact per-eigenmode variance of what a sampler produces for zero-mean Gaussian data.

    Every step is linear for Gaussian data: in the eigenbasis of the covariance (eigenvalue l)
    the denoiser is ``x0_hat = g x`` with ``g = alpha l / (alpha^2 l + sigma^2)``, so each mode
    evolves as ``x <- m x + s z`` with independent noise and its variance as ``v <- m^2 v + s^2``
    (churn adds ``s1^2`` first; Heun: ``m = hx + hm g1 + (hxp + hmp g2)(cx + cm g1)``).
    eigenvalues: (n,) float64; init_var: variance of x_T per mode (scalar or (n,)).  O(T n).
    Tables with multistep / two-stage solver rows (:mod:`fastdiff.solvers`) go through
    :func:`gaussian_sampler_law` (the same numbers for the single-step rows, to rounding).
    """
    if any(st.call[0] == "affine" for st in table):
        return gaussian_sampler_law(eigenvalues, table, init_var=init_var)[1]
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1).clamp(min=0)
    v = torch.as_tensor(init_var, dtype=torch.float64).expand_as(lam).clone()

    def gain(level):
        a, s = level
        return a * lam / (a * a * lam + s * s)

    for st in table:
        v = v + st.churn ** 2
        g1 = gain(st.level)
        m = st.cx + st.cm * g1
        if st.level2 is not None:
            m = st.hx + st.hm * g1 + (st.hxp + st.hmp * gain(st.level2)) * m
        v = m * m * v + st.cz ** 2
    return v


def initial_law(table: Sequence[Step]) -> Tuple[float, float]:
    """``(mean, variance)`` of each coordinate of x_T as :func:`fastdiff.sample` draws it from a shape
    (``_initial``): ``N(0, 1)`` for ddpm / ddim / ou_reverse, ``N(0, 1 + sigma^2)`` for langevin / walk-jump,
    ``N(0, s_0^2)`` for the methods on levels (``s_0``: the first level, sigma_max; the flow path's t_0)."""
    if not table:
        raise ValueError("table: expected at least one row")
    name, args, kw = table[0].call
    if name in ("ddpm_step", "ddim_step") or kw.get("method") == "ou_reverse":
        return 0.0, 1.0
    if name in ("langevin_step", "jump"):
        return 0.0, 1.0 + table[0].level[1] ** 2
    return 0.0, float(args[0]) ** 2


def _affine(level, lam, mu):
    """The mode-wise exact denoiser at ``level``: ``D = g x + b``."""
    a, s = level
    g = a * lam / (a * a * lam + s * s)
    return g, (1.0 - a * g) * mu


def gaussian_sampler_law(eigenvalues, table: Sequence[Step], *, mean=0.0, init_mean=None, init_var=None):
    """Exact per-eigenmode mean and variance of a sampler's output for data ``N(mu, Sigma)``, every row
    kind of :class:`fastdiff.solvers.Step` (churn, history, second stage, pushes, noise).

    eigenvalues: (n,) the eigenvalues ``lam`` of Sigma (clamped at 0); mean: ``V^T mu`` (scalar or (n,));
    init_mean, init_var: the law of ``V^T x_T`` per mode (scalars or (n,); default :func:`initial_law`).
    Per row, with ``D1 = g1 x + b1`` at ``row.level`` after the churn ``x += s1 z1``:
    ``x' = (cx + cm g1) x + cm b1 + sum_j hist_j h_j + cz z2``; with a second stage
    ``x <- (hx + hm g1) x + hm b1 + q x' + hmp b2 + hz z3``, ``q = hxp + hmp g2``; the push
    ``h = (p0 + p1 g1) x + p1 b1`` of the churned x.  Returns ``(mean, var)``, each (n,) float64.
    O(T n K^2) for history length K.
    """
    lam = _modes("eigenvalues", eigenvalues).clamp(min=0)
    mu = _modes("mean", mean, lam)
    m_init, v_init = initial_law(table) if (init_mean is None or init_var is None) else (None, None)
    m0 = _modes("init_mean", m_init if init_mean is None else init_mean, lam)
    v0 = _modes("init_var", v_init if init_var is None else init_var, lam)
    if bool((v0 < 0).any()):
        raise ValueError("init_var: expected variances >= 0")
    n, K = lam.numel(), history_length(table)
    k = K + 1
    m = lam.new_zeros(n, k)
    P = lam.new_zeros(n, k, k)
    m[:, 0], P[:, 0, 0] = m0, v0
    A = lam.new_zeros(n, k, k)
    keep = torch.arange(1, k)    # a row without a push keeps the history as it is
    shift = torch.arange(2, max(k, 2))   # a row with one shifts it: h_j -> h_{j+1}, the oldest dropped
    for st in table:
        if st.churn:
            P[:, 0, 0] += st.churn ** 2
        g1, b1 = _affine(st.level, lam, mu)
        row = lam.new_zeros(n, k)                   # x' as a row over the window
        row[:, 0] = st.cx + st.cm * g1
        for j, c in enumerate(st.hist[:K]):
            row[:, 1 + j] = c
        const = st.cm * b1
        noise = [st.cz * torch.ones_like(lam)] if st.cz else []
        if st.level2 is not None:
            g2, b2 = _affine(st.level2, lam, mu)
            q = st.hxp + st.hmp * g2
            row = q[:, None] * row
            row[:, 0] += st.hx + st.hm * g1
            const = q * const + st.hm * b1 + st.hmp * b2
            noise = [q * z for z in noise] + ([st.hz * torch.ones_like(lam)] if st.hz else [])
        A.zero_()
        A[:, 0] = row
        c = lam.new_zeros(n, k)
        c[:, 0] = const
        if st.push is not None and K:
            p0, p1 = st.push
            A[:, 1, 0] = p0 + p1 * g1
            c[:, 1] = p1 * b1
            A[:, shift, shift - 1] = 1.0
        else:
            A[:, keep, keep] = 1.0
        m = (A @ m[:, :, None])[:, :, 0] + c
        P = A @ P @ A.transpose(1, 2)
        for z in noise:
            P[:, 0, 0] += z * z
    return m[:, 0].clone(), P[:, 0, 0].clamp(min=0).clone()


def table_levels(table: Sequence[Step]) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """The ``(alpha, sigma)`` a solver table starts from and ends at: the first and last level of the
    schedule (a row's ``call`` args ``(s_i, s_{i+1})``), on the path its rows use."""
    if not table or table[0].call[0] not in ("affine", "euler_step", "heun_step", "euler_ancestral_step"):
        raise ValueError("table: expected the rows of a method on noise levels (euler, heun, the solvers of "
                         "fastdiff.solvers)")
    first, last = float(table[0].call[1][0]), float(table[-1].call[1][1])
    if table[0].level[0] == 1.0:   # the path: alpha = 1 on VE (churn too), 1 - t_0 < 1 on the flow path
        return (1.0, first), (1.0, last)
    return (1.0 - first, first), (1.0 - last, last)


def exact_flow_law(eigenvalues, start, end, *, mean=0.0, init_mean=0.0, init_var=1.0):
    """The law the exact probability-flow ODE transports ``N(init_mean, init_var)`` (per mode) to, from the
    level ``start = (alpha, sigma)`` to ``end``: for Gaussian data the marginal at a level is
    ``N(alpha mu, alpha^2 lam + sigma^2)`` and the ODE's velocity is affine in x, so its flow map is the
    increasing affine map between them, ``z = (x - alpha mu) / sqrt(alpha^2 lam + sigma^2)`` constant
    along it (VE: Karras et al. 2022 eq. 4 with the Gaussian denoiser).  Returns ``(mean, var)``."""
    lam = _modes("eigenvalues", eigenvalues).clamp(min=0)
    mu = _modes("mean", mean, lam)
    m0, v0 = _modes("init_mean", init_mean, lam), _modes("init_var", init_var, lam)
    (a0, s0), (a1, s1) = start, end
    r = torch.sqrt((a1 * a1 * lam + s1 * s1) / (a0 * a0 * lam + s0 * s0))
    return a1 * mu + r * (m0 - a0 * mu), r * r * v0


def w2(mean, var, mean_ref, var_ref) -> float:
    """2-Wasserstein distance between ``N(mean, diag var)`` and ``N(mean_ref, diag var_ref)`` in one basis
    (commuting covariances): ``sqrt(sum (m - m_ref)^2 + (sqrt v - sqrt v_ref)^2)`` (Dowson & Landau 1982)."""
    m, v, mr, vr = (torch.as_tensor(t, dtype=torch.float64) for t in (mean, var, mean_ref, var_ref))
    if bool((v < 0).any()) or bool((vr < 0).any()):
        raise ValueError("var, var_ref: expected variances >= 0")
    return math.sqrt(float(((m - mr) ** 2 + (v.sqrt() - vr.sqrt()) ** 2).sum()))


def kl(mean, var, mean_ref, var_ref) -> float:
    """``KL(N(mean, diag var) || N(mean_ref, diag var_ref))``, per mode
    ``(v / v_ref - 1 - log(v / v_ref) + (m - m_ref)^2 / v_ref) / 2``, summed (nats)."""
    m, v, mr, vr = (torch.as_tensor(t, dtype=torch.float64) for t in (mean, var, mean_ref, var_ref))
    if bool((v <= 0).any()) or bool((vr <= 0).any()):
        raise ValueError("var, var_ref: expected variances > 0 (KL of a degenerate Gaussian is infinite)")
    ratio = v / vr
    return float(0.5 * (ratio - 1.0 - torch.log(ratio) + (m - mr) ** 2 / vr).sum())


def nfe(table: Sequence[Step]) -> int:
    """Denoiser evaluations of a table: one per row, two for a row with a second stage."""
    return sum(1 + (st.level2 is not None) for st in table)

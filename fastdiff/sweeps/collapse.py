"""The collapse time of a training set from its excess entropy (docs/math.md section 4c).

After G. Biroli, T. Bonnaire, V. de Bortoli and M. Mezard, *Dynamical regimes of diffusion models*,
Nature Communications 15 (2024), doi:10.1038/s41467-024-54281-3, arXiv:2402.18491 ("BBdBM" below).  Their forward process is
the Ornstein-Uhlenbeck one, ``x_t = e^-t a + sqrt(Delta_t) z`` with ``Delta_t = 1 - e^-2t`` (our
``alpha = e^-t``, ``sigma = sqrt(Delta_t)``).  For N training points ``a_mu`` in dimension d the
exact (empirical) score samples the mixture

    p^e_t(x) = (1/N) sum_mu N(x; e^-t a_mu, Delta_t I)       (:func:`fastdiff.denoisers.empirical_logp`)

with entropy density ``s^e(t) = -(1/d) E_{x ~ p^e_t} log p^e_t(x)``.  Were the N Gaussians disjoint
it would be ``s^sep(t) = log N / d + (1/2) log(2 pi e Delta_t)``; the excess entropy is

    f^e(t) = s^sep(t) - s^e(t) = H(mu | x_t) / d  in [0, alpha_N],   alpha_N = log N / d,

the conditional entropy of the training index given the noisy point (it grows with t: data
processing).  In the limit d -> infinity with alpha_N fixed, ``s^e = s`` (the population's entropy)
for t > t_C and ``f^e = 0`` for t < t_C: the backward dynamics collapses onto a training point at
the time ``t_C`` where ``s(t_C) = s^sep(t_C)``.  For isotropic Gaussian data of variance sigma_0^2
per coordinate, ``s(t) = (1/2) log(2 pi e (Delta_t + sigma_0^2 e^-2t))`` gives

    t_C = (1/2) log(1 + sigma_0^2 / (N^(2/d) - 1))                  (:func:`gaussian_collapse_time`)

(the formula of BBdBM's Gaussian analysis, drawn as the predicted collapse in their Fig. 3; the
authors' code, github.com/tbonnair/Dynamical-Regimes-of-Diffusion-Models, src/Plots_paper.py and
src/Gaussian_mixtures_entropy.py, computes f^e exactly as here).  It decreases as N grows and
increases with d: the curse of dimensionality.

In finite d, f^e(t) is smooth and never exactly 0, so :func:`collapse_time` reports the time where
``f^e / alpha_N`` crosses a stated ``threshold`` (default 0.2, calibrated and measured in
docs/math.md section 4c).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

import fastdiff
from fastdiff.data import ImageSet
from fastdiff.denoisers import empirical_logp

__all__ = ["ExcessEntropy", "excess_entropy", "collapse_time", "crossing_time", "gaussian_collapse_time",
           "gaussian_excess_entropy", "ou_levels", "DEFAULT_TIMES", "COLLAPSE_THRESHOLD"]

COLLAPSE_THRESHOLD = 0.2
# 64 log-spaced OU times: e^-2t from 0.998 (sigma/alpha = 0.045) to 2e-9 (every training set has collapsed
# below the first and none above the last, for data of unit scale)
DEFAULT_TIMES = tuple(torch.logspace(-3, 1, 64, dtype=torch.float64).tolist())


class ExcessEntropy(NamedTuple):
    """Monte Carlo estimates per OU time, float64, each (T,)."""
    times: torch.Tensor
    entropy: torch.Tensor       # s^e(t) = -(1/d) E log p^e_t(x)
    entropy_se: torch.Tensor    # its standard error
    separated: torch.Tensor     # s^sep(t) = log N / d + (1/2) log(2 pi e Delta_t) (exact)
    excess: torch.Tensor        # f^e(t) = s^sep - s^e (the control-variate estimator, below)
    excess_se: torch.Tensor
    alpha: float                # alpha_N = log N / d, the limit of f^e at large t


def ou_levels(t: torch.Tensor):
    """``(alpha, sigma)`` of the OU forward process at times ``t``: ``e^-t`` and ``sqrt(1 - e^-2t)``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-t), torch.sqrt(-torch.expm1(-2 * t))


def _times(times) -> torch.Tensor:
    t = torch.as_tensor(DEFAULT_TIMES if times is None else times, dtype=torch.float64).reshape(-1)
    if t.numel() < 2 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()) or bool((t.diff() <= 0).any()):
        raise ValueError(f"times: expected at least 2 increasing finite OU times > 0, got {t.tolist()[:8]}")
    return t


def _rows(data) -> torch.Tensor:
    if isinstance(data, ImageSet):
        return data.float(dtype=torch.float64, flatten=True)
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or not data.is_floating_point():
        raise ValueError(f"data: expected a floating (N, d) tensor or an ImageSet, got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")
    if data.shape[0] < 2 or data.shape[1] < 1:
        raise ValueError(f"data: expected N >= 2 points of dimension d >= 1, got {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("data: expected finite values")
    return data.detach().to("cpu", torch.float64)


def excess_entropy(data, times: Optional[Sequence[float]] = None, *, samples: int = 1024, seed: int = 0,
                   backend: str = "auto") -> ExcessEntropy:
    """The entropy ``s^e(t)`` of the noised empirical distribution of ``data`` (N, d) (or an
    :class:`~fastdiff.data.ImageSet`, as floats in [-1, 1]) and its excess entropy ``f^e(t)``, at
    each OU time of ``times`` (default :data:`DEFAULT_TIMES`), by Monte Carlo in float64.

    Draws: ``samples`` points ``x_i = e^-t a_{mu_i} + sqrt(Delta_t) z_i`` with the indices stratified
    (each training point ``samples // N`` times, the remainder a seeded random subset) and ``z_i``
    from the Philox stream of ``seed``; the same ``mu_i, z_i`` at every t (common random numbers,
    so the curve is smooth in t and its crossing well defined).  ``log p^e_t(x_i)`` is
    :func:`fastdiff.denoisers.empirical_logp`.  Estimators, averaged over i::

        s^e:  -log p^e_t(x_i) / d
        f^e:  (log N + log p^e_t(x_i) + ||z_i||^2 / 2 + (d/2) log(2 pi Delta_t)) / d  =  -log w_{mu_i}(x_i) / d

    The second is ``s^sep + log p^e / d`` minus the control variate
    ``(log N(x_i; e^-t a_mu_i, Delta_t I) + (d/2) log(2 pi e Delta_t)) / d`` (mean exactly 0): it removes
    the chi-square noise of ``||z||^2`` (variance d/2) and leaves the posterior weight ``w`` of the
    true index, so it is >= 0 up to rounding and exact 0 where x_t identifies its point.
    """
    t = _times(times)
    Y = _rows(data)
    N, d = Y.shape
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples: expected an int >= 2, got {samples!r}")
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    mu = torch.cat([torch.arange(N).repeat(samples // N), torch.randperm(N, generator=g)[: samples % N]])
    z = fastdiff.randn(samples, d, generator=fastdiff.Generator(int(seed)), dtype=torch.float64)
    half_z2 = 0.5 * z.square().sum(1)
    a, s = ou_levels(t)
    ent, ent_se, exc, exc_se = (torch.empty(len(t), dtype=torch.float64) for _ in range(4))
    for j in range(len(t)):
        aj, sj = float(a[j]), float(s[j])
        logp = empirical_logp(aj * Y[mu] + sj * z, Y, aj, sj, backend=backend)
        h = -logp / d
        f = (math.log(N) + logp + half_z2 + 0.5 * d * math.log(2 * math.pi * sj * sj)) / d
        ent[j], ent_se[j] = h.mean(), h.std() / math.sqrt(samples)
        exc[j], exc_se[j] = f.mean(), f.std() / math.sqrt(samples)
    sep = math.log(N) / d + 0.5 * torch.log(2 * math.pi * math.e * s * s)
    return ExcessEntropy(t, ent, ent_se, sep, exc, exc_se, math.log(N) / d)


def crossing_time(times: torch.Tensor, values: torch.Tensor, level: float) -> float:
    """The first time where ``values`` (T,) (a curve increasing in t up to noise) reaches
    ``level``, linearly interpolated between the two grid times that bracket it."""
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.shape != v.shape or t.numel() < 2:
        raise ValueError(f"times, values: expected two (T,) curves with T >= 2, got {tuple(t.shape)} and {tuple(v.shape)}")
    above = (v >= level).nonzero().reshape(-1)
    if above.numel() == 0 or int(above[0]) == 0:
        where = "never reaches" if above.numel() == 0 else "already exceeds"
        raise ValueError(f"times: the curve {where} {level:.4g} on the grid [{float(t[0]):.4g}, {float(t[-1]):.4g}] "
                         f"(values {float(v[0]):.4g} .. {float(v[-1]):.4g}); extend the grid")
    j = int(above[0])
    w = (level - float(v[j - 1])) / (float(v[j]) - float(v[j - 1]))
    return float(t[j - 1] + w * (t[j] - t[j - 1]))


def collapse_time(data, times: Optional[Sequence[float]] = None, *, threshold: float = COLLAPSE_THRESHOLD,
                  samples: int = 1024, seed: int = 0, backend: str = "auto") -> float:
    """The collapse time ``t_C`` (OU time) of the training set ``data`` (N, d): the first time on
    ``times`` where the excess entropy reaches ``threshold * alpha_N`` (``alpha_N = log N / d``),
    i.e. ``H(mu | x_t) = threshold * log N``, from :func:`excess_entropy` (its ``samples`` and
    ``seed``).  In the VE convention (``alpha = 1``) it is the noise level ``sqrt(e^(2 t_C) - 1)``.
    Raises ``ValueError`` where the grid does not bracket the crossing."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold: expected a fraction of log N in (0, 1), got {threshold}")
    ee = excess_entropy(data, times, samples=samples, seed=seed, backend=backend)
    return crossing_time(ee.times, ee.excess / ee.alpha, threshold)


def _check_gaussian(N, d, threshold=0.0):
    if isinstance(N, bool) or not isinstance(N, int) or N < 2:
        raise ValueError(f"N: expected an int >= 2 training points, got {N!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d: expected a positive int dimension, got {d!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold: expected a fraction in [0, 1), got {threshold}")


def gaussian_collapse_time(N: int, d: int, variance: float, *, threshold: float = 0.0) -> float:
    """The high-dimensional collapse time of N points of ``N(m, variance I_d)`` (BBdBM):
    ``t_C = (1/2) log(1 + variance / (N^(2/d) - 1))``; with ``threshold`` eps the time where the
    limiting excess entropy reaches ``eps alpha_N``: the same with N^(2/d) -> N^(2 (1 - eps) / d)."""
    _check_gaussian(N, d, threshold)
    if not variance > 0 or not math.isfinite(variance):
        raise ValueError(f"variance: expected a finite variance > 0, got {variance}")
    return 0.5 * math.log1p(variance / math.expm1(2 * (1 - threshold) * math.log(N) / d))


def gaussian_excess_entropy(times, N: int, eigenvalues) -> torch.Tensor:
    """The limiting (d -> infinity) excess entropy ``max(0, s^sep(t) - s(t))`` (T,) of N points of a
    Gaussian with covariance eigenvalues ``eigenvalues`` (d,): with ``s(t) = (1/2d) sum_j
    log(2 pi e (Delta_t + e^-2t lam_j))``, ``f(t) = max(0, log N / d - (1/2d) sum_j log(1 + e^-2t lam_j / Delta_t))``."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
    _check_gaussian(N, lam.numel())
    if bool((lam < 0).any()) or not bool(torch.isfinite(lam).all()):
        raise ValueError("eigenvalues: expected finite covariance eigenvalues >= 0")
    a, s = ou_levels(_times(times))
    snr = (a * a / (s * s))[:, None] * lam[None]
    return (math.log(N) / lam.numel() - 0.5 * torch.log1p(snr).mean(1)).clamp(min=0)

"""``fastdiff sweep sampler-error``: the exact error of each sampler against the number of denoiser
evaluations, for Gaussian data (:mod:`fastdiff.gaussian_exact`; computed, not sampled, so no trials,
seeds or store: one CSV table and one log-log plot).

Data ``N(mu, diag(lam))`` in its eigenbasis, ``lam_v = v^-k``, ``mu_v = 0.5 v^-1/2`` (v = 1..n); Karras levels
(``sigma_min``, ``sigma_max``, ``rho = 7``, EDM's final 0); x_T as :func:`fastdiff.sample` draws it.  Per
solver and step count: NFE (:func:`fastdiff.gaussian_exact.nfe`), W2 and KL of the output law to the data
law, and W2 to the law of the exact probability-flow ODE from the same x_T (the discretisation error;
deterministic solvers only), both over the levels without the final 0, down to sigma_min: the last step
sigma_min -> 0 has the same size at every N, so its O(sigma_min^2 / lam) error would be a floor.  The
deterministic solvers' W2 to the data stops falling at the gap that remains with the exact ODE: x_T is
N(0, sigma_max^2), not the level's marginal N(mu, sigma_max^2 + lam), which leaves a mean error of about
mu sqrt(lam) / sigma_max per mode.  The fitted log-log slope of each error against NFE
over the last ``fit`` step counts is the measured order (``-slope``).
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Sequence

import numpy as np
import torch

from fastdiff import gaussian_exact as G
from fastdiff.sampling import trajectory_table

__all__ = ["SOLVERS", "run", "DEFAULT_STEPS"]

# (label, method, kwargs, deterministic)
SOLVERS = [
    ("euler", "euler", {}, True), ("heun", "heun", {}, True), ("dpm_2", "dpm_2", {}, True),
    ("dpmpp_2m", "dpmpp_2m", {}, True), ("dpmpp_3m(eta=0)", "dpmpp_3m_sde", {"eta": 0.0}, True),
    ("dpmpp_2s_a(eta=0)", "dpmpp_2s_ancestral", {"eta": 0.0}, True), ("lms(4)", "lms", {}, True),
    ("euler_ancestral", "euler_ancestral", {}, False), ("dpmpp_2m_sde", "dpmpp_2m_sde", {}, False),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", {}, False), ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", {}, False),
    ("dpm_2_ancestral", "dpm_2_ancestral", {}, False),
]
DEFAULT_STEPS = (4, 8, 16, 32, 64, 128, 256, 512)


def _karras(N, smin, smax, rho=7.0) -> List[float]:
    r = np.linspace(0.0, 1.0, N)
    s = (smax ** (1 / rho) + r * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return [float(v) for v in s] + [0.0]


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    ok = [(a, b) for a, b in zip(x, y) if b > 0 and math.isfinite(b)]
    if len(ok) < 2:
        return math.nan
    return float(np.polyfit(np.log([a for a, _ in ok]), np.log([b for _, b in ok]), 1)[0])


def run(out: str, *, n: int = 64, k: float = 1.0, steps: Sequence[int] = DEFAULT_STEPS, sigma_min: float = 0.002,
        sigma_max: float = 80.0, fit: int = 4, plot: bool = True) -> Dict:
    """Compute the table (``sampler-error.csv``: one row per solver and step count), the fitted slopes
    (``sampler-error-slopes.csv``: per solver, log-log slope of W2, KL and W2 to the ODE against NFE over
    the ``fit`` largest step counts) and the plot (``sampler-error.png``) into ``out``.
    Returns ``{"table", "slopes_table", "plot", "rows", "slopes"}``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"k: expected a finite exponent >= 0, got {k!r}")
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in steps):
        raise ValueError(f"steps: expected step counts >= 2 (Karras levels), got {list(steps)!r}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if isinstance(fit, bool) or not isinstance(fit, int) or fit < 2:
        raise ValueError(f"fit: expected an int >= 2 (step counts in the slope fit), got {fit!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    v = torch.arange(1, n + 1, dtype=torch.float64)
    lam, mu = v ** -k, 0.5 * v ** -0.5
    rows, slopes = [], {}
    steps = sorted(set(steps))
    for label, method, kw, det in SOLVERS:
        got = []
        for N in steps:
            sig = _karras(N, sigma_min, sigma_max)
            tab = trajectory_table(sig, method, **kw)
            m0, v0 = G.initial_law(tab)
            m, var = G.gaussian_sampler_law(lam, tab, mean=mu, init_mean=m0, init_var=v0)
            ode = math.nan
            if det:  # over sigma_max .. sigma_min: EDM's last step (sigma_min -> 0) has the same size at every N
                t2 = trajectory_table(sig[:-1], method, **kw)
                m2, var2 = G.gaussian_sampler_law(lam, t2, mean=mu, init_mean=m0, init_var=v0)
                mr, vr = G.exact_flow_law(lam, (1.0, sig[0]), (1.0, sig[-2]), mean=mu, init_mean=m0, init_var=v0)
                ode = G.w2(m2, var2, mr, vr)
            r = {"solver": label, "steps": N, "nfe": G.nfe(tab), "w2": G.w2(m, var, mu, lam),
                 "kl": G.kl(m, var, mu, lam) if bool((var > 0).all()) else math.inf, "w2_ode": ode}
            got.append(r)
        rows += got
        tail = got[-fit:]
        slopes[label] = {key: _slope([r["nfe"] for r in tail], [r[key] for r in tail]) for key in ("w2", "kl", "w2_ode")}
    table = os.path.join(out, "sampler-error.csv")
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["solver", "steps", "nfe", "w2", "kl", "w2_ode"])
        for r in rows:
            w.writerow([r["solver"], r["steps"], r["nfe"]] + [f"{r[c]:.6e}" for c in ("w2", "kl", "w2_ode")])
    slope_table = os.path.join(out, "sampler-error-slopes.csv")
    with open(slope_table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["solver", "fit_nfe_from", "fit_nfe_to", "slope_w2", "slope_kl", "slope_w2_ode"])
        for label, s in slopes.items():
            nf = [r["nfe"] for r in rows if r["solver"] == label][-fit:]
            w.writerow([label, nf[0], nf[-1]] + [f"{s[c]:.3f}" for c in ("w2", "kl", "w2_ode")])
    png = _plot(rows, out) if plot else None
    return {"table": table, "slopes_table": slope_table, "plot": png, "rows": rows, "slopes": slopes}


def _plot(rows, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("w2", "kl", "w2_ode"),
                              ("W2 to the data", "KL(sample || data)", "W2 to the exact ODE (deterministic)")):
        for label in dict.fromkeys(r["solver"] for r in rows):
            pts = [(r["nfe"], r[key]) for r in rows if r["solver"] == label and r[key] > 0 and math.isfinite(r[key])]
            if pts:
                det = next(d for lab, _, _, d in SOLVERS if lab == label)
                ax.loglog(*zip(*pts), marker="o" if det else "s", ms=3, ls="-" if det else "--", label=label)
        ax.set_xlabel("NFE (denoiser evaluations)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "sampler-error.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Plots of a sweep store (matplotlib, PNG), each with the CSV of exactly what it shows beside it.

- subspace-recovery: success-rate heat map over (d, N), one panel per other varying parameter
  (K, learner, ...), with the lines N = d and N = K d (seed 002 Fig. 4);
- linear-diffusion: covariance error (and its exact expectation), KL and test (and train) loss against
  N/n, with the line N = n (seed 001's transition: the sampled law is singular, KL +inf, up to N = n);
- memorization-images: memorized fraction against N per image denoiser, its error bars the bootstrap
  95% interval (left), the distance to the nearest training image, and the collapse time where computed;
- memorization: memorized fraction and generalization (left), energy off the true support
  (right) against N/d, one curve per denoiser;
- jacobian-rank: rank ratio against SNR = 1/sigma, with the d/n and K d/n levels (seed 002 Fig. 3b);
- network-generalization: GL score against N/d per d (seed 002 Fig. 5a), memorized and off-support beside.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Tuple

from fastdiff.sweeps.store import Store, atomic_write

__all__ = ["plot_store", "write_table"]


def _undefined_as_blank(v):
    """NaN in the aggregate means "no value": a metric the cell does not compute (kl_mc with
    mc_samples = 0), or a standard error with fewer than two finite trials.  The table leaves such a
    cell empty, as the rows CSV does for NULL, so no "nan" reads as a measured value."""
    return "" if isinstance(v, float) and math.isnan(v) else v


def _write_csv(path, rows):
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: _undefined_as_blank(v) for k, v in row.items()} for row in rows)
    return path


def _figure_class():
    """matplotlib's ``Figure`` (no pyplot: no GUI backend or figure manager to import, nothing to close)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plots need matplotlib (pip install 'fastdiff[plot]' or pip install matplotlib)") from None
    return Figure


def _save(fig, path):
    # zlib level 1: a third of the default's encode time, for a PNG a few percent larger
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", pil_kwargs={"compress_level": 1})


def _panels(agg, params, fixed):
    """Group aggregated rows by the parameters (other than ``fixed``) that take several values."""
    varying = [p for p in params if p not in fixed and len({r[p] for r in agg}) > 1]
    panels: Dict[Tuple, List[Dict]] = {}
    for r in agg:
        panels.setdefault(tuple((p, r[p]) for p in varying), []).append(r)
    return panels


def _subspace(Figure, agg, params, path):
    panels = _panels(agg, params, ("d", "N"))
    width = 4.2 * len(panels) + 1
    fig = Figure(figsize=(width, 4.0))
    # fixed margins (in inches) instead of constrained layout, which cost half the plot's time
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.3 / width, bottom=0.13, top=0.92, wspace=0.25)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (key, rs) in zip(axes[0], sorted(panels.items())):
        ds = sorted({r["d"] for r in rs})
        Ns = sorted({r["N"] for r in rs})
        grid = [[float("nan")] * len(Ns) for _ in ds]
        for r in rs:
            grid[ds.index(r["d"])][Ns.index(r["N"])] = r["success_mean"]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="gray", vmin=0, vmax=1,
                       extent=(Ns[0] - 0.5 * _step(Ns), Ns[-1] + 0.5 * _step(Ns), ds[0] - 0.5, ds[-1] + 0.5))
        K = rs[0]["K"]
        dd = [ds[0] - 0.5, ds[-1] + 0.5]
        ax.plot(dd, dd, "r-", lw=1.2, label="N = d")
        if K > 1:
            ax.plot([K * v for v in dd], dd, "c--", lw=1.2, label=f"N = {K} d")
        ax.set_xlim(Ns[0] - 0.5 * _step(Ns), Ns[-1] + 0.5 * _step(Ns))
        ax.set_ylim(ds[0] - 0.5, ds[-1] + 0.5)
        ax.set_xlabel("N (training samples)")
        ax.set_ylabel("d (subspace dimension)")
        ax.set_title(", ".join(f"{k}={v}" for k, v in key) or f"K={K}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="success rate", fraction=0.9 / width, pad=0.15 / width)
    _save(fig, path)


def _step(vals):
    return min(b - a for a, b in zip(vals, vals[1:])) if len(vals) > 1 else 1


def _linear(Figure, agg, params, path):
    panels = _panels(agg, params, ("N",))
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for i, (key, rs) in enumerate(sorted(panels.items())):
        rs = sorted(rs, key=lambda r: r["N"])
        # N / n: the sampled law is singular (memorization) up to N = n, whatever the spectrum (seed 001)
        x = [r["N"] / r["n"] for r in rs]
        lab = ", ".join(f"{k}={v}" for k, v in key)
        c = f"C{i % 10}"
        axes[0].errorbar(x, [r["cov_error_mean"] for r in rs], yerr=[r["cov_error_se"] for r in rs], fmt="o-", color=c,
                         ms=3, label=lab or "measured")
        axes[0].plot(x, [r["expected_cov_error_mean"] for r in rs], "--", color=c,
                     label="E: ((N - 1)(d_eff + 1) + 1)/N^2" if "train_loss_mean" in rs[0] else "(d_eff + 1)/N")
        kl = [r["kl_mean"] for r in rs]
        axes[1].errorbar(x, kl, yerr=[r["kl_se"] for r in rs], fmt="o-", color=c, ms=3, label=lab)
        # +inf (a singular sampled law: Sigma_0 + ridge I of rank < n) cannot be drawn on a log axis:
        # a marker on the top edge says where, instead of a silently missing point
        inf_x = [xi for xi, v in zip(x, kl) if v == math.inf]
        if inf_x:
            axes[1].plot(inf_x, [0.97] * len(inf_x), "^", color=c, ms=6, clip_on=False,
                         transform=axes[1].get_xaxis_transform(),
                         label="KL = +inf (singular sampled law)")
        if any(not math.isnan(r["kl_mc_mean"]) for r in rs):
            ok = [r.get("kl_mc_meaningful_mean", 1.0) for r in rs]
            good = [(xi, r["kl_mc_mean"]) for xi, r, o in zip(x, rs, ok) if o == 1.0 and math.isfinite(r["kl_mc_mean"])]
            axes[1].plot([g[0] for g in good], [g[1] for g in good], "x", color=c,
                         label="Monte Carlo (fused ddpm_step)")
            flagged = [xi for xi, o in zip(x, ok) if not o == 1.0]
            if flagged:
                axes[1].plot(flagged, [0.03] * len(flagged), "v", color=c, mfc="none", ms=6, clip_on=False,
                             transform=axes[1].get_xaxis_transform(),
                             label="Monte Carlo flagged not meaningful")
        axes[2].plot(x, [r["test_loss_mean"] for r in rs], "o-", color=c, ms=3, label=lab or "test")
        if "train_loss_mean" in rs[0]:    # a store from before version 3 has no train loss
            axes[2].plot(x, [r["train_loss_mean"] for r in rs], "s:", color=c, ms=3, mfc="none", label="train")
    for ax, name in zip(axes, ("||Sigma - Sigma_0||_F^2 / ||Sigma||_F^2", "KL(sampled || data)",
                               "loss E||eps - eps_hat||^2 (test, train)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N / n")
        ax.set_title(name, fontsize=9)
        ax.axvline(1.0, color="gray", lw=0.8, label="N = n" if ax is axes[1] else None)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _curves(Figure, agg, params, x: str, y: str, fixed: str, fallback: str, ax=None, style="o-", suffix=""):
    """One error-bar curve of metric ``y`` (mean and standard error) against the aggregate column
    ``x`` per combination of the other varying parameters (``fixed`` varies along a curve), on
    ``ax`` or a new (6, 4) figure; returns (fig, ax, [(color, rows sorted by x)])."""
    fig = None
    if ax is None:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
    curves = []
    for i, (key, rs) in enumerate(sorted(_panels(agg, params, (fixed,)).items())):
        rs = sorted(rs, key=lambda r: r[x])
        color = f"C{i % 10}"
        ax.errorbar([r[x] for r in rs], [r[f"{y}_mean"] for r in rs], yerr=[r[f"{y}_se"] for r in rs],
                    fmt=style, ms=3, color=color, mfc="none" if style != "o-" else None,
                    label=(", ".join(f"{k}={v}" for k, v in key) or fallback) + suffix)
        curves.append((color, rs))
    ax.set_xscale("log")
    return fig, ax, curves


def _finish(fig, ax, path, xlabel, ylabel):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _memorization(Figure, agg, params, path):
    # within a curve d is fixed, so N / d orders the points as N does
    if "off_support_mean" not in agg[0]:   # a store from before version 2: the memorized fraction only
        fig, ax, _ = _curves(Figure, agg, params, "N_over_d_mean", "memorized", "N", "memorized")
        ax.set_ylim(-0.03, 1.03)
        ax.axvline(1.0, color="gray", lw=0.8)
        _finish(fig, ax, path, "N / d", "memorized fraction (||x - y1|| / ||x - y2|| < 1/3)")
        return
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    _curves(Figure, agg, params, "N_over_d_mean", "memorized", "N", "memorized", ax=left, suffix=": memorized")
    _curves(Figure, agg, params, "N_over_d_mean", "generalization", "N", "generalization", ax=left, style="s:",
            suffix=": generalized")
    left.set_ylim(-0.03, 1.03)
    left.set_ylabel("fraction of samples")
    left.set_title("memorized (o), generalized: neither memorized nor off the support (s)", fontsize=8)
    _curves(Figure, agg, params, "N_over_d_mean", "off_support", "N", "off support", ax=right)
    right.set_ylim(-0.03, 1.03)
    right.set_ylabel("energy off the true support")
    right.set_title("sum_i min_k ||x_i - U_k U_k^T x_i||^2 / sum_i ||x_i||^2", fontsize=8)
    for ax in (left, right):
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("N / d")
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def _memorization_images(Figure, agg, params, path):
    """Left: the memorized fraction against N per denoiser, its error bar the bootstrap 95% interval
    over samples (the table's ``memorized_lo_mean`` .. ``memorized_hi_mean``: each trial's interval,
    averaged over trials); middle: the distance to the nearest training image; right (where the
    store has one): the collapse time of the training sets (mean and standard error over trials).
    Returns the figure."""
    collapse = any(math.isfinite(r.get("collapse_time_mean", math.nan)) for r in agg)
    fig = Figure(figsize=(16 if collapse else 11, 4))
    axes = fig.subplots(1, 3 if collapse else 2)
    left, right = axes[0], axes[1]
    for i, (key, rs) in enumerate(sorted(_panels(agg, params, ("N",)).items())):
        rs = sorted(rs, key=lambda r: r["N"])
        m = [r["memorized_mean"] for r in rs]
        lo = [max(mi - r["memorized_lo_mean"], 0.0) for mi, r in zip(m, rs)]   # >= 0 against rounding
        hi = [max(r["memorized_hi_mean"] - mi, 0.0) for mi, r in zip(m, rs)]
        left.errorbar([r["N"] for r in rs], m, yerr=[lo, hi], fmt="o-", ms=3, capsize=3, color=f"C{i % 10}",
                      label=", ".join(f"{k}={v}" for k, v in key) or "memorized")
    left.set_xscale("log")
    left.set_ylim(-0.03, 1.03)
    left.set_title("memorized: ||x - y1|| / ||x - y2|| < 1/3 (bars: bootstrap 95% over samples)", fontsize=8)
    _curves(Figure, agg, params, "N", "nearest_rms", "N", "nearest", ax=right)
    right.set_title("distance to the nearest training image, per pixel (RMS)", fontsize=8)
    labelled = [(left, "fraction memorized"), (right, "||x - y1|| / sqrt(n)")]
    if collapse:
        rows = [r for r in agg if math.isfinite(r.get("collapse_time_mean", math.nan))]
        _curves(Figure, rows, params, "N", "collapse_time", "N", "t_C", ax=axes[2])
        axes[2].set_title("collapse time of the training set (excess entropy, Biroli et al. 2024)", fontsize=8)
        labelled.append((axes[2], "t_C (OU time; VE sigma = sqrt(e^(2 t_C) - 1))"))
    for ax, label in labelled:
        ax.set_xlabel("training images N")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _jacobian_rank(Figure, agg, params, path):
    fig, ax, curves = _curves(Figure, agg, params, "snr_mean", "ratio", "level", "rank / n")
    for color, rs in curves:
        n, K, d = rs[0]["n"], rs[0]["K"], rs[0]["d"]
        ax.axhline(d / n, color=color, ls=":", lw=0.8)
        ax.axhline(K * d / n, color=color, ls="--", lw=0.8)
    _finish(fig, ax, path, "SNR = 1 / sigma", "Jacobian rank / n   (dotted d/n, dashed Kd/n)")


def _networks(Figure, agg, params, path):
    # seed 002 Fig. 5a: GL against N / d, one curve per d (and arch, ...); memorized and off-support beside
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    _curves(Figure, agg, params, "N_over_d_mean", "gl", "N", "GL", ax=left)
    left.axhline(1.0, color="gray", lw=0.8)
    left.set_ylabel("GL score (seed 002 eq. 21)")
    _curves(Figure, agg, params, "N_over_d_mean", "memorized", "N", "all", ax=right, suffix=": memorized")
    _curves(Figure, agg, params, "N_over_d_mean", "off_support", "N", "all", ax=right, style="s:",
            suffix=": off support")
    right.set_ylim(-0.03, 1.03)
    right.set_ylabel("memorized fraction (o), energy off the support (s)")
    for ax in (left, right):
        ax.set_xlabel("N / d")
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


PLOTTERS = {"subspace-recovery": _subspace, "linear-diffusion": _linear, "memorization": _memorization,
            "memorization-images": _memorization_images, "jacobian-rank": _jacobian_rank,
            "network-generalization": _networks}


def write_table(store_path: str, out_dir: str = "results") -> str:
    """Write ``<experiment>.csv``, the per-cell table (parameters, trials, each metric's mean and
    standard error) of the store at ``store_path``, into ``out_dir``; returns its path.  Needs no
    matplotlib: ``fastdiff sweep --no-plot`` writes it too."""
    experiment, agg, _ = _aggregate(store_path)
    os.makedirs(out_dir, exist_ok=True)
    return _write_csv(os.path.join(out_dir, f"{experiment}.csv"), agg)


def _aggregate(store_path):
    experiment, params, metrics = Store.read_experiment(store_path)
    with Store(store_path, experiment, params, metrics) as st:
        agg = st.aggregate()
    if not agg:
        raise ValueError(f"plot: {store_path} holds no rows yet")
    return experiment, agg, [p for p, _ in params]


def plot_store(store_path: str, out_dir: str = "results") -> Dict[str, str]:
    """Write ``<experiment>.png`` and ``<experiment>.csv`` (the aggregated table it shows) for the store
    at ``store_path`` into ``out_dir``; returns ``{"plot": ..., "table": ...}``.  The table is written
    first, so it is there also where matplotlib is missing (``RuntimeError``)."""
    experiment, params, _ = Store.read_experiment(store_path)
    if experiment not in PLOTTERS:
        raise ValueError(f"plot: no plot for experiment {experiment!r} (have {sorted(PLOTTERS)})")
    experiment, agg, pnames = _aggregate(store_path)
    os.makedirs(out_dir, exist_ok=True)
    table = _write_csv(os.path.join(out_dir, f"{experiment}.csv"), agg)
    plot = os.path.join(out_dir, f"{experiment}.png")
    PLOTTERS[experiment](_figure_class(), agg, pnames, plot)
    return {"plot": plot, "table": table}

"""Memorization on image data: which analytic denoisers copy their training images (docs/math.md section 4).

A cell draws N training images from a data set (scikit-learn's 8x8 digits, or a synthetic
CIFAR-shaped set), builds one of the training-set denoisers, samples ``samples`` images with
Heun's method on a Karras schedule (:func:`fastdiff.sample`) and reports the fraction memorized
(``||x - y_(1)|| / ||x - y_(2)|| < 1/3``, :func:`fastdiff.sweeps.memorization.memorized`) with a
bootstrap 95% interval over the samples, and the mean distance to the nearest training image per
pixel.  Denoisers:

- ``empirical``: the global optimal denoiser (:class:`fastdiff.denoisers.Empirical`), which copies;
- ``local``: the local patch machine (each pixel sees the training patches at its position);
- ``equivariant``: the equivariant local machine (every training patch at every position:
  M. Kamb and S. Ganguli, ICML 2025), whose samples are new mosaics of training patches;
- ``gaussian``: the Gaussian fitted to the training images (mean and covariance);
- ``gmm``: a Gaussian mixture with one component per label present in the subset (the class
  mean, the class frequency as weight) and the pooled within-class covariance shared by all
  (``sum_k sum_{i in k} (y_i - m_k)(y_i - m_k)^T / N``, rank <= N - K: the "tied" mixture),
  :class:`fastdiff.denoisers.GaussianMixture`; with one image per class it is the empirical
  denoiser and copies;
- ``molrg``: a learned MoLRG (:class:`fastdiff.denoisers.MoLRG`) on the centred images: K =
  ``components`` subspaces of dimension ``rank`` from K-subspaces (:mod:`fastdiff.sweeps.learners`,
  4 restarts, 40 iterations; PCA for K = 1), each point assigned to its best subspace, ``pi_k`` the
  assigned fractions, ``tau_k^2 = mean ||U_k^T y||^2 / rank - delta^2`` and the floor ``delta^2`` the
  residual energy per off-subspace coordinate; the denoiser is ``m + MoLRG(x - alpha m)``.

With ``collapse_samples`` > 0 a trial also reports ``collapse_time``, the OU collapse time t_C of its
training subset from the excess entropy (:func:`fastdiff.sweeps.collapse.collapse_time`, Biroli et
al. 2024; docs/math.md section 4c), the same for every denoiser; NaN when not computed.

Each trial draws its own training subset (seeded), so the interval over trials shows the spread
over training sets; the bootstrap interval the spread over samples.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import fastdiff
from fastdiff import data as D
from fastdiff.sweeps.collapse import DEFAULT_TIMES, collapse_time
from fastdiff.sweeps.learners import fit_bases, psd_project
from fastdiff.sweeps.memorization import memorized
from fastdiff.sweeps.runner import Experiment, Param, register
from fastdiff.sweeps.streams import normals

__all__ = ["IMAGE_DENOISERS", "DATASETS", "bootstrap_interval"]

IMAGE_DENOISERS = ("empirical", "local", "equivariant", "gaussian", "gmm", "molrg")
DATASETS = ("digits", "synthetic")
_S_SUBSET, _S_SAMPLE, _S_BOOT, _S_COLLAPSE = 11, 12, 13, 14   # Philox windows of a cell (fastdiff.sweeps.streams numbers 0-3)
_CACHE: Dict[str, D.ImageSet] = {}


def _dataset(name: str) -> D.ImageSet:
    if name not in _CACHE:
        _CACHE[name] = D.digits() if name == "digits" else D.synthetic(2000, (3, 16, 16), seed=0)
    return _CACHE[name]


def bootstrap_interval(flags: torch.Tensor, *, reps: int = 2000, level: float = 0.95, seed: int = 0):
    """The percentile bootstrap interval of the mean of 0/1 ``flags`` (M,): ``(lo, hi)``."""
    g = torch.Generator().manual_seed(seed)
    f = flags.double().reshape(-1)
    means = f[torch.randint(f.numel(), (reps, f.numel()), generator=g)].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def _denoiser(c: Dict, train: D.ImageSet, seed: int, trial: int):
    kind = c["denoiser"]
    if kind == "empirical":
        return fastdiff.denoisers.Empirical(train)
    if kind in ("local", "equivariant"):
        return fastdiff.denoisers.PatchDenoiser(train, c["patch"], mode=kind)
    X = train.float(dtype=torch.float64, flatten=True)
    if kind == "gmm":
        return _tied_mixture(X, train.labels)
    if kind == "molrg":
        return _learned_molrg(X, c["components"], c["rank"], seed, trial)
    mu = X.mean(0)
    cov = psd_project(((X - mu).T @ (X - mu) / len(X))[None])[0]
    return fastdiff.denoisers.Gaussian(mu.float(), cov.float())


def _tied_mixture(X: torch.Tensor, labels: torch.Tensor) -> "fastdiff.denoisers.GaussianMixture":
    """One component per label present in X (N, n) float64: class means, class frequencies, and the
    pooled within-class ML covariance (PSD-projected) shared by every component."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    K = len(classes)
    counts = torch.bincount(inverse, minlength=K).double()
    means = torch.zeros(K, X.shape[1], dtype=torch.float64).index_add_(0, inverse, X) / counts[:, None]
    R = X - means[inverse]
    cov = psd_project((R.T @ R / len(X))[None])[0]
    return fastdiff.denoisers.GaussianMixture(means, cov.expand(K, -1, -1).contiguous(), counts / counts.sum())


class _CentredMoLRG:
    """``x0_hat(x) = m + MoLRG(x - alpha m)``: the MoLRG model of the centred data ``y - m``."""

    def __init__(self, mean: torch.Tensor, model: "fastdiff.denoisers.MoLRG"):
        self.mean, self.model = mean, model

    def __call__(self, x, alpha, sigma):
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1)
        m = self.mean.to(x.device, x.dtype)
        return m + self.model(x - a * m, alpha, sigma)


def _learned_molrg(X: torch.Tensor, K: int, rank: int, seed: int, trial: int) -> _CentredMoLRG:
    """Bases from K-subspaces (PCA for K = 1) on the centred X (N, n); pi, tau and delta fitted."""
    N, n = X.shape
    mean = X.mean(0)
    Xc = (X - mean).float()
    learner = "pca" if K == 1 else "ksubspaces"
    U = fit_bases(learner, Xc[None], torch.full((1,), float(N), dtype=torch.float64), K, rank, [(seed, trial)],
                  {"restarts": 4, "max_iter": 40})[0].double()                        # (K, n, rank)
    Xd = Xc.double()
    on = (Xd @ U).square().sum(-1).T                                                  # (N, K): ||U_k^T y||^2
    best, label = on.max(1)
    counts = torch.bincount(label, minlength=K).double()
    # the floor: residual energy per off-subspace coordinate; the spread along U_k above it
    delta2 = float((Xd.square().sum(1) - best).clamp(min=0).sum()) / (N * max(n - rank, 1))
    per = torch.zeros(K, dtype=torch.float64).index_add_(0, label, best) / counts.clamp(min=1) / rank
    tau = (per - delta2).clamp(min=1e-8).sqrt()
    model = fastdiff.denoisers.MoLRG(U.float(), pi=counts / N, tau=tau, delta=delta2 ** 0.5)
    return _CentredMoLRG(mean.float(), model)


def _collapse(c: Dict, train: D.ImageSet, seed: int, trial: int) -> float:
    if c["collapse_samples"] == 0:
        return float("nan")
    try:
        return collapse_time(train, samples=c["collapse_samples"], seed=seed ^ (_S_COLLAPSE << 56) ^ trial)
    except ValueError:   # the grid does not bracket the crossing (duplicated images keep H(mu | x) >= log 2)
        return float("nan")


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    rows = []
    for ci, (c, seed) in enumerate(zip(cells, seeds)):
        full = _dataset(c["dataset"])
        for t in range(trials):
            # the trial's training subset: a random permutation from the cell's own Philox window
            idx = normals(seed, _S_SUBSET, len(full), step=t).argsort()[:c["N"]]
            train = full[idx]
            den = _denoiser(c, train, seed, t)
            sched = fastdiff.KarrasSchedule(c["steps"], sigma_max=c["sigma_max"], sigma_min=0.002)
            x = fastdiff.sample(den, (c["samples"], train.n), sched, "heun", progress=False, device=device,
                                generator=fastdiff.Generator(seed, (_S_SAMPLE << 52) + (t << 32)))
            Y = train.float(flatten=True, device=device)
            mem = memorized(x.cpu(), Y.cpu())
            d1 = fastdiff.nearest_neighbors(x, Y, 1)[0][:, 0]
            lo, hi = bootstrap_interval(mem, seed=(seed ^ (_S_BOOT << 56) ^ t) & ((1 << 63) - 1))
            rows.append({"cell_index": ci, "trial": t, "memorized": float(mem.double().mean()),
                         "memorized_lo": lo, "memorized_hi": hi,
                         "nearest_rms": float((d1 / train.n ** 0.5).mean()),
                         "collapse_time": _collapse(c, train, seed, t)})
    return rows, fastdiff.dispatch.choose("fused_step", "auto", device, torch.float32)


def _check(c: Dict) -> None:
    if c["dataset"] not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {c['dataset']!r}")
    if c["denoiser"] not in IMAGE_DENOISERS:
        raise ValueError(f"denoiser: expected one of {IMAGE_DENOISERS}, got {c['denoiser']!r}")
    if c["N"] < 2:
        raise ValueError(f"N: expected at least 2 training images (the memorization ratio needs two neighbours), got {c['N']}")
    if c["dataset"] == "digits" and c["N"] > 1797:
        raise ValueError(f"N: the digits data set has 1797 images, got {c['N']}")
    if c["patch"] < 1 or c["patch"] % 2 == 0:
        raise ValueError(f"patch: expected an odd int >= 1, got {c['patch']}")
    for name in ("samples", "steps", "components", "rank"):
        if c[name] < 1:
            raise ValueError(f"{name}: expected a positive int, got {c[name]}")
    if c["rank"] > (64 if c["dataset"] == "digits" else 768):
        raise ValueError(f"rank: expected at most the image size, got {c['rank']}")
    if c["collapse_samples"] < 0 or c["collapse_samples"] == 1:
        raise ValueError(f"collapse_samples: expected 0 (no collapse time) or >= 2, got {c['collapse_samples']}")
    if not c["sigma_max"] > 0:
        raise ValueError(f"sigma_max: expected > 0, got {c['sigma_max']}")


def _keys_per_query(c: Dict) -> float:
    """Training-sized vectors each sample meets per model call: N; N H W patches for the equivariant
    machine; a (n, n) covariance per class (at most 10 labels) for gmm; K rank basis vectors for molrg."""
    pixels, n = (64, 64) if c["dataset"] == "digits" else (256, 768)     # H W and C H W
    per = {"equivariant": c["N"] * pixels, "gmm": min(c["N"], 10) * n, "molrg": c["components"] * c["rank"]}
    return per.get(c["denoiser"], c["N"])


register(Experiment(
    name="memorization-images",
    description="fraction of Heun samples that copy a training image (bootstrap 95% interval), per image denoiser and N",
    params=(
        Param("dataset", str, ("digits",), "digits (scikit-learn's 8x8) or synthetic (3x16x16)", DATASETS),
        Param("N", int, (10, 30, 100, 300), "training images (a random subset per trial)"),
        Param("denoiser", str, ("empirical", "local", "equivariant", "gaussian", "gmm", "molrg"),
              "empirical, local, equivariant (local patch machines), gaussian, gmm (per label, tied covariance) "
              "or molrg (learned by K-subspaces)", IMAGE_DENOISERS),
        Param("patch", int, (3,), "patch side of the local machines (odd)"),
        Param("samples", int, (64,), "samples per trial"),
        Param("steps", int, (12,), "Heun steps (Karras schedule, 2 steps - 1 model calls)"),
        Param("sigma_max", float, (10.0,), "largest noise level (the data lie in [-1, 1])"),
        Param("components", int, (10,), "molrg: subspaces K"),
        Param("rank", int, (4,), "molrg: dimension of each subspace"),
        Param("collapse_samples", int, (0,), "Monte Carlo samples of the collapse time (0: not computed)"),
    ),
    metrics=(("memorized", float), ("memorized_lo", float), ("memorized_hi", float), ("nearest_rms", float),
             ("collapse_time", float)),
    run_batch=_run_batch,
    check=_check,
    batch_key=lambda c: (c["dataset"], c["denoiser"], c["N"]),
    instance_cost=lambda c: (c["samples"] * (2 * c["steps"]) * _keys_per_query(c)
                             + c["collapse_samples"] * len(DEFAULT_TIMES) * c["N"]) / 2e6,
    # the chains' per-key work, the gmm's covariances (eigenbasis, eigenvalues, a float32 copy), the
    # collapse draws (float64 points and noise)
    instance_bytes=lambda c: (4.0 * c["samples"] * _keys_per_query(c) * 2
                              + (24.0 * min(c["N"], 10) * (64 if c["dataset"] == "digits" else 768) ** 2
                                 if c["denoiser"] == "gmm" else 0.0)
                              + 16.0 * c["collapse_samples"] * (64 if c["dataset"] == "digits" else 768)),
    max_cost=20.0,
    version=2,   # 2: gmm and molrg denoisers, the collapse_time column
))

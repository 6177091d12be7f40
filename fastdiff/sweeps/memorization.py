"""Memorization vs generalization (SPEC 4): sample with a denoiser built from N training points of
MoLRG data and count the samples that copy a training point.

A sample x is memorized when ``||x - y_(1)|| / ||x - y_(2)|| < 1/3`` (nearest and second-nearest
training points, :func:`fastdiff.nearest_neighbors`).  Not copying is not generalizing: a model
can produce new points off the data's support (PCA bases learned from N < d points span N - 1 data
directions and d - N + 1 noise directions), so beside ``memorized`` a cell reports how far the
sampled distribution is from the truth (docs/math.md section 4):

- ``off_support``: the samples' energy off the true support, ``sum_i min_k ||x_i - U_k U_k^T x_i||^2
  / sum_i ||x_i||^2`` (U_k the data's true bases; 0 for a model that samples on the subspaces);
- ``w2``: for Gaussian data (K = 1: ``N(0, U U^T)``) the Wasserstein-2 distance between the
  Gaussian of the samples' mean and covariance and the truth, ``W2^2 = ||m||^2 + tr S + tr Sigma
  - 2 tr (Sigma^1/2 S Sigma^1/2)^1/2`` (exact for a Gaussian sampled law, as the ``linear``
  model's; a lower bound on the sampled law's W2 otherwise, Gelbrich 1990); NaN for K > 1 (a
  mixture is not Gaussian);
- ``generalization``: the fraction of samples that are neither memorized nor off the support
  (``min_k ||x - U_k U_k^T x||^2 > OFF_SUPPORT_TOL ||x||^2``, tolerance 0.1).

Denoisers (``--denoiser``):

- ``empirical``: the optimal denoiser of the training set (:class:`fastdiff.denoisers.Empirical`),
  which reproduces training points;
- ``molrg``: the MoLRG denoiser (:class:`fastdiff.denoisers.MoLRG`) with bases learned from the
  training set by PCA (K = 1) or K-subspaces (:mod:`fastdiff.sweeps.learners`);
- ``linear``: the Gaussian fitted to the training set (:class:`fastdiff.denoisers.Gaussian`), its
  covariance projected onto the PSD cone (:func:`fastdiff.sweeps.learners.psd_project`).  It
  memorizes at N = 2 (the fitted law is a line through the two points: a fraction
  ``2 (Phi(2) - Phi(1/2)) = 0.571`` of its samples fall within 1/3 of a point's distance to the
  other) and generalizes from N ~ 2 d on.

Sampling is DDPM (seed 001's schedule) from ``x_T ~ N(0, I)``, in :func:`sample_ddpm`: the sampler
loop :func:`fastdiff.sampling.run` over the fused :func:`fastdiff.ddpm_step`, the one place to swap
in a fused trajectory sampler.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

import fastdiff
from fastdiff import sampling
from fastdiff.sweeps.learners import DENOISERS, fit_denoisers
from fastdiff.sweeps.linear import _schedule
from fastdiff.sweeps.params import (check_at_least_one, check_d_fits, check_ddpm_steps, check_orthogonal_fits,
                                    ddpm_steps, molrg_shape, training_samples)
from fastdiff.sweeps.runner import Experiment, Param, register
from fastdiff.sweeps.subspace import molrg_instances

__all__ = ["sample_ddpm", "memorized_fraction", "memorized", "off_support", "gaussian_w2", "DENOISERS"]

MEMORIZED_RATIO = 1.0 / 3.0
OFF_SUPPORT_TOL = 0.1   # a sample with more than this share of its energy off the subspaces is not on the support
_S_SAMPLE = 7


def sample_ddpm(denoisers: Sequence[Callable], n: int, M: int, sched: fastdiff.DDPMSchedule,
                generator: fastdiff.Generator, device="cpu") -> torch.Tensor:
    """``M`` DDPM samples (I, M, n) from each of the I denoisers ``den(x, alpha, sigma) -> x0_hat``,
    all I x M chains advanced by one fused ``ddpm_step`` per timestep (:func:`fastdiff.sampling.run`,
    noise from ``generator``), on ``device``."""
    I = len(denoisers)
    x = fastdiff.randn(I * M, n, generator=generator, device=device)

    def all_instances(x, alpha, sigma):  # the I x M chains as one batch, each instance's rows to its denoiser
        return torch.cat([den(xi, alpha, sigma) for den, xi in zip(denoisers, x.view(I, M, n))])

    x = sampling.run(all_instances, x, sampling.trajectory_table(sched, "ddpm"), generator=generator, progress=False)
    return x.view(I, M, n)


def memorized(samples: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Per sample of ``samples`` (M, n): True where its nearest / second-nearest training distance
    in ``data`` (N, n) is < 1/3 (all True for N = 1: the ratio is undefined and the sample's
    nearest is the one point; counted as copied)."""
    if data.shape[0] < 2:
        return torch.ones(samples.shape[0], dtype=torch.bool, device=samples.device)
    dist, _ = fastdiff.nearest_neighbors(samples.double(), data.double(), 2)
    return dist[:, 0] < MEMORIZED_RATIO * dist[:, 1]


def memorized_fraction(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Fraction of ``samples`` (M, n) with nearest / second-nearest training distance < 1/3."""
    return float(memorized(samples, data).double().mean())


def off_support(samples: torch.Tensor, bases: torch.Tensor):
    """``(per_sample, energy)`` for ``samples`` (I, M, n) and the true bases (I, K, n, d), float64:
    ``per_sample`` (I, M) the share of each sample's energy off the support,
    ``min_k ||x - U_k U_k^T x||^2 / ||x||^2`` (0 for x = 0), and ``energy`` (I,) the samples' total
    energy off it, ``sum_i min_k ||x_i - U_k U_k^T x_i||^2 / sum_i ||x_i||^2``."""
    if samples.ndim != 3 or bases.ndim != 4 or bases.shape[0] != samples.shape[0] or bases.shape[2] != samples.shape[2]:
        raise ValueError(f"off_support: expected samples (I, M, n) and bases (I, K, n, d), got "
                         f"{tuple(samples.shape)} and {tuple(bases.shape)}")
    x, U = samples.double(), bases.double()
    sq = x.square().sum(-1)                                            # (I, M)
    on = (x[:, None] @ U).square().sum(-1).amax(1)                     # (I, M): max_k ||U_k^T x||^2
    off = (sq - on).clamp(min=0)                                       # ||x - U_k U_k^T x||^2, orthonormal U_k
    per = torch.where(sq > 0, off / sq.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    total = sq.sum(1)
    return per, torch.where(total > 0, off.sum(1) / total.clamp(min=torch.finfo(torch.float64).tiny),
                            torch.zeros_like(total))


def _sqrt_psd(S: torch.Tensor) -> torch.Tensor:
    lam, V = torch.linalg.eigh(S)
    return (V * lam.clamp(min=0).sqrt()[..., None, :]) @ V.mT


def gaussian_w2(samples: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """W2 (I,) between ``N(m, S)``, the mean and ML covariance (1/M) of ``samples`` (I, M, n), and
    the truth ``N(0, cov)`` (cov (I, n, n)), float64 (the Bures-Wasserstein formula, Dowson and
    Landau 1982): ``W2^2 = ||m||^2 + tr S + tr cov - 2 tr (cov^1/2 S cov^1/2)^1/2``, clamped at 0
    against rounding."""
    if samples.ndim != 3 or cov.shape != (samples.shape[0], samples.shape[2], samples.shape[2]):
        raise ValueError(f"gaussian_w2: expected samples (I, M, n) and cov (I, n, n), got {tuple(samples.shape)} "
                         f"and {tuple(cov.shape)}")
    x, C = samples.double(), cov.double()
    m = x.mean(1)
    xc = x - m[:, None]
    S = xc.mT @ xc / x.shape[1]
    R = _sqrt_psd(C)
    cross = torch.linalg.eigvalsh(R @ S @ R).clamp(min=0).sqrt().sum(-1)
    tr = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(C, dim1=-2, dim2=-1).sum(-1)
    return (m.square().sum(-1) + tr - 2 * cross).clamp(min=0).sqrt()


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    rows = []
    for ci, (c, seed) in enumerate(zip(cells, seeds)):
        U, X, _ = molrg_instances(c["n"], c["K"], c["d"], c["N"], 0.0, "orthogonal", seed, trials)
        X = X.to(device)
        dens = fit_denoisers(c["denoiser"], X, c["K"], c["d"], seed)
        x = sample_ddpm(dens, c["n"], c["samples"], _schedule(c["T"]), fastdiff.Generator(seed, _S_SAMPLE << 52),
                        device)
        x = x.cpu()
        per, energy = off_support(x, U)
        # the truth is Gaussian for K = 1 (tau = 1, delta = 0): N(0, U U^T)
        w2 = gaussian_w2(x, U[:, 0] @ U[:, 0].mT).tolist() if c["K"] == 1 else [float("nan")] * trials
        for t in range(trials):
            mem = memorized(x[t], X[t].cpu())
            new = ~mem & (per[t] <= OFF_SUPPORT_TOL)
            rows.append({"cell_index": ci, "trial": t, "memorized": float(mem.double().mean()),
                         "generalization": float(new.double().mean()), "off_support": float(energy[t]),
                         "w2": w2[t], "N_over_d": c["N"] / c["d"]})
    return rows, fastdiff.dispatch.choose("fused_step", "auto", device, torch.float32)


def _check(c: Dict) -> None:
    check_at_least_one(c, ("n", "K", "d", "N", "samples", "T"))
    check_d_fits(c)
    check_orthogonal_fits(c)
    check_ddpm_steps(c)


register(Experiment(
    name="memorization",
    description="memorized fraction, energy off the support, W2 to the truth and generalization of DDPM samples vs N/d",
    params=(
        *molrg_shape((32,), (1,), (4,), "subspaces of the MoLRG data"),
        training_samples((2, 4, 8, 16, 32, 64)),
        Param("denoiser", str, DENOISERS, "empirical, molrg (learned bases) or linear (fitted Gaussian)", DENOISERS),
        Param("samples", int, (256,), "DDPM samples per instance"),
        ddpm_steps((1000,), "DDPM steps (seed 001 schedule)"),
    ),
    metrics=(("memorized", float), ("generalization", float), ("N_over_d", float), ("off_support", float),
             ("w2", float)),
    run_batch=_run_batch,
    check=_check,
    batch_key=lambda c: (c["n"], c["denoiser"]),
    instance_cost=lambda c: c["samples"] * c["T"] / 2.5e5,
    # data (N x n), the chains (samples x n), sample-to-training distances (samples x N), a fitted covariance
    instance_bytes=lambda c: 8.0 * (2 * c["N"] * c["n"] + c["n"] ** 2) + 16.0 * c["samples"] * c["n"]
                             + 12.0 * c["samples"] * c["N"],
    max_cost=20.0,
    version=2,   # 2: off_support and w2; generalization = neither memorized nor off the support
))

"""Memorization vs generalization (SPEC 4): sample with a denoiser built from N training points of
MoLRG data and count the samples that copy a training point.

A sample x is memorized when ``||x - y_(1)|| / ||x - y_(2)|| < 1/3`` (nearest and second-nearest
training points, :func:`fastdiff.nearest_neighbors`); the generalization score is the fraction not
memorized.  Denoisers (``--denoiser``):

- ``empirical``: the optimal denoiser of the training set (:class:`fastdiff.denoisers.Empirical`),
  which reproduces training points;
- ``molrg``: the MoLRG denoiser (:class:`fastdiff.denoisers.MoLRG`) with bases learned from the
  training set by PCA (K = 1) or K-subspaces (:mod:`fastdiff.sweeps.learners`);
- ``linear``: the Gaussian fitted to the training set (:class:`fastdiff.denoisers.Gaussian`).

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

__all__ = ["sample_ddpm", "memorized_fraction", "DENOISERS"]

MEMORIZED_RATIO = 1.0 / 3.0
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


def memorized_fraction(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Fraction of ``samples`` (M, n) with nearest / second-nearest training distance < 1/3."""
    if data.shape[0] < 2:
        return 1.0  # one training point: every sample's nearest is it, and the ratio is undefined; count as copied
    dist, _ = fastdiff.nearest_neighbors(samples.double(), data.double(), 2)
    return float((dist[:, 0] < MEMORIZED_RATIO * dist[:, 1]).double().mean())


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    rows = []
    for ci, (c, seed) in enumerate(zip(cells, seeds)):
        _, X, _ = molrg_instances(c["n"], c["K"], c["d"], c["N"], 0.0, "orthogonal", seed, trials)
        X = X.to(device)
        dens = fit_denoisers(c["denoiser"], X, c["K"], c["d"], seed)
        x = sample_ddpm(dens, c["n"], c["samples"], _schedule(c["T"]), fastdiff.Generator(seed, _S_SAMPLE << 52),
                        device)
        for t in range(trials):
            mem = memorized_fraction(x[t], X[t])
            rows.append({"cell_index": ci, "trial": t, "memorized": mem, "generalization": 1.0 - mem,
                         "N_over_d": c["N"] / c["d"]})
    return rows, fastdiff.dispatch.choose("fused_step", "auto", device, torch.float32)


def _check(c: Dict) -> None:
    check_at_least_one(c, ("n", "K", "d", "N", "samples", "T"))
    check_d_fits(c)
    check_orthogonal_fits(c)
    check_ddpm_steps(c)


register(Experiment(
    name="memorization",
    description="memorized fraction / generalization score of DDPM samples vs N/d",
    params=(
        *molrg_shape((32,), (1,), (4,), "subspaces of the MoLRG data"),
        training_samples((2, 4, 8, 16, 32, 64)),
        Param("denoiser", str, DENOISERS, "empirical, molrg (learned bases) or linear (fitted Gaussian)", DENOISERS),
        Param("samples", int, (256,), "DDPM samples per instance"),
        ddpm_steps((1000,), "DDPM steps (seed 001 schedule)"),
    ),
    metrics=(("memorized", float), ("generalization", float), ("N_over_d", float)),
    run_batch=_run_batch,
    check=_check,
    batch_key=lambda c: (c["n"], c["denoiser"]),
    instance_cost=lambda c: c["samples"] * c["T"] / 2.5e5,
    # data (N x n), the chains (samples x n), sample-to-training distances (samples x N), a fitted covariance
    instance_bytes=lambda c: 8.0 * (2 * c["N"] * c["n"] + c["n"] ** 2) + 16.0 * c["samples"] * c["n"]
                             + 12.0 * c["samples"] * c["N"],
    max_cost=20.0,
))

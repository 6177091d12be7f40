"""Jacobian rank against SNR along sampling trajectories (SPEC 3, seed 002 Sec. 2.2 / Fig. 3b).

For MoLRG data (n, K, d; orthogonal bases) the denoiser is the exact MoLRG posterior mean.  Each
trial draws an instance (bases) and ``samples`` trajectories of the EDM Heun sampler over a
``steps``-level Karras schedule from ``x = sigma_0 z``; at level ``level`` (0 = the noisiest) the
Jacobian rank of the denoiser at each trajectory point is computed in closed form from the span of
the bases (:func:`fastdiff.molrg_jacobian_rank`, never an n x n matrix) and averaged:
``ratio = mean rank / n``.  The paper's curve: ``K d / n`` at low SNR (every component's posterior
weight is spread) falling to ``d / n`` at high SNR (one component owns each point).

The levels of one (n, K, d, steps, samples, eta) share their random stream (the experiment's
``seed_params`` leave ``level`` out), so every level of a trial is measured on the same trajectories,
computed once per batch: a row does not depend on which other levels were swept with it.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import fastdiff
from fastdiff.sweeps.params import check_at_least_one, check_orthogonal_fits, molrg_shape
from fastdiff.sweeps.runner import Experiment, Param, register
from fastdiff.sweeps.streams import TRAJECTORY_NOISE, normals
from fastdiff.sweeps.subspace import molrg_instances

__all__ = ["rank_ratios"]


def rank_ratios(bases: torch.Tensor, noise: torch.Tensor, steps: int, eta: float, levels: int):
    """``(sigmas, ratios)`` for Karras levels ``0 .. levels-1`` of the Heun trajectories started at
    ``sigma_0 noise``: bases (K, n, d), noise (M, n); ratio = mean rank / n over the M points."""
    sigmas = [float(s) for s in fastdiff.KarrasSchedule(steps).sigmas]
    cut = sigmas[:levels] + [sigmas[levels]]  # the schedule stops right after the last level asked for
    tr = fastdiff.jacobian_rank_trajectory(fastdiff.denoisers.MoLRG(bases), noise, schedule=cut, eta=eta)
    return sigmas[:levels], (tr.ranks.double().mean(1) / bases.shape[1]).tolist()


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    groups: Dict[int, List[int]] = {}
    for ci, seed in enumerate(seeds):
        groups.setdefault(seed, []).append(ci)
    rows = []
    for seed, members in groups.items():
        c = cells[members[0]]
        levels = 1 + max(cells[ci]["level"] for ci in members)
        U, _, _ = molrg_instances(c["n"], c["K"], c["d"], 1, 0.0, "orthogonal", seed, trials)
        z = normals(seed, TRAJECTORY_NOISE, trials, c["samples"], c["n"])
        for t in range(trials):
            sigmas, ratios = rank_ratios(U[t].to(device, torch.float32), z[t].to(device, torch.float32), c["steps"],
                                         c["eta"], levels)
            for ci in members:
                lv = cells[ci]["level"]
                rows.append({"cell_index": ci, "trial": t, "sigma": sigmas[lv], "snr": 1.0 / sigmas[lv],
                             "ratio": ratios[lv]})
    return rows, fastdiff.dispatch.choose("fused_step", "auto", device, torch.float32)


def _check(c: Dict) -> None:
    check_at_least_one(c, ("n", "K", "d", "samples"))
    check_orthogonal_fits(c)
    if c["steps"] < 2:
        raise ValueError(f"--steps: expected at least 2 Karras levels, got {c['steps']}")
    if not 0 <= c["level"] < c["steps"]:
        raise ValueError(f"--level: expected 0 <= level < steps = {c['steps']}, got {c['level']}")
    if not 0 < c["eta"] <= 1:
        raise ValueError(f"--eta: expected 0 < eta <= 1, got {c['eta']}")


register(Experiment(
    name="jacobian-rank",
    description="rank / n of the MoLRG denoiser's Jacobian along EDM Heun trajectories, against SNR",
    params=(
        *molrg_shape((48,), (2,), (6,), "subspaces (orthogonal bases)"),
        Param("level", int, tuple(range(18)), "Karras level (0 = noisiest) at which the rank is taken"),
        Param("steps", int, (18,), "Karras levels of the Heun sampler (seed 002: 18)"),
        Param("samples", int, (32,), "trajectories per instance"),
        Param("eta", float, (0.99,), "energy level of the numerical rank (SPEC 3)"),
    ),
    metrics=(("sigma", float), ("snr", float), ("ratio", float)),
    run_batch=_run_batch,
    check=_check,
    batch_key=lambda c: (c["n"], c["K"], c["d"], c["steps"], c["samples"], c["eta"]),
    seed_params=lambda c: {k: v for k, v in c.items() if k != "level"},
    instance_cost=lambda c: c["samples"] / 64.0,
    # trajectories (samples x n) over the levels, the bases, per-sample K d x K d Gram matrices
    instance_bytes=lambda c: 8.0 * (4 * c["samples"] * c["n"] * c["steps"] + 2 * c["K"] * c["n"] * c["d"]
                                    + c["samples"] * (c["K"] * c["d"]) ** 2),
    max_cost=4096.0,
))

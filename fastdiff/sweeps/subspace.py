"""Subspace recovery (seed 002 Thm 2 and 4, Fig. 4): how many samples N recover a mixture of K
low-rank Gaussians of dimension d in R^n?

Per instance: draw MoLRG data ``x_i = U_{k_i} a_i + delta g_i`` (``a_i ~ N(0, I_d)``, components
uniform, or ``balanced``: exactly N_k = N/K points each, up to one), fit bases with a learner
(``pca``, ``ksubspaces``, ``sgd`` (seed 002's Algorithm 1) or ``adam``: :mod:`fastdiff.sweeps.learners`,
each batched over every instance of a batch of cells), and score

    err = min_P max_k ||Uh_{P(k)} Uh_{P(k)}^T - U_k U_k^T||_F / sqrt(2 d)     (success: err <= threshold)

Trial ``t`` of a cell reads fixed windows of the cell's Philox stream (:mod:`fastdiff.sweeps.streams`,
``t``-major), so it is the same instance whichever batch, executor or trial count runs it.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fastdiff import dispatch
from fastdiff.sweeps.alg1 import DEFAULTS as SGD, INITS
from fastdiff.sweeps.learners import ADAM_DEFAULTS as ADAM, LEARNERS, fit_bases
from fastdiff.sweeps.params import (check_at_least_one, check_d_fits, check_orthogonal_fits, molrg_shape,
                                    training_samples)
from fastdiff.sweeps.runner import Experiment, Param, register
from fastdiff.sweeps.streams import MOLRG_DATA, normals

__all__ = ["molrg_instances", "molrg_batch", "subspace_errors", "bottleneck_assignment"]

BASES = ("orthogonal", "random")
# float32: the sweep is GEMMs and QRs of 48 x d blocks, which float32 runs at twice float64's SIMD width
# (bench/test_bench_sweeps.py times the whole default sweep); errors of exact recoveries stay below 1e-3
# (threshold 0.1, tests/test_sweeps_subspace*.py); the error itself is scored in float64.
# (The C++ K-subspaces kernels take float32 too: fastdiff.ops.ksubspaces.DT.)
DT = torch.float32


# =========================================================================== data
def molrg_instances(n: int, K: int, d: int, N: int, delta: float, bases: str, seed: int, trials: int,
                    balanced: bool = False):
    """``trials`` MoLRG instances of one cell: bases (T, K, n, d), data (T, N, n), labels (T, N)."""
    U, X, labels = molrg_batch(n, K, d, [N], delta, bases, [seed], trials, balanced)
    return U, X, labels


def molrg_batch(n: int, K: int, d: int, Ns: Sequence[int], delta: float, bases: str, seeds: Sequence[int], trials: int,
                balanced: bool = False):
    """MoLRG instances of several cells (sample sizes ``Ns``, seeds ``seeds``), cell-major:
    bases (C T, K, n, d), data (C T, max N, n) zero-padded, labels (C T, max N) (-1 on padding).

    Each cell's numbers come from its own Philox windows; the arithmetic is batched over the cells.
    ``bases="orthogonal"``: the K bases are mutually orthogonal (QR of one n x Kd Gaussian);
    ``"random"``: independent (each its own QR), overlapping in general.
    ``balanced``: point i belongs to component ``i mod K`` (N_k = N/K, up to one; Thm 4 is stated
    per component), instead of a uniform draw; the stream windows are the same either way.
    """
    C, Nmax = len(Ns), max(Ns)
    G = torch.empty(C * trials, n, K * d, dtype=DT)
    a = torch.zeros(C * trials, Nmax, d, dtype=DT)
    labels = torch.full((C * trials, Nmax), -1, dtype=torch.long)
    noise = torch.zeros(C * trials, Nmax, n, dtype=DT) if delta else None
    for i, (N, seed) in enumerate(zip(Ns, seeds)):
        # one Philox window per trial holds its bases, coefficients, label draws and noise
        sizes = [n * K * d, N * d, N] + ([N * n] if delta else [])
        z = normals(seed, MOLRG_DATA, trials, sum(sizes)).split(sizes, dim=1)
        rows = slice(i * trials, (i + 1) * trials)
        G[rows] = z[0].reshape(trials, n, K * d)
        a[rows, :N] = z[1].reshape(trials, N, d)
        labels[rows, :N] = (torch.arange(N) % K).expand(trials, N) if balanced else \
            (torch.special.ndtr(z[2]) * K).long().clamp_(max=K - 1)   # uniform mixing weights
        if delta:
            noise[rows, :N] = z[3].reshape(trials, N, n)
    if bases == "orthogonal":
        U = torch.linalg.qr(G).Q.reshape(-1, n, K, d)
    else:
        U = torch.linalg.qr(G.reshape(-1, n, K, d).permute(0, 2, 1, 3)).Q.permute(0, 2, 1, 3)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), K).to(DT)   # padding rows have a = 0
    coef = (a[:, :, None, :] * onehot[..., None]).reshape(-1, Nmax, K * d)
    X = coef @ U.reshape(-1, n, K * d).mT
    if delta:
        X += delta * noise
    return U.permute(0, 2, 1, 3).contiguous(), X, labels


# =========================================================================== scoring
def subspace_errors(U_hat: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Per instance ``min_P max_k ||Uh_{P(k)} Uh_{P(k)}^T - U_k U_k^T||_F / sqrt(2 d)`` for bases
    (B, K, n, d) (orthonormal, equal d): a bottleneck assignment.  K <= 4: every permutation at
    once (vectorized over instances); larger K: per instance, the smallest threshold admitting a
    perfect matching, found by bisection with scipy's ``linear_sum_assignment``."""
    B, K, n, d = U.shape
    U_hat, U = U_hat.double(), U.double()  # sqrt(1 - overlap / d) loses half the digits: keep 8 of them
    # all K^2 products Uh_a^T U_c of an instance as one (K d, n) x (n, K d) GEMM
    M = U_hat.permute(0, 1, 3, 2).reshape(B, K * d, n) @ U.permute(0, 2, 1, 3).reshape(B, n, K * d)
    overlap = M.reshape(B, K, d, K, d).square().sum((2, 4))            # [b, a, c] = ||Uh_a^T U_c||_F^2
    cost = (1.0 - overlap / d).clamp(min=0).sqrt()                     # (B, K, K): ||.||_F / sqrt(2d)
    if K <= 4:
        perms = torch.tensor(list(itertools.permutations(range(K))), device=cost.device)  # (P, K): P(k) = perms[p, k]
        return cost[:, perms, torch.arange(K, device=cost.device)].amax(-1).amin(-1)
    return bottleneck_assignment(cost.cpu())


def bottleneck_assignment(cost: torch.Tensor) -> torch.Tensor:
    """``min_P max_k cost[b, P(k), k]`` per instance of cost (B, K, K), with scipy's assignment solver."""
    from scipy.optimize import linear_sum_assignment

    c = cost.numpy()
    out = np.empty(c.shape[0])
    for b in range(c.shape[0]):
        vals = np.unique(c[b])
        lo, hi = 0, len(vals) - 1
        while lo < hi:                           # smallest threshold admitting a perfect matching
            mid = (lo + hi) // 2
            over = c[b] > vals[mid]
            r, k = linear_sum_assignment(over)
            if over[r, k].any():
                lo = mid + 1
            else:
                hi = mid
        out[b] = vals[lo]
    return torch.from_numpy(out)


# =========================================================================== the experiment
def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    p0 = cells[0]
    n, K, d = p0["n"], p0["K"], p0["d"]
    U, X, _ = molrg_batch(n, K, d, [c["N"] for c in cells], p0["delta"], p0["bases"], seeds, trials,
                          bool(p0["balanced"]))
    X = X.to(device)
    counts = torch.tensor([float(c["N"]) for c in cells], dtype=DT).repeat_interleave(trials)
    owner = [(s, t) for s in seeds for t in range(trials)]
    U_hat = fit_bases(p0["learner"], X, counts, K, d, owner, p0)
    err = subspace_errors(U_hat, U.to(device)).cpu()
    threshold = torch.tensor([c["threshold"] for c in cells], dtype=err.dtype).repeat_interleave(trials)
    rows = [{"cell_index": b // trials, "trial": b % trials, "error": e, "success": ok}
            for b, (e, ok) in enumerate(zip(err.tolist(), (err <= threshold).int().tolist()))]
    if p0["learner"] == "sgd":
        backend = "torch"
    elif p0["learner"] == "adam":
        backend = "torch" if p0["sgd_engine"] == "batched" else \
            dispatch.choose("molrg", "auto", X.device, torch.float32, n=n, D=K * d, K=K, grad=True)
    else:
        backend = dispatch.choose("ksubspaces", "auto", X.device, X.dtype)
    return rows, backend


def _check(c: Dict) -> None:
    check_at_least_one(c, ("n", "K", "d", "N"))
    check_d_fits(c)
    if c["bases"] == "orthogonal":
        check_orthogonal_fits(c, " (use --bases random)")
    if c["delta"] < 0:
        raise ValueError(f"--delta: expected delta >= 0, got {c['delta']}")
    if not 0 < c["threshold"]:
        raise ValueError(f"--threshold: expected a positive error threshold, got {c['threshold']}")
    for name in ("restarts", "max_iter"):
        if not c[name] > 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive value, got {c[name]}")
    for name in ("sgd_steps", "sgd_lr", "sgd_sigma_max", "sgd_batch", "sgd_grid"):
        if not c[name] >= 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive value (or 0: the learner's "
                             f"default), got {c[name]}")


def _applicable(c: Dict) -> Optional[str]:
    if c["learner"] == "pca" and c["K"] != 1:
        return f"learner 'pca' fits one subspace (K = 1), got K = {c['K']}; use ksubspaces, sgd or adam"
    return None


def _batch_key(c: Dict):
    return tuple((k, v) for k, v in c.items() if k != "N")


def _cost(c: Dict) -> float:
    """Memory/time weight of one instance, ~1 for n = 48, N = 48, one start."""
    r = c["restarts"] * c["K"] if c["learner"] == "ksubspaces" and c["K"] > 1 else 1
    return r * c["n"] * max(c["N"], c["K"] * c["d"]) / (48 * 48)


register(Experiment(
    name="subspace-recovery",
    description="success rate of recovering MoLRG subspaces over a (d, N) grid (seed 002 Fig. 4)",
    params=(
        *molrg_shape((48,), (1, 2), tuple(range(1, 13)), "number of subspaces"),
        training_samples(tuple(range(2, 49, 2)), "training samples (total over the K components)"),
        Param("delta", float, (0.0,), "isotropic noise floor of the data"),
        Param("bases", str, ("orthogonal",), "orthogonal (mutually) or random bases", BASES),
        Param("balanced", int, (0,), "1: N_k = N/K points per component (i mod K); 0: components drawn uniformly",
              (0, 1)),
        Param("learner", str, ("pca", "ksubspaces"), "how the bases are fitted (sgd: seed 002's Algorithm 1; "
              "adam: Adam on full batches from a random start)", LEARNERS),
        Param("threshold", float, (0.1,), "success when the error is at most this"),
        Param("restarts", int, (4,), "ksubspaces: random starts per instance"),
        Param("max_iter", int, (40,), "ksubspaces: assignment/refit iterations"),
        Param("sgd_steps", int, (0,), f"sgd/adam: steps (0: the learner's default, sgd {SGD['steps']}, adam "
              f"{ADAM['steps']})"),
        Param("sgd_sigma_max", float, (0.0,), "sgd: noise levels sigma_max l/L on the grid l = 1..L; adam: log-uniform "
              f"in [sgd_sigma_max / 50, sgd_sigma_max] (0: sgd {SGD['sigma_max']}, adam {ADAM['sigma_max']}; the "
              "adam error's noise floor grows with it: ~0.01 at 0.1, 0.02 at 0.5, 0.04 at 2)"),
        Param("sgd_lr", float, (0.0,), f"sgd/adam: learning rate (0: sgd {SGD['lr']}, adam {ADAM['lr']})"),
        Param("sgd_batch", int, (0,), f"sgd: minibatch size, drawn with replacement (0: {SGD['batch']})"),
        Param("sgd_grid", int, (0,), f"sgd: time steps L of the grid t = l/L (0: {SGD['grid']})"),
        Param("sgd_init", str, ("auto",), "sgd: start (auto: tailored for K > 1, random for K = 1)", INITS),
        Param("sgd_engine", str, ("batched",), "adam: batched GEMM form or the fused molrg_denoise per instance",
              ("batched", "fused")),
    ),
    metrics=(("error", float), ("success", int)),
    run_batch=_run_batch,
    check=_check,
    batch_key=_batch_key,
    applicable=_applicable,
    instance_cost=_cost,
    # data (N x n) and its copies, the bases, the N x n min(N, n) factorisation, assignments per restart
    instance_bytes=lambda c: 8.0 * (4 * c["N"] * c["n"] + 4 * c["K"] * c["n"] * c["d"] + c["n"] * min(c["N"], c["n"])
                                    + c["N"] * c["K"] * c["restarts"]),
    # per batch: larger batches pad more instances to the batch's largest N, smaller ones pay the
    # per-batch overhead more often (bench/test_bench_sweeps.py times the default sweep with it)
    max_cost=1024.0,
))

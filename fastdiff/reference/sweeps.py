"""One-instance-at-a-time references for the subspace-recovery sweep (tests and the benchmark
baseline): the learners written directly with ``torch.linalg.svd`` per instance, the error by
brute force over all permutations.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional

import torch


def pca(X: torch.Tensor, d: int) -> torch.Tensor:
    """Top-d right singular vectors (n, d) of one data matrix X (N, n) (full SVD: N < d works too)."""
    return torch.linalg.svd(X, full_matrices=True).Vh[:d].T


def seed_bases(X: torch.Tensor, K: int, d: int, first: int) -> List[torch.Tensor]:
    """The greedy neighbourhood seeding of :func:`fastdiff.sweeps.learners.seed_bases`, one instance, one start."""
    N, n = X.shape
    Xn = X / X.norm(dim=1, keepdim=True).clamp(min=torch.finfo(X.dtype).tiny)   # zero rows stay 0 (not 0 / 0)
    C = (Xn @ Xn.T).abs()
    explained = torch.zeros(N, dtype=X.dtype)
    seed, out = first, []
    for k in range(K):
        if k:
            seed = int(explained.argmin())
        nb = torch.topk(C[seed], min(d, N)).indices
        pts = X[nb]
        if pts.shape[0] < d:
            pts = torch.cat([pts, torch.zeros(d - pts.shape[0], n, dtype=X.dtype)])
        U = torch.linalg.qr(pts.T).Q
        out.append(U)
        explained += (Xn @ U).square().sum(1)
    return out


def ksubspaces(X: torch.Tensor, K: int, starts: List[List[torch.Tensor]], max_iter: int = 40) -> List[torch.Tensor]:
    """K-subspaces on one instance X (N, n) from each start (a list of K (n, d) bases), exact SVD
    refits; the bases of the start with the largest objective ``sum_i max_k ||U_k^T x_i||^2``."""
    best, best_obj = None, -math.inf
    d = starts[0][0].shape[1]
    for U in starts:
        U = list(U)
        labels = None
        for _ in range(max_iter):
            lab = torch.stack([(X @ u).square().sum(1) for u in U], 1).argmax(1)
            if labels is not None and torch.equal(lab, labels):
                break
            labels = lab
            U = [pca(X[lab == k], d) if bool((lab == k).any()) else U[k] for k in range(K)]
        obj = torch.stack([(X @ u).square().sum(1) for u in U], 1).amax(1).sum().item()
        if obj > best_obj:
            best, best_obj = U, obj
    return best


def subspace_error(U_hat: List[torch.Tensor], U: List[torch.Tensor]) -> float:
    """``min_P max_k ||Uh_{P(k)} Uh_{P(k)}^T - U_k U_k^T||_F / sqrt(2 d_k)`` by brute force."""
    K = len(U)
    best = math.inf
    for perm in itertools.permutations(range(K)):
        worst = max(float(torch.linalg.norm(U_hat[perm[k]] @ U_hat[perm[k]].T - U[k] @ U[k].T)) /
                    math.sqrt(2 * U[k].shape[1]) for k in range(K))
        best = min(best, worst)
    return best


def subspace_recovery_loop(cells: List[Dict], trials: int, seed: int = 0, restarts: int = 4,
                           threshold: float = 0.1, generator: Optional[torch.Generator] = None,
                           dtype: torch.dtype = torch.float32) -> List[Dict]:
    """The benchmark baseline: every instance of every cell on its own, in a Python loop —
    draw the data (torch's generator), fit with ``torch.linalg.svd`` (pca, or K-subspaces with
    exact SVD refits from ``restarts`` seeded starts), score by brute force.  ``dtype``: float32 like
    the batched sweep, so the benchmark compares the same arithmetic."""
    gen = generator or torch.Generator().manual_seed(seed)
    rows = []
    for c in cells:
        n, K, d, N = c["n"], c["K"], c["d"], c["N"]
        for t in range(trials):
            G = torch.randn(n, K * d, generator=gen, dtype=dtype)
            Q = torch.linalg.qr(G).Q
            U = [Q[:, k * d:(k + 1) * d] for k in range(K)]
            lab = torch.randint(0, K, (N,), generator=gen)
            a = torch.randn(N, d, generator=gen, dtype=dtype)
            A = torch.zeros(N, K, d, dtype=dtype)
            A[torch.arange(N), lab] = a
            X = A.reshape(N, K * d) @ Q.T
            if c["learner"] == "pca" or K == 1:
                U_hat = [pca(X, d)]
            else:
                firsts = torch.randint(0, N, (restarts,), generator=gen).tolist()
                U_hat = ksubspaces(X, K, [seed_bases(X, K, d, f) for f in firsts])
            err = subspace_error(U_hat, U)
            rows.append({**c, "trial": t, "error": err, "success": int(err <= threshold)})
    return rows

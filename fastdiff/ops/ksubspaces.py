"""K-subspaces clustering: Lloyd iterations between assigning each point to the subspace with the
largest projected energy and refitting each subspace's top-d basis (seed 002, Sec. 3.2; docs/math.md).

Contract.  Data X (B, N, n): B independent instances of N points in R^n, of which the first
``counts[b]`` rows of instance b are points and the rest zero padding (``counts`` (B,) int64,
``1 <= counts[b] <= N``; ``None``: every row is a point).  Bases are orthonormal n x d blocks.

- :func:`top_subspace` -- the top-d right singular subspace of each X_b (B, n, d), by block
  subspace iteration ``V <- qr(X^T X V)`` from V0 (B, n, d), without forming ``C = X^T X``; an
  instance is done once ``||C V - V V^T C V||_F <= tol ||X||_F^2`` (V spans an invariant subspace
  of C; ``||X||_F^2 >= ||C||_2``).  Instances not done after ``max_iter`` iterations get an exact
  ``torch.linalg.svd``.  Rank-deficient X (N < d) converges too (the extra columns land in C's
  null space).
- :func:`seed_bases` -- R data-driven starts (B, R, K, n, d) from uniforms u (B, R): start r picks
  seed point ``floor(u_r counts)``, spans U_1 with the d points of largest ``|cos|`` to it (the
  seed included); the next seed is the point worst explained so far,
  ``argmin_i sum_{j<k} ||U_j^T x_i||^2 / ||x_i||^2``, and so on (k-means++ in spirit).
- :func:`ksubspaces` -- from R starts V0 (B, R, K, n, d), alternate ``label_i = argmax_k
  ||U_k^T x_i||`` and one subspace-iteration step of each ``C_k = sum_{label_i = k} x_i x_i^T``
  from U_k, until no label changes or ``max_iter`` refits; the start of largest objective
  ``sum_i max_k ||U_k^T x_i||^2`` wins, and its clusters get an exact :func:`top_subspace` refit.
  Returns bases (B, K, n, d) and labels (B, N) int64; padding rows are assigned to component 0 and
  change nothing.

Backends (the caller passes a concrete one; ``fastdiff.dispatch.choose("ksubspaces", ...)``
decides ``"auto"``): ``"cpp"`` -- ``fastdiff._C.top_subspace`` / ``ksubspaces``
(csrc/ksubspaces.cpp, launched from :mod:`fastdiff.kernels.cpp`), float32 CPU, one instance per
OpenMP task held in L1 with the GIL released, padding rows skipped; ``"torch"`` -- the batched
torch forms below, any device, any float dtype for :func:`top_subspace` (the K-subspaces forms
compute in float32, the sweep's precision).  The two agree to float32 rounding wherever the data
determine the answer (tests/test_sweeps_learners.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fastdiff.ops.table import CPU, TORCH, Impl, Op

__all__ = ["ROW", "DT", "REFIT_ITER", "default_tol", "orth", "top_subspace", "seed_bases", "ksubspaces"]

ROW = Op("ksubspaces", what="K-subspaces", names=("auto", "cpp", "torch"), impls=(
    Impl("cpp", CPU, (torch.float32,), cpp_symbol="ksubspaces", limit="float32"),
    TORCH),
    auto={"cpu": ("cpp",)})

DT = torch.float32        # the precision of the K-subspaces forms and of the C++ kernels
REFIT_ITER = 60           # subspace iterations of the exact refit of the best start's clusters


def default_tol(dtype: torch.dtype) -> float:
    """The convergence tolerance of :func:`top_subspace` for data of ``dtype``."""
    # ~1e5 eps for float64, ~150 eps for float32: well above the rounding floor of the residual
    return 1e-10 if dtype == torch.float64 else 2e-5


def orth(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (..., n, d) of the columns of Y (..., n, d) (Householder QR's Q)."""
    return torch.linalg.qr(Y).Q


def _counts(counts: Optional[torch.Tensor], B: int, N: int) -> torch.Tensor:
    return torch.full((B,), N, dtype=torch.int64) if counts is None else counts.to(torch.int64).contiguous()


def _svd_finish(X: torch.Tensor, V: torch.Tensor, converged: torch.Tensor) -> torch.Tensor:
    """V with the instances not ``converged`` replaced by the exact top-d right singular vectors of X."""
    todo = (~converged).nonzero().flatten()
    if todo.numel():
        V[todo] = torch.linalg.svd(X[todo], full_matrices=True).Vh[:, :V.shape[-1]].mT.to(V.dtype)
    return V


def _clusters(X: torch.Tensor, labels: torch.Tensor, K: int) -> torch.Tensor:
    """The points of each cluster (B K, N, n): X_b with the rows not labelled k zeroed."""
    B, N, n = X.shape
    mask = torch.nn.functional.one_hot(labels, K).to(DT).permute(0, 2, 1)       # (B, K, N)
    return (X[:, None] * mask[..., None]).reshape(B * K, N, n)


# =========================================================================== top-d subspace
def top_subspace(X: torch.Tensor, V0: torch.Tensor, tol: float, max_iter: int, counts: Optional[torch.Tensor],
                 backend: str) -> torch.Tensor:
    """Orthonormal bases (B, n, d) of the top-d right singular subspaces of X (B, N, n) from starts
    V0 (B, n, d) (see the module docstring).  ``counts``: used by ``"cpp"`` only (the torch form
    reads the zero padding, which changes nothing)."""
    B, N, n = X.shape
    d = V0.shape[-1]
    if backend == "cpp":
        from fastdiff.kernels import cpp

        X, V0 = X.contiguous(), V0.to(DT).contiguous()
        V = torch.full((B, n, d), float("nan"), dtype=DT)          # poisoned: unwritten shows as NaN
        converged = torch.zeros(B, dtype=torch.bool)
        cpp.top_subspace(X, _counts(counts, B, N), V0, tol, max_iter, V, converged)
        return _svd_finish(X, V, converged)
    V = orth(V0.to(X.dtype))
    # (vector_norm: one reduction pass; .square().sum() is 7x slower here on float64)
    scale = torch.linalg.vector_norm(X, dim=(1, 2)).square()           # ||X||_F^2 >= ||X^T X||_2
    active = torch.arange(B, device=X.device)
    Xa, Va = X, V
    for _ in range(max_iter):
        Y = Xa.mT @ (Xa @ Va)                                          # C V without forming C
        res = torch.linalg.vector_norm(Y - Va @ (Va.mT @ Y), dim=(1, 2))
        todo = res > tol * scale[active]
        if not bool(todo.any()):
            active = active[:0]
            break
        if not bool(todo.all()):
            active, Xa, Y = active[todo], Xa[todo], Y[todo]
        Va = orth(Y)
        V[active] = Va
    converged = torch.ones(B, dtype=torch.bool, device=X.device)
    converged[active] = False
    return _svd_finish(X, V, converged)


# =========================================================================== seeding
def seed_bases(X: torch.Tensor, counts: torch.Tensor, K: int, d: int, u: torch.Tensor, backend: str) -> torch.Tensor:
    """R orthonormal K-subspaces starts (B, R, K, n, d) of X (B, N, n) from uniforms u (B, R)."""
    B, N, n = X.shape
    R = u.shape[1]
    if backend == "cpp":
        from fastdiff.kernels import cpp

        starts = torch.full((B, R, K, n, d), float("nan"), dtype=DT)   # poisoned: unwritten shows as NaN
        cpp.ksubspaces_seed(X.contiguous(), _counts(counts, B, N), K, u.to(DT).contiguous(), starts)
        return starts
    dev = X.device
    valid = (torch.arange(N, device=dev)[None, :] < counts[:, None].long())[:, None]   # (B, 1, N)
    Xn = X / X.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(X.dtype).tiny)   # zero rows stay 0 (not 0 / 0)
    C = (Xn @ Xn.mT).abs()                                                     # (B, N, N)
    seed = (u * counts[:, None]).long().clamp(max=N - 1)                       # (B, R)
    bidx = torch.arange(B, device=dev)[:, None].expand(B, R)
    explained = torch.zeros(B, R, N, dtype=DT, device=dev)
    out = torch.empty(B, R, K, n, d, dtype=DT, device=dev)
    for k in range(K):
        if k:
            seed = explained.masked_fill(~valid, math.inf).argmin(-1)
        nb = torch.topk(C[bidx, seed].masked_fill(~valid, -1.0), min(d, N), dim=-1).indices   # (B, R, d')
        pts = X[bidx[..., None], nb]                                           # (B, R, d', n)
        if pts.shape[2] < d:
            pts = torch.cat([pts, torch.zeros(B, R, d - pts.shape[2], n, dtype=DT, device=dev)], 2)
        Uk = orth(pts.mT)                                                      # (B, R, n, d)
        out[:, :, k] = Uk
        proj = Xn @ Uk.permute(0, 2, 1, 3).reshape(B, n, R * d)                # (B, N, R d)
        explained += torch.linalg.vector_norm(proj.reshape(B, N, R, d), dim=-1).square().mT
    return out


# =========================================================================== K-subspaces
def ksubspaces(X: torch.Tensor, K: int, V0: torch.Tensor, max_iter: int, counts: Optional[torch.Tensor],
               backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """K-subspaces (K >= 2) of X (B, N, n) from the starts V0 (B, R, K, n, d): bases (B, K, n, d) and
    labels (B, N) of the best start, its clusters refitted exactly."""
    B, N, n = X.shape
    d = V0.shape[-1]
    if backend == "cpp":
        from fastdiff.kernels import cpp

        X = X.contiguous()
        bases = torch.full((B, K, n, d), float("nan"), dtype=DT)     # poisoned: unwritten shows as NaN
        labels = torch.full((B, N), -2, dtype=torch.long)
        converged = torch.zeros(B, K, dtype=torch.bool)
        cpp.ksubspaces(X, _counts(counts, B, N), K, V0.to(DT).contiguous(), max_iter, default_tol(DT), REFIT_ITER,
                       bases, labels, converged)
        if not bool(converged.all()):     # clusters whose refit did not converge: an exact SVD
            _svd_finish(_clusters(X, labels, K), bases.view(B * K, n, d), converged.flatten())
        return bases, labels
    Vbest, lab = _ksubspaces_torch(X, K, V0, max_iter)
    # exact PCA of each final cluster, warm-started from that cluster's basis
    U = top_subspace(_clusters(X, lab, K), Vbest.reshape(B * K, n, d), default_tol(X.dtype), REFIT_ITER, None,
                     "torch").reshape(B, K, n, d)
    return U, lab


def _ksubspaces_torch(X, K, V0, max_iter):
    """The batched torch iteration: (bases (B, K, n, d), labels (B, N)) of the best start.

    The R K bases of an instance sit side by side as the columns of one (n, R K d) matrix, so each
    iteration is two batched GEMMs over instances (no copy of X per start) and one batched QR; an
    instance leaves the batch once none of its starts changes an assignment."""
    B, N, n = X.shape
    R, d = V0.shape[1], V0.shape[-1]
    W = R * K * d
    V = V0.to(DT).permute(0, 3, 1, 2, 4).reshape(B, n, W)                      # columns ordered (start, k, j)
    dev = X.device
    labels = torch.full((B, N, R), -1, dtype=torch.long, device=dev)
    E = torch.empty(B, N, R, K, dtype=DT, device=dev)                          # energies with the final bases
    active = torch.arange(B, device=dev)
    Xa, Va = X, V
    for it in range(max_iter + 1):
        P = Xa @ Va                                                            # (m, N, R K d)
        Ea = torch.linalg.vector_norm(P.reshape(-1, N, R, K, d), dim=-1)     # ||U_k^T x||, argmax = of squares
        lab = Ea.argmax(-1)                                                    # (m, N, R)
        moved = (lab != labels[active]).flatten(1).any(1)
        labels[active] = lab
        if it == max_iter:
            moved[:] = False
        if not bool(moved.all()):
            E[active[~moved]] = Ea[~moved]
        if not bool(moved.any()):
            break
        if not bool(moved.all()):
            active, Xa, P, lab = active[moved], Xa[moved], P[moved], lab[moved]
        # refit: one subspace-iteration step of C_k = X^T diag(1[lab = k]) X from the current U_k
        Pm = P.reshape(-1, N, R, K, d) * torch.nn.functional.one_hot(lab, K).to(DT)[..., None]
        Y = Xa.mT @ Pm.reshape(-1, N, W)                                       # (m, n, R K d) = [C_k U_k]
        Q = orth(Y.reshape(-1, n, R * K, d).transpose(1, 2))                   # (m, R K, n, d)
        Va = Q.transpose(1, 2).reshape(-1, n, W)
        V[active] = Va
    best = E.amax(-1).square().sum(1).argmax(1)                                         # (B,): the start of largest objective
    b = torch.arange(B, device=dev)
    lab = E.permute(0, 2, 1, 3)[b, best].argmax(-1)                            # (B, N)
    return V.reshape(B, n, R, K, d).permute(0, 2, 3, 1, 4)[b, best], lab

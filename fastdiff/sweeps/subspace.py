"""Subspace recovery (SPEC 4; seed 002 Thm 2 and 4, Fig. 4): how many samples N recover a mixture of
K low-rank Gaussians of dimension d in R^n?

Per instance: draw MoLRG data ``x_i = U_{k_i} a_i + delta g_i`` (``a_i ~ N(0, I_d)``, components
uniform), fit bases with a learner, and score

    err = min_P max_k ||Uh_{P(k)} Uh_{P(k)}^T - U_k U_k^T||_F / sqrt(2 d)     (success: err <= threshold)

Learners, each batched over every instance of a batch of cells (no Python loop over instances):

- ``pca`` (K = 1, seed 002 Thm 1): the top-d principal subspace, by block subspace iteration
  ``V <- qr(X^T X V)`` on the (B, N, n) data without forming covariances, each instance frozen once
  ``||C V - V V^T C V||_F <= tol ||X||_F^2`` (V spans an invariant subspace); the few that have not
  converged after ``max_iter`` get an exact ``torch.linalg.svd``.  Exact to float64 rounding.
- ``ksubspaces`` (K-subspaces clustering, seed 002 Thm 3): ``restarts`` random starts per instance,
  all run as one batch; alternate ``assign x_i to argmax_k ||U_k^T x_i||`` and one subspace-iteration
  refit of each U_k on its points until no assignment changes; the restart with the largest
  objective ``sum_i max_k ||U_k^T x_i||^2`` wins and its clusters get an exact PCA refit.

  Both run on the C++ kernels ``fastdiff._C.top_subspace`` / ``ksubspaces`` (csrc/ksubspaces.cpp)
  for float32 CPU data: one instance per OpenMP task, held in L1, the GIL released for the whole
  batch (the batched torch form spends its time in per-matrix LAPACK calls and masked GEMMs over
  every component, between which it holds the GIL); ``backend="torch"`` keeps the batched torch
  form (any device or dtype; the CUDA path).  The two agree to float32 rounding wherever the data
  determine the answer (tests/test_sweeps.py).
- ``sgd`` (seed 002 Alg. 1): the MoLRG denoiser's bases trained on the diffusion loss
  ``E ||x0_hat(x_0 + sigma eps) - x_0||^2`` (Adam, a QR retraction onto orthonormal bases after
  each step).  ``sgd_engine="batched"`` evaluates the denoiser of all instances at once in the
  GEMM form (per-instance bases as a batched matmul); ``"fused"`` calls
  :func:`fastdiff.molrg_denoise` (its fused forward/backward kernels) once per instance.

Trial ``t`` of a cell reads fixed windows of the cell's Philox stream (``stream << 52`` offsets,
``t``-major), so it is the same instance whichever batch, executor or trial count runs it.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fastdiff
from fastdiff import dispatch
from fastdiff.generator import Generator
from fastdiff.sweeps.runner import Experiment, Param, register

__all__ = ["molrg_instances", "molrg_batch", "top_subspace", "seed_bases", "ksubspaces", "sgd_bases", "subspace_errors", "bottleneck_assignment", "fit_bases", "LEARNERS"]

LEARNERS = ("pca", "ksubspaces", "sgd")
BASES = ("orthogonal", "random")
# float32: measured 1.5x faster than float64 for the whole default sweep (GEMMs and QRs of 48 x d
# blocks), errors of exact recoveries stay below 1e-3 (threshold 0.1); the error itself is scored in float64.
DT = torch.float32

# Philox stream windows of a cell (offset = stream << 52; each holds trials * per-trial normals)
_S_DATA, _S_INIT, _S_SGD = range(3)


def normals(seed: int, stream: int, *shape, step: int = 0, device="cpu") -> torch.Tensor:
    """Normals (float32) from the Philox stream ``(seed, (stream << 52) + step * 2^32)`` (SPEC 0), drawn
    on ``device`` (the CPU and Triton generators give the same numbers)."""
    gen = Generator(seed, (stream << 52) + (step << 32))
    return fastdiff.randn(*shape, generator=gen, device=device).to(DT)


# =========================================================================== data
def molrg_instances(n: int, K: int, d: int, N: int, delta: float, bases: str, seed: int, trials: int):
    """``trials`` MoLRG instances of one cell: bases (T, K, n, d), data (T, N, n), labels (T, N)."""
    U, X, labels = molrg_batch(n, K, d, [N], delta, bases, [seed], trials)
    return U, X, labels


def molrg_batch(n: int, K: int, d: int, Ns: Sequence[int], delta: float, bases: str, seeds: Sequence[int], trials: int):
    """MoLRG instances of several cells (sample sizes ``Ns``, seeds ``seeds``), cell-major:
    bases (C T, K, n, d), data (C T, max N, n) zero-padded, labels (C T, max N) (-1 on padding).

    Each cell's numbers come from its own Philox windows; the arithmetic is batched over the cells.
    ``bases="orthogonal"``: the K bases are mutually orthogonal (QR of one n x Kd Gaussian);
    ``"random"``: independent (each its own QR), overlapping in general.
    """
    C, Nmax = len(Ns), max(Ns)
    G = torch.empty(C * trials, n, K * d, dtype=DT)
    a = torch.zeros(C * trials, Nmax, d, dtype=DT)
    labels = torch.full((C * trials, Nmax), -1, dtype=torch.long)
    noise = torch.zeros(C * trials, Nmax, n, dtype=DT) if delta else None
    for i, (N, seed) in enumerate(zip(Ns, seeds)):
        # one Philox window per trial holds its bases, coefficients, label draws and noise
        sizes = [n * K * d, N * d, N] + ([N * n] if delta else [])
        z = normals(seed, _S_DATA, trials, sum(sizes)).split(sizes, dim=1)
        rows = slice(i * trials, (i + 1) * trials)
        G[rows] = z[0].reshape(trials, n, K * d)
        a[rows, :N] = z[1].reshape(trials, N, d)
        labels[rows, :N] = (torch.special.ndtr(z[2]) * K).long().clamp_(max=K - 1)   # uniform mixing weights
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


# =========================================================================== learners
def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


def _retract(Y: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """The QR retraction onto orthonormal columns, Y = Q R with R's diagonal positive, so an already
    orthonormal Y maps to itself (LAPACK may flip column signs, which would reverse Adam's momentum).

    ``method``: ``"householder"`` (LAPACK / cuSOLVER QR, signs fixed) or ``"cholesky"`` (CholeskyQR2:
    twice ``L L^T = Q^T Q``, ``Q <- Q L^-T``: batched GEMMs, a batched Cholesky and a batched
    triangular solve, where torch's QR of a batch of tall matrices on CUDA is cuSOLVER calls per
    matrix).  Both give the same Q up to rounding; CholeskyQR2 is accurate while cond(Y) << 1/sqrt(eps)
    (Y here is an orthonormal U plus one Adam step, cond ~1.1) and falls back to Householder when a
    Gram matrix is not numerically positive definite.  ``"auto"``: Cholesky on CUDA, Householder on
    the CPU (measured there at n = 3072, K d = 8: 1.0 ms Householder, 2.7 ms CholeskyQR2).
    """
    if method == "auto":
        method = "cholesky" if Y.is_cuda else "householder"
    if method == "cholesky":
        Q = Y
        for _ in range(2):
            L = torch.linalg.cholesky_ex(Q.mT @ Q).L
            Q = torch.linalg.solve_triangular(L, Q.mT, upper=False).mT
        # a nearly singular Gram matrix can pass Cholesky with a tiny pivot and leave Q inaccurate:
        # check the result itself (one batched GEMM, one host sync per retraction)
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        if bool(((Q.mT @ Q - eye).abs().amax() <= 1e-4).all()):   # False for NaN too
            return Q
    elif method != "householder":
        raise ValueError(f"method: expected 'auto', 'householder' or 'cholesky', got {method!r}")
    Q, R = torch.linalg.qr(Y)
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    return Q * torch.where(sign == 0, 1.0, sign).unsqueeze(-2)


def _default_tol(dtype: torch.dtype) -> float:
    # ~1e5 eps for float64, ~150 eps for float32: well above the rounding floor of the residual
    return 1e-10 if dtype == torch.float64 else 2e-5


def _counts(counts: Optional[torch.Tensor], B: int, N: int) -> torch.Tensor:
    return torch.full((B,), N, dtype=torch.int64) if counts is None else counts.to(torch.int64).contiguous()


def _svd_finish(X: torch.Tensor, V: torch.Tensor, converged: torch.Tensor) -> torch.Tensor:
    """V with the instances not ``converged`` replaced by the exact top-d right singular vectors of X."""
    todo = (~converged).nonzero().flatten()
    if todo.numel():
        V[todo] = torch.linalg.svd(X[todo], full_matrices=True).Vh[:, :V.shape[-1]].mT.to(V.dtype)
    return V


def top_subspace(X: torch.Tensor, V0: torch.Tensor, *, tol: Optional[float] = None, max_iter: int = 60,
                 counts: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Orthonormal bases (B, n, d) of the top-d right singular subspaces of X (B, N, n), from starts V0.

    Block subspace iteration with per-instance convergence (see the module docstring); rank-deficient
    X (N < d) converges too (the extra columns land in the null space).  Instances not converged
    after ``max_iter`` iterations are finished with an exact SVD.  ``counts`` (B,): only the first
    ``counts[b]`` rows of instance b are data (the rest must be zero padding; the C++ kernel skips it).
    ``backend``: ``"cpp"`` (``fastdiff._C.top_subspace``, float32 CPU, one instance per OpenMP task;
    the default there) or ``"torch"`` (batched GEMMs and QRs).
    """
    B, N, n = X.shape
    d = V0.shape[-1]
    tol = _default_tol(X.dtype) if tol is None else tol
    if dispatch.choose("ksubspaces", backend, X.device, X.dtype) == "cpp":
        from fastdiff import _C

        X, V0 = X.contiguous(), V0.to(DT).contiguous()
        counts = _counts(counts, B, N)
        V = torch.full((B, n, d), float("nan"), dtype=DT)          # poisoned: unwritten shows as NaN
        converged = torch.zeros(B, dtype=torch.bool)
        _C.top_subspace(X.data_ptr(), B, N, n, counts.data_ptr(), d, V0.data_ptr(), tol, max_iter, V.data_ptr(),
                        converged.data_ptr(), torch.get_num_threads())
        return _svd_finish(X, V, converged)
    V = _orth(V0.to(X.dtype))
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
        Va = _orth(Y)
        V[active] = Va
    converged = torch.ones(B, dtype=torch.bool, device=X.device)
    converged[active] = False
    return _svd_finish(X, V, converged)


def _ksubspaces_cpp(X, counts, K, d, R, *, u=None, starts=None, max_iter=None):
    """``fastdiff._C.ksubspaces``: seed the starts from uniforms ``u`` (B, R) or take ``starts``; with
    ``max_iter`` also iterate and refit.  Returns (starts, refitted bases (B, K, n, d) or None, labels
    (B, N) or None); clusters whose refit did not converge are finished with an exact SVD."""
    from fastdiff import _C

    B, N, n = X.shape
    X = X.contiguous()
    counts = _counts(counts, B, N)
    if u is not None:
        u = u.to(DT).contiguous()
        starts = torch.full((B, R, K, n, d), float("nan"), dtype=DT)   # poisoned: unwritten shows as NaN
    else:
        starts = starts.to(DT).contiguous()
    if max_iter is None:
        _C.ksubspaces(X.data_ptr(), B, N, n, counts.data_ptr(), K, d, R, u.data_ptr(), starts.data_ptr(), 0,
                      0, 0, 0, 0.0, 0, 0, torch.get_num_threads())
        return starts, None, None
    bases = torch.full((B, K, n, d), float("nan"), dtype=DT)
    labels = torch.full((B, N), -2, dtype=torch.long)
    converged = torch.zeros(B, K, dtype=torch.bool)
    _C.ksubspaces(X.data_ptr(), B, N, n, counts.data_ptr(), K, d, R, u.data_ptr() if u is not None else 0,
                  starts.data_ptr(), max_iter, bases.data_ptr(), labels.data_ptr(), converged.data_ptr(),
                  _default_tol(DT), 60, 0, torch.get_num_threads())
    if not bool(converged.all()):
        mask = torch.nn.functional.one_hot(labels, K).to(DT).permute(0, 2, 1)         # (B, K, N)
        Xk = (X[:, None] * mask[..., None]).reshape(B * K, N, n)
        _svd_finish(Xk, bases.view(B * K, n, d), converged.flatten())
    return starts, bases, labels


def seed_bases(X: torch.Tensor, counts: torch.Tensor, K: int, d: int, u: torch.Tensor, *,
               backend: str = "auto") -> torch.Tensor:
    """Data-driven K-subspaces starts (B, R, K, n, d), orthonormal, for X (B, N, n); ``u`` (B, R) uniforms.

    Greedy neighbourhood seeding (k-means++ in spirit): start ``r`` picks a random seed point
    (``u``), takes the d points with the largest ``|cos|`` to it (the seed included) and spans
    U_1 with them; the next seed is the point worst explained by the bases so far
    (``min_i sum_j ||U_j^T x_i||^2 / ||x_i||^2``), and so on.  Points of one subspace are far more
    correlated with each other than with another subspace's, so a start is usually right up to a
    few points and K-subspaces needs few iterations; restarts differ in the first seed.
    """
    B, N, n = X.shape
    R = u.shape[1]
    if dispatch.choose("ksubspaces", backend, X.device, X.dtype) == "cpp":
        return _ksubspaces_cpp(X, counts, K, d, R, u=u)[0]
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
        Uk = _orth(pts.mT)                                                     # (B, R, n, d)
        out[:, :, k] = Uk
        proj = Xn @ Uk.permute(0, 2, 1, 3).reshape(B, n, R * d)                # (B, N, R d)
        explained += torch.linalg.vector_norm(proj.reshape(B, N, R, d), dim=-1).square().mT
    return out


def ksubspaces(X: torch.Tensor, K: int, V0: torch.Tensor, *, max_iter: int = 40, counts: Optional[torch.Tensor] = None,
               backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """K-subspaces clustering of X (B, N, n) from R orthonormal starts V0 (B, R, K, n, d):
    bases (B, K, n, d) and labels (B, N) of the best start.

    ``backend="cpp"`` (the default for float32 CPU data): ``fastdiff._C.ksubspaces``, one instance
    per OpenMP task in L1 with the GIL released; ``counts`` (B,) (points per instance, the rest
    padding) saves it the padding rows.  ``"torch"``: the R K bases of an instance sit side by side
    as the columns of one (n, R K d) matrix, so each iteration is two batched GEMMs over instances
    (no copy of X per start) and one batched QR; an instance leaves the batch once none of its
    starts changes an assignment.  Both: zero rows (padding) are assigned to component 0 and
    change nothing; the best start's clusters get an exact PCA refit (:func:`top_subspace`).
    """
    B, N, n = X.shape
    R, d = V0.shape[1], V0.shape[-1]
    if K == 1:
        return (top_subspace(X, V0[:, 0, 0], counts=counts, backend=backend)[:, None],
                torch.zeros(B, N, dtype=torch.long, device=X.device))
    if dispatch.choose("ksubspaces", backend, X.device, X.dtype) == "cpp":
        return _ksubspaces_cpp(X, counts, K, d, R, starts=V0, max_iter=max_iter)[1:]
    Vbest, lab = _ksubspaces_torch(X, K, V0, max_iter)
    # exact PCA of each final cluster, warm-started from that cluster's basis
    mask = torch.nn.functional.one_hot(lab, K).to(DT).permute(0, 2, 1)         # (B, K, N)
    Xk = (X[:, None] * mask[..., None]).reshape(B * K, N, n)
    U = top_subspace(Xk, Vbest.reshape(B * K, n, d), backend="torch").reshape(B, K, n, d)
    return U, lab


def _ksubspaces_torch(X, K, V0, max_iter):
    """The batched torch iteration of :func:`ksubspaces`: (bases (B, K, n, d), labels (B, N)) of the best start."""
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
        Q = _orth(Y.reshape(-1, n, R * K, d).transpose(1, 2))                  # (m, R K, n, d)
        Va = Q.transpose(1, 2).reshape(-1, n, W)
        V[active] = Va
    best = E.amax(-1).square().sum(1).argmax(1)                                         # (B,): the start of largest objective
    b = torch.arange(B, device=dev)
    lab = E.permute(0, 2, 1, 3)[b, best].argmax(-1)                            # (B, N)
    return V.reshape(B, n, R, K, d).permute(0, 2, 3, 1, 4)[b, best], lab


def _denoise_batched(xt, U, sigma, K, d):
    """MoLRG posterior mean (delta = 0, tau = 1, uniform pi, alpha = 1) of per-instance bases, in the
    GEMM form: xt (B, M, n), U (B, n, K d), sigma (B, M, 1).  Differentiable (autograd)."""
    B, M, n = xt.shape
    s2 = sigma * sigma
    g = 1.0 / (2 * s2 * (1 + s2))                                      # logit gain; the bias is equal for all k
    P = xt @ U                                                         # (B, M, K d)
    w = torch.softmax(g * P.reshape(B, M, K, d).square().sum(-1), -1)   # (B, M, K)
    q = (P.reshape(B, M, K, d) * w[..., None]).reshape(B, M, K * d) / (1 + s2)
    return q @ U.mT


def sgd_bases(X: torch.Tensor, counts: torch.Tensor, K: int, d: int, seeds_per_row: Sequence[Tuple[int, int]], *,
              steps: int = 300, lr: float = 0.1, sigma_min: float = 0.002, sigma_max: float = 0.1,
              engine: str = "batched", init: Optional[torch.Tensor] = None, retraction: str = "auto") -> torch.Tensor:
    """Bases (B, K, n, d) trained on the diffusion loss of each instance's data X (B, N, n) (rows past
    ``counts[b]`` are padding and do not enter the loss).

    Each step: every training point gets a fresh noise level ``sigma`` (log-uniform in
    [sigma_min, sigma_max]) and noise ``eps`` from its cell's Philox stream
    (``seeds_per_row[b] = (cell seed, trial)``; step s of a cell with N points reads a
    (trials, N, n + 1) window, whatever the batch's padding), drawn on X's device; Adam on U,
    then U <- qr(U) (``retraction``: see :func:`_retract`).  Runs on X's device (the CUDA path of
    the sweep).
    """
    B, N, n = X.shape
    dev = X.device
    if engine not in ("batched", "fused"):
        raise ValueError(f"sgd_engine: expected 'batched' or 'fused', got {engine!r}")
    if retraction not in ("auto", "householder", "cholesky"):
        raise ValueError(f"retraction: expected 'auto', 'householder' or 'cholesky', got {retraction!r}")
    U = _orth(init.to(dev, DT).permute(0, 2, 1, 3).reshape(B, n, K * d)).float().requires_grad_()
    opt = torch.optim.Adam([U], lr=lr)
    # cosine decay to 0: at a constant rate the fresh noise of every step leaves an error floor ~ lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    counts = counts.to(dev)
    valid = (torch.arange(N, device=dev)[None, :] < counts[:, None]).float()   # (B, N)
    Xf = X.float()
    by_cell: Dict[int, List[Tuple[int, int]]] = {}
    for row, (s, t) in enumerate(seeds_per_row):
        by_cell.setdefault(s, []).append((row, t))
    sizes = [int(c) for c in counts.tolist()]
    draws = [(s, max(t for _, t in rows) + 1, sizes[rows[0][0]],             # seed, trials, the cell's N
              torch.tensor([r for r, _ in rows], device=dev), torch.tensor([t for _, t in rows], device=dev))
             for s, rows in by_cell.items()]
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    for step in range(steps):
        z = torch.zeros(B, N, n + 1, device=dev)
        for s, tmax, Nc, idx, tri in draws:      # one Philox draw per cell and step (trial-major windows)
            z[idx, :Nc] = normals(s, _S_SGD, tmax, Nc, n + 1, step=step, device=dev).float()[tri]
        sigma = torch.exp(lo + (hi - lo) * torch.special.ndtr(z[..., n:]))   # (B, N, 1)
        xt = Xf + sigma * z[..., :n]
        opt.zero_grad(set_to_none=True)
        if engine == "batched":
            x0 = _denoise_batched(xt, U, sigma, K, d)
            loss = (((x0 - Xf).square().sum(-1) * valid).sum(1) / counts).sum()
            loss.backward()
        else:
            for b in range(B):
                m = int(counts[b])
                Ub = U[b].reshape(n, K, d).permute(1, 0, 2)
                x0 = fastdiff.molrg_denoise(xt[b, :m], Ub, 1.0, sigma[b, :m, 0])
                ((x0 - Xf[b, :m]).square().sum() / m).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            Y = U.reshape(B, n, K, d).permute(0, 2, 1, 3)
            U.copy_(_retract(Y, retraction).permute(0, 2, 1, 3).reshape(B, n, K * d))
    return U.detach().to(DT).reshape(B, n, K, d).permute(0, 2, 1, 3).contiguous()


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
def fit_bases(learner: str, X: torch.Tensor, counts: torch.Tensor, K: int, d: int, cells_seeds: List[Tuple[int, int]],
              params: Dict) -> torch.Tensor:
    """Bases (B, K, n, d) from ``learner`` on the batch X (B, N, n); ``cells_seeds[b] = (seed, trial)``.
    Runs on X's device (the starts are drawn on the CPU and moved)."""
    B, N, n = X.shape
    dev = X.device
    R = params["restarts"] if learner == "ksubspaces" and K > 1 else 1
    shape = (R,) if learner == "ksubspaces" and K > 1 else (K, n, d)
    init = torch.empty(B, *shape, dtype=DT)
    by_seed: Dict[int, List[Tuple[int, int]]] = {}
    for b, (s, t) in enumerate(cells_seeds):
        by_seed.setdefault(s, []).append((b, t))
    for s, rows in by_seed.items():              # the learner's random numbers, per cell, trial-major
        tmax = max(t for _, t in rows) + 1
        draw = normals(s, _S_INIT, tmax, *shape)
        init[torch.tensor([b for b, _ in rows])] = draw[torch.tensor([t for _, t in rows])]
    init, counts = init.to(dev), counts.to(dev)
    if learner == "pca" or (learner == "ksubspaces" and K == 1):    # K-subspaces with K = 1 is PCA
        # start from the span of the first d data points (a range finder), Gaussian columns where N < d:
        # with delta = 0 that is already the answer and one iteration confirms it
        Nd = min(N, d)
        pts = torch.zeros(B, n, d, dtype=DT, device=dev)
        pts[:, :, :Nd] = X[:, :Nd].mT
        use = (torch.arange(d, device=dev)[None, :] < counts[:, None])[:, None, :]
        return top_subspace(X, torch.where(use, pts, init[:, 0, :, :]), counts=counts)[:, None]
    if learner == "ksubspaces":
        V0 = seed_bases(X, counts, K, d, torch.special.ndtr(init))
        return ksubspaces(X, K, V0, max_iter=params["max_iter"], counts=counts)[0]
    return sgd_bases(X, counts, K, d, cells_seeds, steps=params["sgd_steps"], lr=params["sgd_lr"],
                     sigma_min=params["sgd_sigma_max"] / 50, sigma_max=params["sgd_sigma_max"],
                     engine=params["sgd_engine"], init=init)


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    p0 = cells[0]
    n, K, d = p0["n"], p0["K"], p0["d"]
    U, X, _ = molrg_batch(n, K, d, [c["N"] for c in cells], p0["delta"], p0["bases"], seeds, trials)
    X = X.to(device)
    counts = torch.tensor([float(c["N"]) for c in cells], dtype=DT).repeat_interleave(trials)
    owner = [(s, t) for s in seeds for t in range(trials)]
    U_hat = fit_bases(p0["learner"], X, counts, K, d, owner, p0)
    err = subspace_errors(U_hat, U.to(device)).cpu()
    threshold = torch.tensor([c["threshold"] for c in cells], dtype=err.dtype).repeat_interleave(trials)
    rows = [{"cell_index": b // trials, "trial": b % trials, "error": e, "success": ok}
            for b, (e, ok) in enumerate(zip(err.tolist(), (err <= threshold).int().tolist()))]
    if p0["learner"] == "sgd":
        backend = "torch" if p0["sgd_engine"] == "batched" else \
            dispatch.choose("molrg", "auto", X.device, torch.float32, n=n, D=K * d, K=K, grad=True)
    else:
        backend = dispatch.choose("ksubspaces", "auto", X.device, X.dtype)
    return rows, backend


def _check(c: Dict) -> None:
    for name in ("n", "K", "d", "N"):
        if c[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected {name} >= 1, got {c[name]}")
    if c["d"] > c["n"]:
        raise ValueError(f"--d: expected d <= n = {c['n']}, got d = {c['d']}")
    if c["bases"] == "orthogonal" and c["K"] * c["d"] > c["n"]:
        raise ValueError(f"--K/--d: orthogonal bases need K d <= n, got K d = {c['K'] * c['d']} > n = {c['n']}"
                         " (use --bases random)")
    if c["delta"] < 0:
        raise ValueError(f"--delta: expected delta >= 0, got {c['delta']}")
    if not 0 < c["threshold"]:
        raise ValueError(f"--threshold: expected a positive error threshold, got {c['threshold']}")
    for name in ("restarts", "max_iter", "sgd_steps", "sgd_lr", "sgd_sigma_max"):
        if not c[name] > 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive value, got {c[name]}")


def _applicable(c: Dict) -> Optional[str]:
    if c["learner"] == "pca" and c["K"] != 1:
        return f"learner 'pca' fits one subspace (K = 1), got K = {c['K']}; use ksubspaces or sgd"
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
        Param("n", int, (48,), "ambient dimension"),
        Param("K", int, (1, 2), "number of subspaces"),
        Param("d", int, tuple(range(1, 13)), "subspace dimension"),
        Param("N", int, tuple(range(2, 49, 2)), "training samples (total over the K components)"),
        Param("delta", float, (0.0,), "isotropic noise floor of the data"),
        Param("bases", str, ("orthogonal",), "orthogonal (mutually) or random bases", BASES),
        Param("learner", str, ("pca", "ksubspaces"), "how the bases are fitted", LEARNERS),
        Param("threshold", float, (0.1,), "success when the error is at most this"),
        Param("restarts", int, (4,), "ksubspaces: random starts per instance"),
        Param("max_iter", int, (40,), "ksubspaces: assignment/refit iterations"),
        Param("sgd_steps", int, (300,), "sgd: Adam steps"),
        Param("sgd_sigma_max", float, (0.1,), "sgd: noise levels log-uniform in [sgd_sigma_max / 50, sgd_sigma_max] "
              "(the SGD noise floor of the error grows with it: ~0.01 at 0.1, 0.02 at 0.5, 0.04 at 2)"),
        Param("sgd_lr", float, (0.1,), "sgd: learning rate"),
        Param("sgd_engine", str, ("batched",), "sgd: batched GEMM form or the fused molrg_denoise per instance",
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
    max_cost=1024.0,  # measured: 1024 beats 4096 (less padding of N) and 256 (more per-batch overhead)
))

"""The learners of the sweeps: models fitted to a training set, apart from the experiments that use them.

Each learner takes a padded batch -- data X (B, N, n) of which the first ``counts[b]`` rows of
instance b are points, the rest zero -- and fits every instance at once (no Python loop over
instances).  Where it needs random numbers it reads them from its cell's Philox stream
(:mod:`fastdiff.sweeps.streams`; ``cells_seeds[b] = (cell seed, trial)``), so an instance's
model does not depend on the batch it was fitted in.

Subspace learners (seed 002 Sec. 3; bases (B, K, n, d), orthonormal; :func:`fit_bases` by name):

- ``pca`` (K = 1, seed 002 Thm 1): :func:`top_subspace`, the top-d principal subspace by block
  subspace iteration, exact to float rounding (an exact SVD finishes what does not converge);
- ``ksubspaces`` (K-subspaces clustering, seed 002 Thm 3): :func:`seed_bases` draws ``restarts``
  data-driven starts per instance and :func:`ksubspaces` runs them all as one batch, keeping the
  start of largest objective ``sum_i max_k ||U_k^T x_i||^2``; its clusters get an exact PCA refit.
  These three are the public form of the ``ksubspaces`` op (:mod:`fastdiff.ops.ksubspaces`: the
  contract, the batched torch form; the C++ kernels for float32 CPU data, chosen by
  ``fastdiff.dispatch``);
- ``sgd`` (seed 002 Alg. 1, App. E.1): :func:`fastdiff.sweeps.alg1.alg1_bases`, plain SGD on
  minibatches of the diffusion loss of the MoLRG denoiser, times on the paper's grid, a QR
  retraction per step; K > 1 starts from the tailored initialization (docs/math.md Sec. 4a, the
  reconstruction of App. E.1's eq. 48: the greedy data-driven seeding of :func:`seed_bases`),
  K = 1 from a random start;
- ``adam``: :func:`adam_bases`, the MoLRG denoiser's bases trained on the diffusion loss
  ``E ||x0_hat(x_0 + sigma eps) - x_0||^2`` with Adam on full batches (fresh log-uniform noise
  levels each step), a random start and a QR retraction after each step (not the paper's
  algorithm: what the ``sgd`` learner was before Algorithm 1 replaced it).  ``engine="batched"``
  evaluates the denoiser of all instances at once in the GEMM form (per-instance bases as a
  batched matmul); ``"fused"`` calls :func:`fastdiff.molrg_denoise` (its fused forward/backward
  kernels) once per instance.
  Both take ``sgd_steps``, ``sgd_lr`` and ``sgd_sigma_max`` from a cell, 0 meaning the learner's
  own default (:data:`fastdiff.sweeps.alg1.DEFAULTS`, :data:`ADAM_DEFAULTS`).

The Gaussian learner (seed 001): :func:`fit_gaussian`, the maximum-likelihood ``N(mu_0, Sigma_0)``
of each instance, and :func:`null_modes`, the eigenmodes of ``Sigma_0 + c I`` (the ridge-regularised
model) with the numerically-zero eigenvalues of ``Sigma_0`` made exact.

:func:`fit_denoisers` builds the denoisers the memorization experiment samples with from a
training set: the empirical optimum, the MoLRG denoiser of learned bases, or the fitted Gaussian.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fastdiff
from fastdiff import dispatch
from fastdiff.denoisers.gaussian import psd_eigenvalues
from fastdiff.ops.molrg import posterior
from fastdiff.ops import ksubspaces as op
from fastdiff.ops.ksubspaces import DT, orth
from fastdiff.sweeps.retraction import retract as _retract
from fastdiff.sweeps.streams import draw_per_cell as _draw_per_cell
from fastdiff.sweeps.streams import LEARNER_INIT, LEARNER_SGD, normals

__all__ = ["LEARNERS", "DENOISERS", "top_subspace", "seed_bases", "ksubspaces", "adam_bases", "fit_bases",
           "fit_gaussian", "null_modes", "psd_project", "fit_denoisers"]

LEARNERS = ("pca", "ksubspaces", "sgd", "adam")
# the adam learner's defaults for the shared sgd_* parameters (0 in a cell: the learner's default)
ADAM_DEFAULTS = {"steps": 300, "lr": 0.1, "sigma_max": 0.1}
DENOISERS = ("empirical", "molrg", "linear")


# =========================================================================== K-subspaces (the op's public form)
def _check_data(X: torch.Tensor, V0: torch.Tensor, starts_dims: int, counts: Optional[torch.Tensor]) -> None:
    if X.ndim != 3:
        raise ValueError(f"X: expected shape (B, N, n), got {tuple(X.shape)}")
    B, N, n = X.shape
    if V0.ndim != 2 + starts_dims or V0.shape[0] != B or V0.shape[-2] != n or not 1 <= V0.shape[-1] <= n:
        want = "(B, n, d)" if starts_dims == 1 else "(B, R, K, n, d)"
        raise ValueError(f"starts: expected shape {want} with B = {B}, n = {n} and 1 <= d <= n for X of shape "
                         f"{tuple(X.shape)}, got {tuple(V0.shape)}")
    if counts is not None and tuple(counts.shape) != (B,):
        raise ValueError(f"counts: expected shape ({B},), got {tuple(counts.shape)}")


def top_subspace(X: torch.Tensor, V0: torch.Tensor, *, tol: Optional[float] = None, max_iter: int = 60,
                 counts: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Orthonormal bases (B, n, d) of the top-d right singular subspaces of X (B, N, n), from starts V0.

    Block subspace iteration with per-instance convergence (:mod:`fastdiff.ops.ksubspaces`);
    rank-deficient X (N < d) converges too.  Instances not converged after ``max_iter`` iterations
    are finished with an exact SVD.  ``tol``: default 1e-10 for float64 data, 2e-5 otherwise.
    ``counts`` (B,): only the first ``counts[b]`` rows of instance b are data (the rest must be zero
    padding; the C++ kernel skips it).  ``backend``: ``"cpp"`` (``fastdiff._C.top_subspace``, float32
    CPU, one instance per OpenMP task; the default there) or ``"torch"`` (batched GEMMs and QRs).
    """
    _check_data(X, V0, 1, counts)
    if max_iter < 0:
        raise ValueError(f"max_iter: expected max_iter >= 0, got {max_iter}")
    tol = op.default_tol(X.dtype) if tol is None else tol
    backend = dispatch.choose("ksubspaces", backend, X.device, X.dtype)
    return op.top_subspace(X, V0, tol, max_iter, counts, backend)


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
    if X.ndim != 3 or u.ndim != 2 or u.shape[0] != X.shape[0] or not 1 <= d <= X.shape[-1] or K < 1:
        raise ValueError(f"seed_bases: expected X (B, N, n), u (B, R), K >= 1 and 1 <= d <= n, got X "
                         f"{tuple(X.shape)}, u {tuple(u.shape)}, K = {K}, d = {d}")
    backend = dispatch.choose("ksubspaces", backend, X.device, X.dtype)
    return op.seed_bases(X, counts, K, d, u, backend)


def ksubspaces(X: torch.Tensor, K: int, V0: torch.Tensor, *, max_iter: int = 40, counts: Optional[torch.Tensor] = None,
               backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """K-subspaces clustering of X (B, N, n) from R orthonormal starts V0 (B, R, K, n, d):
    bases (B, K, n, d) and labels (B, N) of the best start.

    ``backend="cpp"`` (the default for float32 CPU data): ``fastdiff._C.ksubspaces``, one instance
    per OpenMP task in L1 with the GIL released; ``counts`` (B,) (points per instance, the rest
    padding) saves it the padding rows.  ``"torch"``: the batched form (two batched GEMMs and one
    batched QR per iteration; an instance leaves the batch once none of its starts changes an
    assignment).  Both: zero rows (padding) are assigned to component 0 and change nothing; the
    best start's clusters get an exact PCA refit (:func:`top_subspace`).  K = 1 is PCA.
    """
    _check_data(X, V0, 3, counts)
    if V0.shape[2] != K:
        raise ValueError(f"starts: expected K = {K} bases per start, got shape {tuple(V0.shape)}")
    if max_iter < 0:
        raise ValueError(f"max_iter: expected max_iter >= 0, got {max_iter}")
    B, N, _ = X.shape
    if K == 1:
        return (top_subspace(X, V0[:, 0, 0], counts=counts, backend=backend)[:, None],
                torch.zeros(B, N, dtype=torch.long, device=X.device))
    backend = dispatch.choose("ksubspaces", backend, X.device, X.dtype)
    return op.ksubspaces(X, K, V0, max_iter, counts, backend)


# =========================================================================== sgd
def _denoise_batched(xt, U, sigma, K, d):
    """MoLRG posterior mean (delta = 0, tau = 1, uniform pi, alpha = 1) of per-instance bases, in the
    GEMM form: xt (B, M, n), U (B, n, K d), sigma (B, M, 1).  Differentiable (autograd)."""
    B, M, n = xt.shape
    s2 = sigma * sigma
    P = xt @ U                                                         # (B, M, K d)
    # the posterior's parameter rows [g | b | C | A | gw]: the logit gain g per row, b = 0 (the bias
    # is equal for all k with uniform pi and equal d); only g and b enter the weights
    params = P.new_zeros(B * M, 3 * K + 2)
    params[:, :K] = (1.0 / (2 * s2 * (1 + s2))).reshape(B * M, 1)
    w, _ = posterior(P.reshape(B * M, K * d), params, [d] * K, False, None)
    w = w.reshape(B, M, K)
    q = (P.reshape(B, M, K, d) * w[..., None]).reshape(B, M, K * d) / (1 + s2)
    return q @ U.mT


def adam_bases(X: torch.Tensor, counts: torch.Tensor, K: int, d: int, seeds_per_row: Sequence[Tuple[int, int]], *,
               steps: int = 300, lr: float = 0.1, sigma_min: float = 0.002, sigma_max: float = 0.1,
               engine: str = "batched", init: Optional[torch.Tensor] = None, retraction: str = "auto") -> torch.Tensor:
    """The ``adam`` learner (not seed 002's Algorithm 1, which is :func:`fastdiff.sweeps.alg1.alg1_bases`):
    bases (B, K, n, d) trained on the diffusion loss of each instance's data X (B, N, n) (rows past
    ``counts[b]`` are padding and do not enter the loss), all points in every step.

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
    U = orth(init.to(dev, DT).permute(0, 2, 1, 3).reshape(B, n, K * d)).float().requires_grad_()
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
            z[idx, :Nc] = normals(s, LEARNER_SGD, tmax, Nc, n + 1, step=step, device=dev).float()[tri]
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


# =========================================================================== by name
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
        draw = normals(s, LEARNER_INIT, tmax, *shape)
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
    if learner == "sgd":
        from fastdiff.sweeps.alg1 import DEFAULTS, alg1_bases

        opt = {k: params.get(f"sgd_{k}") or v for k, v in DEFAULTS.items()}     # 0 / absent: the default
        how = params.get("sgd_init", "auto")
        if K > 1 and how in ("auto", "tailored"):
            # the tailored start (eq. 48 as reconstructed, docs/math.md Sec. 4a): one greedy seeding,
            # its first seed from the first normal of the instance's start window
            init = seed_bases(X, counts, K, d, torch.special.ndtr(init[:, 0, 0, :1]))[:, 0]
        return alg1_bases(X, counts, K, d, cells_seeds, init, **opt)
    if learner != "adam":
        raise ValueError(f"learner: expected one of {LEARNERS}, got {learner!r}")
    opt = {k: params.get(f"sgd_{k}") or v for k, v in ADAM_DEFAULTS.items()}
    return adam_bases(X, counts, K, d, cells_seeds, steps=opt["steps"], lr=opt["lr"],
                      sigma_min=opt["sigma_max"] / 50, sigma_max=opt["sigma_max"],
                      engine=params.get("sgd_engine", "batched"), init=init)


# =========================================================================== the Gaussian
def fit_gaussian(X: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The maximum-likelihood Gaussian of each instance of X (T, N, n): mean ``mu_0`` (T, n) and
    covariance ``Sigma_0 = (1/N) sum_i (x_i - mu_0)(x_i - mu_0)^T`` (T, n, n), in X's dtype."""
    mu0 = X.mean(1)
    Xc = X - mu0[:, None]
    return mu0, Xc.mT @ Xc / X.shape[1]


def null_modes(S0: torch.Tensor, ridge: float):
    """Eigen-decomposition ``(lam, V)`` of ``Sigma_0 + ridge I`` with the numerically-zero
    eigenvalues of ``Sigma_0`` (at most ``n eps max(lam)``: ``Sigma_0`` from N samples has rank
    ``min(N - 1, n)``) set to exactly 0 before the ridge is added."""
    lam, V = torch.linalg.eigh(S0)
    n = S0.shape[-1]
    tol = n * torch.finfo(S0.dtype).eps * lam.abs().amax(-1, keepdim=True)
    lam = torch.where(lam <= tol, torch.zeros_like(lam), lam)
    return lam + ridge, V


def psd_project(S: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    """The nearest positive semi-definite matrix (Frobenius norm: ``V diag(max(lam, 0)) V^T``) to
    each symmetric ``S`` (..., n, n), in float64, for a covariance formed in ``dtype`` (default S's).

    A low-rank covariance formed in float32 has eigenvalues down to about ``-n eps lambda_max``
    (-7e-8 at unit scale) that are zeros; they are projected to 0.  An eigenvalue below the stated
    tolerance ``-max(1e-10, 4 n eps(dtype)) lambda_max`` is not rounding and raises ``ValueError``
    (:func:`fastdiff.denoisers.gaussian.psd_eigenvalues`, per matrix)."""
    dtype = S.dtype if dtype is None else dtype
    S = S.double()
    lam, V = torch.linalg.eigh(0.5 * (S + S.mT))
    lam = torch.stack([psd_eigenvalues(l, dtype) for l in lam.reshape(-1, lam.shape[-1])]).reshape(lam.shape)
    return (V * lam[..., None, :]) @ V.mT


# =========================================================================== denoisers of a training set
def fit_denoisers(kind: str, X: torch.Tensor, K: int, d: int, seed: int) -> List[Callable]:
    """One denoiser per training set X[t] (T, N, n), ``kind`` one of :data:`DENOISERS`:
    ``"empirical"`` -- the optimal denoiser of the training points
    (:class:`fastdiff.denoisers.Empirical`), which reproduces them; ``"molrg"`` -- the MoLRG
    denoiser of K bases of dimension d learned by PCA (K = 1) or K-subspaces (4 restarts, 40
    iterations; the starts from the stream of cell ``seed``); ``"linear"`` -- the optimal
    denoiser of the fitted Gaussian (:class:`fastdiff.denoisers.Gaussian`), its ML covariance
    (rank <= N - 1) formed in float64 and projected onto the PSD cone (:func:`psd_project`)."""
    T, N, _ = X.shape
    if kind == "empirical":
        return [fastdiff.denoisers.Empirical(X[t].float()) for t in range(T)]
    if kind == "linear":
        mu0, S0 = fit_gaussian(X.double())
        S0 = psd_project(S0, X.dtype)
        return [fastdiff.denoisers.Gaussian(mu0[t], S0[t]) for t in range(T)]
    if kind != "molrg":
        raise ValueError(f"denoiser: expected one of {DENOISERS}, got {kind!r}")
    learner = "pca" if K == 1 else "ksubspaces"
    U = fit_bases(learner, X, torch.full((T,), float(N), dtype=torch.float64), K, d, [(seed, t) for t in range(T)],
                  {"restarts": 4, "max_iter": 40})
    return [fastdiff.denoisers.MoLRG(U[t].float()) for t in range(T)]

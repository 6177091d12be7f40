"""Batched singular values and the numerical rank of denoiser Jacobians (SPEC 3, seed 002 Sec. 2.2).

    rank_eta(J) = min { r : sum_{i<=r} s_i^2 > eta^2 sum_i s_i^2 },   s_1 >= s_2 >= ...   (eta = 0.99)

clamped to min(m, n) (what eta = 1 gives) and 0 for a zero matrix.  The rank comes out of the
same kernel pass as the spectrum.  Kernels (one dispatch, ``backend=``):

- ``"cpp"`` (CPU, ``csrc/svd.cpp``): OpenMP over the batch; float64 Householder bidiagonalization
  and implicit-shift QR on the bidiagonal.  Backward stable: |s_i - s_i(exact)| <~ 1e-14 s_1 for
  float64 (measured up to 512 x 512), and float32 inputs get float64 arithmetic, so their only
  error is the final rounding (<= 6e-8 s_1).
- ``"triton"`` (CUDA, or CPU under TRITON_INTERPRET=1; ``kernels/svd.py``, m, n <= 256):
  bidiagonalization in registers and multisection on the Golub-Kahan tridiagonal, float64.
- ``"torch"``: ``torch.linalg.svdvals`` (LAPACK / cuSOLVER) in the input dtype + the rank in float64.

A matrix with a NaN or Inf entry gets all-NaN singular values and rank -1 (every backend); the
other matrices of the batch are unaffected.  float16 / bfloat16 inputs are computed in float32.

Jacobians: :func:`jacobian` for any row-wise torch callable (torch.func vjp / jvp, vmapped over
the basis vectors in chunks), :func:`molrg_jacobian` in closed form, :func:`molrg_jacobian_rank`
from a ``sum d_k``-sized problem (never n x n), ``jacobian_rank(fn, x, method="lanczos")``
matrix-free for large n, and :func:`jacobian_rank_trajectory` along an EDM Heun trajectory
(seed 002 Fig. 3).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch

from fastdiff import dispatch
from fastdiff._interop import accepts_arrays, check_not_meta
from fastdiff._args import _check_x
from fastdiff.denoisers._cache import _tensor_key, cache_get, cache_put
from fastdiff.denoisers._molrg_ops import _segment_ops
from fastdiff.denoisers.molrg import _molrg_inputs, molrg_params

__all__ = ["svdvals", "svdvals_rank", "jacobian_rank", "svd", "jacobian", "molrg_jacobian", "molrg_jacobian_rank",
           "jacobian_rank_trajectory", "TrajectoryRanks"]

_COMPUTE_DTYPES = (torch.float32, torch.float64)
# default chunk of basis vectors per vmapped vjp / jvp: the (chunk, B, n) cotangents and the
# autograd graph per chunk stay around this many elements
_CHUNK_ELEMENTS = 1 << 24


# =========================================================================== validation
def _check_matrices(A, name: str = "A") -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """A (..., m, n) -> (A as (B, m, n) contiguous, batch shape)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, NumPy or CuPy array, got {type(A).__name__}")
    if not A.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got {A.dtype}")
    check_not_meta(name, A)
    if A.ndim < 2:
        raise ValueError(f"{name}: expected a batch of matrices (..., m, n), got shape {tuple(A.shape)}")
    m, n = A.shape[-2:]
    if m < 1 or n < 1:
        raise ValueError(f"{name}: expected m >= 1 and n >= 1, got a ({m}, {n}) matrix shape")
    batch = tuple(A.shape[:-2])
    if math.prod(batch) == 0:
        raise ValueError(f"{name}: empty batch (batch shape {batch})")
    return A.reshape(-1, m, n).contiguous(), batch


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta: expected a number in (0, 1], got {type(eta).__name__}")
    eta = float(eta)
    if not 0.0 < eta <= 1.0:  # NaN fails too
        raise ValueError(f"eta: expected a value in (0, 1], got {eta}")
    return eta


# =========================================================================== kernels
def energy_rank(S: torch.Tensor, eta: float) -> torch.Tensor:
    """Ranks (B,) int64 from descending S (B, N) (float64 prefix sums; NaN rows -> -1)."""
    e = S.double().square()
    cum = e.cumsum(-1)
    total = cum[:, -1:]
    rank = ((cum <= (eta * eta) * total).sum(-1) + 1).clamp(max=S.shape[-1])
    rank = torch.where(total[:, 0] == 0, 0, rank)
    return torch.where(torch.isnan(total[:, 0]), -1, rank)


def _svdvals_rank_torch(A: torch.Tensor, eta: Optional[float]):
    finite = torch.isfinite(A).all(-1).all(-1)
    S = torch.linalg.svdvals(torch.where(finite[:, None, None], A, 0))  # LAPACK may fail on NaN
    S = torch.where(finite[:, None], S, float("nan"))
    return S, (energy_rank(S, eta) if eta is not None else None)


def _svdvals_rank_cpp(A: torch.Tensor, eta: Optional[float]):
    from fastdiff import _C

    B, m, n = A.shape
    # poisoned: an element the kernel skips shows up as NaN / -2 (no valid rank is -2)
    S = torch.full((B, min(m, n)), float("nan"), dtype=A.dtype)
    rank = torch.full((B,), -2, dtype=torch.int64) if eta is not None else None
    _C.svdvals_rank(A.data_ptr(), 0 if A.dtype == torch.float32 else 1, B, m, n, S.data_ptr(),
                    rank.data_ptr() if rank is not None else 0, eta if eta is not None else 1.0)
    return S, rank


def _svdvals_rank_triton(A: torch.Tensor, eta: Optional[float]):
    from fastdiff.kernels.svd import svdvals_rank as launch

    return launch(A, eta)


_IMPLS = {"torch": _svdvals_rank_torch, "cpp": _svdvals_rank_cpp, "triton": _svdvals_rank_triton}


def _svdvals_rank(A: torch.Tensor, eta: Optional[float], backend: str):
    """(B, m, n) -> (S (B, N) in A's dtype, rank (B,) or None)."""
    impl = dispatch.choose("svd", backend, A.device, A.dtype, m=A.shape[-2], n=A.shape[-1])
    if impl != "torch" and A.requires_grad and torch.is_grad_enabled():
        impl = "torch"  # the SVD kernels have no backward (their S would come out detached)
    ct = A.dtype if A.dtype in _COMPUTE_DTYPES else torch.float32
    S, rank = _IMPLS[impl](A.to(ct).contiguous(), eta)
    return S.to(A.dtype), rank


# =========================================================================== public: spectra
@accepts_arrays
def svdvals(A, *, backend: str = "auto") -> torch.Tensor:
    """Singular values of a batch ``A`` (..., m, n), descending: (..., min(m, n)) in A's dtype.

    Non-finite matrices give all-NaN rows (module docstring: accuracy per backend); where A requires
    grad torch computes S (the kernels have no backward)."""
    A3, batch = _check_matrices(A)
    S, _ = _svdvals_rank(A3, None, backend)
    return S.reshape(*batch, S.shape[-1])


@accepts_arrays
def svdvals_rank(A, eta: float = 0.99, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(svdvals(A), jacobian_rank(A, eta))`` from one kernel pass: (..., min(m, n)) and (...,) int64."""
    eta = _check_eta(eta)
    A3, batch = _check_matrices(A)
    S, rank = _svdvals_rank(A3, eta, backend)
    return S.reshape(*batch, S.shape[-1]), rank.reshape(batch)


def jacobian_rank(J, x=None, *args, eta: float = 0.99, method: str = "dense", backend: str = "auto",
                  chunk: Optional[int] = None, k: Optional[int] = None, probes: int = 16, seed: int = 0):
    """Numerical rank (SPEC 3) of Jacobians.

    - ``jacobian_rank(J, eta=0.99)``: J (..., m, n) -> ranks (...,) int64, fused with the SVD.
    - ``jacobian_rank(fn, x, *args, method="dense")``: the rank of each row's Jacobian of the
      row-wise callable ``fn(x, *args)`` (x (B, n)); ``method="dense"`` forms :func:`jacobian`
      (chunked vjps) and runs the kernel; ``method="lanczos"`` is matrix-free (see
      :func:`_lanczos_rank`: Golub-Kahan-Lanczos with jvp / vjp, ``k`` starting steps, doubled
      until the rank is resolved, plus ``probes`` Hutchinson probes for the energy outside the
      Krylov space, drawn from ``torch.Generator().manual_seed(seed)``).

    Non-finite matrices (or Jacobians) give rank -1.  NumPy in, NumPy out.
    """
    eta = _check_eta(eta)
    if method not in ("dense", "lanczos"):
        raise ValueError(f"method: expected 'dense' or 'lanczos', got {method!r}")
    if callable(J) and not isinstance(J, (torch.Tensor, np.ndarray)):
        if x is None:
            raise ValueError("x: required with a callable (the points (B, n) where the Jacobians are taken)")
        return _jacobian_rank_fn(J, x, *args, eta=eta, method=method, backend=backend, chunk=chunk, k=k,
                                 probes=probes, seed=seed)
    if x is not None or args:
        raise TypeError("jacobian_rank(J): extra positional arguments are only taken with a callable")
    return _jacobian_rank_matrices(J, eta=eta, backend=backend)


@accepts_arrays
def _jacobian_rank_matrices(J, *, eta, backend):
    A3, batch = _check_matrices(J, "J")
    _, rank = _svdvals_rank(A3, eta, backend)
    return rank.reshape(batch)


@accepts_arrays
def _jacobian_rank_fn(fn, x, *args, eta, method, backend, chunk, k, probes, seed):
    x = _check_x(x)
    if method == "dense":
        J = jacobian(fn, x, *args, chunk=chunk)
        _, rank = _svdvals_rank(_check_matrices(J, "jacobian")[0], eta, backend)
        return rank
    return _lanczos_rank(fn, x, args, eta, k, probes, seed, backend)


@accepts_arrays
def svd(A, k: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` singular triplets (all min(m, n) without k): ``U (..., m, k), S (..., k), Vh (..., k, n)``
    with ``A ~= U diag(S) Vh``; rows of Vh are the right singular vectors (seed 002 Sec. 4.2 edits
    along them).  Singular vectors are not fused: this is ``torch.linalg.svd(full_matrices=False)``
    (LAPACK gesdd / cuSOLVER), in the input dtype (float16/bfloat16 computed in float32), sliced to k.
    Signs follow LAPACK (each pair (u_i, v_i) is determined up to a common sign).
    """
    A3, batch = _check_matrices(A)
    N = min(A3.shape[-2:])
    if k is None:
        k = N
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= N:
        raise ValueError(f"k: expected an int in [1, min(m, n) = {N}], got {k!r}")
    if not bool(torch.isfinite(A3).all()):
        raise ValueError("A: expected finite entries (singular vectors of NaN / Inf matrices are undefined)")
    ct = A3.dtype if A3.dtype in _COMPUTE_DTYPES else torch.float32
    U, S, Vh = torch.linalg.svd(A3.to(ct), full_matrices=False)
    U, S, Vh = (t.to(A3.dtype) for t in (U[..., :k], S[..., :k], Vh[..., :k, :]))
    m, n = A3.shape[-2:]
    return U.reshape(*batch, m, k), S.reshape(*batch, k), Vh.reshape(*batch, k, n)


# =========================================================================== Jacobians
def _chunk_for(chunk, B, n, n_basis):
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
        return int(chunk)
    return int(max(1, min(n_basis, _CHUNK_ELEMENTS // max(1, B * n))))


def jacobian(fn: Callable, x, *args, chunk: Optional[int] = None, mode: str = "rev") -> torch.Tensor:
    """Per-row Jacobians ``J[b, i, j] = d fn(x, *args)[b, i] / d x[b, j]``, (B, n_out, n).

    ``fn`` must treat rows independently (every denoiser does): then one vjp with the cotangent
    ``e_i`` in every row gives row i of all B Jacobians at once, so ``mode="rev"`` needs n_out
    vjps of the batch and ``mode="fwd"`` n jvps (``e_j`` in every row gives column j).  They are
    ``torch.func.vmap``-ed over the basis vectors in chunks of ``chunk`` (default: ~16M elements
    of cotangents per chunk).  A callable that torch.func cannot transform (an
    ``autograd.Function`` without ``setup_context``, a kernel launched through raw pointers)
    falls back to plain autograd, one backward pass per output coordinate (``mode="rev"``).
    NumPy in, NumPy out (``fn`` is always called with tensors).
    """
    return _jacobian(fn, x, *args, chunk=chunk, mode=mode)


@accepts_arrays
def _jacobian(fn, x, *args, chunk, mode):
    x = _check_x(x)
    if mode not in ("rev", "fwd"):
        raise ValueError(f"mode: expected 'rev' or 'fwd', got {mode!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    B, n = x.shape
    x = x.detach()
    f = lambda z: fn(z, *args)  # noqa: E731
    try:
        if mode == "rev":
            y, vjp_fn = torch.func.vjp(f, x)
            n_out = y.shape[1]
            c = _chunk_for(chunk, B, max(n, n_out), n_out)
            eye = torch.eye(n_out, dtype=y.dtype, device=y.device)
            basis = eye[:, None, :].expand(n_out, B, n_out)
            rows = torch.func.vmap(lambda v: vjp_fn(v)[0], chunk_size=c)(basis)  # (n_out, B, n)
            return rows.permute(1, 0, 2).contiguous()
        c = _chunk_for(chunk, B, n, n)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        basis = eye[:, None, :].expand(n, B, n)
        cols = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1], chunk_size=c)(basis)  # (n, B, n_out)
        return cols.permute(1, 2, 0).contiguous()
    except (RuntimeError, NotImplementedError) as e:
        if not _is_transform_error(e):
            raise
    # plain autograd: fn is not torch.func-transformable
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        y = f(xg)
        rows = [torch.autograd.grad(y[:, i].sum(), xg, retain_graph=i + 1 < y.shape[1])[0] for i in range(y.shape[1])]
    return torch.stack(rows, 1)


def _is_transform_error(e: Exception) -> bool:
    text = str(e)
    return any(s in text for s in ("functorch", "torch.func", "setup_context", "vmap", "Batching rule", "data_ptr",
                                   "forward AD", "jvp", "Cannot access data pointer"))


# --------------------------------------------------------------------------- matrix-free
def _orthogonalize(r, Q):
    """r (B, n) minus its projection on the columns of Q (B, n, j), twice (Gram-Schmidt twice is enough)."""
    if Q.shape[-1] == 0:
        return r
    for _ in range(2):
        r = r - torch.einsum("bnj,bj->bn", Q, torch.einsum("bnj,bn->bj", Q, r))
    return r


def _lanczos_rank(fn, x, args, eta, k, probes, seed, backend):
    """Matrix-free rank of each row's Jacobian J_b (n_out x n) of a row-wise ``fn``.

    Golub-Kahan-Lanczos bidiagonalization (full reorthogonalization, float64 vectors), one jvp
    (J v) and one vjp (J^T u) per step for all rows at once: after k steps J V_k = U_k B_k
    with B_k upper bidiagonal, whose singular values (Ritz values) converge to the leading
    singular values of J first.  The total energy ||J||_F^2 = ||J V_k||_F^2 + ||J (I - V_k V_k^T)||_F^2:
    the first term is ||B_k||_F^2 exactly, the second is estimated with ``probes`` Gaussian
    probes projected off V_k (E ||J (I - V V^T) z||^2 = ||J (I - V V^T)||_F^2; Hutch++'s
    deflation: the estimate's error shrinks with the energy left outside the Krylov space).
    k doubles until the rank r satisfies r <= 3k/4 for every row (Ritz values of the leading
    part have converged) or k = n (then everything is exact: no probes are used).
    A breakdown (beta ~ 0: the Krylov space of J^T J is exhausted, as for exactly low-rank J)
    restarts with a random vector orthogonal to V_k.
    """
    B, n = x.shape
    xd = x.detach()
    f = lambda z: fn(z, *args)  # noqa: E731
    y0, vjp_fn = torch.func.vjp(f, xd)
    n_out = y0.shape[1]
    N = min(n, n_out)
    gen = torch.Generator().manual_seed(int(seed))
    dev, ct = x.device, x.dtype

    def Jv(v):
        return torch.func.jvp(f, (xd,), (v.to(ct),))[1].double()

    def JTu(u):
        return vjp_fn(u.to(ct))[0].double()

    def rand(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dev)

    k_target = min(N, 32 if k is None else int(k))
    if k_target < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    V = torch.zeros(B, n, 0, dtype=torch.float64, device=dev)
    U = torch.zeros(B, n_out, 0, dtype=torch.float64, device=dev)
    alphas, betas = [], []
    v = rand((B, n))
    v = v / v.norm(dim=1, keepdim=True)
    u = None
    scale = torch.zeros(B, dtype=torch.float64, device=dev)  # running max of the alphas and betas (~ ||J||)
    while True:
        while V.shape[-1] < k_target:
            j = V.shape[-1]
            V = torch.cat([V, v[:, :, None]], -1)
            p = Jv(v) if u is None else Jv(v) - betas[-1][:, None] * u
            p = _orthogonalize(p, U)
            a = p.norm(dim=1)
            scale = torch.maximum(scale, a)
            tiny = a <= 1e-12 * scale  # breakdown (or J = 0): continue with a fresh direction
            u = torch.where(tiny[:, None], _orthogonalize(rand((B, n_out)), U), p)
            u = u / u.norm(dim=1, keepdim=True)
            a = torch.where(tiny, 0.0, a)
            alphas.append(a)
            U = torch.cat([U, u[:, :, None]], -1)
            if j + 1 >= N:
                break
            r = _orthogonalize(JTu(u) - a[:, None] * v, V)
            b = r.norm(dim=1)
            scale = torch.maximum(scale, b)
            tiny = b <= 1e-12 * scale
            v = torch.where(tiny[:, None], _orthogonalize(rand((B, n)), V), r)
            v = v / v.norm(dim=1, keepdim=True)
            betas.append(torch.where(tiny, 0.0, b))
        kk = V.shape[-1]
        Bk = torch.diag_embed(torch.stack(alphas, 1))
        if kk > 1:
            Bk = Bk + torch.diag_embed(torch.stack(betas[:kk - 1], 1), offset=1)
        theta, _ = _svdvals_rank(Bk.contiguous(), None, backend)  # (B, kk) float64
        energy = Bk.square().sum((1, 2))
        if kk < N and probes > 0:
            Z = rand((probes, B, n))
            res = torch.stack([Jv(_orthogonalize(z, V)).square().sum(1) for z in Z]).mean(0)
            energy = energy + res
        cum = theta.square().cumsum(1)
        rank = ((cum <= (eta * eta) * energy[:, None]).sum(1) + 1).clamp(max=N)
        rank = torch.where(energy == 0, 0, rank)
        resolved = (rank <= (3 * kk) // 4) | (kk >= N)
        if bool(resolved.all()):
            bad = ~torch.isfinite(energy)
            return torch.where(bad, -1, rank)
        k_target = min(N, 2 * kk)


# --------------------------------------------------------------------------- MoLRG closed form
def _molrg_parts(x, bases, alpha, sigma, pi, tau, delta, mode, labels, guidance, output):
    """(A (R,), terms of M, Ucat (n, D) float64, x, ucat as packed, dims) with J = A I + Ucat M Ucat^T
    (:func:`_molrg_m` assembles M; :func:`molrg_jacobian_rank` uses the terms without it)."""
    x, ucat, dims, labels = _molrg_inputs(x, bases, mode, output, labels, guidance, False)
    B, n = x.shape
    K = len(dims)
    params = molrg_params(alpha, sigma, dims, pi, tau, delta, output, guidance, B, x.device)  # (R, 3K+2) float64
    g, b, C, A, gw = params[:, :K], params[:, K:2 * K], params[:, 2 * K:3 * K], params[:, 3 * K], params[:, 3 * K + 1:]
    segsum, expand = _segment_ops(dims, x.device)
    U = ucat.double()
    p = x.double() @ U                                              # (B, D) = U^T x
    logits = b + g * segsum(p * p)
    if mode == "hard":
        w = torch.nn.functional.one_hot(logits.argmax(1), K).double()
        w = torch.where(torch.isnan(logits).any(1, keepdim=True), float("nan"), w)
    else:
        w = torch.softmax(logits, 1)
    wp = w if labels is None else (1 - gw) * w + gw * torch.nn.functional.one_hot(labels, K).double()
    # M = diag(e[seg]) + (1 - gw) [blockdiag_k(cp_k (2 g_k p_k)^T) - cp hp^T]  (soft; diag only for hard)
    e = (wp * C).expand(B, K)                                     # sum_k w'_k C_k P_k
    soft = None
    if mode == "soft":
        cp = expand(w * C) * p                                      # coefficients of sum_k w_k C_k P_k x
        hp = expand(w * 2 * g) * p                                  # ... of sum_j w_j 2 g_j P_j x
        g2p = expand((2 * g).expand(B, K)) * p
        soft = ((1 - gw).expand(B, 1), cp, g2p, hp, w)
    return A, (e, soft), U, x, ucat, dims


def _molrg_m(terms, dims):
    """The (B, D, D) middle factor M of J = A I + Ucat M Ucat^T from :func:`_molrg_parts`' pieces."""
    (e, soft) = terms
    _, expand = _segment_ops(dims, e.device)
    M = torch.diag_embed(expand(e))
    if soft is not None:
        scale, cp, g2p, hp, _ = soft
        K = len(dims)
        seg = torch.repeat_interleave(torch.arange(K, device=e.device), torch.tensor(dims, device=e.device))
        same = (seg[:, None] == seg[None, :]).double()              # block-diagonal mask
        M = M + scale[:, :, None] * (cp[:, :, None] * g2p[:, None, :] * same - cp[:, :, None] * hp[:, None, :])
    return M


@accepts_arrays
def molrg_jacobian(x, bases, alpha, sigma, *, pi=None, tau=None, delta: float = 0.0, mode: str = "soft",
                   labels=None, guidance=None, output: str = "x0") -> torch.Tensor:
    """Closed-form Jacobian ``d out / d x`` (B, n, n) of :func:`fastdiff.molrg_denoise` (same options).

    With the packed table of :mod:`fastdiff.denoisers.molrg` (``out = A x + sum_k w'_k C_k P_k x``,
    w = softmax_k(b_k + g_k ||U_k^T x||^2), w' = (1 - gw) w + gw onehot(label)) and p = Ucat^T x::

        J = A I + Ucat M Ucat^T,
        M = diag(w'_k C_k)[seg] + (1 - gw) [ blockdiag_k(w_k C_k 2 g_k p_k p_k^T) - (c * p)(h * p)^T ]
        c_j = w_k C_k, h_j = 2 w_k g_k  (k the component of column j)

    the SPEC 3 form for output x0 without guidance.  mode="hard": the one-hot weights are
    piecewise constant, M = diag(w'_k C_k)[seg].  Computed in float64, returned in x's dtype.
    """
    A, terms, U, x, _, dims = _molrg_parts(x, bases, alpha, sigma, pi, tau, delta, mode, labels, guidance, output)
    J = U @ _molrg_m(terms, dims) @ U.T
    J.diagonal(dim1=1, dim2=2).add_(A[:, None])
    return J.to(x.dtype)


_BASIS_CACHE: dict = {}


def _range_basis(ucat: torch.Tensor, dims):
    """(Q (n, r) orthonormal, R (r, D), G (K, r, r) = R_k R_k^T per component) with Ucat = Q R in
    float64, r = numerical rank of Ucat
    (bases may overlap), from an SVD of Ucat.  The SVD (~80 ms at n = 768, D = 160, far more
    than the rest of a call) is cached per packed-bases tensor (weak reference + version
    counter, as :func:`fastdiff.denoisers._cache._packed` caches the packing itself), so a sweep over
    many points and noise levels with one set of bases pays it once."""
    key = _tensor_key([ucat], (tuple(dims),))
    hit = cache_get(_BASIS_CACHE, key, [ucat])
    if hit is not None:
        return hit
    U = ucat.double()
    W, s, Vh = torch.linalg.svd(U, full_matrices=False)
    keep = s > s[0] * max(U.shape) * torch.finfo(torch.float64).eps
    R = s[keep, None] * Vh[keep]
    G = torch.stack([Rk @ Rk.T for Rk in torch.split(R, list(dims), dim=1)])
    QR = (W[:, keep], R, G)
    cache_put(_BASIS_CACHE, key, [ucat], QR)
    return QR


@accepts_arrays
def molrg_jacobian_rank(x, bases, alpha, sigma, *, eta: float = 0.99, pi=None, tau=None, delta: float = 0.0,
                        mode: str = "soft", labels=None, guidance=None, output: str = "x0",
                        return_svals: bool = False, backend: str = "auto"):
    """``jacobian_rank(molrg_jacobian(...), eta)`` without forming the n x n matrices.

    J = A I + Ucat M Ucat^T (see :func:`molrg_jacobian`).  With Ucat = Q R (Q (n, r) an orthonormal
    basis of the span of the bases, r <= sum d_k), J = Q (A I_r + R M R^T) Q^T + A (I - Q Q^T):
    its singular values are those of the (r, r) matrix ``A I_r + R M R^T`` and (n - r) copies of
    |A|.  Cost O(B (n D + D^3)) instead of O(B n^3).  Returns ranks (B,) int64 (and the singular
    values (B, n), descending, with ``return_svals``); a non-finite x gives rank -1.
    """
    eta = _check_eta(eta)
    A, (e, soft), U, x, ucat, dims = _molrg_parts(x, bases, alpha, sigma, pi, tau, delta, mode, labels, guidance,
                                                  output)
    B, n = x.shape
    if B == 0:  # an empty batch: nothing to rank (the segment sums below cannot reshape it)
        rank = torch.zeros(0, dtype=torch.int64, device=x.device)
        return (rank, x.new_zeros(0, n)) if return_svals else rank
    Q, R, G = _range_basis(ucat, dims)
    r = Q.shape[1]
    # small = R M R^T from M's structure, O(B K r^2) instead of two (r, D) x (D, D) products:
    #   R diag(e[seg]) R^T = sum_k e_k G_k;  R [blockdiag_k(cp_k g2p_k^T) - cp hp^T] R^T below
    small = (e @ G.reshape(len(dims), r * r)).reshape(B, r, r)
    if soft is not None:
        scale, cp, g2p, hp, _ = soft
        segsum, _ = _segment_ops(dims, x.device)
        uc = segsum((R[None] * cp[:, None, :]).reshape(B * r, -1)).reshape(B, r, -1)   # (B, r, K): R_k cp_k
        ug = segsum((R[None] * g2p[:, None, :]).reshape(B * r, -1)).reshape(B, r, -1)
        # blockdiag_k(cp_k g2p_k^T) - cp hp^T = sum_k (R_k cp_k)(sum_j c_kj R_j g2p_j)^T with
        # c_kj = [j = k] - w_j.  Where one w_k ~ 1 the two terms nearly cancel; writing 1 - w_k as the
        # sum of the other weights keeps every coefficient exact to rounding (float64 accuracy).
        w = soft[4]
        eye = torch.eye(len(dims), dtype=w.dtype, device=w.device)
        coef = torch.diag_embed((w[:, None, :] * (1 - eye)).sum(-1)) - (1 - eye) * w[:, None, :]   # (B, K, K)
        low = uc @ (ug @ coef.transpose(1, 2)).transpose(1, 2)
        small = small + scale[:, :, None] * low
    small.diagonal(dim1=1, dim2=2).add_(A[:, None])
    S, _ = _svdvals_rank(small.contiguous(), None, backend)       # float64 (B, r)
    if r < n:
        S = torch.cat([S, A.abs()[:, None].expand(B, n - r)], 1).sort(1, descending=True).values
        S = torch.where(torch.isnan(S).any(1, keepdim=True), float("nan"), S)  # sort moves NaN first
    rank = energy_rank(S, eta)
    return (rank, S.to(x.dtype)) if return_svals else rank


# --------------------------------------------------------------------------- trajectories
class TrajectoryRanks(NamedTuple):
    """Ranks along an EDM Heun trajectory (seed 002 Fig. 3): one entry per visited noise level."""
    sigma: torch.Tensor   # (S,) float64, the noise levels visited (decreasing, > 0)
    snr: torch.Tensor     # (S,) 1 / sigma (alpha = 1)
    ranks: torch.Tensor   # (S, B) int64, rank_eta of J = d x0_hat / d x at each point
    ratio: torch.Tensor   # (S,) float64, mean over the batch of rank / n
    x: torch.Tensor       # (B, n) the final sample


def jacobian_rank_trajectory(denoiser, noise, *, schedule=None, eta: float = 0.99, method: str = "dense",
                             chunk: Optional[int] = None, backend: str = "auto", progress: bool = False) -> TrajectoryRanks:
    """Ranks of the denoiser's Jacobian at the points an EDM Heun sampler visits (seed 002 Fig. 3).

    ``noise`` (B, n) standard normal; the sampler (:func:`fastdiff.sampling.run` over the
    ``"heun"`` :func:`fastdiff.sampling.trajectory_table`) starts at ``x = sigma_0 noise`` and runs
    over ``schedule`` (default ``KarrasSchedule(18)``: 18 steps, EDM; or a 1-D sequence of
    decreasing sigmas, all but the last > 0).  At every level sigma_i > 0 the rank of
    ``d x0_hat(x_i, sigma_i) / d x_i`` is taken before stepping (the loop's per-step callback).
    ``denoiser`` is a :class:`fastdiff.denoisers.MoLRG` (closed form, :func:`molrg_jacobian_rank`,
    in the model's own ``mode``) or any callable ``den(x, alpha, sigma) -> x0_hat``
    (:func:`jacobian_rank` with ``method``).  ``backend``: the rank's SVD.  NumPy noise gives
    NumPy arrays in the result.
    """
    from fastdiff.denoisers import MoLRG
    from fastdiff.sampling import run, trajectory_table
    from fastdiff.schedules import KarrasSchedule

    eta = _check_eta(eta)
    is_numpy = isinstance(noise, np.ndarray)
    x = torch.from_numpy(noise) if is_numpy else noise
    x = _check_x(x)
    table = trajectory_table(KarrasSchedule(18) if schedule is None else schedule, "heun")
    levels, ranks = [], []

    def rank_before_step(info):
        s = info.sigma  # alpha = 1
        if isinstance(denoiser, MoLRG):
            r = molrg_jacobian_rank(info.x, denoiser.bases, 1.0, s, eta=eta, pi=denoiser.pi, tau=denoiser.tau,
                                    delta=denoiser.delta, mode=denoiser.mode, backend=backend)
        else:
            r = jacobian_rank(lambda z: denoiser(z, 1.0, s), info.x, eta=eta, method=method, chunk=chunk,
                              backend=backend)
        levels.append(s)
        ranks.append(r.cpu())

    def no_grad_denoiser(z, alpha, sigma):
        with torch.no_grad():
            return denoiser(z, alpha, sigma)

    x = run(no_grad_denoiser, x * table[0].level[1], table, callback=rank_before_step, progress=progress,
            desc="jacobian ranks")
    sig = torch.tensor(levels, dtype=torch.float64)
    R = torch.stack(ranks)
    out = TrajectoryRanks(sig, 1.0 / sig, R, R.double().mean(1) / x.shape[1], x)
    if is_numpy:
        out = TrajectoryRanks(*(t.numpy() for t in out))
    return out

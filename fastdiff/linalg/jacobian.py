"""Per-row Jacobians of any row-wise torch callable and their numerical rank (docs/math.md section 3,
seed 002 Sec. 2.2): dense (:func:`jacobian`: vmapped vjps / jvps, then the SVD kernels) or
matrix-free (:func:`_lanczos_rank`: Golub-Kahan-Lanczos with Hutchinson probes, for large n)."""
from __future__ import annotations

import numbers
from typing import Callable, Optional

import numpy as np
import torch

from fastdiff import dispatch
from fastdiff._interop import accepts_arrays
from fastdiff._args import _check_x
from fastdiff._args import check_eta
from fastdiff.linalg.svd import _check_matrices, _svdvals_rank

__all__ = ["jacobian", "jacobian_rank"]

# default chunk of basis vectors per vmapped vjp / jvp: the (chunk, B, n) cotangents and the
# autograd graph per chunk stay around this many elements
_CHUNK_ELEMENTS = 1 << 24


def jacobian_rank(J, x=None, *args, eta: float = 0.99, method: str = "dense", backend: str = "auto",
                  chunk: Optional[int] = None, k: Optional[int] = None, probes: int = 16, seed: int = 0):
    """Numerical rank (docs/math.md section 3) of Jacobians.

    - ``jacobian_rank(J, eta=0.99)``: J (..., m, n) -> ranks (...,) int64, fused with the SVD.
    - ``jacobian_rank(fn, x, *args, method="dense")``: the rank of each row's Jacobian of the
      row-wise callable ``fn(x, *args)`` (x (B, n)); ``method="dense"`` forms :func:`jacobian`
      (chunked vjps) and runs the kernel; ``method="lanczos"`` is matrix-free (see
      :func:`_lanczos_rank`: Golub-Kahan-Lanczos with jvp / vjp, ``k`` starting steps, doubled
      until the rank is resolved, plus ``probes`` Hutchinson probes for the energy outside the
      Krylov space, drawn from ``torch.Generator().manual_seed(seed)``).

    Non-finite matrices (or Jacobians) give rank -1.  NumPy in, NumPy out.
    """
    dispatch.check_backend("svd", backend)  # an unknown name is an error on every input, empty ones too
    eta = check_eta(eta)
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


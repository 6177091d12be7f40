"""The Jacobian of the MoLRG denoiser in closed form (docs/math.md section 3), and its rank from a
``sum d_k``-sized problem instead of an n x n one."""
from __future__ import annotations

import torch

from fastdiff import dispatch
from fastdiff._interop import accepts_arrays
from fastdiff.denoisers._cache import _tensor_key, cache_get, cache_put
from fastdiff.denoisers.molrg import _molrg_inputs, molrg_params
from fastdiff._args import check_eta
from fastdiff.linalg.svd import _svdvals_rank
from fastdiff.ops.molrg import posterior, segment_ops
from fastdiff.ops.svd import energy_rank

__all__ = ["molrg_jacobian", "molrg_jacobian_rank"]


def _molrg_parts(x, bases, alpha, sigma, pi, tau, delta, mode, labels, guidance, output):
    """(A (R,), terms of M, Ucat (n, D) float64, x, ucat as packed, dims) with J = A I + Ucat M Ucat^T
    (:func:`_molrg_m` assembles M; :func:`molrg_jacobian_rank` uses the terms without it)."""
    x, ucat, dims, labels = _molrg_inputs(x, bases, mode, output, labels, guidance, False)
    B, n = x.shape
    K = len(dims)
    params = molrg_params(alpha, sigma, dims, pi, tau, delta, output, guidance, B, x.device)  # (R, 3K+2) float64
    g, C, A, gw = params[:, :K], params[:, 2 * K:3 * K], params[:, 3 * K], params[:, 3 * K + 1:]
    _, expand = segment_ops(dims, x.device)
    U = ucat.double()
    p = x.double() @ U                                              # (B, D) = U^T x
    w, wp = posterior(p, params, dims, mode == "hard", labels)     # the op's posterior, in float64
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
    _, expand = segment_ops(dims, e.device)
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

    the docs/math.md section 3 form for output x0 without guidance.  mode="hard": the one-hot weights are
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
    (bases may overlap), from an SVD of Ucat.  The SVD (O(n D^2), more than the rest of a call, which works in the
    r-dimensional range) is cached per packed-bases tensor (weak reference + version
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
    dispatch.check_backend("svd", backend)  # an unknown name is an error on every input, empty ones too
    eta = check_eta(eta)
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
        segsum, _ = segment_ops(dims, x.device)
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


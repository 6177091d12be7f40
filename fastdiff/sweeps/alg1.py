"""The ``sgd`` learner: seed 002's Algorithm 1 (App. E.1), plain minibatch SGD on the diffusion loss of
the MoLRG-parameterized denoiser, in a GEMM-shaped form batched over instances (docs/math.md, Sec. 4a).

Per instance (data X (N, n), bases U = [U_1 .. U_K] (n, D), D = K d, each U_k orthonormal), each step:

- a minibatch of ``b`` rows ``i_j`` drawn uniformly (with replacement) from the N points, a time
  ``t_j`` uniform on the grid ``{1/L, 2/L, .., 1}`` and noise ``eps_j ~ N(0, I_n)``; with the
  paper's ``s_t = 1`` the noise level is ``sigma_j = sigma_max t_j``;
- the loss ``l(U) = (1/b) sum_j ||x0_hat(x_j + sigma_j eps_j) - x_j||^2`` of the denoiser (seed 002
  eq. 9, uniform pi, tau = 1, delta = 0) ``x0_hat(y) = c sum_k w_k U_k U_k^T y``,
  ``c = 1/(1 + sigma^2)``, ``w = softmax_k(g ||U_k^T y||^2)``, ``g = 1/(2 sigma^2 (1 + sigma^2))``;
- ``U <- retract(U - lr grad l(U))`` (the parameters live on O^{n x d}: a QR per block).

The denoiser sees ``y`` only through ``p = U^T y = a + sigma e`` with ``a = U^T x`` (one row of the
GEMM ``X U``) and ``e = U^T eps ~ N(0, G)``, ``G = U^T U``, so the forward and backward passes are
D-sized per row; the gradient is

    grad = U M1 + X^T M2 + (I - Pi) Z R

(``Pi`` the projector onto span U; ``M2`` (N, D) the rows' ``dP - (2/b) q`` summed per point; ``M1``
(D, D); ``Z R`` the part of ``sum_j sigma_j eps_j dP_j^T`` orthogonal to span U, which is a Gaussian
``Z`` (n, m) times the triangular factor R (m, D) of ``S = diag(sigma) dP``, m = min(b, D), exactly in
distribution).  Per instance and step that is two (N, n) x (n, D) GEMMs, a handful of (n, D) x (D, D)
ones and n m normals, whatever b, instead of four (b, n) x (n, D) GEMMs and b n normals; the step has
the same law as autograd through the materialized x_t (:func:`materialized_grad`, the test reference).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fastdiff.sweeps.retraction import retract
from fastdiff.sweeps.streams import LEARNER_SGD, draw_per_cell, normals

__all__ = ["alg1_bases", "alg1_grad", "materialized_grad", "alg1_flops", "DEFAULTS", "INITS"]

# Fig. 4 settings of the Algorithm 1 learner (App. E.1 lost its numbers in the seed text; chosen and measured
# in bench/alg1_fig4.py so that the noiseless transitions are those of Thm 2/4, bench/results/alg1.md)
DEFAULTS = {"steps": 2000, "lr": 0.2, "batch": 64, "grid": 64, "sigma_max": 0.1}
INITS = ("auto", "random", "tailored")


def _denoise_rows(a: torch.Tensor, p: torch.Tensor, sigma: torch.Tensor, G: torch.Tensor, K: int):
    """Forward and backward of the rows' loss in D-space.  a, p (B, b, D); sigma (B, b, 1); G (B, D, D).
    Returns ``q`` (the coefficients of x0_hat = U q), ``dP`` (d loss / d p) and the loss per instance."""
    B, b, D = p.shape
    d = D // K
    s2 = sigma * sigma
    c = 1.0 / (1.0 + s2)                                               # (B, b, 1)
    g = 0.5 / (s2 * (1.0 + s2))
    pk = p.reshape(B, b, K, d)
    w = torch.softmax(g * pk.square().sum(-1), dim=-1)                 # (B, b, K)
    q = (c[..., None] * w[..., None] * pk).reshape(B, b, D)
    qG = q @ G
    # ||U q - x||^2 = q^T G q - 2 a^T q + ||x||^2 (the last term does not depend on U)
    loss = ((q * qG).sum(-1) - 2.0 * (a * q).sum(-1)).mean(1)
    dq = (2.0 / b) * (qG - a)                                          # d loss / d q
    dqk = dq.reshape(B, b, K, d)
    dw = c * (dqk * pk).sum(-1)                                        # (B, b, K)
    ds = g * w * (dw - (w * dw).sum(-1, keepdim=True))                 # softmax backward, s_k = ||p_k||^2
    dP = (c[..., None] * w[..., None] * dqk + 2.0 * ds[..., None] * pk).reshape(B, b, D)
    return q, dP, loss


def _psd_root(M: torch.Tensor, pinv: bool):
    """``(L, M^+)`` for symmetric PSD M (B, D, D): ``L L^T = M`` (Cholesky; where it fails, M singular,
    ``V diag(lam)^1/2`` from eigh with eigenvalues below ``1e-6 max(lam)`` set to 0) and, if ``pinv``,
    the pseudo-inverse (None otherwise).  Cholesky first: batched eigh of small matrices costs ~10x."""
    L, info = torch.linalg.cholesky_ex(M)
    bad = info != 0
    # cholesky_ex leaves a partial factor where it fails: give those rows I before inverting
    L = torch.where(bad[:, None, None], torch.eye(M.shape[-1], dtype=M.dtype, device=M.device), L)
    inv = torch.cholesky_inverse(L) if pinv else None
    if bool(bad.any()):
        # float64: float32 syevd can fail to converge on a nearly singular M; a non-finite M (a diverged
        # instance) gets a NaN root, so its error is NaN and the cell fails instead of the sweep raising
        Mb = M[bad].double()
        finite = torch.isfinite(Mb).all(-1).all(-1)
        lam, V = torch.linalg.eigh(torch.where(finite[:, None, None], Mb, torch.eye(M.shape[-1], dtype=Mb.dtype)))
        lam = torch.where(lam > 1e-6 * lam[..., -1:].clamp(min=1e-30), lam, 0.0)
        nan = torch.where(finite, 0.0, float("nan"))[:, None, None]
        L[bad] = (V * lam.sqrt()[..., None, :] + nan).to(M.dtype)
        if pinv:
            inv[bad] = ((V * torch.where(lam > 0, 1.0 / lam.clamp(min=1e-30), 0.0)[..., None, :]) @ V.mT + nan).to(M.dtype)
    return L, inv


def alg1_grad(X, U, K, idx, sigma, z, Z, eps: Optional[torch.Tensor] = None):
    """The stochastic gradient (B, n, D) of one step and the minibatch loss (B,) (up to the U-free
    ``||x||^2`` term).  X (B, N, n); U (B, n, D), K blocks; idx (B, b) int64 rows; sigma (B, b, 1); z (B, b, D)
    standard normals (``e = z L^T`` for a square root ``L L^T = G = U^T U``); Z (B, min(b, D), n)
    standard normals.  ``eps`` (B, b, n): the noise itself instead (``e = U^T eps``, ``W = eps^T S``),
    for the test against autograd through the materialized x_t; z and Z are then ignored."""
    gt, loss = _grad_t(X, U.mT.contiguous(), K, idx, sigma, z, Z, eps)
    return gt.mT, loss


def _grad_t(X, Ut, K, idx, sigma, z, Z, eps=None, Xt=None):
    """:func:`alg1_grad` in the layout the learner keeps, U^T (B, D, n): every n-sized GEMM then has n as
    its output's contiguous dimension (torch's CPU bmm runs (D, N) x (N, n) ~30x faster than
    (n, N) x (N, D)); ``Xt``: X^T (B, n, N) contiguous, formed once by the caller.  Returns grad^T
    (B, D, n) and the loss."""
    B, N, n = X.shape
    D = Ut.shape[1]
    b = idx.shape[1]
    G = Ut @ Ut.mT
    # blocks may share directions (a start with N_k < d), so G may be singular: e ~ N(0, G) from a
    # square root of G, Pi = U G^+ U^T with the pseudo-inverse (_psd_root)
    root, Ginv = _psd_root(G, True)
    A = (Ut @ (X.mT if Xt is None else Xt)).mT                         # GEMM 1: (D, n) x (n, N), A = X U
    ix = idx[..., None].expand(B, b, D)
    a = A.gather(1, ix)
    e = z @ root.mT if eps is None else eps @ Ut.mT                     # e ~ N(0, G), as U^T eps
    q, dP, loss = _denoise_rows(a, a + sigma * e, sigma, G, K)
    M2 = torch.zeros(B, N, D, dtype=X.dtype, device=X.device).scatter_add_(1, ix, dP - (2.0 / b) * q)
    M1 = (2.0 / b) * (q.mT @ q) + Ginv @ ((sigma * e).mT @ dP)        # the Pi-part of the eps term
    S = sigma * dP                                                     # (B, b, D)
    if eps is None:
        F = S if b <= D else _psd_root(S.mT @ S, False)[0].mT         # S^T S = F^T F
        Wt = F.mT @ Z                # W = Z^T F: rows iid N(0, S^T S), the law of eps^T S = sum_j sigma_j eps_j dP_j^T
    else:
        Wt = S.mT @ eps
    # U^T eps^T S = e^T S went into M1 exactly; of W only the part orthogonal to span U is new
    M1 = M1 - Ginv @ (Ut @ Wt.mT)                                      # (I - Pi) W = W - U G^+ U^T W
    return M1.mT @ Ut + M2.mT @ X + Wt, loss                           # GEMM 2: (D, N) x (N, n)


def _retract_t(Yt: torch.Tensor) -> torch.Tensor:
    """The QR retraction of blocks Y (n, d) given as Y^T (..., d, n): CholeskyQR2 in the wide layout
    (``L L^T = Y^T Y``, ``Q^T = L^-1 Y^T``, twice: GEMMs and a triangular solve with n right-hand
    columns), R's diagonal positive as :func:`fastdiff.sweeps.retraction.retract`, whose Householder
    QR takes the blocks where a Gram matrix is not numerically positive definite."""

    Q = Yt
    ok = torch.ones(Yt.shape[:-2], dtype=torch.bool, device=Yt.device)
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q @ Q.mT)
        ok &= info == 0
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        L = torch.where(ok[..., None, None], L, eye)
        # L^-1 (d, d) then one GEMM: a batched triangular solve with n right-hand sides runs ~10x slower
        Q = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False) @ Q
    eye = torch.eye(Q.shape[-2], dtype=Q.dtype, device=Q.device)
    ok &= ((Q @ Q.mT - eye).abs().amax((-2, -1)) <= 1e-4)             # False for NaN too
    if not bool(ok.all()):
        Q = torch.where(ok[..., None, None], Q, retract(Yt.mT, "householder").mT)
    return Q


def materialized_grad(X, U, K, idx, sigma, eps):
    """Reference: autograd of ``(1/b) sum_j ||x0_hat(x_j + sigma_j eps_j) - x_j||^2`` through the
    materialized x_t (B, b, n) (eps (B, b, n)), in X's dtype."""
    B, N, n = X.shape
    D = U.shape[-1]
    d = D // K
    U = U.detach().clone().requires_grad_()
    x = X.gather(1, idx[..., None].expand(-1, -1, n))
    xt = x + sigma * eps
    s2 = sigma * sigma
    P = (xt @ U).reshape(B, -1, K, d)
    w = torch.softmax(0.5 / (s2 * (1 + s2)) * P.square().sum(-1), dim=-1)
    x0 = ((w[..., None] * P).reshape(B, -1, D) / (1 + s2)) @ U.mT
    loss = (x0 - x).square().sum(-1).mean(1)
    loss.sum().backward()
    return U.grad, loss.detach() - x.square().sum(-1).mean(1)


def alg1_flops(N: int, n: int, K: int, d: int, b: int) -> int:
    """The floating-point operations of one step of one instance as :func:`alg1_bases` runs it: the
    GEMMs X U and X^T M2 (2 N n D each), G = U^T U, U^T W and U M1 (2 n D^2 each), Z R (2 n m D) and
    the QR retraction of K (n, d) blocks (Householder, ~4 n d^2 each); the D-sized work is left out."""
    D, m = K * d, min(b, K * d)
    return 4 * N * n * D + 6 * n * D * D + 2 * n * m * D + 4 * n * d * d * K


def alg1_bases(X: torch.Tensor, counts: torch.Tensor, K: int, d: int, seeds_per_row: Sequence[Tuple[int, int]],
               init: torch.Tensor, *, steps: int = DEFAULTS["steps"], lr: float = DEFAULTS["lr"],
               batch: int = DEFAULTS["batch"], grid: int = DEFAULTS["grid"],
               sigma_max: float = DEFAULTS["sigma_max"]) -> torch.Tensor:
    """Bases (B, K, n, d) from Algorithm 1 on each instance's data X (B, N, n) (rows past ``counts[b]``
    are padding), started from ``init`` (B, K, n, d) (orthonormalized per block).

    Step s of a cell reads one (trials, b (D + 2) + min(b, D) n) window of its Philox stream
    (``seeds_per_row[b] = (cell seed, trial)``): per row the point index, the time index and the D
    normals of ``U^T eps``, then the normals of the orthogonal part.  Runs on X's device in float32.
    """

    for name, v in (("sgd_steps", steps), ("sgd_batch", batch), ("sgd_grid", grid)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    for name, v in (("sgd_lr", lr), ("sgd_sigma_max", sigma_max)):
        if not v > 0:
            raise ValueError(f"{name}: expected a positive value, got {v!r}")
    B, N, n = X.shape
    D = K * d
    dev = X.device
    Xf = X.float()
    Xt = Xf.mT.contiguous()
    Ut = torch.linalg.qr(init.to(dev, torch.float32)).Q.mT.reshape(B, D, n)     # U^T, blocks stacked
    cnt = counts.to(dev).float()[:, None]
    m = min(batch, D)
    width = batch * (D + 2) + m * n
    for step in range(steps):
        r = draw_per_cell(seeds_per_row, B, width,
                           lambda s, t, w: normals(s, LEARNER_SGD, t, w, step=step, device=dev))
        head = r[:, :batch * (D + 2)].reshape(B, batch, D + 2)
        u = torch.special.ndtr(head[..., :2])
        idx = torch.minimum((u[..., 0] * cnt).long(), cnt.long() - 1)
        sigma = (sigma_max / grid) * ((u[..., 1:2] * grid).floor().clamp_(max=grid - 1) + 1)
        grad_t, _ = _grad_t(Xf, Ut, K, idx, sigma, head[..., 2:], r[:, batch * (D + 2):].reshape(B, m, n), Xt=Xt)
        Ut = _retract_t((Ut - lr * grad_t).reshape(B, K, d, n)).reshape(B, D, n)
    return Ut.reshape(B, K, d, n).mT.contiguous()

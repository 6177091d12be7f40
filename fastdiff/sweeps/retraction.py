"""The QR retraction of the SGD / Adam learners: onto orthonormal columns, R's diagonal positive."""
from __future__ import annotations

import torch

__all__ = ["retract"]


def retract(Y: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """The QR retraction onto orthonormal columns, Y = Q R with R's diagonal positive, so an already
    orthonormal Y maps to itself (LAPACK may flip column signs, which would reverse Adam's momentum).

    ``method``: ``"householder"`` (LAPACK / cuSOLVER QR, signs fixed) or ``"cholesky"`` (CholeskyQR2:
    twice ``L L^T = Q^T Q``, ``Q <- Q L^-T``: batched GEMMs, a batched Cholesky and a batched
    triangular solve, where torch's QR of a batch of tall matrices on CUDA is cuSOLVER calls per
    matrix).  Both give the same Q up to rounding; CholeskyQR2 is accurate while cond(Y) << 1/sqrt(eps)
    (Y here is an orthonormal U plus one Adam step, cond ~1.1) and falls back to Householder when a
    Gram matrix is not numerically positive definite.  ``"auto"``: Cholesky on CUDA, Householder on
    the CPU, where LAPACK's QR of a tall, thin matrix beats CholeskyQR2's two passes
    (``bench/test_bench_sweeps.py::test_sgd_retraction`` times both).
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

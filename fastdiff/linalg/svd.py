"""Batched singular values, their energy rank, and the leading singular triplets, with the argument
checks every :mod:`fastdiff.linalg` entry point shares (accuracy per backend: :mod:`fastdiff.linalg`).

    rank_eta(A) = min { r : sum_{i<=r} s_i^2 > eta^2 sum_i s_i^2 },   s_1 >= s_2 >= ...   (docs/math.md section 3)

The op (math, shapes, dtypes, the three backends) is :mod:`fastdiff.ops.svd`; this module validates,
chooses the backend and calls it.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from fastdiff import dispatch
from fastdiff._args import check_eta
from fastdiff._interop import accepts_arrays, check_not_meta
from fastdiff.ops import svd as svd_op

__all__ = ["svdvals", "svdvals_rank", "svd"]


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





def _svdvals_rank(A: torch.Tensor, eta: Optional[float], backend: str):
    """(B, m, n) -> (S (B, N) in A's dtype, rank (B,) or None): the backend chosen, the op run."""
    impl = dispatch.choose("svd", backend, A.device, A.dtype, m=A.shape[-2], n=A.shape[-1])
    if impl != "torch" and A.requires_grad and torch.is_grad_enabled():
        impl = "torch"  # the SVD kernels have no backward (their S would come out detached)
    return svd_op.svdvals_rank(impl, A, eta)


@accepts_arrays
def svdvals(A, *, backend: str = "auto") -> torch.Tensor:
    """Singular values of a batch ``A`` (..., m, n), descending: (..., min(m, n)) in A's dtype.

    Non-finite matrices give all-NaN rows (module docstring: accuracy per backend); where A requires
    grad torch computes S (the kernels have no backward)."""
    dispatch.check_backend("svd", backend)  # an unknown name is an error on every input, empty ones too
    A3, batch = _check_matrices(A)
    S, _ = _svdvals_rank(A3, None, backend)
    return S.reshape(*batch, S.shape[-1])


@accepts_arrays
def svdvals_rank(A, eta: float = 0.99, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(svdvals(A), jacobian_rank(A, eta))`` from one kernel pass: (..., min(m, n)) and (...,) int64."""
    dispatch.check_backend("svd", backend)  # an unknown name is an error on every input, empty ones too
    eta = check_eta(eta)
    A3, batch = _check_matrices(A)
    S, rank = _svdvals_rank(A3, eta, backend)
    return S.reshape(*batch, S.shape[-1]), rank.reshape(batch)


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
    ct = A3.dtype if A3.dtype in svd_op.COMPUTE_DTYPES else torch.float32
    U, S, Vh = torch.linalg.svd(A3.to(ct), full_matrices=False)
    U, S, Vh = (t.to(A3.dtype) for t in (U[..., :k], S[..., :k], Vh[..., :k, :]))
    m, n = A3.shape[-2:]
    return U.reshape(*batch, m, k), S.reshape(*batch, k), Vh.reshape(*batch, k, n)


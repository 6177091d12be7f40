"""Batched singular values and the energy rank ``rank_eta(A)`` (seed 002 eq. 12; docs/math.md section 3).

The contract: ``A`` (B, m, n) float32 or float64 (float16 / bfloat16 are computed in float32),
B >= 1, m, n >= 1 (validated by :mod:`fastdiff.linalg`, which also chooses the backend) ->

- ``S`` (B, N = min(m, n)) in A's dtype, descending;
- ``rank`` (B,) int64 when ``eta`` is given (else None)::

      rank_eta = min { r : sum_{i<=r} s_i^2 > eta^2 sum_i s_i^2 }   clamped to N, 0 for a zero matrix

A matrix with a NaN or Inf entry gets all-NaN S and rank -1 (every backend); the other matrices
of the batch are unaffected.  No backward: S from a kernel is detached (the public layer runs
"torch" where A requires grad).  Accuracy per backend: :mod:`fastdiff.linalg`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastdiff.ops.table import ANY_DTYPE, CPU, CUDA, TORCH, Impl, Op

__all__ = ["ROW", "svdvals_rank", "energy_rank", "COMPUTE_DTYPES"]


def _triton_fits(m: int = 1, n: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.svd import MAX_DIM

    if max(m, n) > MAX_DIM:
        return False, f"backend='triton': the SVD kernel takes m, n <= {MAX_DIM}, got ({m}, {n})"
    return True, ""


ROW = Op("svd", what="SVD", impls=(
    # no variant spills (bench/results/triton-resources.md): padded tiles up to 128 x 64 in registers,
    # larger ones streamed through a workspace (kernels/svd.py), so auto takes every size it fits
    Impl("triton", CUDA, ANY_DTYPE, triton_module="svd", fits=_triton_fits,
         limit="m, n <= 256 (tiles over 128 x 64 streamed)"),
    Impl("cpp", CPU, ANY_DTYPE, cpp_symbol="svdvals_rank", limit="float32 / float64"),
    TORCH),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})


# the dtypes the kernels compute in; float16 / bfloat16 are computed in float32
COMPUTE_DTYPES = (torch.float32, torch.float64)


def energy_rank(S: torch.Tensor, eta: float) -> torch.Tensor:
    """Ranks (B,) int64 from descending S (B, N): the contract's ``rank_eta``, on float64 prefix
    sums; NaN rows -> -1."""
    e = S.double().square()
    cum = e.cumsum(-1)
    total = cum[:, -1:]
    rank = ((cum <= (eta * eta) * total).sum(-1) + 1).clamp(max=S.shape[-1])
    rank = torch.where(total[:, 0] == 0, 0, rank)
    return torch.where(torch.isnan(total[:, 0]), -1, rank)


def svdvals_rank(impl: str, A: torch.Tensor, eta: Optional[float]):
    """``(S, rank or None)`` of A (B, m, n) on backend ``impl`` ("torch", "cpp", "triton"); see the contract."""
    ct = A.dtype if A.dtype in COMPUTE_DTYPES else torch.float32
    S, rank = _IMPLS[impl](A.to(ct).contiguous(), eta)
    return S.to(A.dtype), rank


def _svdvals_rank_torch(A: torch.Tensor, eta: Optional[float]):
    """``torch.linalg.svdvals`` (LAPACK / cuSOLVER) in A's dtype, the rank in float64."""
    finite = torch.isfinite(A).all(-1).all(-1)
    S = torch.linalg.svdvals(torch.where(finite[:, None, None], A, 0))  # LAPACK may fail on NaN
    S = torch.where(finite[:, None], S, float("nan"))
    return S, (energy_rank(S, eta) if eta is not None else None)


def _svdvals_rank_cpp(A: torch.Tensor, eta: Optional[float]):
    from fastdiff.kernels import cpp

    B, m, n = A.shape
    # poisoned: an element the kernel skips shows up as NaN / -2 (no valid rank is -2)
    S = torch.full((B, min(m, n)), float("nan"), dtype=A.dtype)
    rank = torch.full((B,), -2, dtype=torch.int64) if eta is not None else None
    cpp.svdvals_rank(A, eta, S, rank)
    return S, rank


def _svdvals_rank_triton(A: torch.Tensor, eta: Optional[float]):
    from fastdiff.kernels.svd import svdvals_rank as launch

    return launch(A, eta)


_IMPLS = {"torch": _svdvals_rank_torch, "cpp": _svdvals_rank_cpp, "triton": _svdvals_rank_triton}

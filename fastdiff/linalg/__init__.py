"""Batched singular values and the numerical rank of denoiser Jacobians (docs/math.md section 3, seed 002 Sec. 2.2).

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

One module per concern: :mod:`.svd` (spectra, ranks, singular triplets and the shared argument
checks; the op is :mod:`fastdiff.ops.svd`), :mod:`.jacobian` (any callable: dense or Lanczos),
:mod:`.molrg_jacobian` (the MoLRG closed form) and :mod:`.trajectory` (ranks along a sampler run).
"""
from fastdiff.linalg.jacobian import jacobian, jacobian_rank
from fastdiff.linalg.molrg_jacobian import molrg_jacobian, molrg_jacobian_rank
from fastdiff.linalg.svd import svd, svdvals, svdvals_rank
from fastdiff.linalg.trajectory import TrajectoryRanks, jacobian_rank_trajectory
from fastdiff.ops.svd import energy_rank  # noqa: F401  (fastdiff.linalg.energy_rank, as before the split)

__all__ = ["svdvals", "svdvals_rank", "jacobian_rank", "svd", "jacobian", "molrg_jacobian", "molrg_jacobian_rank",
           "jacobian_rank_trajectory", "TrajectoryRanks"]

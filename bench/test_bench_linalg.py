"""Batched singular values + rank, and the MoLRG Jacobian rank (issue 4, acceptance 4) on this device.

eager = what a user writes: ``torch.linalg.svdvals`` then the energy rank (cumsum of s^2) in torch;
compile = torch.compile of that (the SVD itself stays a LAPACK / cuSOLVER call).  The MoLRG rows
compare :func:`fastdiff.molrg_jacobian_rank` (a sum d_k-sized problem) with the dense path
(the n x n closed-form Jacobian + svdvals + rank).

FLOPs, counted as the work of the algorithm each row runs (2 per multiply-add):
- svdvals of B (m, n) matrices, m >= n: Householder bidiagonalization 4 m n^2 - 4/3 n^3 each
  (the QR iteration on the bidiagonal is O(n^2), not counted);
- molrg_jacobian_rank (B, n, K, d), D = K d: U^T x (2 n D), R M R^T (4 D^3), bidiagonalization
  of the D x D matrix (8/3 D^3);  the dense row is timed against the same count (a ratio).
"""
import pytest
import torch

import fastdiff

SVD_SHAPES = [(4096, 48), (1024, 128)]
ETA = 0.99


def eager_rank(J, eta=ETA):
    S = torch.linalg.svdvals(J)
    e = S.double().square()
    cum = e.cumsum(-1)
    return ((cum <= eta * eta * cum[:, -1:]).sum(-1) + 1).clamp(max=S.shape[-1])


_compiled = {}


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile"])
@pytest.mark.parametrize("shape", SVD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_jacobian_rank(record, device, shape, impl):
    B, n = shape
    J = torch.randn(B, n, n, generator=torch.Generator().manual_seed(0)).to(device)
    group = f"jacobian_rank (B,n)=({B},{n}) float32"
    flops = B * 8 * n**3 // 3  # 4 m n^2 - 4/3 n^3 at m = n
    if impl == "fastdiff":
        fn = lambda: fastdiff.jacobian_rank(J, eta=ETA)  # noqa: E731
    elif impl == "eager":
        fn = lambda: eager_rank(J)  # noqa: E731
    else:
        f = _compiled.setdefault("rank", torch.compile(eager_rank))
        fn = lambda: f(J)  # noqa: E731
    record(group, impl, fn, flops=flops, rounds=5)


MOLRG = [(8, 768, 10, 16)]


def _molrg_inputs(B, n, K, d, device):
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(K, n, d, generator=gen))[0].to(device)
    x = torch.randn(B, n, generator=gen).to(device)
    return x, U


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
@pytest.mark.parametrize("shape", MOLRG, ids=lambda s: "x".join(map(str, s)))
def test_molrg_jacobian_rank(record, device, shape, impl):
    B, n, K, d = shape
    x, U = _molrg_inputs(B, n, K, d, device)
    D = K * d
    group = f"molrg_jacobian_rank (B,n,K,d)=({B},{n},{K},{d}) [eager = dense n x n]"
    flops = B * (2 * n * D + 4 * D**3 + 8 * D**3 // 3)
    if impl == "fastdiff":
        fn = lambda: fastdiff.molrg_jacobian_rank(x, U, 1.0, 0.5)  # noqa: E731
    else:
        fn = lambda: eager_rank(fastdiff.molrg_jacobian(x, U, 1.0, 0.5))  # noqa: E731
    assert torch.equal(fastdiff.molrg_jacobian_rank(x, U, 1.0, 0.5).cpu(), eager_rank(fastdiff.molrg_jacobian(x, U, 1.0, 0.5)).cpu())
    record(group, impl, fn, flops=flops, rounds=5)

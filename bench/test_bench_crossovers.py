"""The crossovers the dispatch table encodes, measured where they are used (CPU only).

``fastdiff/ops/molrg.py`` sends ``backend="auto"`` to the fused per-row C++ MoLRG kernel while a
row costs at most ``CPP_FUSED_MAX_ND`` multiply-adds (``n * sum d_k``; ``CPP_FUSED_MAX_ND_GRAD``
when a backward follows) and to the torch GEMM form above.  These rows time both forced backends
across that boundary, forward and forward + backward, so the thresholds can be re-derived on any
machine.  In the table the forced C++ kernel is the ``fastdiff`` column and the forced torch GEMM
form the ``eager`` one, so ``eager/fastdiff`` > 1 where the C++ kernel wins: it should cross 1
near the threshold the group's title names.
(n = 128, K = 4 components, d = 8 .. 128: n * sum d_k = 2^12 .. 2^16.)
"""
import pytest
import torch

import fastdiff
from fastdiff.ops.molrg import CPP_FUSED_MAX_ND, CPP_FUSED_MAX_ND_GRAD

B, N_DIM, K = 1024, 128, 4
DIMS = (8, 16, 32, 64, 128)
COLUMN = {"cpp": "fastdiff", "torch": "eager"}


def _problem(d, grad):
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(K, N_DIM, d, generator=gen))[0]
    x = torch.randn(B, N_DIM, generator=gen)
    if grad:
        U.requires_grad_()
        x.requires_grad_()
    return x, U


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("d", DIMS)
def test_molrg_crossover_forward(record, device, d, backend):
    if device != "cpu":
        pytest.skip("a CPU crossover")
    x, U = _problem(d, grad=False)
    nd = N_DIM * K * d
    group = f"molrg crossover fwd n*sum d_k={nd} ({'cpp' if nd <= CPP_FUSED_MAX_ND else 'torch'} by auto)"
    with torch.no_grad():
        record(group, COLUMN[backend], lambda: fastdiff.molrg_denoise(x, U, 0.8, 0.6, backend=backend),
               flops=4 * B * nd)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("d", DIMS)
def test_molrg_crossover_backward(record, device, d, backend):
    if device != "cpu":
        pytest.skip("a CPU crossover")
    x, U = _problem(d, grad=True)
    nd = N_DIM * K * d
    group = f"molrg crossover fwd+bwd n*sum d_k={nd} ({'cpp' if nd <= CPP_FUSED_MAX_ND_GRAD else 'torch'} by auto)"

    def step():
        out = fastdiff.molrg_denoise(x, U, 0.8, 0.6, backend=backend)
        torch.autograd.grad(out.square().sum(), (x, U))

    record(group, COLUMN[backend], step, flops=3 * 4 * B * nd)

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
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_molrg_crossover(record, device, grad, d, backend):
    if device != "cpu":
        pytest.skip("a CPU crossover")
    x, U = _problem(d, grad)
    nd = N_DIM * K * d
    limit = CPP_FUSED_MAX_ND_GRAD if grad else CPP_FUSED_MAX_ND
    group = f"molrg crossover {'fwd+bwd' if grad else 'fwd'} n*sum d_k={nd} ({'cpp' if nd <= limit else 'torch'} by auto)"

    def call():
        out = fastdiff.molrg_denoise(x, U, 0.8, 0.6, backend=backend)
        if grad:
            torch.autograd.grad(out.square().sum(), (x, U))

    with torch.set_grad_enabled(grad):
        record(group, COLUMN[backend], call, flops=(3 if grad else 1) * 4 * B * nd)

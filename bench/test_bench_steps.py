"""Each fused reverse step against the torch eager reference and torch.compile of it, same run.

Size: 2^22 float32 elements (64 x 65536), scalar timestep, in-kernel noise where the step is
stochastic.  The eager reference is what a user writes in torch: the SPEC formula on tensors
(fastdiff.reference.steps) with ``torch.randn_like`` noise; ``compile`` is torch.compile of that.
Bytes counted: each input tensor read once and the output written once (4 bytes each).
"""
import os

import pytest
import torch

import fastdiff
from fastdiff.reference import steps as R

N = int(os.environ.get("FASTDIFF_BENCH_N", 1 << 22))
SHAPE = (64, N // 64)
S = fastdiff.DDPMSchedule()

# name -> (fastdiff call, eager reference, number of tensors read)
CASES = {
    "ddpm_step (noise)": (
        lambda x, m, m2, g, out: fastdiff.ddpm_step(x, m, 500, S, generator=g, out=out),
        lambda x, m, m2: R.ddpm_step(x, m, 500, S, noise=torch.randn_like(x)), 2),
    "ddim_step eta=1 (noise)": (
        lambda x, m, m2, g, out: fastdiff.ddim_step(x, m, 500, 480, S, eta=1.0, generator=g, out=out),
        lambda x, m, m2: R.ddim_step(x, m, 500, 480, S, eta=1.0, noise=torch.randn_like(x)), 2),
    "ddim_step eta=0": (
        lambda x, m, m2, g, out: fastdiff.ddim_step(x, m, 500, 480, S, out=out),
        lambda x, m, m2: R.ddim_step(x, m, 500, 480, S), 2),
    "euler_step": (
        lambda x, m, m2, g, out: fastdiff.euler_step(x, m, 2.0, 1.5, out=out),
        lambda x, m, m2: R.euler_step(x, m, 2.0, 1.5), 2),
    "euler_ancestral_step (noise)": (
        lambda x, m, m2, g, out: fastdiff.euler_ancestral_step(x, m, 2.0, 1.5, generator=g, out=out),
        lambda x, m, m2: R.euler_ancestral_step(x, m, 2.0, 1.5, noise=torch.randn_like(x)), 2),
    "heun_step corrector": (
        lambda x, m, m2, g, out: fastdiff.heun_step(x, m, 2.0, 1.5, x_pred=m2, model_output_pred=x, out=out),
        lambda x, m, m2: R.heun_step(x, m, 2.0, 1.5, x_pred=m2, model_output_pred=x), 3),
    "edm_churn (noise)": (
        lambda x, m, m2, g, out: fastdiff.edm_churn(x, 2.0, 0.3, generator=g, out=out)[0],
        lambda x, m, m2: R.edm_churn(x, 2.0, 0.3, noise=torch.randn_like(x))[0], 1),
    "langevin_step (noise)": (
        lambda x, m, m2, g, out: fastdiff.langevin_step(x, m, 0.01, generator=g, out=out),
        lambda x, m, m2: R.langevin_step(x, m, 0.01, noise=torch.randn_like(x)), 2),
    "ou_reverse_step (noise)": (
        lambda x, m, m2, g, out: fastdiff.ou_reverse_step(x, m, 0.01, generator=g, out=out),
        lambda x, m, m2: R.ou_reverse_step(x, m, 0.01, noise=torch.randn_like(x)), 2),
}

_compiled = {}


@pytest.fixture(scope="module")
def tensors(device):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=gen).to(device) for _ in range(3)]


@pytest.mark.parametrize("impl", ["fastdiff", "fastdiff out=", "eager", "compile"])
@pytest.mark.parametrize("case", list(CASES))
def test_step(record, device, tensors, case, impl):
    fused, eager, reads = CASES[case]
    x, m, m2 = tensors
    g = fastdiff.Generator(0)
    group = f"{case} n=2^{N.bit_length() - 1} float32"
    nbytes = 4 * N * (reads + 1)
    if impl == "fastdiff":
        record(group, impl, lambda: fused(x, m, m2, g, None), nbytes)
    elif impl == "fastdiff out=":
        out = torch.empty_like(x)
        record(group, impl, lambda: fused(x, m, m2, g, out), nbytes)
    elif impl == "eager":
        record(group, impl, lambda: eager(x, m, m2), nbytes)
    else:
        fn = _compiled.setdefault(case, torch.compile(eager))
        record(group, impl, lambda: fn(x, m, m2), nbytes)

"""fastdiff.capture.CapturedSampler: a whole sampling loop as one CUDA graph.

On the CPU it runs the loop uncaptured, and each call must equal ``run`` with a per-sample generator
of the given seeds, bit for bit; on CUDA (marked ``gpu``) the replay must equal the eager loop, take new
initial states and seeds between replays, and replay with no host synchronization.
"""
import math

import pytest
import torch

import fastdiff
from fastdiff.capture import CapturedSampler
from fastdiff.sampling import run, trajectory_table

HAS_CUDA = torch.cuda.is_available()


class _Model(torch.nn.Module):
    """A cheap fixed-shape denoiser x0_hat = c_skip x + c_out f(c_in x), EDM-style preconditioning of a
    1x1 conv with a nonlinearity (nonlinear, so the solver's history matters)."""

    def __init__(self, C):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = torch.nn.Conv2d(C, C, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(C, C, 1, 1, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(C, generator=g) * 0.1)

    def forward(self, x, alpha, sigma):
        s2 = sigma * sigma + alpha * alpha * 0.25
        c_skip, c_out, c_in = 0.25 * alpha / s2, 0.5 * sigma / math.sqrt(s2), 1.0 / math.sqrt(s2)
        return c_skip * x + c_out * torch.tanh(self.conv(c_in * x))


def _sigmas(n):
    return fastdiff.sigmas.karras(n, 0.02, 20.0)


TABLES = {
    "euler_ancestral": lambda: trajectory_table(_sigmas(8), "euler_ancestral"),
    "dpmpp_2m_sde": lambda: trajectory_table(_sigmas(8), "dpmpp_2m_sde"),
    "dpmpp_3m_sde": lambda: trajectory_table(_sigmas(8), "dpmpp_3m_sde"),
    "heun": lambda: trajectory_table(_sigmas(6), "heun", churn=2.0),
    "ddpm": lambda: trajectory_table(fastdiff.DDPMSchedule(T=12), "ddpm"),
}


@pytest.mark.parametrize("method", sorted(TABLES))
def test_cpu_call_is_run_with_per_sample_seeds(method):
    torch.manual_seed(0)
    model = _Model(3)
    x = torch.randn(4, 3, 5, 7) * 20.0
    table = TABLES[method]()
    sampler = CapturedSampler(model, x, table, seeds=[5, 6, 7, 8], offset=16)
    assert not sampler.captured
    got = sampler(x)
    want = run(model, x, table, generator=fastdiff.Generator([5, 6, 7, 8], 16), progress=False)
    assert torch.equal(got, want)
    # a second call starts from the same stream position: the same result (run is a function of x, seeds)
    assert torch.equal(sampler(x), want)
    # new seeds: equal to run with them, and different from the old ones where the method draws noise
    got2 = sampler(x, seeds=[1, 2, 3, 4])
    want2 = run(model, x, table, generator=fastdiff.Generator([1, 2, 3, 4], 16), progress=False)
    assert torch.equal(got2, want2)
    assert not torch.equal(got2, want)
    # sample 2 (seed 3) alone: its noise does not depend on its batch-mates (to the conv's batch-size
    # dependent float32 rounding: the noise itself is bitwise batch-independent, tests/test_rng_per_sample.py)
    one = CapturedSampler(model, x[2:3], table, seeds=[3], offset=16)(x[2:3])
    torch.testing.assert_close(one, got2[2:3], rtol=1e-5, atol=1e-5 * x.abs().max().item())


def test_cpu_seeds_default_and_set_seeds():
    model = _Model(2)
    x = torch.randn(3, 2, 4, 4)
    table = TABLES["euler_ancestral"]()
    s = CapturedSampler(model, x, table)
    assert torch.equal(s(x), run(model, x, table, generator=fastdiff.Generator([0, 1, 2]), progress=False))
    s.set_seeds(torch.tensor([9, 8, 7]))
    assert torch.equal(s(x), run(model, x, table, generator=fastdiff.Generator([9, 8, 7]), progress=False))
    assert "uncaptured" in repr(s)


def test_bad_input():
    model = _Model(2)
    x = torch.randn(3, 2, 4, 4)
    table = TABLES["euler_ancestral"]()
    with pytest.raises(TypeError, match="denoiser"):
        CapturedSampler(3, x, table)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        CapturedSampler(model, torch.zeros(3, dtype=torch.int64), table)
    with pytest.raises(TypeError, match="table"):
        CapturedSampler(model, x, [])
    with pytest.raises(ValueError, match="warmup"):
        CapturedSampler(model, x, table, warmup=0)
    with pytest.raises(ValueError, match="generator: expected 3 seeds"):
        CapturedSampler(model, x, table, seeds=[1, 2])
    with pytest.raises(ValueError, match="offset"):
        CapturedSampler(model, x, table, offset=3)
    with pytest.raises(ValueError, match="capture: a CUDA graph needs a CUDA tensor"):
        CapturedSampler(model, x, table, capture=True)
    s = CapturedSampler(model, x, table)
    with pytest.raises(ValueError, match=r"x: expected shape \(3, 2, 4, 4\)"):
        s(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="dtype"):
        s(x.double())
    with pytest.raises(ValueError, match="generator: expected 3 seeds"):
        s(x, seeds=[1])


class _TinyUNet(torch.nn.Module):
    """A small two-level U-Net (conv, down, conv, up, skip) as the fixed-shape CUDA model of the capture
    test: several dozen kernels per call, as a real model launches."""

    def __init__(self, C=4, W=32):
        super().__init__()
        self.inp = torch.nn.Conv2d(C, W, 3, padding=1)
        self.down = torch.nn.Conv2d(W, 2 * W, 3, stride=2, padding=1)
        self.mid = torch.nn.Conv2d(2 * W, 2 * W, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(2 * W, W, 4, stride=2, padding=1)
        self.out = torch.nn.Conv2d(2 * W, C, 3, padding=1)
        self.norm = torch.nn.GroupNorm(8, W)

    def forward(self, x, alpha, sigma):
        c_in = 1.0 / math.sqrt(alpha * alpha + sigma * sigma)
        h0 = torch.nn.functional.silu(self.norm(self.inp(c_in * x)))
        h1 = torch.nn.functional.silu(self.mid(torch.nn.functional.silu(self.down(h0))))
        h = torch.cat([h0, self.up(h1)], dim=1)
        return (c_in * x) * 0.5 + 0.1 * self.out(h)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m"])
def test_cuda_graph_replays_the_eager_loop_with_no_host_sync(method):
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    model = _TinyUNet().cuda().eval()
    x = torch.randn(4, 4, 32, 32, device="cuda") * 20.0
    table = trajectory_table(fastdiff.sigmas.karras(25, 0.02, 20.0), method)  # 25 steps
    sampler = CapturedSampler(model, x, table, seeds=[1, 2, 3, 4])
    assert sampler.captured and "CUDA graph" in repr(sampler)
    with torch.no_grad():
        want = run(model, x, table, generator=fastdiff.Generator([1, 2, 3, 4]), progress=False)
    x2 = torch.randn_like(x) * 20.0
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call during the replays raises
    try:
        got = sampler(x).clone()
        torch.cuda.set_sync_debug_mode("default")
        sampler.set_seeds([7, 8, 9, 10])  # the one host-to-device copy, between replays
        torch.cuda.set_sync_debug_mode("error")
        got2 = sampler(x2).clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want2 = run(model, x2, table, generator=fastdiff.Generator([7, 8, 9, 10]), progress=False)
    torch.testing.assert_close(got2, want2, rtol=1e-5, atol=1e-5)

"""Whole DDPM trajectories with the MoLRG denoiser: the fused trajectory kernel (one C++/OpenMP
region on CPU, one Triton launch on CUDA) against the eager loop, same run.

- eager: what a user writes with fastdiff.reference: per step the reference MoLRG denoiser
  (per-component einsum form) and the reference DDPM step with ``torch.randn_like`` noise.
- compile: the same per-step function under ``torch.compile`` (timestep and levels passed as
  0-d tensors so one graph serves all steps), called T times.
- instances: I independent problems (different bases) of B samples each in one ``sample`` call,
  against looping over the instances, with the eager loop and with one ``fastdiff.sample`` call
  per instance ("fastdiff per-instance" group, listed as eager there).

Acceptance targets (issue 5): CPU fused >= 4x eager at (B, n, K, d, T) = (1024, 48, 3, 8, 1000);
256 instances x 64 samples >= 10x looping over instances; GPU fused >= 20x eager.
GFLOP/s counts the denoiser's two products per step (4 n D FLOPs per sample per step).
"""
import pytest
import torch

import fastdiff
from fastdiff.denoisers import MoLRG
from fastdiff.reference import denoisers as RD, steps as RS

SINGLE = (1024, 48, 3, 8, 1000)
INSTANCES = (256, 64, 48, 3, 8, 200)  # (I, B, n, K, d, T): T = 200 keeps the per-instance eager loop ~10 s


def _bases(I, K, n, d, device):
    gen = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(I, K, n, d, generator=gen))[0].to(device)


def eager_step(x, U, t, alpha, sigma, sched):
    x0 = RD.molrg_denoise(x, U, alpha, sigma)
    return RS.ddpm_step(x, x0, t, sched, prediction="x0", noise=torch.randn_like(x))


def eager_loop(x, U, sched):
    for t in range(sched.T - 1, -1, -1):
        a = sched.floats("alpha")[t]
        s = sched.floats("sigma")[t]
        x = eager_step(x, U, t, a, s, sched) if t > 0 else RS.ddpm_step(
            x, RD.molrg_denoise(x, U, a, s), t, sched, prediction="x0")
    return x


_compiled = {}


def compiled_loop(x, U, sched):
    f = _compiled.setdefault("step", torch.compile(eager_step, dynamic=False))
    ts = _compiled.setdefault(("t", sched.T, x.device), [
        (torch.tensor(t, device=x.device), sched.alpha[t].to(x.device, torch.float32), sched.sigma[t].to(x.device, torch.float32))
        for t in range(sched.T)])
    for t in range(sched.T - 1, 0, -1):
        x = f(x, U, *ts[t], sched)
    return RS.ddpm_step(x, RD.molrg_denoise(x, U, *ts[0][1:]), 0, sched, prediction="x0")


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile"])
def test_ddpm_trajectory(record, device, impl):
    B, n, K, d, T = SINGLE
    sched = fastdiff.DDPMSchedule(T=T)
    U = _bases(1, K, n, d, device)[0]
    m = MoLRG(U)
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(1)).to(device)
    group = f"ddpm trajectory MoLRG (B,n,K,d,T)=({B},{n},{K},{d},{T})"
    flops = 4 * B * n * K * d * T
    Ul = list(U.unbind(0))
    if impl == "fastdiff":
        fn = lambda: fastdiff.sample(m, x, sched, generator=fastdiff.Generator(0), progress=False)  # noqa: E731
        rounds, warmup = 5, 1
    elif impl == "eager":
        fn = lambda: eager_loop(x, Ul, sched)  # noqa: E731
        rounds, warmup = 3, 1
    else:
        fn = lambda: compiled_loop(x, Ul, sched)  # noqa: E731
        rounds, warmup = 3, 1
    with torch.no_grad():
        record(group, impl, fn, flops=flops, rounds=rounds, warmup=warmup)


def _instances(device):
    """The I problems of the instance rows: the schedule, each instance's bases (I, K, n, d), the
    starting points (I, B, n), FLOPs of the whole sweep, and the fused call over all instances."""
    I, B, n, K, d, T = INSTANCES
    sched = fastdiff.DDPMSchedule(T=T)
    U = _bases(I, K, n, d, device)
    x = torch.randn(I, B, n, generator=torch.Generator().manual_seed(1)).to(device)
    models = [MoLRG(u) for u in U]
    fused = lambda: fastdiff.sample(models, x, sched, generator=fastdiff.Generator(0), progress=False)  # noqa: E731
    return sched, U, x, models, 4 * I * B * n * K * d * T, fused


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
def test_instances_vs_eager_loop_over_instances(record, device, impl):
    I, B, n, K, d, T = INSTANCES
    sched, U, x, _, flops, fused = _instances(device)
    group = f"ddpm {I} instances x {B} (n,K,d,T)=({n},{K},{d},{T})"
    if impl == "fastdiff":
        fn, rounds, warmup = fused, 5, 1
    else:
        Ul = [list(u.unbind(0)) for u in U]
        fn = lambda: [eager_loop(x[i], Ul[i], sched) for i in range(I)]  # noqa: E731
        rounds, warmup = 1, 0
    with torch.no_grad():
        record(group, impl, fn, flops=flops, rounds=rounds, warmup=warmup)


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
def test_instances_vs_per_instance_calls(record, device, impl):
    """The same sweep against one fused ``sample`` call per instance (launch / setup overhead)."""
    I, B = INSTANCES[:2]
    sched, _, x, models, flops, fused = _instances(device)
    group = f"ddpm {I} instances x {B}, vs fastdiff.sample per instance"
    if impl == "fastdiff":
        fn = fused
    else:
        fn = lambda: [fastdiff.sample(models[i], x[i], sched, generator=fastdiff.Generator(0), progress=False)  # noqa: E731
                      for i in range(I)]
    with torch.no_grad():
        record(group, impl, fn, flops=flops, rounds=5, warmup=1)

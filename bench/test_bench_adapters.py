"""The diffusers adapter's ``step`` against the original scheduler's, same run, same config.

Latent 4 x 4 x 64 x 64 float32 (Stable Diffusion's, batch 4), one step at an interior timestep of
a 50-step schedule.  ``eager`` is diffusers' own ``step`` (its noise from torch's RNG), ``fastdiff``
the adapter (noise drawn in the kernel from a fastdiff.Generator).  torch.compile is not listed:
diffusers' step indexes Python-side tables per call (and DDPM searches its timesteps), so a
compiled step re-traces or breaks the graph every call -- not how anyone runs it.  Bytes: the
sample and the model output read once, prev_sample and pred_original_sample written once.
At this size the step is launch/overhead-bound (256 KiB a tensor): the GPU target is >= 3x.
"""
import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install fastdiff[adapters])")
from fastdiff.adapters import diffusers as fd_diffusers  # noqa: E402

SHAPE = (4, 4, 64, 64)
CASES = {  # name -> (scheduler class name, config, step kwargs)
    "DDPM (noise)": ("DDPMScheduler", dict(clip_sample=False), {}),
    "DDPM clip_sample (noise)": ("DDPMScheduler", dict(clip_sample=True), {}),
    "DDIM eta=0": ("DDIMScheduler", dict(clip_sample=False), {}),
    "DDIM eta=1 (noise)": ("DDIMScheduler", dict(clip_sample=False), {"eta": 1.0}),
    "EulerDiscrete": ("EulerDiscreteScheduler", dict(), {}),
    "EulerDiscrete churn (noise)": ("EulerDiscreteScheduler", dict(), {"s_churn": 2.0}),
}


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_step(record, device, case, impl):
    name, config, kwargs = CASES[case]
    sched = getattr(fd_diffusers if impl == "fastdiff" else diffusers, name)(**config)
    sched.set_timesteps(50, device=device)
    t = sched.timesteps[10]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).to(device)
    m = torch.randn(SHAPE, generator=gen).to(device)
    generator = fastdiff.Generator(0) if impl == "fastdiff" else None
    euler = name == "EulerDiscreteScheduler"
    if euler:
        sched.scale_model_input(x, t)

    def step():
        if euler:
            sched._step_index = 10  # step() advances it; every timed call is the same step
        return sched.step(m, t, x, generator=generator, **kwargs)

    record(f"diffusers {name}.step {case} {'x'.join(map(str, SHAPE))}", impl, step,
           bytes_moved=4 * x.numel() * x.element_size(), rounds=200)


MULTISTEP = {  # name -> config
    "DPMSolverMultistep 2M": dict(),
    "DPMSolverMultistep 3M": dict(solver_order=3),
    "DPMSolverMultistep 2M SDE (noise)": dict(algorithm_type="sde-dpmsolver++"),
}


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
@pytest.mark.parametrize("case", list(MULTISTEP))
def test_diffusers_multistep_step(record, device, case, impl):
    """One interior step of a 25-step multistep schedule, the history already full (every timed call
    is the same step: the step index is reset and the history shifts in place)."""
    from fastdiff.adapters.diffusers_solvers import DPMSolverMultistepScheduler
    cls = DPMSolverMultistepScheduler if impl == "fastdiff" else diffusers.DPMSolverMultistepScheduler
    sched = cls(**MULTISTEP[case])
    sched.set_timesteps(25, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).to(device)
    m = torch.randn(SHAPE, generator=gen).to(device)
    t = sched.timesteps[10]
    sched._step_index = 10
    sched.lower_order_nums = sched.config.solver_order
    sched.model_outputs = [torch.randn(SHAPE, generator=gen).to(device) for _ in range(sched.config.solver_order)]
    generator = fastdiff.Generator(0) if impl == "fastdiff" else None

    def step():
        sched._step_index = 10
        return sched.step(m, t, x, generator=generator)

    record(f"diffusers {case}.step {'x'.join(map(str, SHAPE))}", impl, step,
           bytes_moved=(3 + sched.config.solver_order) * x.numel() * x.element_size(), rounds=200)

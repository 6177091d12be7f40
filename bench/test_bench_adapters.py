"""The diffusers adapter's ``step`` against the original scheduler's, same run, same config.

Latent 4 x 4 x 64 x 64 float32 (Stable Diffusion's, batch 4), one step at an interior timestep of
a 50-step schedule.  ``eager`` is diffusers' own ``step`` (its noise from torch's RNG), ``fastdiff``
the adapter (noise drawn in the kernel from a fastdiff.Generator).  torch.compile is not listed:
diffusers' step indexes Python-side tables per call (and DDPM searches its timesteps), so a
compiled step re-traces or breaks the graph every call -- not how anyone runs it.  Bytes: the
sample and the model output read once, prev_sample and pred_original_sample written once.
At this size the step is launch/overhead-bound (256 KiB a tensor): the GPU target is >= 3x.
The Euler ancestral / Heun / LMS rows (``test_diffusers_k_step``) also run at 16 x 4 x 128 x 128
(4 MiB a tensor: bandwidth-bound) on a 25-step schedule.
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


K_SHAPES = [(16, 4, 128, 128), (4, 4, 64, 64)]
K_CASES = {  # name -> (scheduler class name, config, step kwargs)
    "EulerAncestral (noise)": ("EulerAncestralDiscreteScheduler", dict(), {}),
    "Heun (both stages)": ("HeunDiscreteScheduler", dict(), {}),
    "LMS order 4": ("LMSDiscreteScheduler", dict(), {"order": 4}),
}


@pytest.mark.parametrize("shape", K_SHAPES, ids=["x".join(map(str, s)) for s in K_SHAPES])
@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
@pytest.mark.parametrize("case", list(K_CASES))
def test_diffusers_k_step(record, device, case, impl, shape):
    """One interior step of a 25-step schedule (Heun: both of its calls at one noise level, the
    predictor and the corrector; LMS: the four-derivative history already full, kept full by the
    step).  Bytes: what the step must read and write at least once -- Euler ancestral x, m in, prev,
    x0 out (4); Heun x, m in, x0, x_pred out, then x_pred's m, x0 in, x0', prev out (x and x_pred are
    read again by the corrector: 10); LMS x, m and the three earlier derivatives in, x0, the new
    derivative and prev out (8)."""
    from fastdiff.adapters import diffusers_k
    name, config, kwargs = K_CASES[case]
    sched = getattr(diffusers_k if impl == "fastdiff" else diffusers, name)(**config)
    sched.set_timesteps(25, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    m = torch.randn(shape, generator=gen).to(device)
    heun = name == "HeunDiscreteScheduler"
    i = 10 * (2 if heun else 1)  # Heun's timesteps repeat every level but the first
    t = sched.timesteps[i]
    sched.scale_model_input(x, t)
    if name == "LMSDiscreteScheduler":
        sched.derivatives = [torch.randn(shape, generator=gen).to(device) for _ in range(4)]
    generator = fastdiff.Generator(0) if impl == "fastdiff" else None
    extra = {"generator": generator} if name == "EulerAncestralDiscreteScheduler" else {}

    def step():
        sched._step_index = i
        out = sched.step(m, t, x, **kwargs, **extra)
        if heun:
            out = sched.step(m, sched.timesteps[i + 1], out.prev_sample)
        return out

    nbytes = {"EulerAncestralDiscreteScheduler": 4, "HeunDiscreteScheduler": 10, "LMSDiscreteScheduler": 8}[name]
    record(f"diffusers {name}.step {case} {'x'.join(map(str, shape))}", impl, step,
           bytes_moved=nbytes * x.numel() * x.element_size(), rounds=50)

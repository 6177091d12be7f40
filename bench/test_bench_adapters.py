"""Every diffusers adapter's ``step`` against the original scheduler's, same run, same config.

Two latents, float32: 16 x 4 x 128 x 128 (4 MiB a tensor: bandwidth-bound; issue 15's target is
>= 4x) and 4 x 4 x 64 x 64 (Stable Diffusion's at batch 4, 256 KiB a tensor: launch/overhead-bound;
target >= 1.5x).  One step at an interior index of the schedule (DDPM/DDIM/Euler 50 steps, the
others 25, LCM/TCD 8), every timed call the same step: the step index is reset before each call and
a multistep history is full beforehand and kept full by the step itself.  ``eager`` is diffusers' own
``step`` (its noise from torch's RNG), ``fastdiff`` the adapter (noise drawn in the kernel from a
fastdiff.Generator).  torch.compile is not listed: diffusers' step indexes Python-side tables per
call (and DDPM searches its timesteps), so a compiled step re-traces or breaks the graph every
call -- not how anyone runs it.

Bytes: what the step must read and write at least once (``nbytes`` tensors of the latent's size):
the sample and the model output in, ``prev_sample`` (and ``pred_original_sample`` / ``denoised``
where the step returns one) out, and each history tensor read once.  Heun's row is both of its
calls at one noise level (predictor and corrector: x, m in, x0, x_pred out, then x_pred's m, x0 in,
x0', prev out, x and x_pred read again: 10).

    FASTDIFF_BENCH_OUT=adapters-cpu python -m pytest bench/test_bench_adapters.py bench/test_bench_k_diffusion.py \\
        --benchmark-enable -p no:cacheprovider
"""
import importlib
import inspect

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install fastdiff[adapters])")

SHAPES = [(16, 4, 128, 128), (4, 4, 64, 64)]
FD = "fastdiff.adapters."
# case -> (class name, fastdiff module, config, step kwargs, steps, index, history, tensors moved)
# history: "dpm" (model_outputs), "unipc" (model_outputs + last_sample), "lms" (derivatives), None
CASES = {
    "DDPM (noise)": ("DDPMScheduler", "diffusers", dict(clip_sample=False), {}, 50, 10, None, 4),
    "DDPM clip_sample (noise)": ("DDPMScheduler", "diffusers", dict(clip_sample=True), {}, 50, 10, None, 4),
    "DDIM eta=0": ("DDIMScheduler", "diffusers", dict(clip_sample=False), {}, 50, 10, None, 4),
    "DDIM eta=1 (noise)": ("DDIMScheduler", "diffusers", dict(clip_sample=False), {"eta": 1.0}, 50, 10, None, 4),
    "EulerDiscrete": ("EulerDiscreteScheduler", "diffusers", dict(), {}, 50, 10, None, 4),
    "EulerDiscrete churn (noise)": ("EulerDiscreteScheduler", "diffusers", dict(), {"s_churn": 2.0}, 50, 10, None, 4),
    "DPMSolverMultistep 2M": ("DPMSolverMultistepScheduler", "diffusers_solvers", dict(), {}, 25, 10, "dpm", 5),
    "DPMSolverMultistep 3M": ("DPMSolverMultistepScheduler", "diffusers_solvers", dict(solver_order=3), {}, 25, 10,
                              "dpm", 6),
    "DPMSolverMultistep 2M SDE (noise)": ("DPMSolverMultistepScheduler", "diffusers_solvers",
                                          dict(algorithm_type="sde-dpmsolver++"), {}, 25, 10, "dpm", 5),
    "UniPC bh2 order 2": ("UniPCMultistepScheduler", "diffusers_solvers", dict(), {}, 25, 10, "unipc", 7),
    "UniPC bh1 order 3": ("UniPCMultistepScheduler", "diffusers_solvers", dict(solver_type="bh1", solver_order=3),
                          {}, 25, 10, "unipc", 8),
    "DEIS order 3": ("DEISMultistepScheduler", "diffusers_deis", dict(), {}, 25, 10, "dpm", 6),
    "FlowMatchEuler shift=3": ("FlowMatchEulerDiscreteScheduler", "diffusers_solvers", dict(shift=3.0), {}, 25, 10,
                               None, 3),
    "EulerAncestral (noise)": ("EulerAncestralDiscreteScheduler", "diffusers_k", dict(), {}, 25, 10, None, 4),
    "Heun (both stages)": ("HeunDiscreteScheduler", "diffusers_k", dict(), {}, 25, 20, None, 10),
    "LMS order 4": ("LMSDiscreteScheduler", "diffusers_k", dict(), {"order": 4}, 25, 10, "lms", 8),
    "LCM (noise)": ("LCMScheduler", "diffusers_consistency", dict(), {}, 8, 3, None, 4),
    "TCD eta=0.3 (noise)": ("TCDScheduler", "diffusers_consistency", dict(), {"eta": 0.3}, 8, 3, None, 4),
}
NOISY = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
         "DPMSolverMultistepScheduler", "LCMScheduler", "TCDScheduler")


def _fill_history(sched, kind, shape, gen, device):
    """A full multistep history at the timed index (so every timed call is the same interior step)."""
    def r():
        return torch.randn(shape, generator=gen).to(device)
    order = getattr(sched.config, "solver_order", 4)
    if kind in ("dpm", "unipc"):
        sched.lower_order_nums = order
        sched.model_outputs = [r() for _ in range(order)]
    if kind == "unipc":
        sched.timestep_list = [sched.timesteps[0]] * order
        sched.last_sample = r()
        sched.this_order = order
    if kind == "lms":
        sched.derivatives = [r() for _ in range(4)]


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_step(record, device, case, impl, shape):
    name, module, config, kwargs, n_steps, i, history, nbytes = CASES[case]
    cls = getattr(importlib.import_module(FD + module) if impl == "fastdiff" else diffusers, name)
    sched = cls(**config)
    sched.set_timesteps(n_steps, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    m = torch.randn(shape, generator=gen).to(device)
    t = sched.timesteps[i]
    if hasattr(sched, "scale_model_input") and name not in ("FlowMatchEulerDiscreteScheduler",):
        sched.scale_model_input(x, t)  # sets diffusers' is_scale_input_called (and the step index)
    _fill_history(sched, history, shape, gen, device)
    extra = {}
    if name in NOISY:
        extra["generator"] = fastdiff.Generator(0) if impl == "fastdiff" else None
    heun = name == "HeunDiscreteScheduler"
    indexed = hasattr(sched, "_step_index")

    def step():
        if indexed:
            sched._step_index = i
        out = sched.step(m, t, x, **kwargs, **extra)
        if heun:  # the corrector at the same level (diffusers' timesteps repeat every level but the first)
            out = sched.step(m, sched.timesteps[i + 1], out.prev_sample)
        return out

    if impl == "fastdiff":  # the row times the fused path, not a fallback to diffusers' step
        if indexed:
            sched._step_index = i
        accepted = inspect.signature(sched.fastdiff_supports).parameters
        assert sched.fastdiff_supports(m, t, x, **{k: v for k, v in kwargs.items() if k in accepted}), case
    step()  # a first call outside the timing: caches, and Heun's / UniPC's state settle
    record(f"diffusers {name}.step {case} {'x'.join(map(str, shape))}", impl, step,
           bytes_moved=nbytes * x.numel() * x.element_size(), rounds=60 if shape[0] == 16 else 200,
           warmup=3)

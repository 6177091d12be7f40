"""One timestep-spacing function (fastdiff.coefficients.timesteps) for every DDIM-type sampler:
``fastdiff.sample(..., "ddim", steps=N)`` and fastdiff.guidance visit the same timesteps."""
import pytest
import torch

import fastdiff
from fastdiff import guidance as G
from fastdiff.coefficients import SPACINGS, timesteps


def test_spacings_match_diffusers_definitions():
    # diffusers' set_timesteps with num_train_timesteps=1000, num_inference_steps=10, steps_offset=0
    assert timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps(1000, 1, "linspace") == [999]
    for spacing in SPACINGS:
        for T, n in [(10, 10), (1000, 50), (1000, 999), (7, 3)]:
            ts = timesteps(T, n, spacing)
            assert len(set(ts)) == n and ts == sorted(ts, reverse=True) and 0 <= ts[-1] and ts[0] < T


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=11), dict(steps=2.0), dict(spacing="even")])
def test_timesteps_rejects_bad_arguments(bad):
    kw = dict(T=10, steps=5, spacing="linspace")
    kw.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        timesteps(**kw)


def _levels_seen(run):
    seen = []

    def den(x, alpha, sigma, **kw):
        seen.append((float(alpha), float(sigma)))
        return x * 0.0  # differentiable, for DPS

    run(den)
    return seen


@pytest.mark.parametrize("steps", [50, 7, 1000])
def test_sample_and_guidance_use_the_same_ddim_timesteps(steps):
    sched = fastdiff.DDPMSchedule.linear()
    x = torch.zeros(2, 3)
    in_sample = _levels_seen(lambda den: fastdiff.sample(den, x, sched, "ddim", steps=steps, progress=False))
    in_cfg = _levels_seen(lambda den: G.cfg_sample(den, 0, 1.0, sched, x=x, steps=steps, disable=True))
    want = [(sched.floats("alpha")[t], sched.floats("sigma")[t]) for t in timesteps(sched.T, steps)]
    assert len(in_sample) == len(in_cfg) == steps
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(in_sample, dtype=torch.float64), want, rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.tensor(in_cfg, dtype=torch.float64), want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacings_equal_diffusers_set_timesteps(spacing):
    """The diffusers adapter keeps diffusers' own ``set_timesteps`` (its scheduler config picks the
    spacing, and its ``step`` must agree with diffusers'); the definitions here are diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    for n in (1 if spacing != "linspace" else 2, 10, 20, 25, 50, 100, 1000):
        sch.set_timesteps(n)
        assert sch.timesteps.tolist() == timesteps(1000, n, spacing), n


@pytest.mark.parametrize("spacing", SPACINGS)
def test_sample_and_guidance_agree_for_every_spacing(spacing):
    sched = fastdiff.DDPMSchedule.linear()
    x = torch.zeros(2, 3)
    in_sample = _levels_seen(lambda den: fastdiff.sample(den, x, sched, "ddim", steps=20, spacing=spacing,
                                                         progress=False))
    in_dps = _levels_seen(lambda den: G.posterior_sample(den, torch.zeros(1), torch.ones(1, 3), 0.5, sched, x=x,
                                                         steps=20, spacing=spacing, disable=True))
    want = torch.tensor([sched.floats("alpha")[t] for t in timesteps(sched.T, 20, spacing)], dtype=torch.float64)
    # the levels agree to the last bit or so (sample takes sqrt(abar) on the host, guidance the schedule's alpha)
    for seen in (in_sample, in_dps):
        torch.testing.assert_close(torch.tensor([a for a, _ in seen], dtype=torch.float64), want, rtol=1e-15, atol=0)


def test_spacing_rejected_where_unused():
    with pytest.raises(ValueError, match="spacing"):
        fastdiff.sample(lambda x, a, s: x, torch.zeros(2, 3), fastdiff.DDPMSchedule.linear(), "ddim", steps=5,
                        spacing="uniform", progress=False)
    with pytest.raises(ValueError, match="spacing"):
        fastdiff.sample(lambda x, a, s: x, torch.zeros(2, 3), fastdiff.DDPMSchedule.linear(), "ddpm",
                        spacing="trailing", progress=False)
    with pytest.raises(ValueError, match="spacing"):
        G.cfg_sample(lambda x, a, s, **kw: x, 0, 1.0, fastdiff.KarrasSchedule(5), x=torch.zeros(2, 3),
                     spacing="trailing", disable=True)

"""diffusers adapters on the configurations a new user hit (issue 15), against the installed original:
zero-terminal-SNR schedules, pathological ``trained_betas``, one generator per sample, and the noise
diffusers draws on a last DDPM step at ``t > 0``.

Every comparison runs the *stock* original (float32 coefficients) and ours with one shared generator
each, seeded alike, through whole loops: per step on the same (sample, model output) -- so the noise
is the same only if both have drawn the same tensors in the same order -- then the latents of a second
loop drawn from those generators (equal only if the draw counts matched), then that loop free-running.
Fused steps agree to the stock original's coefficient rounding (1e-4, as in test_adapters.py's
``test_diffusers_stock_original_within_its_coefficient_rounding``); steps handed to diffusers' own
``step`` are bitwise its result.
"""
import math

import pytest
import torch

import fastdiff
from test_adapters import _cancel_scale, _close, _model, diffusers, fd_diffusers, needs_diffusers

if diffusers is not None:
    from diffusers.utils.torch_utils import randn_tensor

NAMES = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"]
ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                beta_schedule="scaled_linear")
NOISY = {"DDPMScheduler": {}, "DDIMScheduler": {"eta": 0.7}, "EulerDiscreteScheduler": {"s_churn": 3.0, "s_tmax": 50.0}}


def _generator(per_sample, batch, seed=11):
    """One torch.Generator, or (``per_sample``) a list of ``batch`` of them (diffusers' per-image form)."""
    if not per_sample:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + b) for b in range(batch)]


def _bitwise(a, b, what):
    torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _trajectories(name, config, steps, extra, shape, *, per_sample=False, tol=1e-4):
    """The module docstring's comparison; returns the timesteps that ran diffusers' own step."""
    orig, ours = getattr(diffusers, name)(**config), getattr(fd_diffusers, name)(**config)
    g_orig, g_ours = _generator(per_sample, shape[0]), _generator(per_sample, shape[0])
    fallbacks = []
    for loop in ("same inputs", "free-running"):
        for s in (orig, ours):
            s.set_timesteps(steps)
        x_orig = randn_tensor(shape, generator=g_orig) * float(orig.init_noise_sigma)
        x_ours = randn_tensor(shape, generator=g_ours) * float(ours.init_noise_sigma)
        assert torch.equal(x_orig, x_ours), f"{name}: the shared generators drifted apart (latents of the {loop} loop)"
        for t in orig.timesteps:
            x_in = x_orig if loop == "same inputs" else x_ours
            m_orig = _model(orig.scale_model_input(x_orig, t), t)
            m_ours = _model(ours.scale_model_input(x_in, t), t)
            fused = ours.fastdiff_supports(m_ours, t, x_in)
            assert isinstance(fused, bool)
            a = orig.step(m_orig, t, x_orig, generator=g_orig, **extra)
            b = ours.step(m_ours, t, x_in, generator=g_ours, **extra)
            if loop == "same inputs":
                what = f"{name} {steps} steps t={float(t)}"
                if fused:
                    scale = _cancel_scale(orig, t, x_orig, m_orig)
                    _close(b.pred_original_sample, a.pred_original_sample, tol, scale, what + " pred_original_sample")
                    _close(b.prev_sample, a.prev_sample, tol, scale, what + " prev_sample")
                else:
                    fallbacks.append(float(t))
                    _bitwise(a.prev_sample, b.prev_sample, what + " (diffusers' step)")
                    _bitwise(a.pred_original_sample, b.pred_original_sample, what + " (diffusers' step)")
            x_orig, x_ours = a.prev_sample, b.prev_sample
        if loop == "free-running":
            err = ((x_ours - x_orig).abs().max() / x_orig.abs().max()).item()
            assert err <= 1e-3, f"{name} {steps} steps: whole-loop relative error {err:.3g}"
    states = lambda g: [h.get_state() for h in (g if isinstance(g, list) else [g])]  # noqa: E731
    assert all(torch.equal(p, q) for p, q in zip(states(g_orig), states(g_ours))), f"{name}: generators drifted apart"
    return fallbacks


# ---------------------------------------------------------------- 1. zero terminal SNR
@needs_diffusers
@pytest.mark.parametrize("steps,shape", [(10, (1, 1, 3, 3)), (25, (3, 4, 5, 7)), (50, (2, 3, 4, 1))])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_zero_terminal_snr_runs_and_matches(name, stochastic, steps, shape):
    """``rescale_betas_zero_snr`` (abar_999 = 0 exactly, beta = 1; SD 2.x / SDXL recipes with trailing
    spacing and v-prediction): DDPM/DDIM hand the abar = 0 step (t = 999, the first) to diffusers and
    fuse the rest; Euler (diffusers clamps that abar to 2^-24: sigma_max ~ 4096) fuses every step."""
    config = dict(ZERO_SNR, **({} if name == "EulerDiscreteScheduler" else {"clip_sample": False}))
    probe = getattr(diffusers, name)(**config)
    assert float(probe.alphas_cumprod[-1]) == (2.0**-24 if name == "EulerDiscreteScheduler" else 0.0)
    extra = NOISY[name] if stochastic or name == "DDPMScheduler" else {}
    fallbacks = _trajectories(name, config, steps, extra, shape)
    assert fallbacks == ([] if name == "EulerDiscreteScheduler" else [999.0])


@needs_diffusers
def test_zero_terminal_snr_epsilon_prediction_falls_back_like_diffusers():
    """epsilon prediction on a zero-SNR table divides by sqrt(abar_999) = 0 in diffusers too (an
    infinite x0): ours is bitwise that, not an error, and the steps after it run fused."""
    config = dict(ZERO_SNR, prediction_type="epsilon", clip_sample=False)
    for name in ("DDPMScheduler", "DDIMScheduler"):
        orig, ours = getattr(diffusers, name)(**config), getattr(fd_diffusers, name)(**config)
        for s in (orig, ours):
            s.set_timesteps(10)
        x = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(1))
        t = orig.timesteps[0]
        a = orig.step(_model(x, t), t, x, generator=torch.Generator().manual_seed(2))
        b = ours.step(_model(x, t), t, x, generator=torch.Generator().manual_seed(2))
        _bitwise(a.prev_sample, b.prev_sample, name)
        assert ours.fastdiff_supports(x, orig.timesteps[1], x)


# ---------------------------------------------------------------- 2. pathological betas
def _bad_betas():
    base = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    last_one = base.clone()
    last_one[-1] = 1.0                 # abar_999 = 0 (a hand-made zero terminal SNR)
    zero = base.clone()
    zero[500] = 0.0                    # a step that adds no noise
    negative = base.clone()
    negative[300] = -0.01              # abar grows there
    above_one = base.clone()
    above_one[900] = 1.5               # abar < 0 from there: diffusers' sqrt gives NaN
    return {"last_one": last_one, "zero": zero, "negative": negative, "above_one": above_one}


@needs_diffusers
@pytest.mark.parametrize("case", list(_bad_betas()))
@pytest.mark.parametrize("name", NAMES)
def test_pathological_trained_betas_fall_back(name, case):
    """Betas fastdiff's DDPMSchedule rejects (outside (0, 1)) or sigmas its steps reject (infinite,
    NaN): those steps run diffusers' step, bitwise; ``fastdiff_supports`` answers (a bool) for every
    step and odd timestep, never raising; the representable steps stay fused.  Euler reads only the
    sigmas, which a zero or negative beta leaves finite: it stays fused there (and agrees)."""
    betas = _bad_betas()[case]
    config = dict(trained_betas=betas.tolist(), timestep_spacing="trailing",
                  **({} if name == "EulerDiscreteScheduler" else {"clip_sample": False}))
    orig, ours = getattr(diffusers, name)(**config), getattr(fd_diffusers, name)(**config)
    fused = []
    for steps in (None, 20) if name == "DDPMScheduler" else (20,):
        for s in (orig, ours):
            if steps is not None:
                s.set_timesteps(steps)
        x = torch.randn(3, 2, 5, 1, generator=torch.Generator().manual_seed(4))
        for t in orig.timesteps:
            m = _model(orig.scale_model_input(x, t), t)
            ours.scale_model_input(x, t)
            ok = ours.fastdiff_supports(m, t, x)
            assert isinstance(ok, bool)
            fused.append(ok)
            a = orig.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), **NOISY[name])
            b = ours.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), **NOISY[name])
            if ok:
                _close(b.prev_sample, a.prev_sample, 1e-4, _cancel_scale(orig, t, x, m), f"{name} {case} t={t}")
            else:
                _bitwise(a.prev_sample, b.prev_sample, f"{name} {case} t={t}")
            x = a.prev_sample if torch.isfinite(a.prev_sample).all() else torch.randn_like(x)
        if name != "EulerDiscreteScheduler":
            assert fused[-1], f"{name} {case}: the steps below the bad beta should stay fused"
    representable = name == "EulerDiscreteScheduler" and case in ("zero", "negative")
    assert all(fused) == representable, f"{name} {case}: fused {fused}"
    for odd in (None, "t", torch.tensor([3, 4]), 10**12, -5, float("nan")):
        assert ours.fastdiff_supports(x, odd, x) in (True, False)
        if name != "EulerDiscreteScheduler":
            assert ours.fastdiff_supports(x, odd, x) is False


# ---------------------------------------------------------------- 3. one generator per sample
@needs_diffusers
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_generator_list_draws_like_diffusers(name, batch):
    """A list of torch.Generators (diffusers' randn_tensor: sample b draws from generator[b]) on the
    fused path draws diffusers' tensors: same steps, same generator states after."""
    config = {} if name == "EulerDiscreteScheduler" else {"clip_sample": False}
    shape = (batch, 2, 3, 5)
    assert _trajectories(name, config, 12, NOISY[name], shape, per_sample=True) == []


@needs_diffusers
@pytest.mark.parametrize("name", NAMES)
def test_generator_list_bad(name):
    ours = getattr(fd_diffusers, name)()
    ours.set_timesteps(10)
    x = torch.randn(3, 1, 2, 2)
    t = ours.timesteps[0]
    ours.scale_model_input(x, t)
    assert ours.fastdiff_supports(x, t, x)
    bad = [([], ValueError, "generator"), ([torch.Generator(), torch.Generator()], ValueError, "per sample"),
           ([torch.Generator(), 5, torch.Generator()], TypeError, "position 1"),
           ((torch.Generator(),) * 3, TypeError, "generator"), ([fastdiff.Generator(1)] * 3, TypeError, "generator")]
    for gen, error, match in bad:
        with pytest.raises(error, match=match):
            extra = dict(NOISY[name], s_tmax=math.inf) if name == "EulerDiscreteScheduler" else NOISY[name]
            ours.step(x, t, x, generator=gen, **extra)


# ---------------------------------------------------------------- 4. the last DDPM step's draw
@needs_diffusers
@pytest.mark.parametrize("steps,shape", [(10, (1, 3, 3, 3)), (25, (2, 1, 7, 5)), (50, (4, 2, 1, 3))])
@pytest.mark.parametrize("config", [dict(steps_offset=1, beta_schedule="scaled_linear"),
                                    dict(timestep_spacing="trailing", variance_type="fixed_small_log"),
                                    dict(timestep_spacing="trailing", prediction_type="v_prediction")],
                         ids=["offset1", "trailing-log", "trailing-v"])
def test_ddpm_last_step_at_positive_t_draws_like_diffusers(config, steps, shape):
    """diffusers draws noise whenever t > 0, so on a last step at t = 1 (steps_offset=1) or t = 1000/n - 1
    (trailing) too, scaled by its clamped zero variance (1e-10): ours draws it from the same generator
    and adds it at that scale, so a generator shared by successive loops stays aligned."""
    probe = diffusers.DDPMScheduler(**config)
    probe.set_timesteps(steps)
    assert int(probe.timesteps[-1]) > 0
    assert _trajectories("DDPMScheduler", config, steps, {}, shape) == []


# ---------------------------------------------------------------- 5. what the README says of pipelines
@needs_diffusers
def test_ddim_pipeline_converts_its_scheduler_so_assign_after():
    """README: DDIMPipeline(...) turns any scheduler into diffusers' own DDIMScheduler (from_config),
    so ours must be assigned after construction -- if diffusers stops doing this, update the README."""
    pipe = diffusers.DDIMPipeline(unet=None, scheduler=fd_diffusers.DDIMScheduler())
    assert type(pipe.scheduler) is diffusers.DDIMScheduler
    pipe.scheduler = fd_diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is fd_diffusers.DDIMScheduler


@needs_diffusers
def test_from_config_switch_keeps_each_class_defaults_offline():
    """diffusers' ``SchedulerBaseTests.test_default_arguments_not_in_config`` and
    ``test_default_solver_type_after_switch`` (tests/schedulers/test_schedulers.py) load a pipeline from the
    Hub, which bench/diffusers_scheduler_tests.py cannot reach; their assertions on our classes, from the
    PNDM config that pipeline carries (Stable Diffusion v1's): a switch takes the new class's defaults for
    what the config does not set, and keeps what a kwarg set."""
    from fastdiff.adapters.diffusers_deis import DEISMultistepScheduler
    from fastdiff.adapters.diffusers_k import LMSDiscreteScheduler
    from fastdiff.adapters.diffusers_solvers import UniPCMultistepScheduler
    pndm = diffusers.PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False))
    assert pndm.config.timestep_spacing == "leading"
    euler = fd_diffusers.EulerDiscreteScheduler.from_config(pndm.config)
    assert type(euler) is fd_diffusers.EulerDiscreteScheduler and euler.config.timestep_spacing == "linspace"
    euler = fd_diffusers.EulerDiscreteScheduler.from_config(pndm.config, timestep_spacing="trailing")
    assert euler.config.timestep_spacing == "trailing"
    lms = LMSDiscreteScheduler.from_config(euler.config)
    assert type(lms) is LMSDiscreteScheduler and lms.config.timestep_spacing == "trailing"
    assert LMSDiscreteScheduler.from_config(lms.config).config.timestep_spacing == "trailing"
    deis = DEISMultistepScheduler.from_config(pndm.config)
    assert type(deis) is DEISMultistepScheduler and deis.config.solver_type == "logrho"
    unipc = UniPCMultistepScheduler.from_config(deis.config)
    assert type(unipc) is UniPCMultistepScheduler and unipc.config.solver_type == "bh2"


@needs_diffusers
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log"])
def test_ddpm_last_step_noise_scale(variance_type):
    """That last step's noise at diffusers' scale: with x0_hat = 0 (prediction="sample", a zero model
    output) diffusers returns only its noise term, sqrt(clamp(0, 1e-20)) z = 1e-10 z; ours equals it
    to float32 rounding, plus the float64 rounding of our sample coefficient (0 in exact arithmetic,
    ~1e-16 computed: 16 eps64 |x|, still ~1e-5 of the noise term)."""
    config = dict(steps_offset=1, prediction_type="sample", variance_type=variance_type, clip_sample=False)
    orig, ours = diffusers.DDPMScheduler(**config), fd_diffusers.DDPMScheduler(**config)
    for s in (orig, ours):
        s.set_timesteps(20)
    t = orig.timesteps[-1]
    x = torch.randn(3, 2, 5, 3, generator=torch.Generator().manual_seed(2))
    m = torch.zeros_like(x)
    assert int(t) == 1 and ours.fastdiff_supports(m, t, x)
    a = orig.step(m, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
    b = ours.step(m, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
    assert a.abs().max() > 0
    _close(b, a, 4 * 2.0**-24, 16 * 2.0**-52 * x.abs(), f"{variance_type} last-step noise")

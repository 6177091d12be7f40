"""fastdiff's EulerAncestral / Heun / LMS diffusers schedulers against the installed originals.

Every trajectory comparison runs the stock original and ours with generators seeded alike: first per
step on the *same* (sample, model output) -- diffusers' own trajectory fed to both, so each step's
difference is that step's rounding alone and the noise agrees only if both drew the same tensors --
then both loops free-running from the same latents.  Tolerance per step: float32 rounding, 32 eps32 of
the step's scale ``max|x| + sigma max|m| + max|out|`` (diffusers forms its coefficients from float32
sigmas in float32, e.g. ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, ours in float64, and either
side rounds the x0 conversion ``x - sigma m`` once; a wrong coefficient is off by >= 1e-3 of the scale).
"""
import math
import warnings
from unittest import mock

import pytest
import torch

import fastdiff
from test_adapters import EPS32, _model, diffusers, needs_diffusers

pytestmark = [needs_diffusers, pytest.mark.filterwarnings("ignore:The `scale_model_input`")]
if diffusers is not None:
    from diffusers.utils.torch_utils import randn_tensor

    from fastdiff import coefficients as C
    from fastdiff.adapters import diffusers_k as K

EA, HEUN, LMS = "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"


def _gen(kind, batch, seed=5):
    if kind == "list":
        return [torch.Generator().manual_seed(seed + b) for b in range(batch)]
    return torch.Generator().manual_seed(seed)


def _step_kw(name, g, kw):
    return dict(kw, generator=g) if name == EA else dict(kw)


def _compare(name, config, steps, shape, *, kw=None, gen="torch", model=_model):
    """The module docstring's comparison; returns how many steps ran fused."""
    kw = kw or {}
    orig, ours = getattr(diffusers, name)(**config), getattr(K, name)(**config)
    g_orig, g_ours = _gen(gen, shape[0]), _gen(gen, shape[0])
    fused = 0
    for loop in ("same inputs", "free-running"):
        for s in (orig, ours):
            s.set_timesteps(steps)
        x_orig = randn_tensor(shape, generator=_gen("torch", 1, steps)) * float(orig.init_noise_sigma)
        x_ours = x_orig
        for k, t in enumerate(orig.timesteps):
            x_in = x_orig if loop == "same inputs" else x_ours
            m_orig = model(orig.scale_model_input(x_orig, t), t)
            m_ours = model(ours.scale_model_input(x_in, t), t)
            sigma = float(orig.sigmas[orig.step_index])
            ok = ours.fastdiff_supports(m_ours, t, x_in, **({"order": kw["order"]} if "order" in kw else {}))
            assert ok is True, f"{name} {config} step {k}: expected the fused path"
            fused += 1
            a = orig.step(m_orig, t, x_orig, **_step_kw(name, g_orig, kw))
            b = ours.step(m_ours, t, x_in, **_step_kw(name, g_ours, kw))
            assert type(b) is type(a) and b.prev_sample.dtype == a.prev_sample.dtype
            if loop == "same inputs":
                for field in ("prev_sample", "pred_original_sample"):
                    p, q = getattr(b, field), getattr(a, field)
                    scale = x_orig.abs().max() + sigma * m_orig.abs().max() + q.abs().max()
                    err = (p - q).abs().max()
                    assert err <= 32 * EPS32 * scale, f"{name} {config} {steps} steps, step {k} {field}: " \
                                                      f"{err:.3g} > 32 eps32 x {scale:.3g}"
            x_orig, x_ours = a.prev_sample, b.prev_sample
        err = ((x_ours - x_orig).abs().max() / x_orig.abs().max()).item()
        assert err <= 1e-5, f"{name} {config} {steps} steps: free-running relative error {err:.3g}"
    states = lambda g: [h.get_state() for h in (g if isinstance(g, list) else [g])]  # noqa: E731
    assert all(torch.equal(p, q) for p, q in zip(states(g_orig), states(g_ours))), f"{name}: generators drifted apart"
    return fused


CASES = [  # (scheduler, config, step kwargs): every option at least once
    (EA, dict(), {}),
    (EA, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
              beta_schedule="scaled_linear"), {}),
    (EA, dict(timestep_spacing="leading", steps_offset=1, beta_schedule="squaredcos_cap_v2"), {}),
    (HEUN, dict(), {}),
    (HEUN, dict(prediction_type="v_prediction", use_karras_sigmas=True, timestep_spacing="trailing"), {}),
    (HEUN, dict(prediction_type="sample", use_exponential_sigmas=True, clip_sample=True, clip_sample_range=0.8), {}),
    (HEUN, dict(use_beta_sigmas=True, beta_schedule="exp", clip_sample=True, timestep_spacing="leading",
                steps_offset=1), {}),
    (LMS, dict(), {}),
    (LMS, dict(prediction_type="v_prediction", use_karras_sigmas=True, timestep_spacing="trailing"), {"order": 3}),
    (LMS, dict(prediction_type="sample", use_exponential_sigmas=True, beta_schedule="scaled_linear"), {"order": 5}),
    (LMS, dict(use_beta_sigmas=True, timestep_spacing="leading", steps_offset=1), {"order": 1}),
]
SHAPES = [(1, 1, 1, 1), (3, 2, 5, 3), (2, 3, 4, 5)]


@pytest.mark.parametrize("name,config,kw", CASES, ids=[f"{n[:-16]}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_matches_diffusers_over_whole_trajectories(name, config, kw):
    """10 and 25 steps, every step fused, per step to float32 rounding (module docstring)."""
    for k, steps in enumerate((10, 25)):
        _compare(name, config, steps, SHAPES[(k + len(config)) % len(SHAPES)], kw=kw)


def test_long_trajectory_50_steps():
    """One 50-step case per scheduler (the LMS one order 4 with Karras sigmas: its coefficients over a
    fine grid; the ancestral one with a generator per sample)."""
    assert _compare(EA, dict(beta_schedule="scaled_linear"), 50, (3, 1, 3, 2), gen="list") == 100
    assert _compare(HEUN, dict(use_karras_sigmas=True), 50, (2, 1, 3, 3)) == 2 * 99
    assert _compare(LMS, dict(use_karras_sigmas=True), 50, (2, 3, 1, 5)) == 100


def test_lms_coefficients_are_diffusers_integrals():
    """The closed-form Lagrange integrals against diffusers' ``get_lms_coefficient`` (scipy quad of the
    basis evaluated in float32): the basis keeps one sign on [sigma_{i+1}, sigma_i] (its roots are the
    nodes, all >= sigma_i), so diffusers' float32 integrand is off by <= ~5 (p - 1) roundings relative,
    i.e. |c - c_diffusers| <= (5 (p - 1) + 1) eps32 |c| (observed <= 11 eps32 at p = 5)."""
    for config, steps in [(dict(), 10), (dict(use_beta_sigmas=True), 25), (dict(timestep_spacing="trailing"), 50)]:
        sch = K.LMSDiscreteScheduler(**config)
        sch.set_timesteps(steps)
        sig = sch.sigmas.double().tolist()
        for i in range(0, steps, 3):
            sch._step_index = i
            for order in (1, 2, 4, 5):
                p = min(i + 1, order)
                ours = sch.fastdiff_lms_coefficients(order)
                assert ours == C.lms(sig, i, order) and len(ours) == p
                for j, c in enumerate(ours):
                    want = sch.get_lms_coefficient(p, i, j)
                    assert abs(c - want) <= (5 * (p - 1) + 1) * EPS32 * abs(c), (config, i, order, j, c, want)


def test_euler_ancestral_sample_prediction_is_the_eps_step():
    """``prediction_type="sample"``, which diffusers' own step rejects, is fused: diffusers' epsilon step
    given the equivalent noise ``(x - x0)/sigma`` (rounded once more: eps32 |x|)."""
    orig, ours = diffusers.EulerAncestralDiscreteScheduler(), K.EulerAncestralDiscreteScheduler(prediction_type="sample")
    with pytest.raises(NotImplementedError):
        diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample").step(
            torch.zeros(1), torch.tensor(999.0), torch.zeros(1))
    for s in (orig, ours):
        s.set_timesteps(12)
    g_orig, g_ours = _gen("torch", 1), _gen("torch", 1)
    x = torch.randn(2, 3, 3, 1, generator=_gen("torch", 1, 9)) * float(orig.init_noise_sigma)
    for t in orig.timesteps:
        x0 = _model(orig.scale_model_input(x, t), t)
        ours.scale_model_input(x, t)
        sigma = float(orig.sigmas[orig.step_index])
        a = orig.step((x - x0) / sigma, t, x, generator=g_orig)
        b = ours.step(x0, t, x, generator=g_ours)
        assert b.pred_original_sample is x0
        err = (b.prev_sample - a.prev_sample).abs().max()
        assert err <= 32 * EPS32 * (x.abs().max() + a.prev_sample.abs().max()), f"t={float(t)}: {err:.3g}"
        x = a.prev_sample


# ---------------------------------------------------------------- noise: fastdiff.Generator
def test_euler_ancestral_in_kernel_noise():
    """A fastdiff.Generator draws in the kernel: the same seed reproduces, another differs; per-sample
    seeds give each sample its own stream (sample b alone with seed s_b is the same trajectory), and the
    last step (sigma_up = 0) draws nothing.  Statistically the ancestral sampler's law: on Gaussian data
    N(0, lam) with its exact epsilon predictor ``eps_hat = sigma x / (lam + sigma^2)`` every step is
    ``x' = (1 + (sigma_down - sigma) sigma / (lam + sigma^2)) x + sigma_up z``, whose variance recursion
    (float64, diffusers' sigmas) the sample variance must match within 5 standard errors."""
    lam = torch.tensor([4.0, 1.0, 0.25, 0.04])

    def scheduler():
        sch = K.EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        sch.set_timesteps(20)
        return sch

    def run(gen, x):
        sch = scheduler()
        x = x * float(sch.init_noise_sigma)
        for t in sch.timesteps:
            sch.scale_model_input(x, t)
            s = float(sch.sigmas[sch.step_index])
            x = sch.step(x / (lam + s * s) * s, t, x, generator=gen).prev_sample
        return x
    n = 20000
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    a, b, c = run(fastdiff.Generator(1), z), run(fastdiff.Generator(1), z), run(fastdiff.Generator(2), z)
    assert torch.equal(a, b) and not torch.equal(a, c)
    sig = scheduler().sigmas.double().tolist()
    var = torch.full((4,), sig[0] ** 2, dtype=torch.float64)
    for s, sn in zip(sig, sig[1:]):
        down, up = C.ancestral_sigmas(s, sn, 1.0)
        var = (1 + (down - s) * s / (lam.double() + s * s)) ** 2 * var + up * up
    got = a.double().var(0)
    assert ((got - var).abs() <= 5 * var * (2 / n) ** 0.5).all(), (got, var)
    g = fastdiff.Generator(seed=[7, 8, 9])
    both = run(g, z[:3])
    assert g.offset == 19 * 4  # 20 steps, 4 normals a sample each, none on the last
    alone = run(fastdiff.Generator(seed=[8]), z[1:2])  # the same noise (a different stream is off by O(1));
    torch.testing.assert_close(both[1:2], alone, rtol=1e-6, atol=1e-6)  # the kernel's batch path may round apart


# ---------------------------------------------------------------- generators: lists and bad input
def test_euler_ancestral_generator_list_and_bad_generators():
    """A 1-element list is one generator for the batch (diffusers' randn_tensor); a list of the wrong
    length or with a non-generator, a tuple, a number: errors naming ``generator``."""
    assert _compare(EA, dict(), 10, (3, 2, 2, 1), gen="list") == 20
    ours = K.EulerAncestralDiscreteScheduler()
    ours.set_timesteps(10)
    x = torch.randn(3, 1, 2, 2)
    t = ours.timesteps[0]
    ours.scale_model_input(x, t)
    one = ours.step(x, t, x, generator=[torch.Generator().manual_seed(3)]).prev_sample
    ours._step_index = 0
    want = ours.step(x, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.equal(one, want)
    bad = [([], ValueError, "generator"), ([torch.Generator(), torch.Generator()], ValueError, "per sample"),
           ([torch.Generator(), 5, torch.Generator()], TypeError, "position 1"),
           ((torch.Generator(),) * 3, TypeError, "generator"), (5, TypeError, "generator"),
           (fastdiff.Generator(seed=[1, 2]), ValueError, "")]
    for gen, error, match in bad:
        ours._step_index = 0
        with pytest.raises(error, match=match):
            ours.step(x, t, x, generator=gen)


# ---------------------------------------------------------------- fallbacks and fastdiff_supports
def _inf_betas():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    betas[-1] = 1.0  # abar_999 = 0: an infinite first sigma
    return betas.tolist()


@pytest.mark.parametrize("name", [EA, HEUN, LMS])
def test_fallbacks_run_diffusers_own_step(name):
    """An infinite sigma (``trained_betas`` with beta = 1), a model output of another (broadcastable)
    shape: diffusers' own step, bitwise, ``fastdiff_supports`` False; never raising on odd arguments;
    an integer timestep where diffusers rejects it raises diffusers' error."""
    kw = {"generator": torch.Generator().manual_seed(0)} if name == EA else {}
    for config, m_shape in [(dict(trained_betas=_inf_betas()), (2, 3, 2, 2)), (dict(), (1, 3, 2, 2))]:
        orig, ours = getattr(diffusers, name)(**config), getattr(K, name)(**config)
        for s in (orig, ours):
            s.set_timesteps(6)
        x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
        for t in orig.timesteps[:3]:
            m = _model(torch.ones(m_shape), t)
            orig.scale_model_input(x, t)
            ours.scale_model_input(x, t)
            assert ours.fastdiff_supports(m, t, x) is False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # diffusers on an infinite sigma: NaN, quad warnings
                a = orig.step(m, t, x, **{k: torch.Generator().manual_seed(int(t)) for k in kw})
                b = ours.step(m, t, x, **{k: torch.Generator().manual_seed(int(t)) for k in kw})
            torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=0, atol=0, equal_nan=True)
            x = torch.randn_like(x)
    sch = getattr(K, name)()
    sch.set_timesteps(5)
    for odd in [(None, 0, None), ("x", object(), 3), (torch.zeros(2), 1.0, torch.zeros(3)),
                (torch.zeros(2, dtype=torch.int64), 1.0, torch.zeros(2)), (torch.zeros(2), float("nan"), torch.zeros(2))]:
        assert sch.fastdiff_supports(*odd) in (True, False)
    if name == EA:
        assert not sch.fastdiff_supports(torch.zeros(2), 999, torch.zeros(2))
        with pytest.raises(ValueError, match="integer indices"):
            sch.step(torch.zeros(2), 999, torch.zeros(2))
        with pytest.raises(ValueError, match="per-sample seeds"):  # diffusers' step draws from one torch.Generator
            sch.step(torch.zeros(1, 2), sch.timesteps[0], torch.zeros(2, 2), generator=fastdiff.Generator(seed=[1, 2]))


def test_lms_order_fallback_shares_the_history():
    """``order`` outside [1, 5] runs diffusers' step on the derivatives the fused steps kept (diffusers'
    tensors, to float32 rounding): the switch mid-trajectory agrees with diffusers throughout."""
    orig, ours = diffusers.LMSDiscreteScheduler(), K.LMSDiscreteScheduler()
    for s in (orig, ours):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 1, 4, generator=torch.Generator().manual_seed(2)) * float(orig.init_noise_sigma)
    for k, t in enumerate(orig.timesteps):
        order = 6 if k in (5, 6) else 4
        m = _model(orig.scale_model_input(x, t), t)
        ours.scale_model_input(x, t)
        assert ours.fastdiff_supports(m, t, x, order) is (order == 4)
        a, b = orig.step(m, t, x, order=order), ours.step(m, t, x, order=order)
        assert len(ours.derivatives) == len(orig.derivatives)
        assert (b.prev_sample - a.prev_sample).abs().max() <= 32 * EPS32 * (x.abs().max() + a.prev_sample.abs().max())
        x = a.prev_sample
    for bad in (0, 6, True, 2.0, None):
        assert ours.fastdiff_supports(x, t, x, bad) is False


def test_heun_state_and_second_stage_fallback():
    """The two-stage state is diffusers': ``state_in_first_order`` alternates, ``dt`` and ``sample`` are
    diffusers' objects, ``prev_derivative`` reads as diffusers' derivative; a second stage whose model
    output does not fit runs diffusers' step on that state; one after a diffusers first stage does too;
    ``set_timesteps`` resets it."""
    orig, ours = diffusers.HeunDiscreteScheduler(), K.HeunDiscreteScheduler()
    for s in (orig, ours):
        s.set_timesteps(4)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(3)) * float(orig.init_noise_sigma)
    ts = orig.timesteps
    m = _model(orig.scale_model_input(x, ts[0]), ts[0])
    a, b = orig.step(m, ts[0], x), ours.step(m, ts[0], x)
    assert not ours.state_in_first_order and ours.sample is x and torch.equal(ours.dt, orig.dt)
    assert ours.__dict__["_prev_derivative"] is None  # not written by the fused stage
    torch.testing.assert_close(ours.prev_derivative, orig.prev_derivative, rtol=4 * EPS32, atol=4 * EPS32 * float(x.abs().max()))
    m2 = _model(orig.scale_model_input(a.prev_sample, ts[1]), ts[1])[:1]  # broadcastable, not fused
    assert not ours.fastdiff_supports(m2, ts[1], a.prev_sample)
    a, b = orig.step(m2, ts[1], a.prev_sample), ours.step(m2, ts[1], a.prev_sample)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-6, atol=1e-6)
    assert ours.state_in_first_order and ours.prev_derivative is None
    # a first stage in diffusers' hands (odd model output shape), then a fitting second stage: diffusers' too
    y = a.prev_sample
    m = _model(orig.scale_model_input(y, ts[2]), ts[2])[:1]
    a, b = orig.step(m, ts[2], y), ours.step(m, ts[2], y)
    m = _model(orig.scale_model_input(a.prev_sample, ts[3]), ts[3])
    assert not ours.fastdiff_supports(m, ts[3], a.prev_sample)
    a, b = orig.step(m, ts[3], a.prev_sample), ours.step(m, ts[3], a.prev_sample)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-6, atol=1e-6)
    ours.step(m, ts[4], a.prev_sample)
    assert not ours.state_in_first_order
    ours.set_timesteps(4)
    assert ours.state_in_first_order and ours.prev_derivative is None


@pytest.mark.parametrize("name", [EA, HEUN, LMS])
def test_fused_path_does_not_call_the_original_and_return_types(name):
    """The fused path never runs diffusers' step; ``return_dict=False`` gives the same tuple; a float16
    model output comes back in diffusers' dtype."""
    sch = getattr(K, name)()
    sch.set_timesteps(3)
    x = torch.randn(2, 3, 2, 2)
    with mock.patch.object(getattr(diffusers, name), "step", side_effect=AssertionError("original step called")):
        for t in sch.timesteps[:2]:
            sch.scale_model_input(x, t)
            out = sch.step(_model(x, t).half(), t, x, return_dict=False)
            assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == x.shape
            assert out[0].dtype == (torch.float16 if name == EA else torch.float32)
            x = out[0].float()

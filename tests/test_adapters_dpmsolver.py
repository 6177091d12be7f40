"""fastdiff's DPMSolverMultistepScheduler against diffusers' own, whole trajectories, across its configs."""
from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install fastdiff[adapters])")
from fastdiff.adapters.diffusers_solvers import DPMSolverMultistepScheduler  # noqa: E402

import fastdiff  # noqa: E402
from adapter_checks import supports_never_raises  # noqa: E402  (tests/)


def _model(x, t):
    """A smooth stand-in for a network (bounded output, depends on t)."""
    return torch.tanh(x) * 0.5 + 1e-4 * float(t) * x.flip(-1)


def _trajectory(cls, config, steps, x, seed, model=_model, **set_timesteps):
    sch = cls(**config)
    sch.set_timesteps(steps, **set_timesteps)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in sch.timesteps:
        x = sch.step(model(x, t), t, x, generator=g).prev_sample
        out.append(x)
    return out


# every option of the fused path at least once, in combinations (a full product is ~10^4 configs)
BASE = [
    dict(),
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_type="heun"),
    dict(solver_order=3, lower_order_final=False),
    dict(algorithm_type="sde-dpmsolver++"),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun"),
    dict(algorithm_type="sde-dpmsolver++", solver_order=1),
    dict(euler_at_final=True),
    dict(final_sigmas_type="sigma_min"),
]
SIGMAS = [dict(), dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
          dict(use_lu_lambdas=True)]
PREDICTIONS = [dict(prediction_type="epsilon"), dict(prediction_type="v_prediction"), dict(prediction_type="sample")]
SPACINGS = [dict(timestep_spacing="linspace"), dict(timestep_spacing="leading", steps_offset=1),
            dict(timestep_spacing="trailing")]
CONFIGS = [dict(**b, **s, **p, **sp) for (b, s), p, sp in zip(itertools.product(BASE, SIGMAS),
                                                              itertools.cycle(PREDICTIONS), itertools.cycle(SPACINGS))]
CONFIGS += [dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
            dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=3),
            dict(use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="sde-dpmsolver++")]


@pytest.mark.parametrize("config", CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CONFIGS])
def test_matches_diffusers_over_whole_trajectories(config):
    """10, 25 and 50 steps; the same torch.Generator on both sides (the SDE noise is diffusers' own draw).
    Tolerance: float32 rounding per step (fastdiff rounds float64 coefficients once where diffusers
    takes exp/log of float32 tensors), 2e-6 of the trajectory's scale per step."""
    sch = DPMSolverMultistepScheduler(**config)
    sch.set_timesteps(10)
    assert sch.fastdiff_supports(torch.zeros(1), sch.timesteps[0], torch.zeros(1))
    for steps in (10, 25, 50):
        x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(steps))
        want = _trajectory(diffusers.DPMSolverMultistepScheduler, config, steps, x, 7)
        got = _trajectory(DPMSolverMultistepScheduler, config, steps, x, 7)
        scale = max(w.abs().max().item() for w in want)
        for k, (p, q) in enumerate(zip(got, want)):
            err = (p - q).abs().max().item()
            assert err <= 2e-6 * (k + 1) * max(scale, 1.0), f"{steps} steps, step {k}: {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("config", [dict(thresholding=True), dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(algorithm_type="sde-dpmsolver++", solver_order=3),
                                    dict(variance_type="learned_range")])
def test_unsupported_configs_run_diffusers_own_step(config):
    """What the fused path does not take runs diffusers' step unchanged: bit-identical results, and
    fastdiff_supports says so (never raising)."""
    model = _model
    if config.get("variance_type"):
        model = lambda x, t: torch.cat([_model(x, t), torch.zeros_like(x)], 1)  # noqa: E731 (learned: 2x channels)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    want = _trajectory(diffusers.DPMSolverMultistepScheduler, config, 8, x, 3, model)
    got = _trajectory(DPMSolverMultistepScheduler, config, 8, x, 3, model)
    fused = 2 if config.get("solver_order") == 3 else 0  # sde third order: its first- and second-order steps are fused
    for k, (p, q) in enumerate(zip(got, want)):
        if fused:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 * (k + 1))
        else:
            assert torch.equal(p, q)
    sch = DPMSolverMultistepScheduler(**config)
    sch.set_timesteps(8)
    if config.get("solver_order") == 3:  # sde third order: the first two steps are fused, the rest not
        sch._init_step_index(sch.timesteps[0])
        assert sch.fastdiff_supports(x, sch.timesteps[0], x)
        sch._step_index, sch.lower_order_nums = 4, 3
    assert not sch.fastdiff_supports(x, sch.timesteps[0], x)


def test_fastdiff_supports_never_raises():
    sch = supports_never_raises(DPMSolverMultistepScheduler)


def test_in_kernel_noise_with_a_fastdiff_generator_is_reproducible():
    """sde-dpmsolver++ with a fastdiff.Generator: Philox noise in the kernel, the same for the same seed,
    different for another, and statistically the SDE's (a Gaussian target with its exact denoiser)."""
    config = dict(algorithm_type="sde-dpmsolver++", prediction_type="sample")
    lam = torch.tensor([2.0, 0.5, 0.1, 1.0])

    def run(seed):
        sch = DPMSolverMultistepScheduler(**config)
        sch.set_timesteps(60)
        x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
        g = fastdiff.Generator(seed)
        for t in sch.timesteps:
            abar = sch.alphas_cumprod[int(t)].item()
            a = abar ** 0.5
            x = sch.step(a * lam / (abar * lam + 1 - abar) * x, t, x, generator=g).prev_sample
        return x
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    var = a.double().var(0)
    assert ((var - lam.double()).abs() <= 5 * lam.double() * (2 / 20000) ** 0.5 + 0.02 * lam.double()).all(), var


# =========================================================================== FlowMatch Euler
from fastdiff.adapters.diffusers_solvers import FlowMatchEulerDiscreteScheduler  # noqa: E402

FLOW_CONFIGS = [dict(), dict(shift=3.0), dict(use_dynamic_shifting=True), dict(stochastic_sampling=True),
                dict(shift=3.0, stochastic_sampling=True), dict(shift_terminal=0.1), dict(invert_sigmas=True),
                dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]


def _flow_trajectory(cls, config, steps, x, seed):
    return _trajectory(cls, config, steps, x, seed, mu=0.7 if config.get("use_dynamic_shifting") else None)


@pytest.mark.parametrize("config", FLOW_CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in FLOW_CONFIGS])
def test_flowmatch_matches_diffusers(config):
    for steps in (10, 25, 50):
        x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(steps))
        want = _flow_trajectory(diffusers.FlowMatchEulerDiscreteScheduler, config, steps, x, 5)
        got = _flow_trajectory(FlowMatchEulerDiscreteScheduler, config, steps, x, 5)
        for k, (p, q) in enumerate(zip(got, want)):
            assert p.dtype == q.dtype
            torch.testing.assert_close(p, q, rtol=1e-6 * (k + 1), atol=1e-6 * (k + 1))


@pytest.mark.parametrize("stochastic", [False, True])
def test_flowmatch_per_token_timesteps(stochastic):
    """Per-token timesteps (B, T) for a (B, T, C) sample: one coefficient row per token in one pass,
    the same as diffusers' per-token step (float32 result, as diffusers leaves it)."""
    B, T, C = 2, 7, 5
    ours, orig = FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic), \
        diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic)
    for s in (ours, orig):
        s.set_timesteps(12)
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    ptt = ours.timesteps[torch.randint(0, 11, (B, T), generator=g)].float()
    t = ours.timesteps[3]
    a = orig.step(m, t, x, per_token_timesteps=ptt, generator=torch.Generator().manual_seed(1)).prev_sample
    b = ours.step(m, t, x, per_token_timesteps=ptt, generator=torch.Generator().manual_seed(1)).prev_sample
    assert b.dtype == a.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert ours.fastdiff_supports(m, t, x, ptt) and not ours.fastdiff_supports(m, t, x, ptt[:, :3])


def test_flowmatch_integer_timestep_falls_back_to_diffusers_error():
    sch = FlowMatchEulerDiscreteScheduler()
    sch.set_timesteps(5)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="integer indices"):
        sch.step(x, 0, x)

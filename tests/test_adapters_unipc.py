"""fastdiff's UniPCMultistepScheduler against diffusers' own: whole trajectories across its configs, the
state it leaves, the fallbacks, and where diffusers' arithmetic is not finite."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install fastdiff[adapters])")
from fastdiff.adapters.diffusers_solvers import UniPCMultistepScheduler  # noqa: E402
from adapter_checks import supports_never_raises  # noqa: E402  (tests/)


def _model(x, t):
    """A smooth stand-in for a network (bounded output, depends on t)."""
    return torch.tanh(x) * 0.5 + 1e-4 * float(t) * x.flip(-1)


def _trajectory(cls, config, steps, x, model=_model):
    sch = cls(**config)
    sch.set_timesteps(steps, mu=0.7 if config.get("use_dynamic_shifting") else None)
    out = []
    for t in sch.timesteps:
        x = sch.step(model(x, t), t, x).prev_sample
        out.append(x)
    return out, sch


# every fused option at least once (bh1 with a zero final sigma is the non-finite case below)
CONFIGS = [
    dict(),
    dict(solver_order=1, timestep_spacing="trailing"),
    dict(solver_order=3, prediction_type="v_prediction", use_karras_sigmas=True),
    dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min", use_exponential_sigmas=True),
    dict(solver_type="bh1", final_sigmas_type="sigma_min", timestep_spacing="leading", steps_offset=1),
    dict(disable_corrector=[0, 1, 4], prediction_type="sample", use_beta_sigmas=True),
    dict(lower_order_final=False, final_sigmas_type="sigma_min", use_karras_sigmas=True),  # order 2 at h = 0
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True, solver_type="bh1",
         final_sigmas_type="sigma_min"),
]


def _check(got, want, what):
    """float32 rounding per step: fastdiff rounds float64 coefficients once where diffusers takes
    exp/log/solve of float32 tensors (measured <= 3e-7 of the scale per step): 2e-6 per step."""
    scale = max(max(w.abs().max().item() for w in want), 1.0)
    for k, (p, q) in enumerate(zip(got, want)):
        assert p.dtype == q.dtype and p.shape == q.shape
        err = (p - q).abs().max().item()
        assert err <= 2e-6 * (k + 1) * scale, f"{what}, step {k}: {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("config", CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CONFIGS])
def test_matches_diffusers_over_whole_trajectories(config):
    """10 and 25 steps (the 50-step case below), the same model, every step fused; the scheduler's state
    (the corrected last_sample, model_outputs, orders) is diffusers' too, so either class can continue."""
    for steps, shape in ((10, (2, 3, 6, 5)), (25, (1, 7))):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(steps))
        want, ref = _trajectory(diffusers.UniPCMultistepScheduler, config, steps, x)
        sch = UniPCMultistepScheduler(**config)
        sch.set_timesteps(steps, mu=0.7 if config.get("use_dynamic_shifting") else None)
        got, y = [], x
        for t in sch.timesteps:
            assert sch.fastdiff_supports(_model(y, t), t, y)
            y = sch.step(_model(y, t), t, y).prev_sample
            got.append(y)
        _check(got, want, f"{steps} steps")
        assert sch.this_order == ref.this_order and sch.lower_order_nums == ref.lower_order_nums
        torch.testing.assert_close(sch.last_sample, ref.last_sample, rtol=0, atol=2e-6 * steps * max(1.0, want[-1].abs().max().item()))
        assert sch.timestep_list == ref.timestep_list


def test_matches_diffusers_over_50_steps_and_hands_over_mid_run():
    """One long trajectory (order 3, bh2, epsilon); after 20 fused steps diffusers' own class continues from
    the fused scheduler's state and ends where diffusers alone does."""
    config = dict(solver_order=3)
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(50))
    want, _ = _trajectory(diffusers.UniPCMultistepScheduler, config, 50, x)
    got, _ = _trajectory(UniPCMultistepScheduler, config, 50, x)
    _check(got, want, "50 steps")
    sch = UniPCMultistepScheduler(**config)
    sch.set_timesteps(50)
    y = x
    for k, t in enumerate(sch.timesteps):
        y = (sch if k < 20 else super(UniPCMultistepScheduler, sch)).step(_model(y, t), t, y).prev_sample
    assert (y - want[-1]).abs().max() <= 1e-4 * max(1.0, want[-1].abs().max().item())


@pytest.mark.parametrize("config", [dict(predict_x0=False), dict(thresholding=True), dict(solver_order=4),
                                    dict(lower_order_final=False, timestep_spacing="trailing")])
def test_unsupported_configs_run_diffusers_own_step(config):
    """What the fused path does not take runs diffusers' step unchanged (bit-identical, NaNs included:
    lower_order_final=False's order-2 step to sigma = 0 divides by r = 0 in diffusers), and
    fastdiff_supports says so."""
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    want, _ = _trajectory(diffusers.UniPCMultistepScheduler, config, 8, x)
    got, _ = _trajectory(UniPCMultistepScheduler, config, 8, x)
    fused = "lower_order_final" in config
    for p, q in zip(got[:-1] if fused else got, want):
        if fused:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(p.nan_to_num(), q.nan_to_num())
    sch = UniPCMultistepScheduler(**config)
    sch.set_timesteps(8)
    if fused:  # every step but the last is fused; the last is diffusers' (non-finite) own
        assert not torch.isfinite(want[-1]).all() and torch.equal(got[-1].isnan(), want[-1].isnan())
        sch._step_index, sch.lower_order_nums = 7, 2
    assert not sch.fastdiff_supports(x, sch.timesteps[0], x)


def test_bh1_to_sigma_zero_takes_the_limit_where_diffusers_is_nan():
    """diffusers' bh1 step to sigma = 0 computes alpha B(h) * 0 with B(h) = -h = -inf: NaN.  The fused step
    takes the limit x = x0 of that step (the data prediction it stored), the rest matches."""
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    want, _ = _trajectory(diffusers.UniPCMultistepScheduler, dict(solver_type="bh1"), 10, x)
    got, sch = _trajectory(UniPCMultistepScheduler, dict(solver_type="bh1"), 10, x)
    assert torch.isnan(want[-1]).all()
    _check(got[:-1], want[:-1], "bh1")
    assert torch.equal(got[-1], sch.model_outputs[-1])


def test_fastdiff_supports_never_raises_and_return_types():
    sch = supports_never_raises(UniPCMultistepScheduler)
    x = torch.randn(3, 2)
    out = sch.step(x, sch.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape
    other = UniPCMultistepScheduler.from_config(diffusers.DPMSolverMultistepScheduler().config)
    assert isinstance(other, diffusers.UniPCMultistepScheduler) and other.config.solver_type == "bh2"

"""Every reverse step against its float64 reference (fastdiff.reference.steps), on every backend.

Inputs are drawn fresh in the tested dtype; the reference sees the same values upcast to float64.
Outputs are poisoned (NaN) before the kernel runs, so an unwritten element fails.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastdiff
from fastdiff.reference import rng as ref_rng
from fastdiff.reference import steps as R
from conftest import TOLERANCE, assert_close_scaled, is_interpreter

SCHED = fastdiff.DDPMSchedule()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 5), (2, 3, 7, 5), (4, 257)]


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _times(kind, B, device, lo=0, hi=1000, gen=None):
    if kind == "scalar":
        return int(torch.randint(lo, hi, (1,), generator=gen))
    return torch.randint(lo, hi, (B,), generator=gen).to(device)


def _levels(kind, B, device, gen, lo=0.05, hi=20.0):
    if kind == "scalar":
        return float(torch.empty(1).uniform_(lo, hi, generator=gen))
    return (torch.rand(B, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(device)


def _f64(v):
    if isinstance(v, torch.Tensor):
        return v.double().cpu() if v.is_floating_point() else v.cpu()
    if isinstance(v, tuple):
        return tuple(_f64(a) for a in v)
    return v


def _run(fn, ref_fn, args, kwargs, *, dtype, backend, device, gen, noise_mode="none", ref_kwargs=None):
    """Run the fused step (poisoned out=) and the float64 reference with the same noise."""
    x = args[0]
    out = torch.full_like(x, float("nan"))
    ref_kwargs = dict(kwargs, **(ref_kwargs or {}))
    if noise_mode == "tensor":
        z = _rand(x.shape, dtype, device, gen)
        kwargs = dict(kwargs, noise=z)
        ref_kwargs["noise"] = z.double().cpu()
    elif noise_mode == "philox":
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        kwargs = dict(kwargs, generator=fastdiff.Generator(seed, 4 * 1000))
        ref_kwargs["noise"] = torch.from_numpy(ref_rng.randn(seed, 4000, x.numel()).astype(np.float64)).reshape(x.shape)
    res = fn(*args, **kwargs, out=out, backend=backend)
    assert res is out
    ref = ref_fn(*[_f64(a) for a in args], **{k: _f64(v) for k, v in ref_kwargs.items()})
    scale = ref.abs().mean().item() if ref.numel() else 0.0
    if dtype == torch.float32 and ref.numel():
        # float32 arithmetic errs by a few ulps of the largest *term* (conftest's TOLERANCE note):
        # where the terms c_j in_j cancel to an output much smaller than the inputs, 1e-5 of the
        # output is below one float32 rounding of the inputs.  Floor the scale at 4 ulps of the
        # inputs' scale (CI once saw 1.02x the bound at 0.4 ulp of the terms).
        terms = [a for a in (*args, *(m for a in args if isinstance(a, tuple) for m in a))
                 if isinstance(a, torch.Tensor) and a.shape == x.shape]
        input_scale = max(t.double().abs().mean().item() for t in terms)
        scale = max(scale, 4 * torch.finfo(torch.float32).eps * input_scale / TOLERANCE[torch.float32])
    assert_close_scaled(out, ref, dtype, scale=scale)
    return out, ref


def _over_dtypes_and_predictions(test):
    """Parametrize a step test over every tested dtype and every prediction type (outermost, as
    ``@parametrize("dtype")`` over ``@parametrize("prediction")`` over the test's own)."""
    test = pytest.mark.parametrize("prediction", fastdiff.PREDICTIONS)(test)
    return pytest.mark.parametrize("dtype", DTYPES, ids=str)(test)


def _model_output(shape, dtype, device, gen, cfg):
    if cfg:
        return (_rand(shape, dtype, device, gen), _rand(shape, dtype, device, gen))
    return _rand(shape, dtype, device, gen)


@_over_dtypes_and_predictions
@pytest.mark.parametrize("tkind", ["scalar", "per_sample"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm(backend_device, dtype, prediction, tkind, variance):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(hash((prediction, tkind, variance, str(dtype))) % 2**31)
    for shape in SHAPES[:3] if is_interpreter(backend, device) else SHAPES:
        for cfg in (False, True):
            for noise_mode in ("tensor", "philox"):
                x = _rand(shape, dtype, device, gen)
                m = _model_output(shape, dtype, device, gen, cfg)
                t = _times(tkind, shape[0], device, gen=gen)
                w = _levels(tkind, shape[0], device, gen, 0.0, 7.5) if cfg else None
                _run(fastdiff.ddpm_step, R.ddpm_step, (x, m, t, SCHED),
                     dict(prediction=prediction, variance=variance, guidance=w),
                     dtype=dtype, backend=backend, device=device, gen=gen, noise_mode=noise_mode)


@_over_dtypes_and_predictions
@pytest.mark.parametrize("tkind", ["scalar", "per_sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim(backend_device, dtype, prediction, tkind, eta):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(hash((prediction, tkind, eta, str(dtype))) % 2**31)
    for shape in SHAPES[:3] if is_interpreter(backend, device) else SHAPES:
        for cfg in (False, True):
            x = _rand(shape, dtype, device, gen)
            m = _model_output(shape, dtype, device, gen, cfg)
            t = _times(tkind, shape[0], device, lo=1, gen=gen)
            t_prev = t - 20 if tkind == "scalar" else (t - 20).clamp(min=-1)
            t_prev = max(t_prev, -1) if tkind == "scalar" else t_prev
            w = 3.0 if cfg else None
            _run(fastdiff.ddim_step, R.ddim_step, (x, m, t, t_prev, SCHED),
                 dict(eta=eta, prediction=prediction, guidance=w),
                 dtype=dtype, backend=backend, device=device, gen=gen, noise_mode="philox" if eta else "none")


def test_ddim_eta0_is_seed004_form():
    """eta = 0: x_p = (sigma_p/sigma_t) x_t + (alpha_p - (sigma_p/sigma_t) alpha_t) x0_hat (seed 004)."""
    x = torch.randn(8, 16, dtype=torch.float64)
    x0 = torch.randn(8, 16, dtype=torch.float64)
    t, tp = 700, 650
    a, s = SCHED.alpha, SCHED.sigma
    expect = (s[tp] / s[t]) * x + (a[tp] - (s[tp] / s[t]) * a[t]) * x0
    got = fastdiff.ddim_step(x, x0, t, tp, SCHED, prediction="x0")
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


@_over_dtypes_and_predictions
@pytest.mark.parametrize("skind", ["scalar", "per_sample"])
def test_euler_family(backend_device, dtype, prediction, skind):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(hash((prediction, skind, str(dtype))) % 2**31)
    for shape in SHAPES[:3] if is_interpreter(backend, device) else SHAPES:
        for cfg in (False, True):
            B = shape[0]
            x = _rand(shape, dtype, device, gen) * 5
            m = _model_output(shape, dtype, device, gen, cfg)
            sigma = _levels(skind, B, device, gen)
            sigma_next = sigma * 0.7 if skind == "scalar" else sigma * torch.rand(B, generator=gen, dtype=torch.float64).to(device)
            w = _levels(skind, B, device, gen, 0.0, 5.0) if cfg else None
            kw = dict(prediction=prediction, guidance=w)
            _run(fastdiff.euler_step, R.euler_step, (x, m, sigma, sigma_next), kw,
                 dtype=dtype, backend=backend, device=device, gen=gen)
            for eta in (0.0, 1.0):
                _run(fastdiff.euler_ancestral_step, R.euler_ancestral_step, (x, m, sigma, sigma_next),
                     dict(kw, eta=eta, s_noise=1.003), dtype=dtype, backend=backend, device=device, gen=gen,
                     noise_mode="philox")
            # Heun: predictor, then corrector with a second model output at x_pred
            xp = _rand(shape, dtype, device, gen)
            m2 = _model_output(shape, dtype, device, gen, cfg)
            _run(fastdiff.heun_step, R.heun_step, (x, m, sigma, sigma_next), kw,
                 dtype=dtype, backend=backend, device=device, gen=gen)
            _run(fastdiff.heun_step, R.heun_step, (x, m, sigma, sigma_next),
                 dict(kw, x_pred=xp, model_output_pred=m2), dtype=dtype, backend=backend, device=device, gen=gen)


def test_heun_last_step_is_euler(backend_device):
    backend, device = backend_device
    x = torch.randn(4, 6, device=device)
    m = torch.randn(4, 6, device=device)
    pred = fastdiff.heun_step(x, m, 0.5, 0.0, backend=backend)
    corr = fastdiff.heun_step(x, m, 0.5, 0.0, x_pred=pred, model_output_pred=torch.randn_like(x), backend=backend)
    torch.testing.assert_close(corr, pred, rtol=1e-6, atol=1e-6)
    # per-sample: only the samples with sigma_next == 0 fall back to Euler
    sn = torch.tensor([0.0, 0.3, 0.0, 0.2], dtype=torch.float64, device=device)
    m2 = torch.randn_like(x)
    pred = fastdiff.heun_step(x, m, 0.5, sn, backend=backend)
    corr = fastdiff.heun_step(x, m, 0.5, sn, x_pred=pred, model_output_pred=m2, backend=backend)
    torch.testing.assert_close(corr[[0, 2]], pred[[0, 2]], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(corr[[1, 3]], pred[[1, 3]])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("skind", ["scalar", "per_sample"])
def test_edm_churn(backend_device, dtype, skind):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(7)
    x = _rand((3, 33), dtype, device, gen)
    sigma = _levels(skind, 3, device, gen)
    gamma = 0.4 if skind == "scalar" else torch.tensor([0.0, 0.2, 0.4], dtype=torch.float64, device=device)
    seed = 77
    z = torch.from_numpy(ref_rng.randn(seed, 0, x.numel()).astype(np.float64)).reshape(x.shape)
    out = torch.full_like(x, float("nan"))
    x_hat, sigma_hat = fastdiff.edm_churn(x, sigma, gamma, s_noise=1.007, generator=fastdiff.Generator(seed), out=out, backend=backend)
    ref, ref_sigma_hat = R.edm_churn(x.double().cpu(), _f64(sigma), _f64(gamma), s_noise=1.007, noise=z)
    assert_close_scaled(x_hat, ref, dtype)
    torch.testing.assert_close(torch.as_tensor(sigma_hat, dtype=torch.float64).cpu().reshape(-1), ref_sigma_hat.reshape(-1))
    same, _ = fastdiff.edm_churn(x, sigma, 0.0, backend=backend)
    assert same is x


@_over_dtypes_and_predictions
@pytest.mark.parametrize("which", ["langevin", "ou"])
def test_langevin_family(backend_device, dtype, prediction, which):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(hash((prediction, which, str(dtype))) % 2**31)
    fn, ref_fn = {"langevin": (fastdiff.langevin_step, R.langevin_step), "ou": (fastdiff.ou_reverse_step, R.ou_reverse_step)}[which]
    for skind in ("scalar", "per_sample"):
        for cfg in (False, True):
            shape = (3, 2, 9)
            x = _rand(shape, dtype, device, gen)
            m = _model_output(shape, dtype, device, gen, cfg)
            g = _levels(skind, 3, device, gen, 1e-4, 0.1)
            kw = dict(prediction=prediction, guidance=1.5 if cfg else None)
            if prediction != "score":
                kw.update(alpha=0.9, sigma=_levels(skind, 3, device, gen, 0.1, 2.0))
            for noise_mode in ("tensor", "philox"):
                _run(fn, ref_fn, (x, m, g), kw, dtype=dtype, backend=backend, device=device, gen=gen, noise_mode=noise_mode)


@pytest.mark.parametrize("prediction", fastdiff.PREDICTIONS)
def test_predict_x0_roundtrip(backend_device, prediction):
    """Build each prediction type from a known (x0, eps) and check predict_x0 recovers x0."""
    backend, device = backend_device
    x0 = torch.randn(5, 11, dtype=torch.float64)
    eps = torch.randn(5, 11, dtype=torch.float64)
    alpha, sigma = 0.8, 0.6
    xt = alpha * x0 + sigma * eps
    m = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma, "flow": eps - x0}[prediction]
    got = fastdiff.predict_x0(xt.float().to(device), m.float().to(device), alpha, sigma, prediction=prediction, backend=backend)
    torch.testing.assert_close(got.double().cpu(), x0, rtol=1e-5, atol=1e-5)


def test_extreme_noise_levels_stay_finite(backend_device):
    backend, device = backend_device
    x = torch.randn(4, 8, device=device)
    m = torch.randn(4, 8, device=device)
    for sigma, sigma_next in [(1e-4, 0.0), (1e4, 5e3), (80.0, 0.002)]:
        for pred in fastdiff.PREDICTIONS:
            out = fastdiff.euler_step(x, m, sigma, sigma_next, prediction=pred, backend=backend)
            assert torch.isfinite(out).all(), (sigma, pred)
    for t in (0, 999):
        out = fastdiff.ddpm_step(x, m, t, SCHED, prediction="x0", generator=fastdiff.Generator(1), backend=backend)
        assert torch.isfinite(out).all()


def test_nan_propagates(backend_device):
    backend, device = backend_device
    x = torch.randn(2, 8, device=device)
    x[1, 3] = float("nan")
    out = fastdiff.ddpm_step(x, torch.randn_like(x), 10, SCHED, generator=fastdiff.Generator(0), backend=backend)
    assert torch.isnan(out[1, 3]) and torch.isfinite(out[0]).all()


def test_in_place_non_contiguous_and_reproducible(backend_device):
    backend, device = backend_device
    base = torch.randn(6, 10, device=device)
    x = base.t()  # non-contiguous (10, 6)
    m = torch.randn(6, 10, device=device).t()
    expect = R.ddpm_step(x.double().cpu(), m.double().cpu(), 100, SCHED,
                         noise=torch.from_numpy(ref_rng.randn(9, 0, 60).astype(np.float64)).reshape(10, 6))
    a = fastdiff.ddpm_step(x, m, 100, SCHED, generator=fastdiff.Generator(9), backend=backend)
    assert a.shape == x.shape
    assert_close_scaled(a, expect, torch.float32)
    # in place into the non-contiguous x itself
    fastdiff.ddpm_step(x, m, 100, SCHED, generator=fastdiff.Generator(9), out=x, backend=backend)
    torch.testing.assert_close(x, a, rtol=0, atol=0)
    # in place into a contiguous tensor
    y = torch.randn(6, 10, device=device)
    my = torch.randn(6, 10, device=device)
    expect_y = fastdiff.ddim_step(y, my, 500, 480, SCHED, eta=1.0, generator=fastdiff.Generator(2), backend=backend)
    r = fastdiff.ddim_step(y, my, 500, 480, SCHED, eta=1.0, generator=fastdiff.Generator(2), out=y, backend=backend)
    assert r is y
    torch.testing.assert_close(y, expect_y, rtol=0, atol=0)


def test_generator_advances_and_default_generator():
    x = torch.randn(3, 5)
    g = fastdiff.Generator(1)
    a = fastdiff.ddpm_step(x, x, 10, SCHED, generator=g)
    assert g.offset == 16
    b = fastdiff.ddpm_step(x, x, 10, SCHED, generator=g)
    assert not torch.equal(a, b)
    fastdiff.manual_seed(1)
    c = fastdiff.ddpm_step(x, x, 10, SCHED)
    torch.testing.assert_close(c, a, rtol=0, atol=0)
    # a deterministic step draws nothing
    before = g.offset
    fastdiff.ddpm_step(x, x, 0, SCHED, generator=g)
    fastdiff.ddim_step(x, x, 10, 5, SCHED, generator=g)
    assert g.offset == before


def test_numpy_in_numpy_out():
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    m = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    out = fastdiff.ddpm_step(x, m, 3, SCHED, generator=fastdiff.Generator(0))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (4, 6)
    ref = fastdiff.ddpm_step(torch.from_numpy(x), torch.from_numpy(m), 3, SCHED, generator=fastdiff.Generator(0))
    np.testing.assert_array_equal(out, ref.numpy())
    buf = np.empty_like(x)
    r = fastdiff.ddpm_step(x, m, 3, SCHED, generator=fastdiff.Generator(0), out=buf)
    assert r is buf
    np.testing.assert_array_equal(buf, out)
    x_hat, s_hat = fastdiff.edm_churn(x, 1.0, 0.5, generator=fastdiff.Generator(0))
    assert isinstance(x_hat, np.ndarray)
    # float64 arrays go to the torch backend and stay float64
    out64 = fastdiff.euler_step(x.astype(np.float64), m.astype(np.float64), 1.0, 0.5)
    assert out64.dtype == np.float64


def test_per_sample_times_equal_scalar_times(backend_device):
    """A (B,) timestep tensor holding one value gives what the scalar gives (same noise)."""
    backend, device = backend_device
    x = torch.randn(5, 7, device=device)
    m = torch.randn(5, 7, device=device)
    a = fastdiff.ddpm_step(x, m, 321, SCHED, generator=fastdiff.Generator(4), backend=backend)
    b = fastdiff.ddpm_step(x, m, torch.full((5,), 321, device=device), SCHED, generator=fastdiff.Generator(4), backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       t=st.integers(0, 999), pred=st.sampled_from(fastdiff.PREDICTIONS), per_sample=st.booleans(),
       seed=st.integers(0, 2**63))
def test_ddpm_shape_fuzz(shape, t, pred, per_sample, seed):
    """Hypothesis shapes on the default CPU backend: odd sizes, size 1, ragged ranks."""
    gen = torch.Generator().manual_seed(seed % 2**31)
    x = torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen)
    tt = torch.full((shape[0],), t) if per_sample else t
    out = torch.full_like(x, float("nan"))
    fastdiff.ddpm_step(x, m, tt, SCHED, prediction=pred, generator=fastdiff.Generator(seed), out=out)
    z = torch.from_numpy(ref_rng.randn(seed, 0, x.numel()).astype(np.float64)).reshape(shape)
    ref = R.ddpm_step(x.double(), m.double(), tt, SCHED, prediction=pred, noise=z)
    assert_close_scaled(out, ref, torch.float32)

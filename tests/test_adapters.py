"""Drop-in adapters against the installed originals (skipped, with the reason, where missing).

diffusers: every scheduler step is compared with the original's on the *same* (sample, model
output, noise) at every step of a whole loop, plus the free-running loops end to end.  The
original computes its coefficients in float32 (``1 - abar_t / abar_prev`` loses ``eps32 / beta``
relative accuracy: up to ~1e-3 for 1000-step chains), ours in float64 from the same float32
``alphas_cumprod``.  To compare the *kernels* at float32 rounding, the tests promote the original's
tables to float64 (its code unchanged: only ``alphas_cumprod``/``sigmas`` are float64 tensors, so
its coefficients are exact and its arithmetic stays float32); the stock original is compared too,
at the tolerance its own coefficient rounding implies.

k-diffusion: ``k_diffusion.sampling`` is imported by file path when ``import k_diffusion`` fails
(it imports torchvision/skimage for unrelated modules); its ``torch.randn_like`` draws are fed the
same noise our ``noise_sampler`` returns.
"""
import importlib.util
import math
import os
import sys
import types
from unittest import mock

import pytest
import torch
from scipy import stats

import fastdiff

EPS32 = 2.0**-24
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def _close(out, ref, tol, scale=None, what=""):
    """|out - ref| <= tol (|ref| + mean|ref|) + scale, elementwise (scale: float32 rounding of the
    terms that cancel, e.g. (x - sigma eps)/alpha with 1/alpha ~ 1e2 at the noisiest step)."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    bound = tol * (ref.abs() + ref.abs().mean()) + (0.0 if scale is None else scale.double()) + 1e-30
    worst = ((out - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: max err/bound = {worst:.3g} (max abs err {(out - ref).abs().max().item():.3g})"


def _model(x, t):
    """A smooth stand-in for a network (bounded output, depends on the timestep)."""
    return torch.tanh(0.7 * x + 1e-3 * float(t)) * 0.9


# =========================================================================== diffusers
try:
    import diffusers
    from fastdiff.adapters import diffusers as fd_diffusers
except ImportError as e:  # the k-diffusion tests below still run
    diffusers = fd_diffusers = None
    DIFFUSERS_WHY = f"diffusers is not importable ({e}); pip install fastdiff[adapters]"
needs_diffusers = pytest.mark.skipif(diffusers is None, reason=DIFFUSERS_WHY if diffusers is None else "")


def _pair(name, promote=True, **config):
    """(original, ours) with one config; ``promote``: the original's tables in float64 (module docstring)."""
    orig = getattr(diffusers, name)(**config)
    ours = getattr(fd_diffusers, name)(**config)
    if promote and name != "EulerDiscreteScheduler":   # Euler's table is promoted after set_timesteps
        orig.alphas_cumprod = orig.alphas_cumprod.double()
        if hasattr(orig, "one"):
            orig.one = orig.one.double()
        if hasattr(orig, "final_alpha_cumprod"):
            orig.final_alpha_cumprod = orig.final_alpha_cumprod.double()
    return orig, ours


def _set(orig, ours, steps, promote=True):
    for s in (orig, ours):
        if steps is not None:   # None: DDPM's full chain, as constructed
            s.set_timesteps(steps)
    if promote and isinstance(orig, diffusers.EulerDiscreteScheduler):
        orig.sigmas = orig.sigmas.double()


def _cancel_scale(sched, t, x, m):
    """float32 rounding of the x0 conversion's terms: a few eps32 * (|x| + |m|) * the largest coefficient."""
    if isinstance(sched, diffusers.EulerDiscreteScheduler):
        c = 1.0 + float(sched.sigmas.max())
    else:
        c = 1.0 / math.sqrt(float(sched.alphas_cumprod[int(t)]))
    return 8 * EPS32 * c * (x.abs() + m.abs())


def _extra(name, stochastic):
    if name == "DDIMScheduler":
        return {"eta": 0.6} if stochastic else {}
    if name == "EulerDiscreteScheduler":
        return {"s_churn": 2.0, "s_tmin": 0.2, "s_tmax": 5.0} if stochastic else {}
    return {}


CASES = [  # (scheduler, config, inference steps)
    ("DDPMScheduler", dict(variance_type="fixed_small"), None),
    ("DDPMScheduler", dict(variance_type="fixed_large"), 50),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", timestep_spacing="trailing"), 37),
    ("DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2"), 20),
    ("DDIMScheduler", dict(), 50),
    ("DDIMScheduler", dict(set_alpha_to_one=False, timestep_spacing="trailing", beta_schedule="scaled_linear"), 23),
    ("DDIMScheduler", dict(steps_offset=1, beta_schedule="scaled_linear"), 50),
    ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear"), 30),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="trailing"), 25),
    ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min", use_karras_sigmas=True), 12),
]


def _free_loop(sched, x, extra):
    for t in sched.timesteps:
        m = _model(sched.scale_model_input(x, t), t)
        x = sched.step(m, t, x, generator=torch.Generator().manual_seed(int(t) + 1), **extra).prev_sample
    return x


def _loop(name, config, steps, prediction, clip, stochastic, *, promote=True, shape=(2, 3, 7, 5), tol=1e-5,
          use_clipped=False):
    """Per step: the original and ours on the same (sample, model output, noise), compared; then both
    loops free-running from the same x_T with the same noise; returns their final samples."""
    config = dict(config, prediction_type=prediction)
    if name != "EulerDiscreteScheduler":
        config["clip_sample"] = clip
    extra = _extra(name, stochastic)
    if use_clipped:
        extra["use_clipped_model_output"] = True
    orig, ours = _pair(name, promote=promote, **config)
    _set(orig, ours, steps, promote)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * float(orig.init_noise_sigma)
    x = x_T.clone()
    for t in orig.timesteps:
        inp = orig.scale_model_input(x, t)
        ours.scale_model_input(x, t)
        m = _model(inp, t)
        assert ours.fastdiff_supports(m, t, x)
        a = orig.step(m, t, x, generator=torch.Generator().manual_seed(int(t) + 1), **extra)
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(int(t) + 1), **extra)
        assert type(a) is type(b)
        scale = _cancel_scale(orig, t, x, m)
        _close(b.pred_original_sample, a.pred_original_sample, tol, scale, f"{name} t={float(t)} pred_original_sample")
        _close(b.prev_sample, a.prev_sample, tol, scale, f"{name} t={float(t)} prev_sample")
        x = a.prev_sample
    orig, ours = _pair(name, promote=promote, **config)
    _set(orig, ours, steps, promote)
    return _free_loop(orig, x_T, extra), _free_loop(ours, x_T, extra)


@needs_diffusers
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusers_step_matches_original_every_step(case, prediction):
    """Same inputs and noise each step: float32 rounding (1e-5 of the output's scale, plus the
    rounding of the cancelling x0 terms); the free-running loops end within 1e-4 of each other."""
    name, config, steps = CASES[case]
    for clip in ((False, True) if name != "EulerDiscreteScheduler" else (False,)):
        for stochastic in (False, True):
            x_orig, x_ours = _loop(name, config, steps, prediction, clip, stochastic)
            err = ((x_ours - x_orig).abs().max() / x_orig.abs().max()).item()
            assert err <= 1e-4, f"{name} clip={clip} stochastic={stochastic}: whole-loop relative error {err:.3g}"


@needs_diffusers
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusers_ddim_use_clipped_model_output(prediction):
    _loop("DDIMScheduler", {}, 25, prediction, True, True, use_clipped=True)


@needs_diffusers
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_diffusers_stock_original_within_its_coefficient_rounding(name):
    """Against the unmodified original (float32 coefficients): its beta = 1 - abar_t/abar_prev has
    relative error ~eps32/beta_min (beta_min ~ 2e-3 for 50 of 1000 steps -> ~3e-5); 1e-4 bounds it."""
    x_orig, x_ours = _loop(name, {}, 50, "epsilon", False, True, promote=False, tol=1e-4)
    assert ((x_ours - x_orig).abs().max() / x_orig.abs().max()).item() <= 1e-3


@needs_diffusers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_diffusers_half_precision(name, dtype):
    """float16/bfloat16 samples: both round each result to the dtype once or more (diffusers after
    every op), so the per-step agreement is a few ulps of the dtype (conftest's TOLERANCE x 4)."""
    from conftest import TOLERANCE

    orig, ours = _pair(name, clip_sample=False)
    _set(orig, ours, 20)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    for t in orig.timesteps:
        m = _model(x.float(), t).to(dtype)
        a = orig.step(m, t, x, generator=torch.Generator().manual_seed(int(t)))
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(int(t)))
        assert b.prev_sample.dtype == dtype and b.pred_original_sample.dtype == dtype
        scale = 8 * TOLERANCE[dtype] / math.sqrt(float(orig.alphas_cumprod[int(t)])) * (x.float().abs() + m.float().abs())
        _close(b.prev_sample, a.prev_sample, 4 * TOLERANCE[dtype], scale, f"{name} {dtype} t={int(t)}")
        x = a.prev_sample


@needs_diffusers
def test_diffusers_return_types_and_config():
    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        orig = getattr(diffusers, name)(beta_schedule="scaled_linear")
        ours = getattr(fd_diffusers, name).from_config(orig.config)
        assert isinstance(ours, getattr(diffusers, name))
        assert dict(ours.config) == dict(orig.config)
        ours.set_timesteps(10)
        t = ours.timesteps[0]
        x = torch.randn(1, 2, 3, 3)
        ours.scale_model_input(x, t)
        out = ours.step(_model(x, t), t, x, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == x.shape and out[1].shape == x.shape


@needs_diffusers
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_diffusers_fused_path_does_not_call_the_original(name):
    _, ours = _pair(name, promote=False)
    ours.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4)
    parent = getattr(diffusers, name)
    with mock.patch.object(parent, "step", side_effect=AssertionError("fell back to diffusers' step")):
        for t in ours.timesteps:
            ours.scale_model_input(x, t)
            x = ours.step(_model(x, t), t, x, **({"eta": 1.0} if name == "DDIMScheduler" else {})).prev_sample
    assert torch.isfinite(x).all()


def _fallback_cases():
    yield "DDPMScheduler", dict(thresholding=True), {}, (2, 3, 4, 4), (2, 3, 4, 4)
    yield "DDPMScheduler", dict(variance_type="learned_range"), {}, (2, 6, 4, 4), (2, 3, 4, 4)
    yield "DDIMScheduler", dict(thresholding=True), {}, (2, 3, 4, 4), (2, 3, 4, 4)


@needs_diffusers
@pytest.mark.parametrize("case", list(_fallback_cases()), ids=lambda c: f"{c[0]}-{list(c[1])[0]}")
def test_diffusers_unsupported_configurations_fall_back(case):
    """Configurations without a fused path run diffusers' own step: bitwise its result."""
    name, config, extra, m_shape, x_shape = case
    orig, ours = _pair(name, promote=False, **config)
    _set(orig, ours, 10)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(x_shape, generator=gen)
    m = torch.randn(m_shape, generator=gen).clamp(-1, 1)
    t = orig.timesteps[3]
    assert not ours.fastdiff_supports(m, t, x)
    a = orig.step(m, t, x, generator=torch.Generator().manual_seed(1), **extra)
    b = ours.step(m, t, x, generator=torch.Generator().manual_seed(1), **extra)
    assert torch.equal(a.prev_sample, b.prev_sample)
    # a fastdiff.Generator still works there (a torch.Generator seeded from its stream), reproducibly
    c, d = (ours.step(m, t, x, generator=fastdiff.Generator(7), **extra).prev_sample for _ in range(2))
    assert torch.equal(c, d) and torch.isfinite(c).all()


@needs_diffusers
def test_diffusers_ddpm_fixed_large_final_noise_falls_back():
    """With trailing spacing the last timestep is > 0 and diffusers adds sqrt(1 - abar_t) noise there
    for fixed_large: that step goes to diffusers (documented), the others stay fused."""
    orig, ours = _pair("DDPMScheduler", promote=False, variance_type="fixed_large", timestep_spacing="trailing")
    _set(orig, ours, 10)
    x = torch.randn(2, 2, 3, 3)
    m = _model(x, 0)
    assert ours.fastdiff_supports(m, ours.timesteps[0], x)
    last = ours.timesteps[-1]
    assert int(last) > 0 and not ours.fastdiff_supports(m, last, x)
    a = orig.step(m, last, x, generator=torch.Generator().manual_seed(1))
    b = ours.step(m, last, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prev_sample, b.prev_sample)
    # mixed dtypes also go to diffusers
    assert not ours.fastdiff_supports(m.half(), ours.timesteps[0], x)


@needs_diffusers
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_diffusers_in_kernel_noise_is_statistically_the_same(name):
    """In-kernel Philox noise (fastdiff.Generator) vs diffusers' torch noise over whole loops on
    Gaussian data with an exact model: the final samples' per-channel distributions agree
    (two-sample KS per channel, 4096 samples each), and differ from the deterministic run."""
    lam = torch.tensor([1.0, 0.25, 0.04, 4.0]).reshape(1, 4, 1, 1)
    results = {}
    for which in ("orig", "ours"):
        sched = (diffusers if which == "orig" else fd_diffusers).__dict__[name]()
        sched.set_timesteps(40)
        gen = torch.Generator().manual_seed(1) if which == "orig" else fastdiff.Generator(1)
        x = torch.randn(4096, 4, 1, 1, generator=torch.Generator().manual_seed(0)) * float(sched.init_noise_sigma)
        for t in sched.timesteps:
            sched.scale_model_input(x, t)
            if name == "EulerDiscreteScheduler":   # VE form x = x0 + sigma eps: x0_hat = lam/(lam + sigma^2) x
                sigma = float(sched.sigmas[sched.step_index])
                m = (x - lam / (lam + sigma**2) * x) / sigma
                kw = {"s_churn": 4.0}
            else:                                  # VP form: x0_hat = a lam/(a^2 lam + s^2) x
                abar = float(sched.alphas_cumprod[int(t)])
                a, s = math.sqrt(abar), math.sqrt(1 - abar)
                m = (x - a * (a * lam / (a * a * lam + s * s)) * x) / s
                kw = {"eta": 1.0} if name == "DDIMScheduler" else {}
            x = sched.step(m, t, x, generator=gen, **kw).prev_sample
        results[which] = x.reshape(4096, 4)
    for c in range(4):
        p = stats.ks_2samp(results["orig"][:, c].numpy(), results["ours"][:, c].numpy()).pvalue
        assert p > 1e-3, f"channel {c}: two-sample KS p = {p:.2e}"
    assert not torch.allclose(results["orig"], results["ours"])


@needs_diffusers
def test_diffusers_in_kernel_noise_same_seed_reproduces():
    outs = []
    for seed in (4, 4, 5):
        _, ours = _pair("DDPMScheduler", promote=False)
        ours.set_timesteps(10)
        x = torch.ones(1, 2, 4, 4)
        g = fastdiff.Generator(seed)
        for t in ours.timesteps:
            x = ours.step(_model(x, t), t, x, generator=g).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@needs_diffusers
def test_diffusers_bad_generator():
    _, ours = _pair("DDPMScheduler", promote=False)
    ours.set_timesteps(10)
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(TypeError, match="generator"):
        ours.step(x, ours.timesteps[0], x, generator=123)


# =========================================================================== k-diffusion
def _load_k_diffusion_sampling():
    """``k_diffusion.sampling``; by file path (with a 1-function stand-in for its ``utils``) when the
    package itself cannot be imported (its __init__ imports torchvision, PIL, skimage...)."""
    try:
        from k_diffusion import sampling
        return sampling, None
    except Exception as e:  # noqa: BLE001 - any import failure of the package: try the one file
        why = f"{type(e).__name__}: {e}"
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        return None, "k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq)"
    root = os.path.dirname(spec.origin)
    pkg = types.ModuleType("_kdiffusion_original")
    pkg.__path__ = [root]
    utils = types.ModuleType("_kdiffusion_original.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]  # k_diffusion.utils.append_dims
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("_kdiffusion_original", "_kdiffusion_original.utils")}
    sys.modules.update({"_kdiffusion_original": pkg, "_kdiffusion_original.utils": utils})
    try:
        file_spec = importlib.util.spec_from_file_location("_kdiffusion_original.sampling", os.path.join(root, "sampling.py"))
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        return None, f"k_diffusion not importable ({why}) and sampling.py not loadable ({type(e).__name__}: {e})"
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
    return module, None


K_SAMPLING, K_WHY = _load_k_diffusion_sampling()
needs_k = pytest.mark.skipif(K_SAMPLING is None, reason=str(K_WHY))
from fastdiff.adapters import k_diffusion as fd_k  # noqa: E402


def _k_model(x, sigma, scale=0.8):
    """A smooth denoiser stand-in (k-diffusion convention: returns x0_hat)."""
    c = (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2).rsqrt()
    return torch.tanh(x * c) * scale


K_CASES = [
    ("sample_euler", {}),
    ("sample_euler", dict(s_churn=5.0, s_tmin=0.5, s_tmax=10.0)),
    ("sample_heun", {}),
    ("sample_heun", dict(s_churn=3.0, s_noise=1.003)),
    ("sample_euler_ancestral", {}),
    ("sample_euler_ancestral", dict(eta=0.5, s_noise=0.9)),
]


@needs_k
@pytest.mark.parametrize("case", range(len(K_CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(K_CASES)])
@pytest.mark.parametrize("sigmas", ["karras", "exponential"])
def test_k_diffusion_matches_original_with_the_same_noise(case, sigmas):
    """The same noise (k-diffusion's torch.randn_like draws, replayed by our noise_sampler): per-step
    float32 rounding, checked on each step's callback payload and on the result (1e-5 of the scale
    per step, accumulated over the <= 2 x 25 model evaluations: 1e-4)."""
    name, kw = K_CASES[case]
    n = 25
    sig = (K_SAMPLING.get_sigmas_karras(n, 0.03, 14.6) if sigmas == "karras"
           else K_SAMPLING.get_sigmas_exponential(n, 0.03, 14.6))
    gen = torch.Generator().manual_seed(case)
    x = torch.randn(3, 2, 5, 7, generator=gen) * sig[0]
    noise = {float(s): torch.randn(x.shape, generator=gen) for s in sig[:-1]}
    seen = {"orig": [], "ours": []}
    order = iter([noise[float(s)] for s in sig[:-1]])
    with mock.patch.object(torch, "randn_like", lambda t: next(order)):
        a = getattr(K_SAMPLING, name)(_k_model, x, sig, disable=True, callback=seen["orig"].append, **kw)
    b = getattr(fd_k, name)(_k_model, x, sig, disable=True, callback=seen["ours"].append,
                            noise_sampler=lambda s, s_next: noise[float(s)], **kw)
    assert len(seen["orig"]) == len(seen["ours"]) == n
    for p, q in zip(seen["orig"], seen["ours"]):
        assert p.keys() == q.keys() and p["i"] == q["i"]
        assert torch.equal(torch.as_tensor(p["sigma_hat"]), torch.as_tensor(q["sigma_hat"]))
        _close(q["x"], p["x"], 1e-4, what=f"{name} step {p['i']} x")
        _close(q["denoised"], p["denoised"], 1e-4, what=f"{name} step {p['i']} denoised")
    _close(b, a, 1e-4, what=f"{name} result")


@needs_k
def test_k_diffusion_in_kernel_noise_is_statistically_the_same():
    """Euler ancestral with Philox noise in the kernel vs the original's torch noise, Gaussian data
    N(0, lam) with its exact denoiser: per-coordinate two-sample KS and variances on 4000 samples."""
    lam = torch.tensor([1.0, 0.3, 0.05, 2.0])
    model = lambda x, s: lam / (lam + s[:, None] ** 2) * x  # noqa: E731
    sig = K_SAMPLING.get_sigmas_karras(30, 0.02, 20.0)
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0)) * sig[0]
    torch.manual_seed(1)
    a = K_SAMPLING.sample_euler_ancestral(model, x, sig, disable=True)
    b = fd_k.sample_euler_ancestral(model, x, sig, disable=True, generator=fastdiff.Generator(1))
    for c in range(4):
        p = stats.ks_2samp(a[:, c].numpy(), b[:, c].numpy()).pvalue
        assert p > 1e-3, f"coordinate {c}: p = {p:.2e}"
        # the variances agree (ratio SE sqrt(4/4000) = 3.2%; the sampler's own 30-step bias, e.g.
        # 0.76 of lam for lam = 1, is the same in both)
        assert abs(b[:, c].var().item() / a[:, c].var().item() - 1) < 0.1
    assert not torch.allclose(a, b)


def test_k_diffusion_progress_bar_and_errors(capsys):
    sig = fastdiff.KarrasSchedule(5).sigmas.float()
    x = torch.randn(2, 3) * sig[0]
    fd_k.sample_euler(lambda x, s: x * 0, x, sig, disable=False)
    assert "5/5" in capsys.readouterr().err
    fd_k.sample_heun(lambda x, s: x * 0, x, sig, disable=True)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="sigmas"):
        fd_k.sample_euler(_k_model, x, sig[None])
    with pytest.raises(ValueError, match="sigmas"):
        fd_k.sample_euler(_k_model, x, torch.tensor([1.0, 0.0, 0.5]))
    with pytest.raises(TypeError, match="x"):
        fd_k.sample_euler(_k_model, x.long(), sig)
    with pytest.raises(TypeError, match="generator"):
        fd_k.sample_euler_ancestral(_k_model, x, sig, generator=torch.Generator())


def test_k_diffusion_same_seed_reproduces():
    sig = fastdiff.KarrasSchedule(8).sigmas.float()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * sig[0]
    runs = [fd_k.sample_euler(_k_model, x, sig, s_churn=4.0, disable=True, generator=fastdiff.Generator(s))
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

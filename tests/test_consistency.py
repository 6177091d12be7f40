"""The consistency samplers (LCM, TCD): solver rows against a float64 direct implementation, their
distributional exactness with a true consistency function, ComfyUI's ``sample_lcm``, and the diffusers
``LCMScheduler`` / ``TCDScheduler`` adapters against the installed originals over whole trajectories.

Tolerances: rows vs float64 are float32 arithmetic on O(1) values over a few steps (``8 eps32`` per
step, relative); the adapters vs diffusers differ by diffusers' float32 coefficient arithmetic (``abar``
products and square roots, each ~eps32 relative) amplified by the x0 conversion's ``1/sqrt(abar_t)``
(<= 15 on the default scaled-linear table), the bound :func:`_bound` states.
"""
import math

import pytest
import torch

import fastdiff
from fastdiff import coefficients as C
from fastdiff.sampling import run
from fastdiff.solvers import solver_table
from fastdiff.adapters.k_diffusion import sample_lcm
from fastdiff.steps import randn as fd_randn

EPS32 = torch.finfo(torch.float32).eps
VE = [14.6, 3.1, 0.9, 0.21, 0.03, 0.0]
FLOW = [1.0, 0.81, 0.55, 0.3, 0.07, 0.0]


def _den(x, alpha, sigma):
    """A smooth nonlinear stand-in for a distilled model's x0 prediction."""
    return torch.tanh(0.8 * x) * (1.0 + 0.1 * sigma) + 0.05 * alpha


def _direct(method, levels, x, noises, *, gamma=None, boundary=None):
    """The update written out in float64 from the papers' equations (not from the coefficient functions)."""
    x = x.double()
    for i in range(len(levels) - 1):
        (a, s), (an, sn) = levels[i], levels[i + 1]
        D = _den(x, a, s)
        if method == "lcm":
            c_skip, c_out = (0.0, 1.0) if boundary is None else boundary[i]
            x = an * (c_skip * x + c_out * D) + sn * noises[i].double()
        else:
            a_s, s_s = gamma[i]
            x_s = a_s * D + s_s * (x - a * D) / s
            x = an / a_s * x_s + math.sqrt(max(sn * sn - (an / a_s * s_s) ** 2, 0.0)) * noises[i].double()
    return x


@pytest.mark.parametrize("method, path, shape, opt", [
    ("lcm", "ve", (1,), {}),                                          # ComfyUI's x = D + sigma_next z
    ("lcm", "flow", (3, 5, 7), {"timesteps": [999, 500, 120, 19, 0], "timestep_scaling": 0.5}),
    ("tcd", "ve", (2, 3, 4, 5), {"eta": 0.3}),
    ("tcd", "flow", (5, 1), {"eta": 0.7}),
])
def test_rows_match_the_float64_equations(method, path, shape, opt):
    """The table run by fastdiff.sampling.run (noise handed in) against the update in float64; and the
    in-kernel draw (cz) against the same rows fed the generator's own Philox stream."""
    sig = VE if path == "ve" else FLOW
    table = solver_table(method, sig, path=path, **opt)
    levels = [(1.0, s) if path == "ve" else (1.0 - s, s) for s in sig]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * sig[0]
    noises = [torch.randn(shape, generator=torch.Generator().manual_seed(10 + i)) for i in range(len(sig))]
    got = run(_den, x, table, noise=lambda i, row: noises[i], progress=False)
    gamma = boundary = None
    if method == "tcd":
        mid = [(1 - opt["eta"]) * s for s in sig[1:]]  # s = (1 - gamma) t_next, the intermediate levels
        gamma = [(1.0, u) if path == "ve" else (1.0 - u, u) for u in mid]
    if "timesteps" in opt:
        u = [0.5 * t for t in opt["timesteps"]]
        boundary = [(0.25 / (v * v + 0.25), v / math.sqrt(v * v + 0.25)) for v in u]
    want = _direct(method, levels, x, noises, gamma=gamma, boundary=boundary)
    torch.testing.assert_close(got.double(), want, rtol=8 * EPS32 * len(sig), atol=8 * EPS32 * len(sig))
    assert table[-1].cz == 0.0  # no draw to sigma = 0
    # in-kernel: each row draws x.numel() normals of the Philox stream, in row order
    g = fastdiff.Generator(21)
    drawn = run(_den, x, table, generator=g, progress=False)
    g2 = fastdiff.Generator(21)
    stream = {i: fd_randn(shape, generator=g2) for i, st in enumerate(table) if st.cz}
    fed = run(_den, x, table, noise=lambda i, row: stream[i], progress=False)
    torch.testing.assert_close(drawn, fed, rtol=1e-6, atol=1e-6)
    assert g.get_state() == g2.get_state()


def test_rows_limits_and_boundary():
    """TCD's gamma = 1 is LCM and gamma = 0 DPM-Solver++(1) = DDIM (coefficients to 1e-15); the boundary
    condition at timestep 0 is the identity (c_skip = 1, c_out = 0): the row copies x, whatever D says."""
    for path, sig in (("ve", VE), ("flow", FLOW)):
        for a, b in zip(solver_table("tcd", sig, path=path, eta=1.0), solver_table("lcm", sig, path=path)):
            assert (a.cx, a.cm, a.cz) == pytest.approx((b.cx, b.cm, b.cz), abs=1e-15)
        lev = [(1.0, s) if path == "ve" else (1.0 - s, s) for s in sig]
        for i, r in enumerate(solver_table("tcd", sig, path=path, eta=0.0)):
            cx, (cm,), _ = C.dpmpp_2m(lev[i], lev[i + 1], None)
            assert (r.cx, r.cm, r.cz) == pytest.approx((cx, cm, 0.0), abs=1e-14)
    assert C.lcm_boundary(0) == (1.0, 0.0)
    row = solver_table("lcm", [0.5, 0.0], timesteps=[0])[0]
    assert (row.cx, row.cm, row.cz) == (1.0, 0.0, 0.0)
    c_skip, c_out = C.lcm_boundary(19, 10.0)  # diffusers' lowest LCM timestep: u = 190
    assert c_skip == pytest.approx(0.25 / (190.0**2 + 0.25), rel=1e-15) and c_out == pytest.approx(190 / (190.0**2 + 0.25) ** 0.5, rel=1e-15)


@pytest.mark.parametrize("path", ["ve", "flow"])
def test_lcm_with_a_true_consistency_function_is_exact(path):
    """Gaussian data N(0, diag(lam)): the consistency function (the probability-flow ODE's endpoint) is
    f(x; alpha, sigma) = sqrt(lam / (alpha^2 lam + sigma^2)) x, and multistep consistency sampling with it
    keeps every x_i ~ N(0, alpha_i^2 lam + sigma_i^2), so the samples have variance lam (5 standard errors
    of 4000 samples).  (The posterior mean is no consistency function: tests/test_solvers.py leaves LCM out.)"""
    lam = torch.tensor([2.0, 1.0, 0.25, 0.04], dtype=torch.float64)
    f = lambda x, alpha, sigma: (lam / (alpha * alpha * lam + sigma * sigma)).sqrt() * x  # noqa: E731
    sig = [80.0, 5.0, 1.0, 0.2, 0.0] if path == "ve" else [1.0, 0.8, 0.4, 0.1, 0.0]
    x = fastdiff.sample(f, (4000, 4), sig, "lcm", path=path, generator=fastdiff.Generator(5), dtype=torch.float64,
                        progress=False)
    se = lam * (2.0 / 4000) ** 0.5
    assert ((x.var(0) - lam).abs() <= 5 * se).all(), x.var(0)


# =========================================================================== ComfyUI's sample_lcm
@pytest.mark.parametrize("path, shape, dtype", [("ve", (2, 3, 4, 5), torch.float64), ("flow", (1, 7), torch.float32)])
def test_sample_lcm_matches_comfyui_loop(path, shape, dtype):
    """sample_lcm against ComfyUI's loop written out (x = denoised; if sigma_next > 0: x += sigma_next z, or
    ``noise_scaling``'s (1 - t) x + t z for flow models) with the same noise_sampler draws; callback and dtype."""
    sig = torch.tensor(VE if path == "ve" else FLOW, dtype=torch.float32)
    model = lambda x, s: torch.tanh(x) * (1 + s.reshape(-1, *[1] * (x.ndim - 1)))  # noqa: E731
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * float(sig[0])
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i in range(len(sig))]
    it = iter(draws)
    seen = []
    got = sample_lcm(model, x, sig, disable=True, noise_sampler=lambda s, sn: next(it), path=path,
                     callback=lambda d: seen.append(d["i"]))
    ref, s_in, k = x.double(), x.new_ones([x.shape[0]]), 0
    for i in range(len(sig) - 1):
        ref = model(ref, (sig[i] * s_in).double())
        if sig[i + 1] > 0:
            t = float(sig[i + 1])
            ref = ref + t * draws[k].double() if path == "ve" else (1 - t) * ref + t * draws[k].double()
            k += 1
    assert got.dtype == dtype and seen == list(range(len(sig) - 1))
    tol = 1e-12 if dtype == torch.float64 else 8 * EPS32 * len(sig)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_sample_lcm_in_kernel_noise_and_bad_input():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    sig = torch.tensor(VE)
    model = lambda x, s: 0.5 * x  # noqa: E731
    a = sample_lcm(model, x, sig, disable=True, generator=fastdiff.Generator(4))
    b = sample_lcm(model, x, sig, disable=True, generator=fastdiff.Generator(4))
    assert torch.equal(a, b) and not torch.equal(a, sample_lcm(model, x, sig, disable=True, generator=fastdiff.Generator(5)))
    with pytest.raises(ValueError, match="path: expected"):
        sample_lcm(model, x, sig, path="vp")
    with pytest.raises(TypeError, match="generator"):
        sample_lcm(model, x, sig, generator=torch.Generator())
    with pytest.raises(ValueError, match="sigmas"):
        sample_lcm(model, x, torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("kw, err, match", [
    (dict(method="lcm", eta=0.5), ValueError, "eta: not used by method='lcm'"),
    (dict(method="tcd", eta=1.5), ValueError, r"eta: TCD's gamma, expected a number in \[0, 1\]"),
    (dict(method="lcm", timesteps=[1, 2]), ValueError, "timesteps: expected 5 finite"),
    (dict(method="lcm", timesteps=[9, 8, 7, 6, float("nan")]), ValueError, "timesteps: expected 5 finite"),
    (dict(method="lcm", timestep_scaling=-1.0), ValueError, "timestep_scaling: expected a finite number"),
    (dict(method="tcd", timesteps=[9, 8, 7, 6, 5]), ValueError, "not used by method='tcd'"),
    (dict(method="dpmpp_2m", timestep_scaling=5.0), ValueError, "only used by method='lcm'"),
    (dict(method="lcm", churn=1.0), ValueError, "churn"),
])
def test_rows_bad_input(kw, err, match):
    method = kw.pop("method")
    with pytest.raises(err, match=match):
        solver_table(method, VE, **kw)


# =========================================================================== diffusers adapters
diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from fastdiff.adapters import diffusers_consistency as fd  # noqa: E402


def _model(x, t):
    return torch.tanh(0.7 * x + 1e-3 * float(t)) * 0.9


def _bound(sched, t, x, m, ref):
    """float32 rounding of diffusers' coefficient arithmetic: a few eps32 of the result, plus the x0
    conversion's terms (|x| + |m|) / sqrt(abar_t)."""
    c = 1.0 / math.sqrt(float(sched.alphas_cumprod[int(t)]))
    return 16 * EPS32 * (ref.abs() + ref.abs().mean() + c * (x.abs() + m.abs()))


def _gens(kind, batch, seed=7):
    if kind == "list":
        return [torch.Generator().manual_seed(seed + b) for b in range(batch)]
    return torch.Generator().manual_seed(seed)


CASES = [  # (scheduler, config, set_timesteps kwargs, step kwargs, generator kind): each covers something distinct
    ("LCMScheduler", {}, dict(num_inference_steps=4), {}, "one"),
    ("LCMScheduler", dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.6, timestep_scaling=0.5),
     dict(num_inference_steps=8, original_inference_steps=100), {}, "list"),
    ("LCMScheduler", dict(prediction_type="sample", timestep_spacing="trailing"), dict(num_inference_steps=25), {}, "one"),
    # strength truncates to [259, 19, 3]: never reaches index num_inference_steps - 1, so every step draws;
    # at t = 3 the boundary condition is large (c_skip = 2.8e-4)
    ("LCMScheduler", {}, dict(timesteps=[999, 759, 499, 259, 19, 3], strength=0.6), {}, "one"),
    ("LCMScheduler", dict(set_alpha_to_one=False), dict(num_inference_steps=4, strength=0.5), {}, "list"),
    ("TCDScheduler", {}, dict(num_inference_steps=4), dict(eta=0.3), "one"),
    ("TCDScheduler", dict(prediction_type="v_prediction"), dict(num_inference_steps=8), dict(eta=0.0), "one"),
    ("TCDScheduler", dict(prediction_type="sample"), dict(num_inference_steps=25, original_inference_steps=1000),
     dict(eta=1.0), "list"),
    ("TCDScheduler", {}, dict(timesteps=[999, 700, 431, 100], strength=0.8), dict(eta=0.1), "one"),
]


@pytest.mark.parametrize("name, config, ts_kw, step_kw, gen", CASES,
                         ids=[f"{c[0][:3]}-{i}" for i, c in enumerate(CASES)])
def test_adapters_match_diffusers_over_whole_trajectories(name, config, ts_kw, step_kw, gen):
    """Per step on the same (sample, model output) with generators seeded alike (the noise is the same only
    if both drew the same tensors on the same steps): prev_sample and denoised / pred_noised_sample to float32
    rounding; then the generators' states agree (the draw counts matched) and the free-running loops too."""
    shape = (3, 2, 3, 5)
    orig, ours = getattr(diffusers, name)(**config), getattr(fd, name)(**config)
    g_orig, g_ours = _gens(gen, shape[0]), _gens(gen, shape[0])
    for s in (orig, ours):
        s.set_timesteps(**ts_kw)
    assert torch.equal(orig.timesteps, ours.timesteps)
    x = randn_tensor(shape, generator=torch.Generator().manual_seed(1))
    x_free = x.clone()
    for t in orig.timesteps:
        m = _model(x, t)
        assert ours.fastdiff_supports(m, t, x, **step_kw)
        a = orig.step(m, t, x, generator=g_orig, **step_kw)
        b = ours.step(m, t, x, generator=g_ours, **step_kw)
        assert type(a) is type(b)
        for f in a.keys():
            err = (b[f] - a[f]).abs() / _bound(orig, t, x, m, a[f])
            assert err.max() <= 1.0, f"{name} t={int(t)} {f}: err/bound {err.max():.3g}"
        x = a.prev_sample
    assert ours.step_index == orig.step_index
    states = lambda g: [h.get_state() for h in (g if isinstance(g, list) else [g])]  # noqa: E731
    assert all(torch.equal(p, q) for p, q in zip(states(g_orig), states(g_ours)))
    # free-running, tuple returns
    ours.set_timesteps(**ts_kw)
    g_ours = _gens(gen, shape[0])
    for t in ours.timesteps:
        out = ours.step(_model(x_free, t), t, x_free, generator=g_ours, return_dict=False, **step_kw)
        assert isinstance(out, tuple) and len(out) == 2
        x_free = out[0]
    assert ((x_free - x).abs().max() / x.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
def test_adapters_in_kernel_noise_and_per_sample_seeds(name):
    """A fastdiff.Generator draws in the kernel: the re-noising term (prev - r x_s)/q is standard normal, and
    with per-sample seeds sample b's result depends on its own seed only (a batch of 3 equals 1-sample runs)."""
    kw = {"eta": 0.5} if name == "TCDScheduler" else {}
    s = getattr(fd, name)()
    s.set_timesteps(4)
    t = s.timesteps[1]
    x = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0))
    out = s.step(_model(x, t), t, x, generator=fastdiff.Generator(3), **kw)
    x_s = out[1]
    abar = s.alphas_cumprod.double()
    t_next = int(s.timesteps[2])
    r = (abar[t_next] if name == "LCMScheduler" else
         abar[t_next] / abar[int(math.floor(0.5 * t_next))]).sqrt()
    q = (1 - abar[t_next]) if name == "LCMScheduler" else (1 - abar[t_next] / abar[int(math.floor(0.5 * t_next))])
    z = (out.prev_sample.double() - r * x_s.double()) / q.sqrt()
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel()) and abs(z.std().item() - 1) < 5 / math.sqrt(2 * z.numel())
    xb = x[:3].clone()
    whole = getattr(fd, name)()
    whole.set_timesteps(4)
    batch = whole.step(_model(xb, t), t, xb, generator=fastdiff.Generator([11, 12, 13]), **kw).prev_sample
    for b, seed in enumerate((11, 12, 13)):
        one = getattr(fd, name)()
        one.set_timesteps(4)
        got = one.step(_model(xb[b:b + 1], t), t, xb[b:b + 1], generator=fastdiff.Generator([seed]), **kw).prev_sample
        # (to float32 rounding: a batch of 1 and of 3 take different vector paths through the kernel)
        torch.testing.assert_close(got[0], batch[b], rtol=4 * EPS32, atol=4 * EPS32)


def _bitwise(a, b):
    for f in a.keys():
        torch.testing.assert_close(b[f], a[f], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name, config, step_kw, case", [
    ("LCMScheduler", dict(thresholding=True), {}, "config"),
    ("LCMScheduler", dict(rescale_betas_zero_snr=True), {}, "abar=0"),   # eps at abar_999 = 0: inf coefficients
    ("LCMScheduler", {}, {}, "dtype"),
    ("TCDScheduler", dict(prediction_type="v_prediction"), dict(eta=0.3), "dtype"),
])
def test_adapters_fall_back_to_diffusers_step(name, config, step_kw, case):
    """Configurations and calls fastdiff does not fuse run diffusers' own step: bitwise its result, same state."""
    orig, ours = getattr(diffusers, name)(**config), getattr(fd, name)(**config)
    for s in (orig, ours):
        s.set_timesteps(4)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    t = orig.timesteps[0]
    m = _model(x, t).double() if case == "dtype" else _model(x, t)
    assert not ours.fastdiff_supports(m, t, x, **step_kw)
    a = orig.step(m, t, x, generator=torch.Generator().manual_seed(3), **step_kw)
    b = ours.step(m, t, x, generator=torch.Generator().manual_seed(3), **step_kw)
    _bitwise(a, b)
    assert ours.step_index == orig.step_index == 1
    if case == "abar=0":  # the next steps are fused again
        assert ours.fastdiff_supports(_model(x, orig.timesteps[1]), orig.timesteps[1], x)


def test_adapters_errors_and_questions_never_raise():
    """diffusers' own errors for what it rejects; fastdiff_supports answers False, never raising."""
    lcm, tcd = fd.LCMScheduler(), fd.TCDScheduler()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="set_timesteps"):
        lcm.step(x, 999, x)
    for s in (lcm, tcd):
        s.set_timesteps(4)
    odd = [(x, 999.5, x), (x, torch.tensor(999.0), x), (None, 999, x), (x, "999", x), (x, 5, x), (x, -1, x),
           (x, 999, torch.randn(3, 3)), (x, torch.tensor([999, 759]), x)]
    for args in odd:
        assert lcm.fastdiff_supports(*args) is False and tcd.fastdiff_supports(*args) is False
    assert tcd.fastdiff_supports(x, 999, x, eta=1.5) is False and tcd.fastdiff_supports(x, 999, x, eta="a") is False
    with pytest.raises(AssertionError):  # diffusers' own check of eta
        tcd.step(x, 999, x, eta=1.5)
    with pytest.raises(IndexError):  # a float timestep indexes diffusers' table: its own error
        _set(fd.LCMScheduler()).step(x, torch.tensor(999.0), x)
    with pytest.raises(ValueError, match="per sample"):  # a list of 2 generators for 3 samples
        _set(fd.LCMScheduler()).step(torch.randn(3, 2), 999, torch.randn(3, 2), generator=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="per-sample seeds"):  # diffusers' own step cannot take them
        _set(fd.LCMScheduler(thresholding=True)).step(x, 999, x, generator=fastdiff.Generator([1, 2]))


def _set(s, n=4):
    s.set_timesteps(n)
    return s

"""The multistep and two-stage solvers (fastdiff.solvers): k-diffusion's samplers of the same names,
replayed with the same noise over whole trajectories, and the rows' machinery (history, pushes,
the second stage, injected noise) through fastdiff.sample and fastdiff.affine_step."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import fastdiff
from fastdiff import coefficients as C
from fastdiff.adapters import k_diffusion as fd_k
from fastdiff.sampling import run, trajectory_table
from fastdiff.solvers import CONSISTENCY_METHODS, FLOW_METHODS, MULTISTEP_METHODS, solver_table
from test_adapters import K_SAMPLING, K_WHY, _k_model

needs_k = pytest.mark.skipif(K_SAMPLING is None, reason=str(K_WHY))

CASES = [
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}),
    ("sample_dpmpp_2m_sde", dict(eta=0.5, s_noise=0.9, solver_type="heun")),
    ("sample_dpmpp_2m_sde", dict(eta=0.0)),
    ("sample_dpmpp_3m_sde", {}),
    ("sample_dpmpp_3m_sde", dict(eta=0.0)),
    ("sample_dpmpp_3m_sde", dict(eta=0.7, s_noise=1.1)),
    ("sample_dpmpp_2s_ancestral", {}),
    ("sample_dpmpp_2s_ancestral", dict(eta=0.0)),
    ("sample_dpmpp_2s_ancestral", dict(eta=3.0)),  # sigma_down = 0 on some steps: the Euler branch
    ("sample_dpm_2", {}),
    ("sample_dpm_2_ancestral", {}),
    ("sample_dpm_2_ancestral", dict(eta=0.4, s_noise=0.8)),
    ("sample_lms", {}),
    ("sample_lms", dict(order=2)),
    ("sample_lms", dict(order=1)),
]


def _close(a, b, rtol, what):
    scale = b.abs().max().clamp(min=1.0)
    err = (a.double() - b.double()).abs().max() / scale
    assert err <= rtol, f"{what}: max error {err:.3g} of the scale {scale:.3g} (tolerance {rtol})"


def _sigmas(kind, n):
    if kind == "karras":
        return K_SAMPLING.get_sigmas_karras(n, 0.03, 14.6)
    if kind == "exponential":
        return K_SAMPLING.get_sigmas_exponential(n, 0.03, 14.6)
    return K_SAMPLING.get_sigmas_polyexponential(n, 0.02, 30.0, rho=2.0)


def _err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1.0)).item()


@needs_k
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0][7:]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("n,kind", [(10, "karras"), (25, "exponential"), (50, "polyexponential")])
def test_matches_k_diffusion_with_the_same_noise(case, n, kind):
    """Whole trajectories of 10, 25 and 50 steps with the same noise (replayed through ``noise_sampler``),
    in float32 (each step's callback payload and the result) and in float64 (the result).

    Tolerances.  float64: the same math, so rounding only, amplified by the trajectory's conditioning
    ``cond`` (k-diffusion's own float32-vs-float64 gap in units of float32's eps; about 3 for most cases,
    3e5 for 4th-order LMS on 50 polyexponential steps, which amplifies rounding): ``1e-11 cond``
    (k-diffusion integrates the LMS weights with ``quad(epsrel=1e-4)``, exact for these cubics to ~1e-12).
    float32: fastdiff rounds float64 coefficients once where k-diffusion takes ``exp``/``log``/``expm1``
    in float32, so the two float32 runs may differ by what float32 rounding does to k-diffusion itself:
    3x its own float32-vs-float64 gap, or 2e-6 per step (at least 1e-5), whichever is larger."""
    name, kw = CASES[case]
    sig = _sigmas(kind, n)
    gen = torch.Generator().manual_seed(case + 100 * n)
    x = torch.randn(3, 2, 5, 7, generator=gen) * sig[0]
    noise = {float(s): torch.randn(x.shape, generator=gen) for s in sig[:-1]}

    def run_both(dtype, seen=None):
        sampler_kw = {} if name in ("sample_dpmpp_2m", "sample_lms", "sample_dpm_2") else \
            {"noise_sampler": lambda s, s_next: noise[float(s)].to(dtype)}
        cb = {} if seen is None else {"orig": dict(callback=seen["orig"].append), "ours": dict(callback=seen["ours"].append)}
        a = getattr(K_SAMPLING, name)(_k_model, x.to(dtype), sig.to(dtype), disable=True, **cb.get("orig", {}),
                                      **sampler_kw, **kw)
        b = getattr(fd_k, name)(_k_model, x.to(dtype), sig.to(dtype), disable=True, **cb.get("ours", {}),
                                **sampler_kw, **kw)
        assert b.dtype == a.dtype == dtype and b.shape == a.shape
        return a, b

    seen = {"orig": [], "ours": []}
    a, b = run_both(torch.float32, seen)
    a64, b64 = run_both(torch.float64)
    cond = max(1.0, _err(a, a64) / 2**-24)
    assert _err(b64, a64) <= 1e-11 * cond, f"{name} float64: {_err(b64, a64):.3g} (cond {cond:.3g})"
    tol = max(1e-5, 2e-6 * n, 3 * _err(a, a64))
    assert len(seen["orig"]) == len(seen["ours"]) == n
    for p, q in zip(seen["orig"], seen["ours"]):
        assert p.keys() == q.keys() and p["i"] == q["i"]
        assert torch.equal(torch.as_tensor(p["sigma"]), torch.as_tensor(q["sigma"]))
        _close(q["x"], p["x"], tol, what=f"{name} step {p['i']} x")
        _close(q["denoised"], p["denoised"], tol, what=f"{name} step {p['i']} denoised")
    _close(b, a, tol, what=f"{name} result")


@needs_k
def test_dpm_2_with_churn_matches_k_diffusion():
    """EDM churn inside [s_tmin, s_tmax]: k-diffusion draws torch.randn_like on every step; the same
    draws are replayed through fastdiff's churn by giving both the same normals (only the steps whose
    gamma > 0 use them)."""
    sig = K_SAMPLING.get_sigmas_karras(20, 0.03, 14.6)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 17, generator=gen) * sig[0]
    draws = [torch.randn(x.shape, generator=gen) for _ in range(20)]
    kw = dict(s_churn=4.0, s_tmin=0.2, s_tmax=8.0, s_noise=1.01)
    order = iter(draws)
    with mock.patch.object(torch, "randn_like", lambda t: next(order)):
        a = K_SAMPLING.sample_dpm_2(_k_model, x, sig, disable=True, **kw)
    levels = sig.double().tolist()
    churned = [i for i in range(20) if kw["s_tmin"] <= levels[i] <= kw["s_tmax"]]
    order = iter([draws[i] for i in churned])
    table = solver_table("dpm_2", levels, churn=kw["s_churn"], s_tmin=kw["s_tmin"], s_tmax=kw["s_tmax"],
                            s_noise=kw["s_noise"])
    assert [i for i, st in enumerate(table) if st.churn] == churned
    with mock.patch.object(fastdiff.steps, "edm_churn", _churn_with(order)):
        b = fd_k.sample_dpm_2(_k_model, x, sig, disable=True, **kw)
    _close(b, a, 1e-5, "dpm_2 with churn")


def _churn_with(draws):
    real = fastdiff.steps.edm_churn

    def churn(x, sigma, gamma, **kw):
        kw.pop("generator", None)
        return real(x, sigma, gamma, noise=next(draws), **kw)
    return churn


@needs_k
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_euler_ancestral", "sample_dpm_2",
                                  "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_3m_sde"])
def test_half_precision_state_follows_k_diffusion(name):
    """bfloat16 x with float32 sigmas: the result has k-diffusion's dtype (the to_d samplers promote the
    state to float32, the DPM-Solver++ ones keep bfloat16) and is at least as close to the float64 run
    as k-diffusion's own (k-diffusion's first ``x - denoised`` is a bfloat16 subtraction, so the two
    differ by bfloat16 rounding, not float32's)."""
    sig = K_SAMPLING.get_sigmas_karras(12, 0.03, 14.6)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 8, generator=gen) * sig[0]).bfloat16()
    kw = {"eta": 0.0} if name == "sample_dpmpp_3m_sde" else {}
    if name == "sample_euler_ancestral":
        draws = [torch.randn(x.shape, generator=gen) for _ in range(12)]
        kw["noise_sampler"] = lambda s, s_next: draws[int((sig.to(s.dtype) == s).nonzero()[0, 0])].to(s.dtype)
    a = getattr(K_SAMPLING, name)(_k_model, x, sig, disable=True, **kw)
    b = getattr(fd_k, name)(_k_model, x, sig, disable=True, **kw)
    exact = getattr(K_SAMPLING, name)(_k_model, x.double(), sig.double(), disable=True, **kw)
    assert b.dtype == a.dtype, (name, a.dtype, b.dtype)
    # a bfloat16 state rounds every update to 2^-8 relative on both sides: within 2 of its ulps
    floor = 2.0 ** -7 if a.dtype == torch.bfloat16 else 1e-6
    assert _err(b, exact) <= max(1.25 * _err(a, exact), floor), (name, _err(b, exact), _err(a, exact))


# =========================================================================== the machinery
def _gauss_model(lam):
    return lambda x, alpha, sigma: alpha * lam / (alpha * alpha * lam + sigma * sigma) * x


# the consistency samplers need a consistency function, not the posterior mean: tests/test_consistency.py
@pytest.mark.parametrize("method", [m for m in MULTISTEP_METHODS if m not in CONSISTENCY_METHODS])
def test_sample_runs_every_solver_and_converges_to_the_data(method):
    """fastdiff.sample with each solver on Gaussian data N(0, diag(lam)) with its exact denoiser: the
    sample variance per coordinate matches lam (the solvers are consistent: 40 Karras steps, 120 for the
    stochastic ones, put the error well under the Monte-Carlo tolerance of 4000 samples, 5 standard errors)."""
    lam = torch.tensor([2.0, 1.0, 0.25, 0.04], dtype=torch.float64)
    sched = fastdiff.KarrasSchedule(120 if method.endswith(("_sde", "ancestral")) else 40, sigma_min=0.002,
                                    sigma_max=40.0)  # the stochastic solvers converge weakly at first order
    x = fastdiff.sample(_gauss_model(lam.float()), (4000, 4), sched, method, generator=fastdiff.Generator(7),
                        progress=False)
    var = x.double().var(0)
    se = lam * (2.0 / 4000) ** 0.5
    assert ((var - lam).abs() <= 5 * se + 2e-3 * lam).all(), (method, var, lam)


def test_history_survives_an_in_place_loop_and_rejects_a_reused_output():
    """The state is updated in place; the remembered outputs are not.  A denoiser that writes into one
    buffer every call would corrupt the history silently: it raises instead."""
    lam = torch.tensor([1.0, 0.5])
    sig = [10.0, 3.0, 1.0, 0.3, 0.0]
    table = trajectory_table(sig, "dpmpp_3m_sde", eta=0.0)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * 10
    buf = torch.empty(6, 2)

    def reusing(x, alpha, sigma):
        return torch.mul(lam / (lam + sigma * sigma), x, out=buf)
    with pytest.raises(ValueError, match="earlier step's output"):
        run(reusing, x, table, progress=False)
    fresh = run(_gauss_model(lam), x, table, progress=False)
    # the same recursion written out in float64 with the coefficient functions
    xd, hist, hs = x.double(), [], []
    for i in range(4):
        m = _gauss_model(lam.double())(xd, 1.0, sig[i])
        h1, h2 = (hs + [None, None])[:2]
        cx, cs, _ = C.dpmpp_3m_sde((1.0, sig[i]), (1.0, sig[i + 1]), h1, h2, eta=0.0)
        hist.insert(0, m)
        xd = cx * xd + sum(c * h for c, h in zip(cs, hist))
        if sig[i + 1] > 0:
            hs.insert(0, C.log_snr(1.0, sig[i + 1]) - C.log_snr(1.0, sig[i]))
    _close(fresh, xd, 1e-6, "dpmpp_3m in float64")


def test_injected_noise_is_used_exactly_where_the_rows_draw():
    sig = [8.0, 2.0, 0.5, 0.0]
    table = trajectory_table(sig, "dpmpp_2m_sde")
    calls = []

    def noise(i, row):
        calls.append(i)
        return torch.zeros(3, 4)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    run(lambda x, a, s: 0.5 * x, x, table, noise=noise, progress=False)
    assert calls == [i for i, st in enumerate(table) if st.cz] == [0, 1]  # none to sigma = 0


def test_fused_true_is_refused_for_a_multistep_solver():
    den = fastdiff.denoisers.MoLRG(torch.linalg.qr(torch.randn(2, 6, 2)).Q)
    with pytest.raises(ValueError, match="fused: the fused trajectory kernel runs the single-step"):
        fastdiff.sample(den, (4, 6), fastdiff.KarrasSchedule(5), "dpmpp_2m", fused=True, progress=False)
    out = fastdiff.sample(den, (4, 6), fastdiff.KarrasSchedule(5), "dpmpp_2m", generator=fastdiff.Generator(0),
                          progress=False)
    assert out.shape == (4, 6) and torch.isfinite(out).all()


@pytest.mark.parametrize("bad, match", [
    (dict(method="dpmpp_2m", eta=0.5), "eta: not used"),
    (dict(method="lms", order=5), "order: expected an int in"),
    (dict(method="dpmpp_2m", order=3), "order: only used by method='lms'"),
    (dict(method="dpmpp_2m_sde", solver_type="rk4"), "solver_type: expected"),
    (dict(method="dpmpp_2m", solver_type="heun"), "solver_type: only used"),
    (dict(method="dpmpp_2m", churn=1.0), "churn: used by"),
    (dict(method="euler", order=3), "solver_type, order: only used by the multistep solvers"),
])
def test_bad_solver_options_name_the_argument(bad, match):
    method = bad.pop("method")
    with pytest.raises(ValueError, match=match):
        trajectory_table(fastdiff.KarrasSchedule(6), method, **bad)


# =========================================================================== affine_step
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7), (4, 1001)])
def test_affine_step_against_float64(backend, shape):
    if backend == "cpp" and not fastdiff.available()["cpp"][0]:
        pytest.skip("the C++ backend is not built")
    g = torch.Generator().manual_seed(sum(shape))
    ts = [torch.randn(shape, generator=g) for _ in range(4)]
    z = torch.randn(shape, generator=g)
    per = torch.rand(shape[0], generator=g, dtype=torch.float64)
    coefs = [0.3, -1.25, per, 2.0]
    out = torch.full(shape, float("nan"))  # poisoned
    res = fastdiff.affine_step(list(zip(ts, coefs)), 0.7, noise=z, out=out, backend=backend)
    assert res is out
    want = sum((c.reshape(-1, *[1] * (len(shape) - 1)) if isinstance(c, torch.Tensor) else c) * t.double()
               for t, c in zip(ts, coefs)) + 0.7 * z.double()
    _close(out, want, 1e-6, f"affine_step {shape}")


def test_affine_step_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="terms: expected a non-empty sequence"):
        fastdiff.affine_step([])
    with pytest.raises(TypeError, match=r"terms\[1\]: expected a \(tensor, coefficient\) pair"):
        fastdiff.affine_step([(x, 1.0), x])
    with pytest.raises(ValueError, match=r"terms\[1\]: expected shape"):
        fastdiff.affine_step([(x, 1.0), (torch.randn(3, 2), 1.0)])
    with pytest.raises(ValueError, match="at most 6 distinct tensors"):
        fastdiff.affine_step([(torch.randn(2, 3), 1.0) for _ in range(7)])
    with pytest.raises(ValueError, match="finite"):
        fastdiff.affine_step([(x, float("nan"))])


# =========================================================================== the flow path
@pytest.mark.parametrize("method", [m for m in FLOW_METHODS if m not in CONSISTENCY_METHODS])
def test_flow_path_converges_to_the_data(method):
    """Rectified-flow levels (alpha, sigma) = (1 - t, t), t from 1 to 0, x_1 ~ N(0, I): every solver of
    the flow path reaches N(0, diag(lam)) (the exact denoiser of that path; 30 steps, 120 for the SDEs)."""
    lam = torch.tensor([2.0, 1.0, 0.25, 0.04])
    # the SDE solvers' weak error is first order: 30 steps leave a ~7% bias in the smallest mode
    ts = torch.linspace(1.0, 0.0, 121 if method.endswith("_sde") else 31).tolist()
    x = fastdiff.sample(_gauss_model(lam), (4000, 4), ts, method, path="flow", generator=fastdiff.Generator(3),
                        progress=False)
    var = x.double().var(0)
    se = lam.double() * (2.0 / 4000) ** 0.5
    assert ((var - lam.double()).abs() <= 5 * se + 5e-3 * lam.double()).all(), (method, var)


def test_flowmatch_euler_matches_diffusers():
    """FlowMatch Euler (path="flow", method="euler") against diffusers' FlowMatchEulerDiscreteScheduler
    with a static shift, the model predicting the flow ``v = eps - x0``: the same trajectory to float32
    rounding (fastdiff's loop takes ``x0 = x - t v`` from the model and steps ``x + (t_next - t)(x - x0)/t``)."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(12)
    sig = sch.sigmas.double().tolist()
    model = lambda x, t: torch.tanh(x) * (1 - t) - 0.3 * x  # noqa: E731  (a smooth flow field)
    x = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(0))
    a = x.clone()
    for i, ts in enumerate(sch.timesteps):
        a = sch.step(model(a, sig[i]), ts, a).prev_sample
    den = lambda xc, alpha, sigma: xc - sigma * model(xc, sigma)  # noqa: E731
    b = run(den, x, trajectory_table(sig, "euler", path="flow"), progress=False)
    _close(b, a, 2e-6 * len(sig), "FlowMatch Euler")


@pytest.mark.parametrize("bad, match", [
    (dict(method="dpmpp_2s_ancestral", path="flow"), "method: expected one of"),
    (dict(method="euler", path="sde"), "path: expected one of"),
    (dict(method="ddim", path="flow"), "path: only used by"),
    (dict(method="heun", path="flow", churn=1.0), "churn: VE only"),
])
def test_flow_path_bad_options(bad, match):
    method = bad.pop("method")
    sched = fastdiff.DDPMSchedule() if method == "ddim" else [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match=match):
        trajectory_table(sched, method, **bad)


def test_flow_prediction_form_round_trips():
    """prediction="flow" on any path: x0 = (x - sigma flow)/(alpha + sigma), eps = (x + alpha flow)/(alpha + sigma)."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    for alpha, sigma in [(0.7, 0.3), (1.0, 2.5), (0.6, 0.8)]:
        x = alpha * x0 + sigma * eps
        (px, pm), (ex, em) = C.prediction_forms("flow", alpha, sigma)
        torch.testing.assert_close(px * x + pm * (eps - x0), x0)
        torch.testing.assert_close(ex * x + em * (eps - x0), eps)


@pytest.mark.parametrize("name", ["sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_sde_samplers_default_to_one_brownian_path(name):
    """Without a noise_sampler the SDE samplers take Brownian-tree noise seeded from the generator (as
    k-diffusion's default): 20 and 40 steps from one seed land close (the same path), two seeds do not."""
    def run_with(steps, seed):
        sig = fastdiff.KarrasSchedule(steps, sigma_min=0.002, sigma_max=80.0).sigmas.float()
        x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 80.0
        return getattr(fd_k, name)(_k_model, x, sig, disable=True, generator=fastdiff.Generator(seed))

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    a, b, c = run_with(20, 5), run_with(40, 5), run_with(40, 6)
    # (here about 0.8 (2M) and 0.5 (3M, its noise weighs more) against about 0.0 for two seeds)
    assert corr(a, b) > 0.4 and abs(corr(a, c)) < 0.15, (corr(a, b), corr(a, c))
    assert torch.equal(run_with(20, 5), a)  # reproducible

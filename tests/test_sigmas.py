"""fastdiff.sigmas against the originals (docs/math.md section 5).

- k-diffusion's ``get_sigmas_*`` run with torch's default dtype set to float64 compute the same
  formulas in float64: agreement to a few ulp (``rtol=4e-15``; ``vp`` 1e-11, since k-diffusion's
  ``exp(x) - 1`` loses ``eps/x ~ 1e-12`` relative at ``t = eps_s`` where ours uses ``expm1``).  Run in
  their default float32 they agree to float32 rounding.
- diffusers casts ``scheduler.sigmas`` to float32 at the end: agreement to float32 rounding
  (``rtol=2**-23``, i.e. one float32 ulp at most, ``atol=0``); the private conversions
  (``_convert_to_karras`` ...) and ``time_shift`` / ``stretch_shift_to_terminal`` compute in float64 on
  float64 input, and are compared at ``rtol=4e-15``.
- ComfyUI is not installed: its ``simple`` / ``normal`` / ``sgm_uniform`` / ``beta`` /
  ``linear_quadratic`` / ``kl_optimal`` schedulers are transcribed below (plain Python loops, as in
  ``comfy/samplers.py``) and compared in float64; plus the properties every schedule must have.
"""
import ast
import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import sigmas as S

NS = [1, 2, 7, 10, 25, 50]
ULP = 4e-15  # float64 formulas evaluated in a different order: a few ulp
F32 = 2.0**-23  # one float32 ulp (relative): the originals' final cast


def close(ours, ref, rtol, atol=0.0):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert ours.dtype == torch.float64 and ours.device.type == "cpu" and ours.ndim == 1
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)


def decreasing(s, final="zero"):
    """Strictly decreasing positive levels, then the final level."""
    body = s if final is None else s[:-1]
    assert bool((body > 0).all()) and bool((body[1:] < body[:-1]).all()), body
    if final == "zero":
        assert s[-1].item() == 0.0
    elif final == "last":
        assert s[-1].item() == s[-2].item()


# ------------------------------------------------------------------------------- k-diffusion

def _load_k_sampling():
    """``k_diffusion/sampling.py`` by file path (``import k_diffusion`` needs skimage etc.), with a
    stand-in for the one ``utils`` function it uses; None when k-diffusion is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        return None
    root = os.path.dirname(spec.origin)
    pkg = types.ModuleType("_kd_sigmas")
    pkg.__path__ = [root]
    utils = types.ModuleType("_kd_sigmas.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.update({"_kd_sigmas": pkg, "_kd_sigmas.utils": utils})
    try:
        fs = importlib.util.spec_from_file_location("_kd_sigmas.sampling", os.path.join(root, "sampling.py"))
        mod = importlib.util.module_from_spec(fs)
        fs.loader.exec_module(mod)
        return mod
    except Exception:  # noqa: BLE001 - its other imports (torchsde, torchdiffeq) may be missing
        return None
    finally:
        sys.modules.pop("_kd_sigmas", None)
        sys.modules.pop("_kd_sigmas.utils", None)


K = _load_k_sampling()
needs_k = pytest.mark.skipif(K is None, reason="k_diffusion/sampling.py not loadable")


def _k64(fn, *a, **kw):
    """A k-diffusion ``get_sigmas_*`` with torch's default dtype float64 (its linspace then is float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn(*a, **kw)
    finally:
        torch.set_default_dtype(old)


# (ours, k-diffusion's, args, rtol against it in float64, rtol against it in its own float32).
# float32 karras: the float32 ramp's error in the base smax^(1/rho) + r (smin^(1/rho) - smax^(1/rho)) is
# amplified by smax^(1/rho) / smin^(1/rho) (<= 4.5 here) and then by rho (the power): ~ 32 float32 ulp.
# float32 (poly)exponential: the exponent's absolute error ~ |log smax - log smin| ulp (~ 11): 16 ulp.
# vp in float32: exp(x) - 1 at x ~ 1e-4 (t = eps_s) keeps only ~ 2^-24 / x ~ 6e-4 of relative accuracy.
K_CASES = [
    (S.karras, "get_sigmas_karras", (0.002, 80.0), ULP, 32 * F32),
    (S.karras, "get_sigmas_karras", (0.0292, 14.6146, 3.0), ULP, 32 * F32),
    (S.exponential, "get_sigmas_exponential", (0.002, 80.0), ULP, 16 * F32),
    (S.polyexponential, "get_sigmas_polyexponential", (0.002, 80.0), ULP, 16 * F32),
    (S.polyexponential, "get_sigmas_polyexponential", (0.03, 14.6, 2.5), ULP, 16 * F32),
    (S.vp, "get_sigmas_vp", (), 1e-11, 1e-3),
    (S.vp, "get_sigmas_vp", (10.0, 0.5, 1e-2), 1e-11, 1e-4),
]


@needs_k
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("ours, name, args, rtol, rtol32", K_CASES)
def test_k_diffusion(ours, name, args, rtol, rtol32, n):
    fn = getattr(K, name)
    got = ours(n, *args)
    assert got.shape == (n + 1,)
    close(got, _k64(fn, n, *args), rtol)
    close(got, fn(n, *args), rtol32)  # k-diffusion's own float32: a few float32 ulp (pow, exp)
    decreasing(got)


@pytest.mark.parametrize("n", NS)
def test_karras_endpoints_and_class(n):
    s = S.karras(n, 0.002, 80.0)
    assert s[0].item() == pytest.approx(80.0, rel=1e-15)
    if n > 1:
        assert s[n - 1].item() == pytest.approx(0.002, rel=1e-13)
    torch.testing.assert_close(s, fastdiff.KarrasSchedule(n, 0.002, 80.0).sigmas, rtol=ULP, atol=0)


@pytest.mark.parametrize("n", NS)
def test_exponential_is_polyexponential_rho1_and_log_uniform(n):
    e, p = S.exponential(n, 0.01, 50.0), S.polyexponential(n, 0.01, 50.0, 1.0)
    torch.testing.assert_close(e, p, rtol=1e-14, atol=0)
    if n > 2:
        d = e[:-1].log().diff()
        torch.testing.assert_close(d, d[:1].expand_as(d), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------- kl_optimal

def comfy_kl_optimal(n, smin, smax):  # comfy/samplers.py kl_optimal_scheduler, in float64
    idx = [i / (n - 1) for i in range(n)]
    return [math.tan(t * math.atan(smin) + (1 - t) * math.atan(smax)) for t in idx] + [0.0]


@pytest.mark.parametrize("n", [2, 7, 10, 25, 50])
def test_kl_optimal(n):
    got = S.kl_optimal(n, 0.0292, 14.6146)
    close(got, comfy_kl_optimal(n, 0.0292, 14.6146), 1e-14)
    decreasing(got)
    assert got[0].item() == pytest.approx(14.6146, rel=1e-14) and got[-2].item() == pytest.approx(0.0292, rel=1e-13)
    # the defining property: uniform steps in atan(sigma)
    d = torch.atan(got[:-1]).diff()
    torch.testing.assert_close(d, d[:1].expand_as(d), rtol=1e-11, atol=0)
    assert S.kl_optimal(1, 0.1, 10.0).tolist() == pytest.approx([10.0, 0.0], rel=1e-15)  # ComfyUI: 0/0 = NaN here


# ------------------------------------------------------------------------------- VP tables

TABLES = {
    "scaled_linear": fastdiff.DDPMSchedule.scaled_linear(),
    "linear": fastdiff.DDPMSchedule.linear(),
    "seed001_T37": fastdiff.DDPMSchedule(T=37),
    "cosine": fastdiff.DDPMSchedule.cosine(),  # beta capped at 0.999: sigma_{T-1} ~ 2e4
}


def comfy_sigma(table, t):  # ModelSamplingDiscrete.sigma: log-linear interpolation at fractional t
    t = min(max(t, 0.0), len(table) - 1)
    lo, hi, w = math.floor(t), math.ceil(t), t - math.floor(t)
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def comfy_simple(table, steps):
    ss = len(table) / steps
    return [table[-(1 + int(x * ss))] for x in range(steps)] + [0.0]


def comfy_normal(table, steps, sgm=False):
    start, end = len(table) - 1, 0  # timestep(sigma_max), timestep(sigma_min): the table's ends
    ts = np.linspace(start, end, steps + 1)[:-1] if sgm else np.linspace(start, end, steps)
    return [comfy_sigma(table, float(t)) for t in ts] + [0.0]


def comfy_beta(table, steps, alpha=0.6, beta=0.6):
    import scipy.stats
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * (len(table) - 1))
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(table[int(t)])
        last = t
    return sigs + [0.0]


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("name", list(TABLES))
def test_comfy_table_schedules(name, n):
    sched = TABLES[name]
    table = sched.sigma_ve.tolist()
    T = len(table)
    for ours, ref in ((S.normal, comfy_normal), (S.sgm_uniform, lambda tb, k: comfy_normal(tb, k, sgm=True))):
        got = ours(sched, n)
        assert got.shape == (n + 1,)
        close(got, ref(table, n), 1e-13)
        decreasing(got)
        assert got[0].item() == pytest.approx(table[-1], rel=1e-15)
    if n <= T:
        got = S.simple(sched, n)
        close(got, comfy_simple(table, n), 0.0)  # table entries: exact
        decreasing(got)
        assert got[0].item() == table[-1]
    got = S.beta(sched, n)
    close(got, comfy_beta(table, n), 0.0)
    decreasing(got)
    assert got[0].item() == table[-1] and got.numel() <= n + 1
    if n == 50 and T == 1000:
        assert got.numel() == n + 1  # no repeats on a long table


def test_simple_normal_by_hand():
    tb = torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4], dtype=torch.float64)  # T = 7
    assert S.simple(tb, 3, final=None).tolist() == pytest.approx([6.4, 1.6, 0.4])  # T/n = 7/3: 6, 4, 2
    close(S.normal(tb, 4, final=None), [6.4, 6.4 / 2**2, 6.4 / 2**4, 0.1], 1e-14)  # t = 6, 4, 2, 0
    close(S.sgm_uniform(tb, 3, final=None), [6.4, 1.6, 0.4], 1e-14)  # t = 6, 4, 2 (0 dropped)
    close(S.sgm_uniform(tb, 4, final=None), [6.4, 6.4 / 2**1.5, 0.8, 0.8 / 2**1.5], 1e-14)  # t = 6, 4.5, 3, 1.5


# ------------------------------------------------------------------------------- diffusers

try:
    import diffusers
    DIFFUSERS_WHY = ""
except Exception as e:  # noqa: BLE001 - any import failure: skip the comparisons, say why
    diffusers, DIFFUSERS_WHY = None, f"diffusers not importable ({type(e).__name__}: {e})"
needs_diffusers = pytest.mark.skipif(diffusers is None, reason=DIFFUSERS_WHY)


def _dpm(flag, beta_schedule="scaled_linear", final="zero"):
    kw = dict(beta_schedule=beta_schedule, final_sigmas_type=final)
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    return diffusers.DPMSolverMultistepScheduler(**{flag: True}, **kw)


DIFF_CASES = [("use_karras_sigmas", S.diffusers_karras, "_convert_to_karras"),
              ("use_exponential_sigmas", S.diffusers_exponential, "_convert_to_exponential"),
              ("use_beta_sigmas", S.diffusers_beta, "_convert_to_beta")]


@needs_diffusers
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("flag, ours, conv", DIFF_CASES)
def test_diffusers_conversions(flag, ours, conv, beta_schedule, n):
    for final, ours_final in (("zero", "zero"), ("sigma_min", "last")):
        sch = _dpm(flag, beta_schedule, final)
        sch.set_timesteps(n)
        # diffusers' own (float32) table, as float64: the ends match it exactly, the levels to its float32 cast
        table = (((1 - sch.alphas_cumprod) / sch.alphas_cumprod) ** 0.5).double()
        got = ours(table, n, final=ours_final)
        if n == 1 and final == "sigma_min":
            # one level (sigma_max): diffusers appends sigma_0 all the same, "last" repeats sigma_max
            assert sch.sigmas[-1].item() == pytest.approx(table[0].item(), rel=F32)
            got = torch.cat([got[:-1], table[:1]])
        close(got, sch.sigmas, F32)
        decreasing(got, ours_final if n > 1 else "zero" if final == "zero" else None)
        if n > 1:
            assert got[0].item() == pytest.approx(table[-1].item(), rel=1e-14) and got[n - 1].item() == pytest.approx(table[0].item(), rel=1e-13)
        # the conversion itself, in float64 on float64 input
        ref = getattr(sch, conv)(in_sigmas=table.flip(0).numpy(), num_inference_steps=n)
        close(got[:-1], ref, ULP)
    # from fastdiff's own float64 tables: diffusers' float32 cumprod of T = 1000 factors is the only
    # difference, up to ~ T 2^-24 = 6e-5 relative in abar near t = T (seen: 8e-5 in sigma, "linear")
    ddpm = getattr(fastdiff.DDPMSchedule, beta_schedule)()
    close(ours(ddpm, n, final="zero")[:-1], sch.sigmas[:-1], 2e-4)


# ------------------------------------------------------------------------------- flow matching

def _fm(**kw):
    return diffusers.FlowMatchEulerDiscreteScheduler(**kw)


FLOW_CASES = [  # (scheduler config, set_timesteps mu, our kwargs)
    (dict(shift=1.0), None, dict(shift=1.0)),
    (dict(shift=3.0), None, dict(shift=3.0)),
    (dict(shift=3.0, shift_terminal=0.1), None, dict(shift=3.0, shift_terminal=0.1)),
    (dict(shift=1.0, num_train_timesteps=250), None, dict(num_train_timesteps=250)),
] + [(dict(use_dynamic_shifting=True), mu, dict(mu=mu)) for mu in (-0.5, 0.5, 1.15, 2.3)] + [
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), mu, dict(mu=mu, time_shift="linear")) for mu in (0.3, 3.0)
] + [(dict(use_dynamic_shifting=True, shift_terminal=0.02), 1.15, dict(mu=1.15, shift_terminal=0.02))]


@needs_diffusers
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("config, mu, kw", FLOW_CASES)
def test_flow_matches_diffusers(config, mu, kw, n):
    if "shift_terminal" in kw and n == 1:
        with pytest.raises(ValueError, match="shift_terminal"):
            S.flow(n, **kw)
        return
    sch = _fm(**config)
    sch.set_timesteps(n, mu=mu)
    got = S.flow(n, **kw)
    assert got.shape == (n + 1,)
    # diffusers' lowest level comes from a float32 __init__ table (1/N rounded): a few float32 ulp
    close(got, sch.sigmas, 4 * F32)
    decreasing(got)
    assert got[0].item() == pytest.approx(1.0, rel=1e-15) and bool((got <= 1).all())
    if "shift_terminal" in kw:
        assert got[-2].item() == pytest.approx(kw["shift_terminal"], rel=1e-13)


@needs_diffusers
def test_flow_shift_formulas_float64():
    t = np.linspace(1.0, 1e-3, 19)
    sch = _fm(use_dynamic_shifting=True)
    for mu in (-0.5, 0.8, 2.0):
        ours = S.flow(19, mu=mu, num_train_timesteps=1000, final=None)
        close(ours, sch.time_shift(mu, 1.0, t), ULP)
    lin = _fm(use_dynamic_shifting=True, time_shift_type="linear")
    close(S.flow(19, mu=0.7, time_shift="linear", final=None), lin.time_shift(0.7, 1.0, t), ULP)
    term = _fm(shift_terminal=0.05)
    close(S.flow(19, mu=0.8, shift_terminal=0.05, final=None), term.stretch_shift_to_terminal(sch.time_shift(0.8, 1.0, t)), ULP)
    # static: g(t) = s t / (1 + (s-1) t) at t from 1 to g(1/N)
    s, N = 3.0, 1000
    g = lambda u: s * u / (1 + (s - 1) * u)  # noqa: E731
    close(S.flow(19, s, final=None), g(np.linspace(N, g(1 / N) * N, 19) / N), ULP)
    # exponential time shift with mu is the static shift with s = e^mu, from 1/N
    close(S.flow(7, mu=math.log(3.0)), [g(u) for u in np.linspace(1, 1 / N, 7)] + [0.0], 1e-14)


def _calculate_shift():
    """diffusers' ``calculate_shift`` from pipeline_flux.py, by source (the module imports transformers)."""
    path = os.path.join(os.path.dirname(diffusers.__file__), "pipelines", "flux", "pipeline_flux.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
    ns = {}
    exec(compile(ast.Module([fn], []), path, "exec"), ns)
    return ns["calculate_shift"]


@needs_diffusers
def test_flow_mu():
    ref = _calculate_shift()
    for L in (1, 256, 1024, 4096, 6000):
        assert S.flow_mu(L) == ref(L)
        assert S.flow_mu(L, 128, 2048, 0.3, 1.5) == ref(L, 128, 2048, 0.3, 1.5)
    assert S.flow_mu(256) == pytest.approx(0.5) and S.flow_mu(4096) == pytest.approx(1.15)


# ------------------------------------------------------------------------------- linear_quadratic

def comfy_linear_quadratic(steps, sigma_max=1.0, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        q_steps = steps - linear_steps
        qc = diff / (linear_steps * q_steps**2)
        lc = threshold_noise / linear_steps - 2 * diff / (q_steps**2)
        const = qc * (linear_steps**2)
        quad = [qc * (i**2) + lc * i + const for i in range(linear_steps, steps)]
        sched = [1.0 - x for x in lin + quad + [1.0]]
    return [x * sigma_max for x in sched]


@pytest.mark.parametrize("n", NS)
def test_linear_quadratic(n):
    got = S.linear_quadratic(n)
    close(got, comfy_linear_quadratic(n), 1e-14, 1e-15)
    decreasing(got)
    close(S.linear_quadratic(n, 14.6, threshold_noise=0.05), comfy_linear_quadratic(n, 14.6, 0.05), 1e-14, 1e-14)
    if n > 2:
        L = n // 2
        got = S.linear_quadratic(n, linear_steps=L - 1)
        close(got, comfy_linear_quadratic(n, linear_steps=L - 1), 1e-14, 1e-15)
        lin = 1 - got[:L - 1]  # the linear part: equal steps of thr / L
        torch.testing.assert_close(lin.diff(), torch.full((L - 2,), 0.025 / (L - 1), dtype=torch.float64), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------- final, properties, errors

ALL = {
    "karras": lambda n, **k: S.karras(n, 0.002, 80.0, **k),
    "exponential": lambda n, **k: S.exponential(n, 0.002, 80.0, **k),
    "polyexponential": lambda n, **k: S.polyexponential(n, 0.002, 80.0, 2.0, **k),
    "vp": lambda n, **k: S.vp(n, **k),
    "kl_optimal": lambda n, **k: S.kl_optimal(n, 0.03, 14.6, **k),
    "simple": lambda n, **k: S.simple(TABLES["scaled_linear"], n, **k),
    "normal": lambda n, **k: S.normal(TABLES["scaled_linear"], n, **k),
    "sgm_uniform": lambda n, **k: S.sgm_uniform(TABLES["scaled_linear"], n, **k),
    "beta": lambda n, **k: S.beta(TABLES["scaled_linear"], n, **k),
    "diffusers_karras": lambda n, **k: S.diffusers_karras(TABLES["scaled_linear"], n, **k),
    "diffusers_exponential": lambda n, **k: S.diffusers_exponential(TABLES["scaled_linear"], n, **k),
    "diffusers_beta": lambda n, **k: S.diffusers_beta(TABLES["scaled_linear"], n, **k),
    "flow": lambda n, **k: S.flow(n, 3.0, **k),
    "linear_quadratic": lambda n, **k: S.linear_quadratic(n, **k),
}


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("name", list(ALL))
def test_final_and_properties(name, n):
    z, last, none = (ALL[name](n, final=f) for f in ("zero", "last", None))
    assert none.dtype == torch.float64 and none.device.type == "cpu" and none.ndim == 1
    k = none.numel()
    assert k == n or name == "beta" and 1 <= k <= n
    assert z.shape == last.shape == (k + 1,)
    assert torch.equal(z[:-1], none) and torch.equal(last[:-1], none)
    decreasing(z, "zero"), decreasing(last, "last"), decreasing(none, None)
    assert torch.equal(ALL[name](n), z)  # "zero" is the default


def test_final_last_is_diffusers_sigma_min():
    tb = TABLES["scaled_linear"]
    for f in (S.diffusers_karras, S.diffusers_exponential, S.diffusers_beta):
        assert f(tb, 10, final="last")[-1].item() == pytest.approx(tb.sigma_ve[0].item(), rel=1e-13)


BAD = [
    (lambda: S.karras(0, 0.1, 1.0), ValueError, "n: expected n >= 1"),
    (lambda: S.karras(2.0, 0.1, 1.0), TypeError, "n: expected an int"),
    (lambda: S.karras(True, 0.1, 1.0), TypeError, "n: expected an int"),
    (lambda: S.karras(5, 0.0, 1.0), ValueError, "sigma_min"),
    (lambda: S.karras(5, 2.0, 1.0), ValueError, "sigma_min: expected sigma_min < sigma_max"),
    (lambda: S.karras(5, 0.1, math.inf), ValueError, "sigma_max"),
    (lambda: S.karras(5, 0.1, "80"), TypeError, "sigma_max"),
    (lambda: S.karras(5, 0.1, 1.0, rho=0), ValueError, "rho"),
    (lambda: S.karras(5, 0.1, 1.0, final="min"), ValueError, "final: expected 'zero', 'last' or None"),
    (lambda: S.exponential(5, -1.0, 1.0), ValueError, "sigma_min"),
    (lambda: S.polyexponential(5, 0.1, 1.0, rho=-1), ValueError, "rho"),
    (lambda: S.vp(5, eps_s=1.0), ValueError, "eps_s"),
    (lambda: S.vp(5, beta_d=0), ValueError, "beta_d"),
    (lambda: S.vp(5, beta_min=-0.1), ValueError, "beta_min"),
    (lambda: S.kl_optimal(5, 1.0, 1.0), ValueError, "sigma_min"),
    (lambda: S.simple([0.1, 0.2], 3), ValueError, "n: expected n <= T = 2"),
    (lambda: S.simple([0.2, 0.1], 1), ValueError, "sigmas: expected levels strictly increasing"),
    (lambda: S.normal([0.0, 0.1], 1), ValueError, "sigmas: expected finite, positive"),
    (lambda: S.normal([0.1, math.nan], 1), ValueError, "sigmas: expected finite, positive"),
    (lambda: S.normal([[0.1, 0.2]], 1), ValueError, "sigmas: expected a 1-D table"),
    (lambda: S.normal([0.1], 1), ValueError, "sigmas: expected a 1-D table"),
    (lambda: S.normal(0.1, 1), TypeError, "sigmas: expected a DDPMSchedule"),
    (lambda: S.normal("abc", 1), TypeError, "sigmas: expected a DDPMSchedule"),
    (lambda: S.sgm_uniform(TABLES["linear"], -1), ValueError, "n: expected n >= 1"),
    (lambda: S.beta(TABLES["linear"], 5, alpha=0), ValueError, "alpha"),
    (lambda: S.diffusers_beta(TABLES["linear"], 5, beta=-1), ValueError, "beta"),
    (lambda: S.diffusers_karras(TABLES["linear"], 5, final="sigma_min"), ValueError, "final"),
    (lambda: S.flow(5, 0.0), ValueError, "shift"),
    (lambda: S.flow(5, 3.0, mu=1.0), ValueError, "shift: a static shift"),
    (lambda: S.flow(5, mu=math.nan), ValueError, "mu"),
    (lambda: S.flow(5, mu=-1.0, time_shift="linear"), ValueError, "mu"),
    (lambda: S.flow(5, mu=1.0, time_shift="log"), ValueError, "time_shift"),
    (lambda: S.flow(5, shift_terminal=1.0), ValueError, "shift_terminal"),
    (lambda: S.flow(5, shift_terminal=0.0), ValueError, "shift_terminal"),
    (lambda: S.flow(1, shift_terminal=0.1), ValueError, "shift_terminal: needs n >= 2"),
    (lambda: S.flow(5, num_train_timesteps=1), ValueError, "num_train_timesteps"),
    (lambda: S.flow(5, num_train_timesteps=100.0), TypeError, "num_train_timesteps: expected an int"),
    (lambda: S.flow(5, mu="1"), TypeError, "mu"),
    (lambda: S.flow(5, final="sigma_min"), ValueError, "final"),
    (lambda: S.flow_mu(0), ValueError, "image_seq_len"),
    (lambda: S.flow_mu(1024, 4096, 256), ValueError, "base_seq_len: expected base_seq_len < max_seq_len"),
    (lambda: S.flow_mu(1024, max_shift=None), TypeError, "max_shift"),
    (lambda: S.linear_quadratic(5, threshold_noise=1.0), ValueError, "threshold_noise"),
    (lambda: S.linear_quadratic(5, linear_steps=5), ValueError, "linear_steps: expected 1 <= linear_steps < n"),
    (lambda: S.linear_quadratic(5, linear_steps=2.0), TypeError, "linear_steps"),
    (lambda: S.linear_quadratic(5, sigma_max=0), ValueError, "sigma_max"),
    (lambda: S.linear_quadratic(3, threshold_noise=0.9, linear_steps=1), ValueError, "threshold_noise, linear_steps"),
    (lambda: S.linear_quadratic(6, threshold_noise=0.9, linear_steps=4), ValueError, "do not strictly decrease"),
]


@pytest.mark.parametrize("call, exc, msg", BAD)
def test_bad_arguments(call, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_beta_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import scipy.stats -> ImportError
    with pytest.raises(ImportError, match="need scipy"):
        S.diffusers_beta(TABLES["linear"], 5)
    with pytest.raises(ImportError, match="need scipy"):
        S.beta(TABLES["linear"], 5)
    assert S.karras(3, 0.1, 1.0).numel() == 4  # the rest does not need it


def test_exported():
    assert fastdiff.sigmas is S and "sigmas" in fastdiff.__all__
    assert all(callable(getattr(S, f)) for f in S.__all__ if f not in ("FINALS", "TIME_SHIFTS"))

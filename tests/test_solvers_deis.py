"""DEIS (log rho), iPNDM and iPNDM-v: the rows against direct float64 loops, the k-diffusion-style
samplers, diffusers' DEISMultistepScheduler over whole trajectories, the convergence orders, bad input."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy import integrate

from fastdiff import coefficients as C
from fastdiff import gaussian_exact as G
from fastdiff.adapters import k_diffusion as fd_k
from fastdiff.sampling import run
from fastdiff.solvers import level_of, solver_table

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_gaussian_exact import _karras, _spectrum  # noqa: E402
from adapter_checks import supports_never_raises  # noqa: E402  (tests/)

LAM = torch.tensor([2.0, 0.7, 0.1, 0.02, 1.3], dtype=torch.float64)


def _den(x, alpha, sigma):
    """The exact denoiser of N(0.3, diag(LAM)) (affine in x: a smooth, non-trivial model)."""
    lam = LAM.to(x.dtype)
    g = alpha * lam / (alpha * alpha * lam + sigma * sigma)
    return g * x + (1.0 - alpha * g) * 0.3


# ------------------------------------------------------------------ direct float64 loops (the papers' forms)
def _deis_direct(x, levels, order):
    """diffusers' DEIS written out: eps remembered, ``x_t = a_t (x/a_s + sum_j c_j eps_j)``, the c_j by
    quadrature of the Lagrange basis in log rho (independent of fastdiff's series), DDIM where p = 1."""
    rho = [s / a if a > 0 else math.inf for a, s in levels]
    eps = []
    for i in range(len(levels) - 1):
        (a, s), (an, sn) = levels[i], levels[i + 1]
        d = _den(x, a, s)
        eps.insert(0, (x - a * d) / s)
        p = 1
        while p < min(order, i + 1) and math.isfinite(rho[i - p]):
            p += 1
        if p == 1:
            x = sn / s * x + (an - sn * a / s) * d
            continue
        nodes = [math.log(rho[i - k]) for k in range(p)]
        cs = []
        for j in range(p):
            def basis(r, j=j):
                u = math.log(r)
                return math.prod((u - nodes[k]) / (nodes[j] - nodes[k]) for k in range(p) if k != j)
            val, _ = integrate.quad(basis, rho[i + 1], rho[i], epsabs=1e-14, epsrel=1e-13, limit=200)
            cs.append(-val)
        x = an * (x / a + sum(c * e for c, e in zip(cs, eps)))
    return x


def _ipndm_direct(x, sig, max_order, variable):
    """ComfyUI's ``sample_ipndm`` / ``sample_ipndm_v`` loop (its buffer, its expressions), in float64."""
    buf = []
    for i in range(len(sig) - 1):
        t, tn = sig[i], sig[i + 1]
        d = (x - _den(x, 1.0 - t if FLOW[0] else 1.0, t)) / t
        denoised = x - t * d
        order = min(max_order, i + 1)
        if tn == 0:
            x = denoised
        elif order == 1:
            x = x + (tn - t) * d
        elif not variable:
            w = {2: (3, -1, 0, 0, 2), 3: (23, -16, 5, 0, 12), 4: (55, -59, 37, -9, 24)}[order]
            x = x + (tn - t) * (w[0] * d + sum(w[k] * buf[-k] for k in range(1, order))) / w[4]
        else:
            c = C.ipndm_v(sig, i, order)   # checked against ComfyUI's literal expressions in test_ipndm_v_weights
            x = x + sum(cj * dj for cj, dj in zip(c, [d] + buf[::-1]))
        buf = (buf + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


FLOW = [False]


def test_ipndm_v_weights_are_comfyuis_expressions():
    """The p = 2..4 weights against ComfyUI's expressions as written there, on a random grid; the p = 4
    weights on equal steps are (57, -65, 43, -11)/24, not AB4's (55, -59, 37, -9)/24 (docs/math.md 1b)."""
    t = sorted(np.random.default_rng(0).uniform(0.1, 20, 8).tolist(), reverse=True)
    i = 5
    hn, h1, h2, h3 = t[i + 1] - t[i], t[i] - t[i - 1], t[i - 1] - t[i - 2], t[i - 2] - t[i - 3]
    temp1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    temp2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    want = [(2 + (hn / h1)) / 2 + temp1 + temp2,
            -(hn / h1) / 2 - (1 + h1 / h2) * temp1 - (1 + (h1 / h2) + (h1 * (h1 + h2) / (h2 * (h2 + h3)))) * temp2,
            temp1 * h1 / h2 + ((h1 / h2) + (h1 * (h1 + h2) / (h2 * (h2 + h3))) * (1 + h2 / h3)) * temp2,
            -temp2 * (h1 * (h1 + h2) / (h2 * (h2 + h3))) * h1 / h2]
    assert C.ipndm_v(t, i, 4) == pytest.approx([hn * w for w in want], rel=1e-13)
    assert C.ipndm_v(t, i, 2) == pytest.approx([hn * (2 + hn / h1) / 2, -hn * hn / h1 / 2], rel=1e-13)
    assert [24 * c for c in C.ipndm_v([9.0, 8.0, 7.0, 6.0, 5.0], 3, 4)] == pytest.approx([-57, 65, -43, 11])


@pytest.mark.parametrize("method,path,order", [("deis", "ve", 1), ("deis", "ve", 2), ("deis", "ve", 3),
                                               ("deis", "flow", 3), ("ipndm", "ve", 4), ("ipndm", "flow", 3),
                                               ("ipndm_v", "ve", 4), ("ipndm_v", "ve", 2)])
@pytest.mark.parametrize("shape", [(1, 5), (3, 5), (2, 7, 5)])
def test_rows_match_a_direct_float64_loop(method, path, order, shape):
    """The rows run by fastdiff.sampling.run in float64 equal the direct loops (1e-9 relative: float64
    rounding and quad's 1e-13), over 12 levels to 0 (VE Karras; flow from t = 1, where alpha = 0)."""
    sig = [float(s) for s in _karras(11, 0.03, 40.0)] + [0.0] if path == "ve" else \
        torch.linspace(1.0, 0.0, 13).double().tolist()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64) * sig[0]
    table = solver_table(method, sig, path=path, order=order)
    got = run(_den, x, table, progress=False)
    FLOW[0] = path == "flow"
    want = _deis_direct(x, [level_of(path, s) for s in sig], order) if method == "deis" else \
        _ipndm_direct(x, sig, order, method == "ipndm_v")
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-9, (method, path, order, err)


# ------------------------------------------------------------------ the k-diffusion-style samplers
@pytest.mark.parametrize("name,kw", [("sample_deis", {}), ("sample_deis", {"max_order": 2}), ("sample_ipndm", {}),
                                     ("sample_ipndm_v", {}), ("sample_ipndm_v", {"max_order": 3})])
def test_k_diffusion_style_samplers_match_the_direct_loop(name, kw):
    """float32 x and sigmas against the float64 direct loop: 20 Karras steps to 0, within float32
    rounding per step (2e-6 of the scale per step); the callback sees every step; the dtype is x's."""
    sig = torch.cat([torch.tensor(_karras(19, 0.03, 14.6), dtype=torch.float32), torch.zeros(1)])
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1)) * sig[0]
    model = lambda xc, s: _den(xc, 1.0, s[:1].reshape(1, 1, 1).to(xc.dtype))  # noqa: E731
    seen = []
    got = getattr(fd_k, name)(model, x, sig, disable=True, callback=seen.append, **kw)
    levels = sig.double().tolist()
    FLOW[0] = False
    order = kw.get("max_order", 3 if name == "sample_deis" else 4)
    want = _deis_direct(x.double(), [(1.0, s) for s in levels], order) if name == "sample_deis" else \
        _ipndm_direct(x.double(), levels, order, name == "sample_ipndm_v")
    assert got.dtype == torch.float32 and len(seen) == 20 and [c["i"] for c in seen] == list(range(20))
    err = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
    assert err <= 2e-6 * 20, (name, err)


# ------------------------------------------------------------------ diffusers' DEISMultistepScheduler
diffusers = pytest.importorskip("diffusers")
from fastdiff.adapters.diffusers_deis import DEISMultistepScheduler  # noqa: E402


def _model(x, t):
    return torch.tanh(x) * 0.5 + 1e-4 * float(t) * x.flip(-1)


def _trajectory(cls, config, steps, x, promote=False):
    sch = cls(**config)
    sch.set_timesteps(steps)
    if promote:  # diffusers' own float64 run: its coefficients and arithmetic in float64
        sch.sigmas = sch.sigmas.double()
    out = []
    for t in sch.timesteps:
        x = sch.step(_model(x, t), t, x).prev_sample
        out.append(x)
    return out


DEIS_CONFIGS = [
    (dict(), (10, 25)),
    (dict(solver_order=1, timestep_spacing="trailing"), (10, 25)),
    (dict(solver_order=3, prediction_type="v_prediction", use_karras_sigmas=True), (10, 25)),
    (dict(solver_order=3, prediction_type="sample", use_exponential_sigmas=True, lower_order_final=False), (10, 25)),
    (dict(solver_order=3, use_beta_sigmas=True, timestep_spacing="leading", steps_offset=1), (10, 50)),
    (dict(solver_order=3, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), (10, 25)),
]


@pytest.mark.parametrize("config,steps", DEIS_CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default"
                                                            for c, _ in DEIS_CONFIGS])
def test_deis_scheduler_matches_diffusers(config, steps):
    """Whole trajectories against diffusers' own with the same model.  Tolerance per step k: float32
    rounding, 2e-6 (k + 1) of the trajectory's scale, or 3x diffusers' own float32-vs-float64 gap so far,
    whichever is larger: diffusers evaluates its log-rho antiderivative in float32, which cancels on short
    steps (beta sigmas) and near alpha = 0 (flow sigmas at t ~ 1), fastdiff's series form does not."""
    sch = DEISMultistepScheduler(**config)
    sch.set_timesteps(steps[0])
    assert sch.fastdiff_supports(torch.zeros(1), sch.timesteps[0], torch.zeros(1))
    for n in steps:
        x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(n))
        want = _trajectory(diffusers.DEISMultistepScheduler, config, n, x)
        exact = _trajectory(diffusers.DEISMultistepScheduler, config, n, x.double(), promote=True)
        got = _trajectory(DEISMultistepScheduler, config, n, x)
        scale = max(1.0, max(w.abs().max().item() for w in want))
        gap = 0.0
        for k, (p, q, e) in enumerate(zip(got, want, exact)):
            assert p.dtype == q.dtype
            gap = max(gap, (q.double() - e).abs().max().item())
            err = (p - q).abs().max().item()
            assert err <= max(2e-6 * (k + 1) * scale, 3 * gap), f"{n} steps, step {k}: {err:.3g} (gap {gap:.3g})"


def test_deis_scheduler_fallbacks_and_supports():
    """thresholding runs diffusers' step (bit-identical); fastdiff_supports never raises."""
    config = dict(thresholding=True, solver_order=3)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for p, q in zip(_trajectory(DEISMultistepScheduler, config, 8, x), _trajectory(diffusers.DEISMultistepScheduler,
                                                                                    config, 8, x)):
        assert torch.equal(p, q)
    sch = supports_never_raises(DEISMultistepScheduler)
    assert sch.fastdiff_supports(torch.zeros(2), sch.timesteps[0], torch.zeros(2)) is True


# ------------------------------------------------------------------ convergence orders
def _ode_error(method, sig, order):
    lam, mu = _spectrum()
    tab = solver_table(method, sig, order=order)
    start, end = G.table_levels(tab)
    v0 = start[1] ** 2
    m, v = G.gaussian_sampler_law(lam, tab, mean=mu, init_mean=0.0, init_var=v0)
    return G.w2(m, v, *G.exact_flow_law(lam, start, end, mean=mu, init_mean=0.0, init_var=v0))


# (method, order, grid, Ns, the order that holds).  Measured slopes (Karras rho = 7 to sigma_min = 0.002,
# N = 256 .. 1024): DEIS-p p (1.00, 2.01, 2.98); iPNDM(4) 2.00 (its equal-step weights on unequal steps are
# consistent only to O(h^3) locally); iPNDM-v(3) 2.9; iPNDM-v(4) 1.9 on Karras levels (its weights do not sum
# to the step where the step ratio changes, an O(h^3) local error) and 2.9 on geometric levels (constant ratio).
ORDERS = [("deis", 1, "karras", (256, 512, 1024), 1), ("deis", 2, "karras", (256, 512, 1024), 2),
          ("deis", 3, "karras", (256, 512, 1024), 3), ("ipndm", 4, "karras", (256, 512, 1024), 2),
          ("ipndm_v", 3, "karras", (256, 512, 1024), 3), ("ipndm_v", 4, "karras", (512, 1024, 2048), 2),
          ("ipndm_v", 4, "geometric", (256, 512, 1024), 3)]


@pytest.mark.parametrize("method,order,grid,Ns,want", ORDERS, ids=[f"{m}{o}-{g}" for m, o, g, _, _ in ORDERS])
def test_convergence_order(method, order, grid, Ns, want):
    """The fitted log-log slope of the exact Gaussian ODE error (fastdiff.gaussian_exact; as
    tests/test_gaussian_exact.py test_convergence_order) is the order theory gives, within 0.15."""
    err = [_ode_error(method, _karras(N) if grid == "karras" else np.geomspace(80.0, 0.002, N + 1).tolist(), order)
           for N in Ns]
    slope = -np.polyfit(np.log(Ns), np.log(err), 1)[0]
    assert abs(slope - want) < 0.15, (method, order, grid, err, slope)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method,kw,match", [
    ("deis", {"order": 4}, r"order: expected an int in \[1, 3\] \(deis\)"),
    ("ipndm", {"order": 0}, r"order: expected an int in \[1, 4\] \(ipndm\)"),
    ("ipndm_v", {"order": 2.0}, "order: expected an int"),
    ("dpmpp_2m", {"order": 2}, "order: only used by method='lms', 'deis'"),
    ("deis", {"eta": 0.5}, "eta: not used"),
])
def test_bad_options(method, kw, match):
    with pytest.raises(ValueError, match=match):
        solver_table(method, [10.0, 1.0, 0.0], **kw)


def test_bad_input():
    x, sig = torch.zeros(2, 3), torch.tensor([10.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"max_order: expected an int in \[1, 3\]"):
        fd_k.sample_deis(lambda x, s: x, x, sig, max_order=4)
    with pytest.raises(ValueError, match=r"max_order: expected an int in \[1, 4\]"):
        fd_k.sample_ipndm_v(lambda x, s: x, x, sig, max_order=0)
    with pytest.raises(ValueError, match="rhos: DEIS needs finite rho > 0"):
        C.deis([math.inf, 2.0, 1.0], 1, 2)
    with pytest.raises(ValueError, match="rhos: DEIS needs distinct nodes"):
        C.deis([2.0, 2.0, 1.0], 1, 2)

"""UniPC rows (fastdiff.solvers, method="unipc"): against a float64 implementation that keeps the corrected
state x_{i-1} as the paper and diffusers do, through the exact Gaussian analysis (the loop's affine map and
the convergence orders), and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import coefficients as C
from fastdiff import gaussian_exact as G
from fastdiff.sampling import run, trajectory_table
from fastdiff.solvers import level_of, solver_table
from test_gaussian_exact import _data, _karras, _spectrum


# ------------------------------------------------------------------ a direct float64 implementation
def _lam(level):
    return math.log(level[0] / level[1]) if level[1] > 0 else math.inf


def _update(levels, i, x, ms, p, variant, m_next=None):
    """One UniP-p (``m_next`` None) or UniC-p update from level i to i+1 on x, written out as diffusers'
    ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update`` (data prediction): the phi's by the
    recursion, ``rho`` by torch.linalg.solve, the corrector from the explicit x."""
    (a, s), (an, sn) = levels[i], levels[i + 1]
    h = _lam(levels[i + 1]) - _lam(levels[i])
    m0 = ms[i]
    rks = [(_lam(levels[i - k]) - _lam(levels[i])) / h for k in range(1, p)]
    D1 = [(ms[i - k] - m0) / r for k, r in zip(range(1, p), rks)]
    hh = -h
    hphi1 = math.expm1(hh)
    g, fact = hphi1 / hh - 1, 1
    B = hh if variant == "bh1" else math.expm1(hh)
    R, b = [], []
    for j in range(1, p + 1):
        R.append([r ** (j - 1) for r in rks + [1.0]])
        b.append(g * fact / B)
        fact *= j + 1
        g = g / hh - 1 / fact
    R, b = torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    base = sn / s * x - an * hphi1 * m0
    if m_next is None:
        if p == 1:
            return base
        rho = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return base - an * B * sum(c * d for c, d in zip(rho, D1))
    rho = [0.5] if p == 1 else torch.linalg.solve(R, b).tolist()
    return base - an * B * (sum(c * d for c, d in zip(rho[:-1], D1)) + rho[-1] * (m_next - m0))


def unipc_direct(den, x, levels, order=2, variant="bh2", corrector=True, disable=(), lower_order_final=True):
    """UniPC as diffusers' step runs it: m_i at the predicted x~_i, UniC to x_i from the kept x_{i-1}, UniP."""
    n = len(levels) - 1
    ms, last, last_order = [], None, None
    for i in range(n):
        m = den(x, *levels[i])
        if corrector and i > 0 and i - 1 not in disable:
            x = _update(levels, i - 1, last, ms, last_order, variant, m_next=m)
        ms.append(m)
        p = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        last, last_order = x, p
        x = _update(levels, i, x, ms, p, variant)
    return x


def _den(x, a, s):  # smooth and nonlinear, mixing coordinates
    return torch.tanh(x) * a / (a * a + s * s) + 0.1 * x.flip(-1) * s / (1.0 + s)


VE = [14.6, 6.0, 2.5, 1.0, 0.4, 0.15, 0.05, 0.0]
CASES = [  # (path, levels, options, shape): every option and both ends (sigma = 0 / sigma_min) at least once
    ("ve", VE, dict(), (1,)),
    ("ve", VE, dict(order=3, variant="bh1"), (2, 3, 4, 5)),
    ("ve", VE[:-1] + [0.03], dict(order=3, lower_order_final=False), (3, 7)),
    ("ve", VE, dict(order=1, variant="bh1", disable_corrector=(0, 3)), (2, 3, 4, 5)),
    ("ve", VE, dict(order=3, corrector=False), (5,)),
    ("flow", [0.99, 0.85, 0.7, 0.5, 0.3, 0.15, 0.05, 0.0], dict(order=3), (2, 3, 4, 5)),
    ("flow", [0.97, 0.8, 0.6, 0.4, 0.2, 0.01], dict(order=2, variant="bh1", lower_order_final=False), (3, 7)),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_rows_match_the_direct_float64_implementation(case):
    """fastdiff.sampling.run over the rows (the corrector folded into the next row: x_i = x~_i + sum e_j m_j)
    against the direct recursion with x_{i-1} kept: the same numbers in float64, up to rounding
    (1e-12 of the scale: a few ulps per step, the phi's differ in summation order)."""
    path, sig, kw, shape = CASES[case]
    lev = [level_of(path, s) for s in sig]
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case)) * sig[0]
    got = run(_den, x, solver_table("unipc", sig, path=path, **kw), progress=False)
    want = unipc_direct(_den, x, lev, kw.get("order", 2), kw.get("variant", "bh2"), kw.get("corrector", True),
                        kw.get("disable_corrector", ()), kw.get("lower_order_final", True))
    assert got.dtype == torch.float64 and got.shape == shape
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
    assert err <= 1e-12, err
    # and the corrector changes the result (the comparison can tell it apart)
    if kw.get("corrector", True):
        off = run(_den, x, solver_table("unipc", sig, path=path, **dict(kw, corrector=False)), progress=False)
        assert (off - want).abs().max() > 1e-4 * want.abs().max()


def test_row_structure_orders_and_the_ends():
    """Warm-up and lower_order_final orders as diffusers' (min(order, i + 1, n - i)), the corrector flags,
    the last step to sigma = 0 first order (x = D), and out of the flow path's t = 1 (alpha = 0, lambda = -inf)
    the first step is DDIM's limit x_1 = t_1 x + (1 - t_1) D and its output uncorrected, the history never
    reaching back to it."""
    tab = solver_table("unipc", VE, order=3, disable_corrector=(2,))
    assert [st.call[2]["order"] for st in tab] == [1, 2, 3, 3, 3, 2, 1]
    assert [st.call[2]["corrected"] for st in tab] == [False, True, True, False, True, True, True]
    assert tab[-1].cx == 0.0 and tab[-1].cm == 1.0 and tab[0].push == (0.0, 1.0)
    assert max(len(st.hist) for st in tab) == 3
    flow = solver_table("unipc", [1.0, 0.8, 0.5, 0.2, 0.0], path="flow", order=3)
    assert [st.call[2]["order"] for st in flow] == [1, 1, 2, 1]
    assert [st.call[2]["corrected"] for st in flow] == [False, False, True, True]
    assert flow[0].cx == pytest.approx(0.8) and flow[0].cm == pytest.approx(0.2) and flow[0].hist == ()
    assert all(math.isfinite(c) for st in flow for c in (st.cx, st.cm) + st.hist)


@pytest.mark.parametrize("path,sig,kw", [
    ("ve", [30.0, 9.0, 3.0, 1.2, 0.5, 0.2, 0.08, 0.0], dict(order=3)),
    ("ve", [30.0, 9.0, 3.0, 1.2, 0.5, 0.2, 0.08, 0.03], dict(order=2, variant="bh1", lower_order_final=False)),
    ("flow", [1.0, 0.8, 0.55, 0.3, 0.12, 0.0], dict(order=3)),
])
@pytest.mark.parametrize("n", [1, 5])
def test_gaussian_law_is_the_loops_affine_map(path, sig, kw, n):
    """gaussian_exact.gaussian_sampler_law on UniPC rows (history of 3, the corrector folded in) against the
    loop in float64 with the exact Gaussian denoiser: the output is A x_T + b, read off on x_T = 0 and the
    basis vectors, and the analysis must agree to 1e-9 (as test_gaussian_exact's affine-map test)."""
    lam, mu, V, _ = _data(n, 20 + n)

    def g(x, a, s):  # the exact denoiser, also at alpha = 0 (flow t = 1: D = E x0), in the eigenbasis
        y = x @ V
        return (V @ mu + ((a * lam / (a * a * lam + s * s)) * (y - a * mu)) @ V.T).expand_as(x)
    table = solver_table("unipc", sig, path=path, **kw)
    xs = torch.cat([torch.zeros(1, n, dtype=torch.float64), V.T])
    out = run(g, xs, table, progress=False) @ V
    b, A = out[0], out[1:] - out[0]
    m0, v0 = 0.4, 1.7
    m, v = G.gaussian_sampler_law(lam, table, mean=mu, init_mean=m0, init_var=v0)
    torch.testing.assert_close(m, b + m0 * A.sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(v, v0 * (A * A).sum(0), rtol=1e-9, atol=1e-12)


# (options, the order that holds).  UniC raises UniP-p's order p to p + 1; lower_order_final=False so the
# last steps keep the order (with it, UniPC-3's last two steps (orders 1, 2; the final state uncorrected)
# bring it to 3 at N ~ 512).  Where rho is solved (not the fixed 1/2) B(h) cancels: bh1 = bh2 at p = 3.
ORDERS = [
    (dict(order=1), 2), (dict(order=1, corrector=False), 1), (dict(order=2, variant="bh1"), 3),
    (dict(order=2, corrector=False), 2), (dict(order=3), 4), (dict(order=3, variant="bh1", corrector=False), 3),
]


@pytest.mark.parametrize("kw,order", ORDERS, ids=[str(kw) for kw, _ in ORDERS])
def test_convergence_order(kw, order):
    """The log-log slope of the exact W2 discretisation error (test_gaussian_exact's measure: Karras levels
    to sigma_min = 0.002, power-law spectrum) over N = 128 .. 512 (asymptotic there: the local slopes
    move by < 0.05 from 64 to 1024) is the order, within 0.15."""
    lam, mu = _spectrum()
    Ns = [128, 256, 512]
    err = []
    for N in Ns:
        tab = solver_table("unipc", _karras(N), lower_order_final=False, **kw)
        start, end = G.table_levels(tab)
        m, v = G.gaussian_sampler_law(lam, tab, mean=mu, init_mean=0.0, init_var=start[1] ** 2)
        mr, vr = G.exact_flow_law(lam, start, end, mean=mu, init_mean=0.0, init_var=start[1] ** 2)
        err.append(G.w2(m, v, mr, vr))
    slope = -np.polyfit(np.log(Ns), np.log(err), 1)[0]
    assert abs(slope - order) < 0.15, (kw, err, slope)


def test_phi_series_and_recursion_agree():
    """phi_k by the series (|z| < 1) and the recursion (else) meet at |z| = 1 to rounding; phi_1(z) = expm1(z)/z."""
    for k in (1, 2, 3, 4):
        for z in (-1.0, 1.0):
            lo, hi = C.phi(k, z * (1 - 1e-12)), C.phi(k, z)
            assert lo == pytest.approx(hi, rel=1e-9), (k, z)
    assert C.phi(1, -0.3) == pytest.approx(math.expm1(-0.3) / -0.3, rel=1e-15)
    assert C.phi(3, -1e-8) == pytest.approx(1 / 6, rel=1e-8)


def test_sample_runs_unipc():
    """fastdiff.sample / trajectory_table take method="unipc" (its defaults: order 2, bh2, corrector) and order."""
    sched = [10.0, 3.0, 1.0, 0.3, 0.0]
    assert trajectory_table(sched, "unipc") == solver_table("unipc", sched)
    assert trajectory_table(sched, "unipc", order=3) == solver_table("unipc", sched, order=3, variant="bh2")
    assert trajectory_table(sched, "lms") == solver_table("lms", sched, order=4)


@pytest.mark.parametrize("bad, err, match", [
    (dict(order=4), ValueError, r"order: expected an int in \[1, 3\] \(unipc\)"),
    (dict(order=0), ValueError, r"order: expected an int in \[1, 3\]"),
    (dict(variant="bh3"), ValueError, "variant: expected one of"),
    (dict(corrector="yes"), TypeError, "corrector: expected True or False"),
    (dict(disable_corrector=[0.5]), TypeError, "disable_corrector: expected a sequence of step indices"),
    (dict(disable_corrector="01"), TypeError, "disable_corrector: expected a sequence of step indices"),
    (dict(lower_order_final=1), TypeError, "lower_order_final: expected True or False"),
    (dict(eta=0.5), ValueError, "eta: not used"),
    (dict(method="dpmpp_2m", variant="bh1"), ValueError, "variant, corrector, disable_corrector, lower_order_final: only"),
    (dict(method="dpmpp_2m", corrector=False), ValueError, "only used by method='unipc'"),
    (dict(method="dpmpp_2m", order=2), ValueError, "order: only used by method='lms'"),
])
def test_bad_options_name_the_argument(bad, err, match):
    method = bad.pop("method", "unipc")
    with pytest.raises(err, match=match):
        solver_table(method, [5.0, 1.0, 0.2, 0.0], **bad)


def test_coefficients_bad_input():
    with pytest.raises(ValueError, match="variant: expected one of"):
        C.unipc((1.0, 2.0), (1.0, 1.0), variant="midpoint")
    with pytest.raises(ValueError, match="earlier: UniP to sigma = 0 or from alpha = 0"):
        C.unipc((1.0, 2.0), (1.0, 0.0), [(1.0, 4.0)])

"""The excess entropy and the collapse time (fastdiff/sweeps/collapse.py, docs/math.md section 4c):
the Monte Carlo estimators against a dense float64 formula on the same draws, their limits, the
high-dimensional Gaussian predictions of Biroli et al. (2024) at moderate d and N (t_C and the
excess-entropy curve above it), t_C decreasing with N and increasing with d, and bad input."""
import math

import pytest
import torch

import fastdiff
from fastdiff.data import ImageSet
from fastdiff.sweeps.collapse import (COLLAPSE_THRESHOLD, collapse_time, crossing_time, excess_entropy,
                                      gaussian_collapse_time, gaussian_excess_entropy, ou_levels)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small GEMMs on a shared machine: one thread (as the sweep runs its cells), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gaussian(N, d, var, seed):
    return torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * var ** 0.5


def _dense_reference(Y, times, samples, seed):
    """s^e, f^e from the formula: the same draws, log p = LSE_i(-||x - a y_i||^2 / 2 s^2) - log N - (d/2) log 2 pi s^2."""
    N, d = Y.shape
    g = torch.Generator().manual_seed(seed)
    mu = torch.cat([torch.arange(N).repeat(samples // N), torch.randperm(N, generator=g)[: samples % N]])
    z = fastdiff.randn(samples, d, generator=fastdiff.Generator(seed), dtype=torch.float64)
    ent, exc = [], []
    for t in times:
        a, s = math.exp(-t), math.sqrt(1 - math.exp(-2 * t))
        x = a * Y[mu] + s * z
        sq = ((x[:, None, :] - a * Y[None]) ** 2).sum(-1)                        # (M, N)
        logp = torch.logsumexp(-sq / (2 * s * s), 1) - math.log(N) - 0.5 * d * math.log(2 * math.pi * s * s)
        ent.append(float((-logp / d).mean()))
        # the conditional entropy of the true index: -log w_mu(x)
        logw = -sq[torch.arange(samples), mu] / (2 * s * s) - torch.logsumexp(-sq / (2 * s * s), 1)
        exc.append(float((-logw / d).mean()))
    return torch.tensor(ent, dtype=torch.float64), torch.tensor(exc, dtype=torch.float64)


@pytest.mark.parametrize("N,d,samples", [(2, 1, 9), (7, 3, 50), (33, 10, 64), (5, 17, 5)])
def test_estimators_match_the_dense_formula(N, d, samples):
    Y = _gaussian(N, d, 2.0, N * 100 + d) + 0.5
    times = [0.01, 0.3, 1.0, 4.0]
    ee = excess_entropy(Y, times, samples=samples, seed=N + d)
    ent, exc = _dense_reference(Y, times, samples, N + d)
    # float64 throughout; the scan centres the data and re-ranks, so agreement is to rounding of O(d) terms
    torch.testing.assert_close(ee.entropy, ent, rtol=0, atol=1e-9)
    torch.testing.assert_close(ee.excess, exc, rtol=0, atol=1e-9)
    assert ee.alpha == math.log(N) / d
    s = ou_levels(torch.tensor(times))[1]
    torch.testing.assert_close(ee.separated, math.log(N) / d + 0.5 * torch.log(2 * math.pi * math.e * s * s))
    assert bool((ee.excess >= -1e-12).all()) and bool((ee.entropy_se > 0).all())


def test_image_set_and_float32_data_are_their_float64_rows():
    g = torch.Generator().manual_seed(3)
    imgs = ImageSet(torch.randint(0, 256, (12, 1, 3, 3), generator=g, dtype=torch.uint8))
    a = excess_entropy(imgs, [0.1, 1.0], samples=24, seed=5)
    b = excess_entropy(imgs.float(dtype=torch.float64, flatten=True), [0.1, 1.0], samples=24, seed=5)
    c = excess_entropy(imgs.float(flatten=True), [0.1, 1.0], samples=24, seed=5)   # float32 rows: rounded once
    torch.testing.assert_close(a.excess, b.excess, rtol=0, atol=0)
    torch.testing.assert_close(a.excess, c.excess, rtol=0, atol=1e-5)


def test_limits_small_and_large_t():
    # small t: x_t identifies its point (f^e = 0, s^e = s^sep); large t: no information (f^e = alpha_N)
    Y = _gaussian(200, 8, 1.0, 0)
    ee = excess_entropy(Y, [1e-4, 12.0], samples=400, seed=1)
    assert 0 <= float(ee.excess[0]) < 1e-12
    # the plain estimator carries the chi-square noise of ||z||^2 / 2 (the control variate removes it)
    assert abs(float(ee.entropy[0] - ee.separated[0])) < 4 * float(ee.entropy_se[0])
    assert abs(float(ee.excess[1]) / ee.alpha - 1) < 1e-6       # e^-24 signal: the posterior is uniform


@pytest.mark.parametrize("d,N,var,tol", [(16, 2000, 9.0, 0.10), (32, 1000, 4.0, 0.05), (64, 500, 1.0, 0.05)])
def test_gaussian_collapse_time_at_moderate_d(d, N, var, tol):
    # measured at 2048 samples and 57 grid points: t_C / theory = 1.059, 1.034, 1.005 (the finite-d
    # crossing of 0.2 alpha converges to the d -> infinity t_C; 0.1 and 0.3 bracket it from below and above)
    Y = _gaussian(N, d, var, d * N)
    tc = gaussian_collapse_time(N, d, var)
    t = collapse_time(Y, torch.linspace(0.5 * tc, 2 * tc, 25, dtype=torch.float64), samples=1024, seed=2)
    assert abs(t / tc - 1) < tol, (t, tc)


def test_collapse_time_decreases_with_N_and_grows_with_d():
    var = 9.0
    ts = []
    for N in (100, 400, 1600):                                # theory 1.266, 1.102, 0.969 at d = 16
        tc = gaussian_collapse_time(N, 16, var)
        ts.append(collapse_time(_gaussian(N, 16, var, N), torch.linspace(0.8, 1.6, 17, dtype=torch.float64),
                                samples=512, seed=3))
        assert abs(ts[-1] / tc - 1) < 0.10, (N, ts[-1], tc)
    assert ts[0] > ts[1] > ts[2]
    by_d = [collapse_time(_gaussian(1000, d, 4.0, d), torch.linspace(0.1, 1.6, 16, dtype=torch.float64),
                          samples=256, seed=4) for d in (8, 16, 32)]
    assert by_d[0] < by_d[1] < by_d[2]                      # theory 0.312, 0.683, 1.065 (measured 0.355, 0.740, 1.098)


def test_excess_entropy_above_collapse_follows_the_population():
    # above t_C the empirical entropy is the population's (BBdBM): f^e -> max(0, s^sep - s), here with an
    # anisotropic covariance (eigenvalues 0.5 .. 8) for the general formula
    d, N = 32, 2000
    lam = torch.logspace(math.log10(0.5), math.log10(8.0), d, dtype=torch.float64)
    Y = _gaussian(N, d, 1.0, 7) * lam.sqrt()
    t = torch.linspace(0.1, 4.0, 21, dtype=torch.float64)
    theory = gaussian_excess_entropy(t, N, lam)
    tc = crossing_time(t, theory + 1e-12 * t, 1e-9)                 # where the limit leaves 0
    ee = excess_entropy(Y, t, samples=512, seed=8)
    above = t > 1.5 * tc
    assert int(above.sum()) > 5
    gap = (ee.excess[above] - theory[above]) / ee.alpha
    assert float(gap.abs().max()) < 0.03, gap                       # measured 0.016
    # the entropies themselves: s^e = s (the population's, exact for a Gaussian) above, s^e = s^sep well below
    a, s = ou_levels(t)
    pop = 0.5 * torch.log(2 * math.pi * math.e * (s[:, None] ** 2 + a[:, None] ** 2 * lam)).mean(1)
    assert bool(((ee.entropy[above] - pop[above]).abs() < 0.03 * ee.alpha + 4 * ee.entropy_se[above]).all())
    below = t < 0.3 * tc
    assert int(below.sum()) >= 1
    assert bool(((ee.entropy[below] - ee.separated[below]).abs() < 4 * ee.entropy_se[below]).all())


def test_gaussian_formulas_agree():
    # the closed form t(eps) is where the limiting curve crosses eps alpha_N
    for N, d, var in ((100, 4, 1.0), (5000, 50, 3.0)):
        t = torch.linspace(1e-3, 6, 20001, dtype=torch.float64)
        f = gaussian_excess_entropy(t, N, torch.full((d,), var)) / (math.log(N) / d)
        for eps in (0.1, 0.2, 0.5):
            assert abs(crossing_time(t, f, eps) - gaussian_collapse_time(N, d, var, threshold=eps)) < 1e-3
    # t_C = (1/2) log(1 + var / (N^(2/d) - 1)) by hand
    assert gaussian_collapse_time(1000, 16, 9.0) == pytest.approx(0.5 * math.log(1 + 9 / (1000 ** (2 / 16) - 1)), rel=1e-14)
    assert COLLAPSE_THRESHOLD == 0.2


def test_crossing_time_interpolates():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert crossing_time(t, torch.tensor([0.0, 0.1, 0.5, 0.9]), 0.3) == pytest.approx(2.5)
    assert crossing_time(t, torch.tensor([0.0, 0.1, 0.5, 0.2]), 0.5) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="never reaches"):
        crossing_time(t, torch.zeros(4), 0.2)
    with pytest.raises(ValueError, match="already exceeds"):
        crossing_time(t, torch.ones(4), 0.2)
    with pytest.raises(ValueError, match="times, values"):
        crossing_time(t, torch.ones(3), 0.2)


@pytest.mark.parametrize("call,match", [
    (lambda: excess_entropy(torch.zeros(5), [0.1, 1]), "data: expected a floating"),
    (lambda: excess_entropy(torch.zeros(1, 3), [0.1, 1]), "data: expected N >= 2"),
    (lambda: excess_entropy(torch.full((3, 2), float("nan")), [0.1, 1]), "data: expected finite"),
    (lambda: excess_entropy(torch.zeros(4, 2, dtype=torch.int64), [0.1, 1]), "data: expected a floating"),
    (lambda: excess_entropy(torch.randn(4, 2), [1.0, 0.5]), "times: expected at least 2 increasing"),
    (lambda: excess_entropy(torch.randn(4, 2), [0.0, 0.5]), "times: expected"),
    (lambda: excess_entropy(torch.randn(4, 2), [0.1, 0.5], samples=1), "samples: expected an int >= 2"),
    (lambda: collapse_time(torch.randn(4, 2), threshold=1.0), "threshold: expected a fraction"),
    (lambda: collapse_time(torch.randn(50, 2), [5.0, 6.0], samples=8), "already exceeds"),
    (lambda: gaussian_collapse_time(1, 4, 1.0), "N: expected an int >= 2"),
    (lambda: gaussian_collapse_time(10, 0, 1.0), "d: expected a positive int"),
    (lambda: gaussian_collapse_time(10, 4, -1.0), "variance: expected"),
    (lambda: gaussian_collapse_time(10, 4, 1.0, threshold=1.0), "threshold: expected"),
    (lambda: gaussian_excess_entropy([0.1, 1.0], 10, [1.0, -2.0]), "eigenvalues: expected"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()

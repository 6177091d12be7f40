"""Conditional sampling (fastdiff.guidance): DPS and the exact Gaussian posterior (seed 004 Alg. 7.1,
Fig. 7.11) and classifier-free guidance through the MoLRG labels.

For Gaussian data and a linear measurement every update of both samplers is affine in x, so the
distribution each *algorithm* produces is Gaussian and is computed here exactly, in float64, by
pushing the mean and covariance through the recursion (closed-form Jacobians, no autograd, no
fused kernels).  That gives two separate checks:

- implementation: Monte Carlo samples of ``posterior_sample`` must match the algorithm's own
  predicted distribution (moments within a few standard errors, two-sample KS tests) -- this is
  where an error in the autograd gradient, the step coefficients or the noise would show;
- approximation: the predicted DPS distribution against the true posterior measures DPS's bias
  (the numbers are in ``test_dps_bias_is_the_known_one``), so the tolerances on DPS-vs-posterior
  comparisons are the measured bias, not a loose guess.
"""
import math

import pytest
import torch
from scipy import stats

import fastdiff
from fastdiff import guidance as G
from fastdiff.coefficients import timesteps
from fastdiff.denoisers import Gaussian, MoLRG

MU = torch.zeros(2, dtype=torch.float64)
SIGMA = torch.diag(torch.tensor([1.0, 0.25], dtype=torch.float64))   # seed 004 Fig. 7.11
A = torch.tensor([[1.0, 0.0]], dtype=torch.float64)                  # A = e_1^T
Y = torch.tensor([0.8], dtype=torch.float64)
N = 20000


def _schedule(kind, steps):
    """(schedule, steps argument, per-level alphas, sigmas, initial variance) of the loop G runs."""
    if kind == "vp":
        s = fastdiff.DDPMSchedule.linear()
        ts = timesteps(s.T, steps)  # the DDIM timesteps of fastdiff.sample (test_timesteps.py)
        return s, steps, [s.floats("alpha")[t] for t in ts] + [1.0], [s.floats("sigma")[t] for t in ts] + [0.0], 1.0
    if kind == "karras":
        s = fastdiff.KarrasSchedule(steps, sigma_max=80.0)
        sig = s.floats("sigmas")
    else:  # "fig": seed 004 Fig. 7.11 exactly: VE, sigma_t = t, t_l = l/L, T = 1, x_T ~ N(0, I)
        s = torch.linspace(1.0, 0.0, steps + 1)
        sig = s.double().tolist()
    return s, None, [1.0] * len(sig), sig, sig[0] ** 2


def _posterior(sy):
    SAt = SIGMA @ A.T
    gram = A @ SAt + sy * sy * torch.eye(1, dtype=torch.float64)
    return MU + SAt @ torch.linalg.solve(gram, Y - A @ MU), SIGMA - SAt @ torch.linalg.solve(gram, SAt.T)


def _predicted(sy, kind, steps, method):
    """Exact mean and covariance of the samples the algorithm produces (deterministic DDIM, eta = 0)."""
    _, _, al, sg, v0 = _schedule(kind, steps)
    I = torch.eye(2, dtype=torch.float64)
    mu, S = (MU, SIGMA) if method == "dps" else _posterior(sy)
    m, C = torch.zeros(2, dtype=torch.float64), v0 * I
    for a, s, ap, sp in zip(al[:-1], sg[:-1], al[1:], sg[1:]):
        Gt = a * S @ torch.linalg.inv(a * a * S + s * s * I)   # x0_hat = Gt x + (mu - a Gt mu)
        P, q = Gt, mu - a * Gt @ mu
        if method == "dps":   # x0_c = x0_hat - k Gt^T A^T (A x0_hat - y),  k = s^2 / (a sy^2)
            K = (s * s / (a * sy * sy)) * Gt.T @ A.T @ A
            P, q = P - K @ P, q - K @ q + (s * s / (a * sy * sy)) * Gt.T @ A.T @ Y
        w = ap - sp / s * a
        M = sp / s * I + w * P
        m, C = M @ m + w * q, M @ C @ M.T
    return m, C


def _run(sy, kind, steps, method, seed=1, n=N):
    sched, st, *_ = _schedule(kind, steps)
    return G.posterior_sample(Gaussian(MU, SIGMA), Y.float(), A.float(), sy, sched, num_samples=n, steps=st,
                              method=method, generator=fastdiff.Generator(seed), disable=True).double()


def _assert_moments(x, mean, cov, k=5.0):
    """Sample mean and covariance within k standard errors of (mean, cov) (Gaussian sampling errors:
    SE(mean_i) = sqrt(C_ii/n), SE(C_ij) = sqrt((C_ii C_jj + C_ij^2)/n)), plus float32 rounding."""
    n = x.shape[0]
    d = torch.diag(cov)
    se_m = (d / n).sqrt() + 1e-5
    assert ((x.mean(0) - mean).abs() <= k * se_m).all(), f"mean {x.mean(0).tolist()} vs {mean.tolist()} (SE {se_m.tolist()})"
    emp = torch.cov(x.T)
    se_c = ((d[:, None] * d[None, :] + cov ** 2) / n).sqrt() + 1e-7
    assert ((emp - cov).abs() <= k * se_c).all(), f"cov {emp.tolist()} vs {cov.tolist()} (SE {se_c.tolist()})"


def _ks_against_gaussian(x, mean, cov, seed=7):
    """Two-sample KS tests, per coordinate and along the diagonal, against draws from N(mean, cov)."""
    gen = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(cov + 1e-12 * torch.eye(2, dtype=torch.float64))
    ref = mean + torch.randn(x.shape[0], 2, generator=gen, dtype=torch.float64) @ L.T
    for v in (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.6, 0.8])):
        p = stats.ks_2samp((x @ v.double()).numpy(), (ref @ v.double()).numpy()).pvalue
        assert p > 1e-3, f"two-sample KS along {v.tolist()}: p = {p:.2e}"


# --------------------------------------------------------------------------- implementation
@pytest.mark.parametrize("kind", ["vp", "karras", "fig"])
@pytest.mark.parametrize("sy", [0.5, 0.1])
@pytest.mark.parametrize("method", ["dps", "exact"])
def test_samples_follow_the_algorithms_exact_distribution(kind, sy, method):
    steps = 100  # Fig. 7.11's L = 100
    x = _run(sy, kind, steps, method)
    mean, cov = _predicted(sy, kind, steps, method)
    _assert_moments(x, mean, cov)
    if cov[0, 0] > 1e-6:   # DPS at sy = 0.1 collapses e_1 to a point (variance ~1e-9): moments only
        _ks_against_gaussian(x, mean, cov)


def test_exact_method_samples_the_posterior():
    """With enough steps and sigma_max >> data scale, the exact conditional denoiser's sampler
    reproduces p(x | y) (eq. 7.3.15): two-sample test against direct draws from gaussian_posterior."""
    post = G.gaussian_posterior(Gaussian(MU, SIGMA), A, Y, 0.5)
    mean, cov = _posterior(0.5)
    assert torch.allclose(post.mean, mean) and torch.allclose(post.cov, cov)
    # discretization bias of 1000 DDIM steps (from the recursion): well below the MC error at N
    pm, pc = _predicted(0.5, "vp", 1000, "exact")
    assert (pm - mean).abs().max() < 2e-3 and (pc - cov).abs().max() < 2e-3
    x = _run(0.5, "vp", 1000, "exact", n=10000)
    _assert_moments(x, mean, cov)
    direct = post.sample(10000, generator=3)
    for j in range(2):
        p = stats.ks_2samp(x[:, j].numpy(), direct[:, j].numpy()).pvalue
        assert p > 1e-3, f"coordinate {j}: two-sample KS p = {p:.2e}"


# --------------------------------------------------------------------------- approximation
def test_dps_bias_is_the_known_one():
    """DPS's bias (seed 004 Example 7.4): it replaces Sigma_{y|x_t} = s_y^2 + t^2 lam/(lam + t^2) by
    s_y^2, overweighting the measurement while t is not small.  Measured here (Fig. 7.11 setting,
    sigma_max = 80, 100 Karras steps; posterior e_1 variance in brackets):

        s_y = 2.0: mean 0.182 (0.160), var 0.738 (0.800)   small bias
        s_y = 0.5: mean 1.015 (0.640), var 0.015 (0.200)   overshoot, variance collapse
        s_y = 0.1: mean 0.807 (0.792), var ~0   (0.0099)   total collapse along A (Fig. 7.11 bottom)

    and e_2 (not measured) is untouched.  The sampled moments must show exactly this."""
    for sy, (mean_lo, mean_hi), (vr_lo, vr_hi) in ((2.0, (0.17, 0.195), (0.88, 0.96)),
                                                   (0.5, (0.98, 1.05), (0.05, 0.1)),
                                                   (0.1, (0.79, 0.82), (0.0, 0.01))):
        pm, pc = _predicted(sy, "karras", 100, "dps")
        post_m, post_c = _posterior(sy)
        x = _run(sy, "karras", 100, "dps", n=10000)
        # the measured bias is the predicted one (within MC error) ...
        _assert_moments(x, pm, pc)
        # ... and it has the documented size
        assert mean_lo <= x[:, 0].mean().item() <= mean_hi, (sy, x[:, 0].mean().item())
        ratio = x[:, 0].var().item() / post_c[0, 0].item()
        assert vr_lo <= ratio <= vr_hi, (sy, ratio)
        # e_2 is unaffected: DPS and exact have the same unconditional marginal there
        xe = _run(sy, "karras", 100, "exact", n=10000)
        assert abs(x[:, 1].var().item() - xe[:, 1].var().item()) < 1e-4


def test_dps_with_weak_measurement_is_close_to_the_posterior():
    """Two-sample test DPS vs the exact posterior where the approximation is good (s_y = 2, measured
    bias 0.02 in the mean, -8% in the e_1 variance): at N = 2000 that bias is below what the test
    resolves (SE of the mean 0.02), at N = 20000 it is resolved -- the test shows both, so it is
    not merely too weak to ever fail."""
    post = G.gaussian_posterior(Gaussian(MU, SIGMA), A, Y, 2.0)
    small = _run(2.0, "karras", 100, "dps", n=2000)
    direct = post.sample(2000, generator=5)
    assert stats.ks_2samp(small[:, 0].numpy(), direct[:, 0].numpy()).pvalue > 1e-3
    big = _run(2.0, "karras", 100, "dps", n=40000)
    direct = post.sample(40000, generator=5)
    t = (big[:, 0].var() / direct[:, 0].var()).item()
    assert t < 0.96, f"the e_1 variance deficit of DPS (predicted 0.92) should be resolved, got ratio {t:.3f}"


# --------------------------------------------------------------------------- MoLRG
def test_dps_through_molrg_equals_gaussian_for_one_component():
    """A one-component MoLRG is the Gaussian N(0, tau^2 U U^T): DPS through molrg_denoise's autograd
    (fused forward and backward) must give the same samples as through gaussian_denoise."""
    gen = torch.Generator().manual_seed(0)
    n, d, m = 7, 3, 2
    U = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0]
    tau = 1.3
    mol = MoLRG(U[None].float(), tau=tau)
    gauss = Gaussian(torch.zeros(n), tau * tau * U @ U.T)
    # unit-scale measurement rows and s_y = 0.5: the DPS gain ~ tau^2 |A|^2 / s_y^2 stays O(1) (a
    # larger one makes DPS itself diverge, for any denoiser -- the step size needs tuning then)
    Am = torch.randn(m, n, generator=gen) / math.sqrt(n)
    y = torch.randn(m, generator=gen)
    x_T = fastdiff.randn(500, n, generator=fastdiff.Generator(2))
    sched = fastdiff.DDPMSchedule.linear()
    outs = [G.posterior_sample(den, y, Am, 0.5, sched, x=x_T, steps=50, disable=True) for den in (mol, gauss)]
    assert torch.isfinite(outs[0]).all() and outs[1].abs().max() < 10
    # float32 (eigen-form Gaussian vs projection-form MoLRG) through 50 steps: 1e-4 of the sample scale
    err = (outs[0] - outs[1]).abs().max().item()
    assert err <= 1e-4 * outs[1].abs().max().item(), err
    # and the samples are consistent with the measurement (a check the test is not vacuous)
    assert (outs[0] @ Am.T - y).norm(dim=1).mean() < (x_T @ Am.T - y).norm(dim=1).mean()


def test_dps_per_sample_measurements_and_callable_forward_model():
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(3, 6, 2, generator=gen))[0]
    mol = MoLRG(U)
    Am = torch.randn(2, 6, generator=gen) / math.sqrt(6)   # an O(1) DPS gain (see above)
    y = torch.randn(8, 2, generator=gen)
    x_T = fastdiff.randn(8, 6, generator=fastdiff.Generator(4))
    sched = fastdiff.KarrasSchedule(30)
    by_matrix = G.posterior_sample(mol, y, Am, 0.5, sched, x=x_T, disable=True)
    by_callable = G.posterior_sample(mol, y, lambda v: v @ Am.T, 0.5, sched, x=x_T, disable=True)
    assert torch.equal(by_matrix, by_callable)
    # each sample's measurement is its own: sample i from y_i alone must equal row i
    one = G.posterior_sample(mol, y[3], Am, 0.5, sched, x=x_T[3:4], disable=True)
    assert by_matrix.abs().max() < 10
    # float32 (a batch of 1 vs 8 may take other GEMM paths): 1e-5 of the scale per step, 30 steps
    assert (one[0] - by_matrix[3]).abs().max() <= 3e-4 * by_matrix[3].abs().max()
    assert not torch.allclose(by_matrix[2], by_matrix[3])


def test_cfg_component_frequencies_follow_the_label():
    """CFG through MoLRG labels (seed 004 eq. 7.4.20): with w = 0 the components follow pi (chi-square),
    as w grows the labelled component takes over, and from w = 1 on every sample is in it."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(3, 8, 2, generator=gen))[0]
    pi = torch.tensor([0.5, 0.3, 0.2])
    mol = MoLRG(U, pi=pi)
    sched = fastdiff.DDPMSchedule.linear()
    B = 4000
    freq = []
    for w in (0.0, 0.25, 0.5, 1.0, 2.0):
        x = G.cfg_sample(mol, 2, w, sched, num_samples=B, steps=100, generator=fastdiff.Generator(3), disable=True)
        comp = torch.einsum("bn,knd->bkd", x, U).square().sum(-1).argmax(1)
        counts = torch.bincount(comp, minlength=3)
        if w == 0.0:
            p = stats.chisquare(counts.numpy(), (pi * B).numpy()).pvalue
            assert p > 1e-3, f"w = 0: component counts {counts.tolist()} vs pi (chi-square p = {p:.2e})"
        freq.append(counts[2].item() / B)
    assert all(b > a for a, b in zip(freq[:3], freq[1:4])), f"labelled-component frequency not increasing in w: {freq}"
    assert freq[3] == 1.0 and freq[4] == 1.0, freq


def test_cfg_per_sample_labels():
    gen = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(4, 10, 3, generator=gen))[0]
    mol = MoLRG(U)
    labels = torch.randint(0, 4, (600,), generator=gen)
    x = G.cfg_sample(mol, labels, 1.0, fastdiff.KarrasSchedule(40), num_samples=600, eta=1.0,
                     generator=fastdiff.Generator(9), disable=True)
    comp = torch.einsum("bn,knd->bkd", x, U).square().sum(-1).argmax(1)
    assert torch.equal(comp, labels)


@pytest.mark.parametrize("kind,eta", [("vp", 0.0), ("vp", 0.7), ("karras", 0.0), ("karras", 0.7), ("tensor", 0.5)])
def test_cfg_and_sample_run_the_same_table(kind, eta):
    """cfg_sample is fastdiff.sample's loop (fastdiff.sampling.run) over the same trajectory_table:
    ddim on a DDPMSchedule, euler (eta = 0) or euler_ancestral on VE levels; same seed, same bits."""
    gen = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(3, 8, 2, generator=gen))[0]
    mol = MoLRG(U, pi=torch.tensor([0.5, 0.3, 0.2]))
    sched = {"vp": fastdiff.DDPMSchedule.linear(), "karras": fastdiff.KarrasSchedule(12),
             "tensor": torch.linspace(2.0, 0.0, 9)}[kind]
    if kind == "vp":
        method, kw = "ddim", dict(steps=15, eta=eta)
    else:
        method, kw = ("euler", {}) if eta == 0.0 else ("euler_ancestral", dict(eta=eta))
    table = fastdiff.sampling.trajectory_table(sched, method, **kw)
    labels = torch.arange(40) % 3
    x_T = fastdiff.randn(40, 8, generator=fastdiff.Generator(6)) * (1.0 if kind == "vp" else table[0].level[1])
    steps = []
    a = G.cfg_sample(mol, labels, 1.5, sched, x=x_T, steps=kw.get("steps"), eta=eta, generator=fastdiff.Generator(3),
                     disable=True, callback=lambda info: steps.append(info.step))
    b = fastdiff.sample(mol, x_T, sched, method, labels=labels, guidance=1.5, generator=fastdiff.Generator(3),
                        fused=False, progress=False, **kw)
    assert torch.equal(a, b)
    assert [(s.level, s.cx, s.cm, s.cz) for s in steps] == [(s.level, s.cx, s.cm, s.cz) for s in table]


def test_same_seed_same_samples():
    sched = fastdiff.DDPMSchedule.linear()
    kw = dict(num_samples=64, steps=20, eta=0.7, disable=True)
    a = G.posterior_sample(Gaussian(MU, SIGMA), Y, A, 0.5, sched, generator=fastdiff.Generator(11), **kw)
    b = G.posterior_sample(Gaussian(MU, SIGMA), Y, A, 0.5, sched, generator=fastdiff.Generator(11), **kw)
    c = G.posterior_sample(Gaussian(MU, SIGMA), Y, A, 0.5, sched, generator=fastdiff.Generator(12), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_numpy_in_numpy_out():
    import numpy as np

    sched = fastdiff.KarrasSchedule(10)
    x_T = fastdiff.randn(16, 2, generator=fastdiff.Generator(1)) * 80.0
    ref = G.posterior_sample(Gaussian(MU, SIGMA), Y.float(), A.float(), 0.5, sched, x=x_T.clone(), disable=True)
    out = G.posterior_sample(Gaussian(MU, SIGMA), Y.numpy(), A.numpy(), 0.5, sched, x=x_T.numpy().copy(), disable=True)
    assert isinstance(out, np.ndarray) and np.array_equal(out, ref.numpy())
    post = G.gaussian_posterior(Gaussian(MU, SIGMA), A.numpy(), Y.numpy(), 0.5)
    assert torch.allclose(post.mean, _posterior(0.5)[0])


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    prior = Gaussian(MU, SIGMA)
    sched = fastdiff.DDPMSchedule.linear()
    ok = dict(num_samples=4, disable=True)
    with pytest.raises(ValueError, match="noise_std"):
        G.posterior_sample(prior, Y, A, 0.0, sched, **ok)
    with pytest.raises(ValueError, match="method"):
        G.posterior_sample(prior, Y, A, 0.5, sched, method="pigdm", **ok)
    with pytest.raises(ValueError, match="y: expected shape"):
        G.posterior_sample(prior, torch.zeros(3), A, 0.5, sched, **ok)
    with pytest.raises(ValueError, match="A: expected a"):
        G.posterior_sample(prior, Y, torch.zeros(3), 0.5, sched, **ok)
    with pytest.raises(TypeError, match="A: expected"):
        G.posterior_sample(prior, Y, "A", 0.5, sched, **ok)
    with pytest.raises(ValueError, match="steps"):
        G.posterior_sample(prior, Y, A, 0.5, sched, steps=0, **ok)
    with pytest.raises(ValueError, match="steps"):
        G.posterior_sample(prior, Y, A, 0.5, fastdiff.KarrasSchedule(5), steps=3, **ok)
    with pytest.raises(TypeError, match="schedule"):
        G.posterior_sample(prior, Y, A, 0.5, "linear", **ok)
    with pytest.raises(ValueError, match="schedule"):
        G.posterior_sample(prior, Y, A, 0.5, torch.tensor([1.0, 2.0, 0.0]), **ok)
    with pytest.raises(ValueError, match="num_samples"):
        G.posterior_sample(prior, Y, A, 0.5, sched, disable=True)
    with pytest.raises(ValueError, match="eta"):
        G.posterior_sample(prior, Y, A, 0.5, sched, eta=-1.0, **ok)
    with pytest.raises(TypeError, match="generator"):
        G.posterior_sample(prior, Y, A, 0.5, sched, generator=torch.Generator(), **ok)
    with pytest.raises(TypeError, match="method='exact'"):
        G.posterior_sample(MoLRG(torch.eye(2)[None, :, :1]), Y, A, 0.5, sched, method="exact", **ok)
    with pytest.raises(ValueError, match="y: expected one measurement or 4"):
        G.posterior_sample(prior, torch.zeros(3, 1), A, 0.5, sched, **ok)
    with pytest.raises(TypeError, match="prior"):
        G.gaussian_posterior("N(0,1)", A, Y, 0.5)
    with pytest.raises(ValueError, match="y: expected one measurement"):
        G.gaussian_posterior(prior, A, torch.zeros(2, 1), 0.5)

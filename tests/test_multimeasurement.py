"""Multi-measurement posterior means, the SMS / JMS scores and samplers, and stochastic localization
(seed 003, "Multimeasurement generative models" onwards; docs/math.md §8a-8b)."""
import math

import pytest
import torch

import fastdiff
from fastdiff import multimeasurement as MM
from fastdiff.denoisers import Empirical, Gaussian, GaussianMixture, MoLRG, mixture_components


# =========================================================================== float64 references
def _stack_ref(pi, mu, covs, y, sigma):
    """E[X | y_1..y_m] and log p(y_1..y_m) of a Gaussian mixture from the stacked (m n)-dim Gaussian of
    all measurements: vec(y) | k ~ N(1 (x) mu_k, J (x) Sigma_k + sigma^2 I), E[X | y, k] =
    mu_k + (1^T (x) Sigma_k) C_k^{-1} (vec y - 1 (x) mu_k)  (no mean of the y's used)."""
    B, m, n = y.shape
    v = y.reshape(B, m * n)
    ones = torch.ones(m, 1, dtype=torch.float64)
    logits, means = [], []
    for k in range(len(pi)):
        Ck = torch.kron(ones @ ones.T, covs[k]) + sigma ** 2 * torch.eye(m * n, dtype=torch.float64)
        r = v - torch.kron(ones, mu[k][:, None]).reshape(-1)
        dist = torch.distributions.MultivariateNormal(torch.zeros(m * n, dtype=torch.float64), Ck)
        logits.append(torch.log(pi[k]) + dist.log_prob(r))
        cross = torch.kron(ones.T, covs[k])                                  # Cov(X, vec y | k): (n, m n)
        means.append(mu[k] + torch.linalg.solve(Ck, r.T).T @ cross.T)
    L = torch.stack(logits, 1)
    w = torch.softmax(L, 1)
    return (w[:, :, None] * torch.stack(means, 1)).sum(1), torch.logsumexp(L, 1)


def _molrg(n, dims, seed, delta=0.0):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q for d in dims]
    K = len(dims)
    pi = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    tau = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
    return MoLRG(bases, pi=pi, tau=tau, delta=delta)


def _models(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    gauss = Gaussian(torch.randn(n, generator=g, dtype=torch.float64), M @ M.T / n + 0.1 * torch.eye(n, dtype=torch.float64))
    covs = torch.stack([(lambda A: A @ A.T / n + 0.2 * torch.eye(n, dtype=torch.float64))(torch.randn(n, n, generator=g,
                        dtype=torch.float64)) for _ in range(3)])
    gm = GaussianMixture(2 * torch.randn(3, n, generator=g, dtype=torch.float64), covs, pi=[0.2, 0.5, 0.3])
    return {"gaussian": gauss, "molrg": _molrg(n, [2, 1] if n > 2 else [1, 1], seed, delta=0.2), "mixture": gm}


@pytest.mark.parametrize("n,m,B", [(1, 1, 1), (3, 4, 5), (5, 2, 7), (4, 7, 2)])
@pytest.mark.parametrize("kind", ["gaussian", "molrg", "mixture"])
def test_posterior_mean_matches_stacked_reference(n, m, B, kind):
    den = _models(n, seed=10 * n + m)[kind]
    pi, mu, covs = mixture_components(den)
    sigma = 0.7
    y = torch.randn(B, m, n, dtype=torch.float64) * 1.5
    ref, _ = _stack_ref(pi, mu, covs, y, sigma)
    torch.testing.assert_close(MM.posterior_mean(den, y, sigma), ref, rtol=1e-9, atol=1e-9)
    got32 = MM.posterior_mean(den, y.float(), sigma)                        # float32 compute
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 3])
def test_posterior_mean_empirical(m):
    data = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randn(6, m, 4, dtype=torch.float64)
    sigma = 0.8
    # brute force: weights over training points from every measurement's likelihood
    d2 = ((y[:, :, None, :] - data[None, None]) ** 2).sum(-1).sum(1)         # (B, N) summed over m
    ref = torch.softmax(-d2 / (2 * sigma ** 2), 1) @ data
    torch.testing.assert_close(MM.posterior_mean(Empirical(data), y, sigma), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_scores_are_gradients_of_the_joint_log_density(m):
    den = _models(3, seed=m)["mixture"]
    pi, mu, covs = mixture_components(den)
    sigma = 0.9
    y = torch.randn(4, m, 3, dtype=torch.float64, requires_grad=True)
    _, logp = _stack_ref(pi, mu, covs, y, sigma)
    (grad,) = torch.autograd.grad(logp.sum(), y)
    torch.testing.assert_close(MM.jms_score(den, y.detach(), sigma), grad, rtol=1e-8, atol=1e-8)
    # SMS: grad_{y_i} log p(y_i | y_<i) = grad_{y_i} log p(y_1..y_i) (the rest does not depend on y_i)
    yd = y.detach()
    torch.testing.assert_close(MM.sms_score(den, yd[:, -1], yd[:, :-1], sigma), grad[:, -1], rtol=1e-8, atol=1e-8)


# =========================================================================== the talk's example
# two Gaussians N(+-3 (1, .., 1), tau^2 I) (mean gap 6 (1, ..., 1)), weights 0.3 / 0.7
D, TAU, SIG, M = 2, 1.0, 4.0, 16


def _two_gaussians():
    return GaussianMixture(torch.stack([torch.full((D,), -3.0), torch.full((D,), 3.0)]), TAU ** 2, pi=[0.3, 0.7])


def _reference_law(gm, m=M, N=100_000):
    """Exact draws of what SMS / JMS target: E[X | y_1..y_m] = D(X + (sigma/sqrt m) N; sigma/sqrt m)."""
    se = SIG / math.sqrt(m)
    X = gm.sample(N, generator=123)
    return gm(X + se * torch.randn(N, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64), 1.0, se)


def _check_law(x, ref):
    side, rside = x.sum(1) > 0, ref.sum(1) > 0
    p = rside.double().mean().item()
    n1 = int(side.sum())
    N = x.shape[0]
    chi2 = (n1 - N * p) ** 2 / (N * p) + ((N - n1) - N * (1 - p)) ** 2 / (N * (1 - p))
    assert chi2 < 10.8, f"component frequency {n1 / N:.3f} vs {p:.3f} (chi2 = {chi2:.1f}, 1 dof, p = 0.001)"
    for s in (True, False):
        a, b = x[side == s].double(), ref[rside == s]
        se_mean = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
        assert ((a.mean(0) - b.mean(0)).abs() < 4.5 * se_mean).all(), (s, a.mean(0), b.mean(0))
        ca, cb = torch.cov(a.T), torch.cov(b.T)
        # the standard error of a covariance entry: sqrt((s_ii s_jj + s_ij^2) / N) per sample set
        se_cov = ((cb.diag()[:, None] * cb.diag()[None] + cb ** 2) * (1 / a.shape[0] + 1 / b.shape[0])).sqrt()
        assert ((ca - cb).abs() < 4.5 * se_cov).all(), (s, ca, cb)


def test_jms_two_gaussians_converges_to_the_mixture():
    """m = 4 here: JMS mixes over the modes as one measurement at sigma / sqrt(m) does
    (test_jms_mean_chain_is_single_measurement_langevin), and at sigma/sqrt(m) = 2 that takes a few
    hundred steps; at m = 16 (sigma/sqrt(m) = 1) over a thousand."""
    gm, m = _two_gaussians(), 4
    x = fastdiff.sample(gm, (1500, D), SIG, "jms", measurements=m, steps=600, step_size=0.1 * SIG ** 2,
                        generator=fastdiff.Generator(2), disable=True)
    assert x.shape == (1500, D)
    _check_law(x, _reference_law(gm, m))


def test_sms_two_gaussians_converges_to_the_mixture():
    gm, m = _two_gaussians(), 8
    x = fastdiff.sample(gm, (1500, D), SIG, "sms", measurements=m, steps=80, step_size=0.1 * SIG ** 2,
                        generator=fastdiff.Generator(3), disable=True)
    _check_law(x, _reference_law(gm, m))


def test_sms_mixes_across_modes_in_fewer_steps_than_one_measurement():
    """All chains start in the light mode (-3, -3); after the same 480 Langevin steps SMS (m = 16 at
    sigma = 4) has moved most of the way to the 0.7 weight of the heavy mode, a single measurement at
    the same final noise sigma / sqrt(m) = 1 (walk-jump) far less (measured: 0.61 vs 0.21)."""
    gm, B = _two_gaussians(), 2000
    x0 = torch.full((B, D), -3.0)
    sms = fastdiff.sample(gm, x0, SIG, "sms", measurements=M, steps=30, step_size=0.1 * SIG ** 2,
                          generator=fastdiff.Generator(5), disable=True)
    se = SIG / math.sqrt(M)
    one = fastdiff.sample(gm, x0, se, "walk_jump", steps=30 * M, step_size=0.1 * se ** 2,
                          generator=fastdiff.Generator(5), disable=True)
    f_sms, f_one = (sms.sum(1) > 0).double().mean().item(), (one.sum(1) > 0).double().mean().item()
    assert f_sms > f_one + 0.25, (f_sms, f_one)


def test_jms_mean_chain_is_single_measurement_langevin():
    """The per-measurement JMS walk moves ybar exactly as Langevin on q_{sigma/sqrt m} with step g/m and
    noise the mean of the m draws times sqrt(m) (docs/math.md §8a): JMS's mixing over the modes is that
    of one measurement at sigma/sqrt(m) (the default JMS runs that chain itself: tests/test_jms_split.py)."""
    gm, B, m, sigma, g, steps = _two_gaussians(), 64, 8, 3.0, 1.5, 12
    y0 = torch.randn(B, m, D) * 3
    _, traj = fastdiff.sample(gm, y0, sigma, "jms", measurements=m, steps=steps, step_size=g, per_measurement=True,
                              generator=fastdiff.Generator(9), return_trajectory=True, disable=True)
    gen = fastdiff.Generator(9)
    yb, se = y0.double().mean(1), sigma / math.sqrt(m)
    for k in range(steps):
        z = fastdiff.randn(B, m, D, generator=gen).double()
        yb = yb + (g / m) * (gm(yb, 1.0, se) - yb) / se ** 2 + math.sqrt(2 * g / m) * (z.mean(1) * math.sqrt(m))
        torch.testing.assert_close(traj[k + 1].double().mean(1), yb, rtol=1e-4, atol=1e-4)


def test_sms_jump_is_the_posterior_mean_of_all_measurements():
    gm = _two_gaussians()
    calls = []
    x, traj = fastdiff.sample(gm, (5, D), SIG, "sms", measurements=3, steps=4, generator=fastdiff.Generator(0),
                              return_trajectory=True, disable=True, callback=lambda info: calls.append(info.x.clone()))
    ys = torch.stack([traj[4], traj[8], traj[12]], 1).double()            # y_1, y_2, y_3 after each stage
    torch.testing.assert_close(x.double(), MM.posterior_mean(gm, ys, SIG), rtol=1e-5, atol=1e-5)


# =========================================================================== stochastic localization
def _gaussian_em_law(lam, mu, times):
    """Exact mean and variance of the EM chain's final jump for 1-D N(mu, lam) (a linear recursion)."""
    m, v = 0.0, 0.0
    for k, (t, tn) in enumerate(zip(times, times[1:])):
        te = t if t > 0 else MM._T0 * times[1]
        c, d = lam / (1 + lam * te), tn - t
        # Z' = Z + d (mu + c (Z - te mu)) + sqrt(d) z
        m, v = m + d * (mu + c * (m - te * mu)), (1 + d * c) ** 2 * v + d
    T = times[-1]
    c = lam / (1 + lam * T)
    return mu + c * (m - T * mu), c * c * v


def test_localization_gaussian_matches_exact_chain_and_target():
    lam = torch.tensor([0.3, 1.0, 2.5])
    mu = torch.tensor([1.0, -0.5, 0.0])
    den = Gaussian(mu, torch.diag(lam))
    times = [0.0] + torch.logspace(-3, 3, 300, dtype=torch.float64).tolist()
    x = fastdiff.sample(den, (20000, 3), times, "stochastic_localization", generator=fastdiff.Generator(4), disable=True)
    for i in range(3):
        em_m, em_v = _gaussian_em_law(float(lam[i]), float(mu[i]), times)
        xi = x[:, i].double()
        assert abs(xi.mean() - em_m) < 4.5 * math.sqrt(em_v / 20000)
        assert abs(xi.var() - em_v) < 4.5 * em_v * math.sqrt(2 / 20000)
        # and the chain's law is the data's, to the discretisation (checked on the exact law)
        assert abs(em_m - float(mu[i])) < 0.02 and abs(em_v / float(lam[i]) - 1) < 0.04


def test_localization_molrg_matches_target():
    den = _molrg(6, [2, 2], seed=3)
    den = MoLRG([b.float() for b in den.bases], pi=den.pi, tau=den.tau)
    times = [0.0] + torch.logspace(-3, 3, 200, dtype=torch.float64).tolist()
    N = 8000
    x = fastdiff.sample(den, (N, 6), times, "stochastic_localization", generator=fastdiff.Generator(6), disable=True)
    # the data lie in one subspace each (delta = 0): the larger projection energy is the component
    energy = torch.stack([(x @ U).square().sum(1) for U in den.bases], 1)
    lab = energy.argmax(1)
    freq = torch.bincount(lab, minlength=2).double()
    pi = den.pi.double()
    chi2 = ((freq - N * pi) ** 2 / (N * pi)).sum()
    assert chi2 < 13.8, (freq / N, pi)                                  # 1 dof, p = 0.0002
    _, _, covs = mixture_components(den)
    target = (pi[:, None, None] * covs).sum(0)
    emp = torch.cov(x.double().T)
    se = ((target.diag()[:, None] * target.diag()[None] + target ** 2) / N).sqrt()
    assert ((emp - target).abs() < 5 * se + 0.02).all(), (emp - target).abs().max()


def test_localization_increments_are_independent_measurements():
    """Y_k = (Z_{k delta} - Z_{(k-1) delta}) / delta: samples against the exact EM covariance, and that
    against k iid measurements X + N(0, I / delta) (covariance lam 11^T + I / delta)."""
    lam, delta, K, N = 1.0, 0.05, 6, 40000
    times = [delta * k for k in range(K + 1)]
    den = Gaussian(torch.zeros(1), torch.full((1, 1), lam))
    _, traj = fastdiff.sample(den, (N, 1), times, "stochastic_localization", generator=fastdiff.Generator(8),
                              return_trajectory=True, disable=True)
    Y = ((traj[1:K + 1] - traj[:K]) / delta)[:, :, 0].T.double()          # (N, K)
    # exact: Y_{k+1} = c_k Z_k + z_k / sqrt(delta), Z_k linear in the earlier z's
    Zc = torch.zeros(K + 1, K, dtype=torch.float64)                        # Z_k = Zc[k] . z
    Yc = torch.zeros(K, K, dtype=torch.float64)
    for k in range(K):
        te = times[k] if k else MM._T0 * times[1]
        c = lam / (1 + lam * te)
        Yc[k] = c * Zc[k]
        Yc[k, k] += 1 / math.sqrt(delta)
        Zc[k + 1] = Zc[k] + delta * Yc[k]
    exact = Yc @ Yc.T
    emp = torch.cov(Y.T)
    se = ((exact.diag()[:, None] * exact.diag()[None] + exact ** 2) / N).sqrt()
    assert ((emp - exact).abs() < 4.5 * se).all()
    # k iid measurements X + N(0, I/delta) have covariance lam 11^T + I/delta.  EM's increment is
    # Y_k = E[X | Z_{(k-1) delta}] + z_k / sqrt(delta): the off-diagonal (the shared X) is lam / (1 + lam t)
    # -> within lam^2 delta of lam; the diagonal is own noise 1/delta plus the variance of that
    # posterior mean, between 0 (the first: E[X | Z_0] = E[X]) and lam
    off = ~torch.eye(K, dtype=torch.bool)
    assert ((exact[off] - lam).abs() <= lam * lam * delta).all(), exact
    assert ((exact.diag() - 1 / delta) >= -1e-9).all() and ((exact.diag() - 1 / delta) <= lam).all(), exact.diag()


# =========================================================================== errors
def test_errors():
    gm = _two_gaussians()
    with pytest.raises(ValueError, match="measurements"):
        fastdiff.sample(gm, (4, D), 1.0, "jms", measurements=0, disable=True)
    with pytest.raises(ValueError, match="measurements"):
        fastdiff.sample(gm, (4, D), 1.0, "sms", disable=True)
    with pytest.raises(ValueError, match="measurements"):
        fastdiff.sample(gm, (4, D), 1.0, "walk_jump", measurements=3, disable=True)
    with pytest.raises(ValueError, match="x: method='jms'"):
        fastdiff.sample(gm, torch.zeros(4, 2, D), 1.0, "jms", measurements=3, disable=True)
    with pytest.raises(ValueError, match="schedule"):
        fastdiff.sample(gm, (4, D), [1.0, 0.5], "stochastic_localization", disable=True)
    with pytest.raises(ValueError, match="times must start at 0"):
        fastdiff.sample(gm, (4, D), [0.5, 1.0], "stochastic_localization", disable=True)
    with pytest.raises(ValueError, match="step_size"):
        fastdiff.sample(gm, (4, D), 2.0, "stochastic_localization", step_size=0.1, disable=True)
    with pytest.raises(ValueError, match="fused"):
        fastdiff.sample(gm, (4, D), 1.0, "jms", measurements=2, fused=True, disable=True)
    with pytest.raises(ValueError, match="sigma"):
        MM.posterior_mean(gm, torch.zeros(2, 3, D), -1.0)
    with pytest.raises(ValueError, match="y: expected shape"):
        MM.posterior_mean(gm, torch.zeros(2, D), 1.0)
    with pytest.raises(ValueError, match="cov"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="pi"):
        GaussianMixture(torch.zeros(2, 3), 1.0, pi=[0.2, 0.2])

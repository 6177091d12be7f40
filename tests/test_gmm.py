"""GaussianMixture's posterior (mean, score, log p_t, responsibilities) against an independent NumPy /
SciPy computation (multivariate_normal.logpdf and a linear solve per component) for full, diagonal
and low-rank-plus-isotropic covariances; its sampler's moments; the MoLRG special case; bad input."""
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import fastdiff
from fastdiff.denoisers.gmm import GaussianMixture


def _numpy_posterior(x, means, covs, weights, alpha, sigma):
    """float64 NumPy: x_t | k ~ N(alpha mu_k, alpha^2 S_k + sigma^2 I); E[x0 | x, k] by a solve."""
    B, n = x.shape
    K = len(means)
    alpha = np.broadcast_to(np.asarray(alpha, float), (B,))
    sigma = np.broadcast_to(np.asarray(sigma, float), (B,))
    logits = np.zeros((B, K))
    cond = np.zeros((B, K, n))
    for b in range(B):
        for k in range(K):
            M = alpha[b] ** 2 * covs[k] + sigma[b] ** 2 * np.eye(n)
            logits[b, k] = np.log(weights[k]) + multivariate_normal(alpha[b] * means[k], M, allow_singular=False).logpdf(x[b])
            cond[b, k] = means[k] + alpha[b] * covs[k] @ np.linalg.solve(M, x[b] - alpha[b] * means[k])
    logp = logsumexp(logits, 1)
    w = np.exp(logits - logp[:, None])
    x0 = np.einsum("bk,bkn->bn", w, cond)
    score = (alpha[:, None] * x0 - x) / sigma[:, None] ** 2
    return x0, score, logp, w


def _mixture(form, K, n, r, seed):
    g = np.random.default_rng(seed)
    means = g.normal(size=(K, n)) * 2
    weights = g.uniform(0.5, 2.0, size=K)
    weights /= weights.sum()
    if form == "full":
        A = g.normal(size=(K, n, n))
        covs = A @ A.transpose(0, 2, 1) / n + 0.05 * np.eye(n)
        kw = dict(covs=torch.from_numpy(covs))
    elif form == "diag":
        d = g.uniform(0.0, 2.0, size=(K, n))
        covs = np.stack([np.diag(v) for v in d])
        kw = dict(diag=torch.from_numpy(d))
    else:
        U = np.linalg.qr(g.normal(size=(K, n, r)))[0]
        lam = g.uniform(0.5, 3.0, size=(K, r))
        floor = g.uniform(0.0, 0.3, size=K)
        covs = np.stack([U[k] @ np.diag(lam[k]) @ U[k].T + floor[k] ** 2 * (np.eye(n) - U[k] @ U[k].T) for k in range(K)])
        kw = dict(bases=torch.from_numpy(U), eigenvalues=torch.from_numpy(lam), floor=torch.from_numpy(floor))
    return GaussianMixture(torch.from_numpy(means), pi=torch.from_numpy(weights), **kw), means, covs, weights


@pytest.mark.parametrize("form", ["full", "diag", "lowrank"])
@pytest.mark.parametrize("K,n,r,B", [(1, 1, 1, 1), (3, 5, 2, 4), (2, 7, 7, 3), (4, 12, 3, 6)])
def test_against_numpy(form, K, n, r, B):
    gmm, means, covs, weights = _mixture(form, K, n, r, seed=K * 100 + n * 10 + r)
    g = np.random.default_rng(B)
    x = g.normal(size=(B, n)) * 2
    alpha, sigma = g.uniform(0.3, 1.0, size=B), g.uniform(0.2, 1.5, size=B)
    post = gmm.posterior(torch.from_numpy(x), torch.from_numpy(alpha), torch.from_numpy(sigma))
    x0, score, logp, w = _numpy_posterior(x, means, covs, weights, alpha, sigma)
    np.testing.assert_allclose(post.x0.numpy(), x0, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(post.score.numpy(), score, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(post.logp.numpy(), logp, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(post.responsibilities.numpy(), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["full", "diag", "lowrank", "isotropic"])
def test_the_call_is_the_posterior_mean_alone(form):
    """``gmm(x, ...)`` takes a shorter path than :meth:`posterior` (no score, no log p_t; the
    isotropic form no (B, K, n) intermediate): the same x0 and responsibilities, bit for bit, and
    against NumPy."""
    if form == "isotropic":
        g = np.random.default_rng(3)
        means, var = g.normal(size=(3, 6)) * 2, g.uniform(0.3, 2.0, size=3)
        weights = np.array([0.2, 0.3, 0.5])
        gmm = GaussianMixture(torch.from_numpy(means), torch.from_numpy(var), pi=torch.from_numpy(weights))
        assert gmm.isotropic
        covs = np.stack([v * np.eye(6) for v in var])
    else:
        gmm, means, covs, weights = _mixture(form, 3, 6, 2, seed=11)
    x = np.random.default_rng(4).normal(size=(7, 6)) * 2
    alpha, sigma = np.linspace(0.3, 1.0, 7), np.linspace(1.4, 0.2, 7)
    xt, at, st = torch.from_numpy(x), torch.from_numpy(alpha), torch.from_numpy(sigma)
    out, w = gmm(xt, at, st, return_weights=True)
    post = gmm.posterior(xt, at, st)
    assert torch.equal(out, post.x0) and torch.equal(w, post.responsibilities)
    x0, _, _, wn = _numpy_posterior(x, means, covs, weights, alpha, sigma)
    np.testing.assert_allclose(out.numpy(), x0, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(w.numpy(), wn, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["full", "diag", "lowrank"])
def test_float32_and_outputs(form):
    gmm, means, covs, weights = _mixture(form, 10, 32, 4, seed=7)
    x = np.random.default_rng(1).normal(size=(9, 32))
    x0, score, logp, _ = _numpy_posterior(x, means, covs, weights, 0.8, 0.6)
    xt = torch.from_numpy(x).float()
    got = gmm(xt, 0.8, 0.6)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gmm(xt, 0.8, 0.6, output="score").numpy(), score, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gmm(xt, 0.8, 0.6, output="eps").numpy(), -0.6 * score, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gmm.posterior(x, 0.8, 0.6).logp, logp, rtol=1e-10)   # NumPy in, NumPy out


def test_isotropic_covs_and_the_dense_view():
    g = GaussianMixture(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0]))
    assert g.form == "diag" and torch.equal(g.covs, torch.diag_embed(torch.tensor([0.5, 1.0, 2.0])[:, None].expand(3, 4).double()))
    h = GaussianMixture(g.means, g.covs)                                   # full form, same law
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(g(x, 0.7, 0.5), h(x, 0.7, 0.5), rtol=1e-10, atol=1e-12)
    gmm, _, covs, _ = _mixture("lowrank", 2, 6, 2, seed=9)
    torch.testing.assert_close(gmm.covs, torch.from_numpy(covs), rtol=1e-12, atol=1e-12)


def test_molrg_is_the_zero_mean_low_rank_case():
    U = torch.linalg.qr(torch.randn(3, 10, 2, dtype=torch.float64)).Q
    gmm = GaussianMixture(torch.zeros(3, 10, dtype=torch.float64), bases=U, eigenvalues=torch.ones(3, 2, dtype=torch.float64))
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(gmm(x, 0.7, 0.4), fastdiff.molrg_denoise(x, U, 0.7, 0.4), rtol=1e-10, atol=1e-12)


def test_sample_moments():
    gmm, means, covs, weights = _mixture("lowrank", 2, 6, 2, seed=3)
    x, k = gmm.sample(40000, generator=torch.Generator().manual_seed(0), return_labels=True)
    freq = np.bincount(k.numpy(), minlength=2) / 40000
    assert np.all(np.abs(freq - weights) < 5 * np.sqrt(weights * (1 - weights) / 40000))
    for c in range(2):
        xc = x[k == c].numpy()
        se = np.sqrt(np.diag(covs[c]) / len(xc))
        assert np.all(np.abs(xc.mean(0) - means[c]) < 5 * se)
        assert np.abs(np.cov(xc.T) - covs[c]).max() < 0.1


@pytest.mark.parametrize("kw,match", [
    (dict(), "expected exactly one of covs=, diag= or bases="),
    (dict(covs=torch.ones(2, 3, 3), diag=torch.ones(2, 3)), "expected exactly one"),
    (dict(covs=torch.ones(2, 3, 4)), r"covs: expected a floating tensor|covs: expected shape \(2, 3, 3\)"),
    (dict(covs=torch.tensor([[[1.0, 0.5, 0], [0.0, 1, 0], [0, 0, 1]]] * 2)), "covs: expected symmetric"),
    (dict(covs=-torch.eye(3).expand(2, 3, 3)), "covs: expected positive semi-definite"),
    (dict(diag=-torch.ones(2, 3)), "diag: expected non-negative"),
    (dict(bases=torch.ones(2, 3, 1)), "bases: expected orthonormal"),
    (dict(bases=torch.eye(3)[None, :, :2].repeat(2, 1, 1)), "eigenvalues: expected"),
    (dict(diag=torch.ones(2, 3), pi=torch.tensor([1.0, -1.0])), "pi: expected 2 finite non-negative"),
    (dict(covs=torch.ones(3)), r"covs: expected a variance >= 0, \(2,\) variances"),
])
def test_bad_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(torch.zeros(2, 3), **kw)


def test_bad_calls():
    gmm = GaussianMixture(torch.zeros(2, 3), diag=torch.ones(2, 3))
    with pytest.raises(ValueError, match="x: expected n = 3 columns"):
        gmm(torch.randn(4, 5), 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        gmm(torch.randn(4, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="output: expected one of"):
        gmm(torch.randn(4, 3), 1.0, 0.5, output="v")
    with pytest.raises(ValueError, match="means: expected finite"):
        GaussianMixture(torch.tensor([[float("nan"), 0.0, 0.0]]), diag=torch.ones(1, 3))


def test_speciation_time_is_half_log_lambda():
    """Biroli et al. (2024): two Gaussians at +-m with unit covariance under the OU process
    (alpha = e^-t, sigma^2 = 1 - e^-2t) speciate at t_S = (1/2) log Lambda, Lambda = |m|^2 + 1 the
    top eigenvalue of the data covariance.  The time where the clone agreement phi crosses 3/4
    (halfway from 1 to 1/2) follows t_S with slope 1 over three decades of Lambda, and sits within
    0.15 of it (measured: +0.02 to +0.07, slope 1.012)."""
    d = 40
    ts_cross, ts_theory = [], []
    for m2 in (10.0, 100.0, 1000.0, 1e4):
        m = torch.full((d,), np.sqrt(m2 / d), dtype=torch.float64)
        gmm = GaussianMixture(torch.stack([m, -m]), diag=torch.ones(2, d, dtype=torch.float64))
        t_s = 0.5 * np.log(m2 + 1)
        ts = np.linspace(t_s - 0.8, t_s + 0.8, 17)
        phi = [gmm.clone_agreement(np.exp(-t), np.sqrt(1 - np.exp(-2 * t)), 3000,
                                   generator=torch.Generator().manual_seed(1)) for t in ts]
        assert phi[0] > 0.8 and phi[-1] < 0.7
        i = next(i for i, p in enumerate(phi) if p < 0.75)
        ts_cross.append(ts[i - 1] + (phi[i - 1] - 0.75) / (phi[i - 1] - phi[i]) * (ts[i] - ts[i - 1]))
        ts_theory.append(t_s)
        assert abs(ts_cross[-1] - t_s) < 0.15, (m2, ts_cross[-1], t_s)
    slope = np.polyfit(ts_theory, ts_cross, 1)[0]
    assert abs(slope - 1) < 0.05, slope
    far = GaussianMixture(torch.stack([m, -m]), diag=torch.ones(2, d, dtype=torch.float64))
    assert abs(far.clone_agreement(np.exp(-12.0), 1.0, 20000, generator=torch.Generator().manual_seed(2)) - 0.5) < 0.01

"""Gaussian-mixture denoiser, classifier guidance with the exact classifier, the ambient-diffusion
consistency step (seed 004 eq. 7.3.8), sampling from linear measurements (eq. 7.5.8) and SURE
(eq. 7.6.1); docs/math.md §8c-8d.  Every closed form against a float64 reference written from the
joint Gaussian directly."""
import math

import pytest
import torch

import fastdiff
from fastdiff import conditional as CD
from fastdiff.denoisers import Gaussian, GaussianMixture, MoLRG, mixture_components
from fastdiff.sure import divergence


def _molrg(n, dims, seed, delta=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q.to(dtype) for d in dims]
    K = len(dims)
    pi = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    return MoLRG(bases, pi=pi, tau=0.5 + torch.rand(K, generator=g, dtype=torch.float64), delta=delta)


def _mixture(n, K, seed):
    g = torch.Generator().manual_seed(seed)
    covs = []
    for _ in range(K):
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        covs.append(A @ A.T / n + 0.1 * torch.eye(n, dtype=torch.float64))
    pi = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    return GaussianMixture(torch.randn(K, n, generator=g, dtype=torch.float64), torch.stack(covs), pi)


def _mixture_ref(pi, mu, covs, x, alpha, sigma):
    """E[x0 | x_t] and log p(k | x_t) from torch.distributions (the marginal of x_t per component)."""
    n = x.shape[1]
    logits, means = [], []
    for k in range(len(pi)):
        Mk = alpha ** 2 * covs[k] + sigma ** 2 * torch.eye(n, dtype=torch.float64)
        logits.append(torch.log(pi[k]) + torch.distributions.MultivariateNormal(alpha * mu[k], Mk).log_prob(x))
        means.append(mu[k] + alpha * torch.linalg.solve(Mk, (x - alpha * mu[k]).T).T @ covs[k])
    L = torch.stack(logits, 1)
    return (torch.softmax(L, 1)[:, :, None] * torch.stack(means, 1)).sum(1), torch.log_softmax(L, 1), torch.stack(means, 1)


# =========================================================================== the mixture denoiser
@pytest.mark.parametrize("n,K,B", [(1, 1, 1), (3, 2, 5), (7, 3, 4)])
def test_gaussian_mixture_matches_reference(n, K, B):
    gm = _mixture(n, K, seed=n + K)
    x = torch.randn(B, n, dtype=torch.float64) * 2
    ref, logp, comp = _mixture_ref(gm.pi, gm.means, gm.covs, x, 0.8, 0.6)
    torch.testing.assert_close(gm(x, 0.8, 0.6), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.log_posterior(x, 0.8, 0.6), logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm(x.float(), 0.8, 0.6).double(), ref, rtol=1e-4, atol=1e-4)
    # isotropic components take the no-basis path
    iso = GaussianMixture(gm.means, torch.linspace(0.5, 1.5, K, dtype=torch.float64), gm.pi)
    r2, _, _ = _mixture_ref(iso.pi, iso.means, iso.covs, x, 1.0, 0.3)
    torch.testing.assert_close(iso(x, 1.0, 0.3), r2, rtol=1e-10, atol=1e-10)


def test_mixture_components_of_molrg_reproduce_its_denoiser():
    m = _molrg(6, [2, 3], seed=1, delta=0.3)
    x = torch.randn(5, 6, dtype=torch.float64)
    pi, mu, covs = mixture_components(m)
    ref, _, _ = _mixture_ref(pi, mu, covs, x, 0.9, 0.4)
    torch.testing.assert_close(m(x, 0.9, 0.4), ref, rtol=1e-9, atol=1e-9)


# =========================================================================== classifier guidance
@pytest.mark.parametrize("kind", ["molrg", "mixture"])
def test_classifier_guidance_gamma_one_is_the_conditional_posterior_mean(kind):
    den = _molrg(5, [2, 1, 2], seed=4, delta=0.1) if kind == "molrg" else _mixture(5, 3, seed=4)
    pi, mu, covs = mixture_components(den)
    x = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    alpha, sigma = 0.7, 0.8
    uncond, logp, comp = _mixture_ref(pi, mu, covs, x, alpha, sigma)
    cond = comp[torch.arange(6), labels]                                 # E[x0 | x_t, y] exactly
    torch.testing.assert_close(CD.class_log_posterior(den, x, alpha, sigma), logp, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(CD.ClassifierGuided(den, labels, 1.0)(x, alpha, sigma), cond, rtol=1e-8, atol=1e-8)
    # any gamma: eq. 7.4.14, (1 - gamma) E[x0 | x_t] + gamma E[x0 | x_t, y]
    torch.testing.assert_close(CD.ClassifierGuided(den, labels, 2.5)(x, alpha, sigma), -1.5 * uncond + 2.5 * cond,
                               rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(CD.ClassifierGuided(den, labels, 0.0)(x, alpha, sigma), uncond, rtol=1e-8, atol=1e-8)


def test_classifier_guidance_samples_the_class_through_sample():
    den = _molrg(8, [2, 2], seed=2, dtype=torch.float32)
    den = MoLRG(den.bases, pi=den.pi, tau=torch.ones(2))
    x = fastdiff.sample(CD.ClassifierGuided(den, 1, 1.0), (2000, 8), fastdiff.DDPMSchedule.linear(), "ddim",
                        steps=50, generator=fastdiff.Generator(0), disable=True)
    e = torch.stack([(x @ U).square().sum(1) for U in den.bases], 1)
    assert (e.argmax(1) == 1).double().mean() > 0.99
    # within the class: the component's covariance U_1 U_1^T (tau = 1), to sampling error
    proj = x @ den.bases[1]
    torch.testing.assert_close(torch.cov(proj.T.double()), torch.eye(2, dtype=torch.float64), atol=0.12, rtol=0)


# =========================================================================== ambient diffusion
def _ambient_ref(pi, mu, covs, x, A, alpha, sigma):
    """Condition the joint Gaussian (x0, z = A x_t) per component (block covariance, lstsq), then mix."""
    n = x.shape[1]
    I = torch.eye(n, dtype=torch.float64)
    z = x @ A.T
    logits, means = [], []
    for k in range(len(pi)):
        joint = torch.cat([torch.cat([covs[k], alpha * covs[k]], 1),
                           torch.cat([alpha * covs[k], alpha ** 2 * covs[k] + sigma ** 2 * I], 1)], 0)
        T = torch.block_diag(I, A)
        J = T @ joint @ T.T
        Szz, Sxz = J[n:, n:], J[:n, n:]
        r = z - alpha * (A @ mu[k])
        logits.append(torch.log(pi[k]) + torch.distributions.MultivariateNormal(torch.zeros(A.shape[0], dtype=torch.float64),
                                                                               Szz).log_prob(r))
        means.append(mu[k] + (Sxz @ torch.linalg.lstsq(Szz, r.T).solution).T)
    w = torch.softmax(torch.stack(logits, 1), 1)
    return (w[:, :, None] * torch.stack(means, 1)).sum(1)


@pytest.mark.parametrize("kind", ["gaussian", "molrg", "mixture"])
@pytest.mark.parametrize("n,p", [(1, 1), (5, 3), (6, 6)])
def test_ambient_posterior_mean_matches_reference(kind, n, p):
    if kind == "gaussian":
        A0 = torch.randn(n, n, dtype=torch.float64)
        den = Gaussian(torch.randn(n, dtype=torch.float64), A0 @ A0.T / n + 0.05 * torch.eye(n, dtype=torch.float64))
    elif kind == "molrg":
        den = _molrg(n, [1, 1] if n < 3 else [2, 1], seed=n, delta=0.2)
    else:
        den = _mixture(n, 2, seed=n)
    pi, mu, covs = mixture_components(den)
    x = torch.randn(4, n, dtype=torch.float64)
    A = torch.randn(p, n, dtype=torch.float64)
    ref = _ambient_ref(pi, mu, covs, x, A, 0.9, 0.5)
    torch.testing.assert_close(CD.ambient_posterior_mean(den, x, A, 0.9, 0.5), ref, rtol=1e-8, atol=1e-8)
    # per-sample masks: each row against the reference with its own selection matrix
    mask = torch.rand(4, n, generator=torch.Generator().manual_seed(n)) < 0.6
    mask[:, 0] = True
    got = CD.ambient_posterior_mean(den, x, mask, 0.9, 0.5)
    for b in range(4):
        S = torch.eye(n, dtype=torch.float64)[mask[b]]
        torch.testing.assert_close(got[b], _ambient_ref(pi, mu, covs, x[b:b + 1], S, 0.9, 0.5)[0], rtol=1e-8, atol=1e-8)


def test_ambient_full_observation_is_the_denoiser_and_step_is_7_3_8():
    den = _molrg(6, [2, 2], seed=5, delta=0.1)
    x = torch.randn(5, 6, dtype=torch.float64) * 2
    full = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(CD.ambient_posterior_mean(den, x, full, 1.0, 0.7), den(x, 1.0, 0.7), rtol=1e-9, atol=1e-9)
    A = torch.randn(3, 6, dtype=torch.float64)
    s, sn = 0.7, 0.4
    E = _ambient_ref(*mixture_components(den), x, A, 1.0, s)
    step = CD.consistency_step(x, den, A, s, sn)
    torch.testing.assert_close(step, (sn / s) * x + (1 - sn / s) * E, rtol=1e-9, atol=1e-9)
    # through fastdiff.sample: one Euler step on the VE levels (s, sn) is the same update
    out = fastdiff.sample(CD.AmbientDenoiser(den, A), x, torch.tensor([s, sn], dtype=torch.float64), "euler",
                          disable=True)
    torch.testing.assert_close(out, step, rtol=1e-9, atol=1e-9)


# =========================================================================== eq. 7.5.8
def test_linear_measurement_step_matches_reference():
    den = _molrg(6, [2, 2], seed=6, delta=0.1)
    A = torch.randn(3, 6, dtype=torch.float64)
    prior_y = CD.measurement_prior(den, A)
    x = torch.randn(4, 6, dtype=torch.float64) * 2
    t, s = 0.9, 0.2
    out = fastdiff.sample(CD.LinearMeasurementDenoiser(A, prior_y), x, torch.tensor([t, t - s], dtype=torch.float64),
                          "euler", disable=True)
    # reference: x + s t A^+ grad log p_t(A x), the score by autograd of the float64 density of y_t
    pi, mu, covs = mixture_components(den)
    y = (x @ A.T).requires_grad_(True)
    logp = torch.logsumexp(torch.stack([torch.log(pi[k]) + torch.distributions.MultivariateNormal(
        A @ mu[k], A @ covs[k] @ A.T + t * t * torch.eye(3, dtype=torch.float64)).log_prob(y) for k in range(2)], 1), 1)
    (score,) = torch.autograd.grad(logp.sum(), y)
    ref = x + s * t * score @ torch.linalg.pinv(A).T
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)


def test_linear_measurement_sampling_recovers_the_measured_law():
    """Run to t = 0: A x has the law of A x_0, the null-space part of x stays that of x_T."""
    den = Gaussian(torch.zeros(4), torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.2])))
    A = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    sig = fastdiff.sigmas.karras(40, 0.002, 20.0)
    g = torch.Generator().manual_seed(1)
    P = torch.linalg.pinv(A) @ A
    # x_T with A x_T = y_T ~ N(0, 20^2 I) (eq. 7.5.4), plus any null-space part
    xT = 20.0 * (torch.randn(4000, 2, generator=g) @ torch.linalg.pinv(A).T) + \
        torch.randn(4000, 4, generator=g) @ (torch.eye(4) - P).T
    x = fastdiff.sample(CD.LinearMeasurementDenoiser(A, CD.measurement_prior(den, A)), xT, sig, "heun", disable=True)
    torch.testing.assert_close(x - x @ P.T, xT - xT @ P.T, rtol=0, atol=1e-3)
    cov_y = torch.cov((x @ A.T).T.double())
    target = A.double() @ den.cov @ A.double().T
    se = ((target.diag()[:, None] * target.diag()[None] + target ** 2) / 4000).sqrt()
    assert ((cov_y - target).abs() < 5 * se).all()


# =========================================================================== SURE
@pytest.mark.parametrize("kind", ["gaussian", "molrg"])
@pytest.mark.parametrize("exact", [True, False])
def test_sure_agrees_with_true_mse(kind, exact):
    n, N, sigma = 12, 4000, 0.6
    if kind == "gaussian":
        den = Gaussian(torch.zeros(n), torch.diag(torch.linspace(0.1, 2.0, n)))
        x = den.sample(N, generator=0).float()
    else:
        den = _molrg(n, [3, 2], seed=7, delta=0.05, dtype=torch.float32)
        x = den.sample(N, generator=0)
    y = x + sigma * torch.randn(N, n, generator=torch.Generator().manual_seed(1))
    res = fastdiff.sure(den, y, sigma, exact=exact, probes=2, generator=3)
    err = (x.double() - den(y, 1.0, sigma).double()).square().sum(1)
    diff = res.per_sample - err
    # SURE - MSE has mean zero: within 4 standard errors of the paired difference
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(N), (res.estimate, float(err.mean()))
    assert res.stderr > 0


@pytest.mark.parametrize("kind", ["gaussian", "molrg", "molrg_hard"])
def test_sure_exact_trace_matches_autograd(kind):
    n = 7
    if kind == "gaussian":
        M = torch.randn(n, n, dtype=torch.float64)
        den = Gaussian(torch.randn(n, dtype=torch.float64), M @ M.T / n)
    else:
        den = _molrg(n, [2, 3, 1], seed=8, delta=0.2)
        if kind == "molrg_hard":
            den = MoLRG(den.bases, pi=den.pi, tau=den.tau, delta=den.delta, mode="hard")
    y = torch.randn(5, n, dtype=torch.float64) * 1.5
    exact = divergence(den, y, 0.45, exact=True)
    J = torch.stack([torch.autograd.functional.jacobian(lambda v: den(v[None], 1.0, 0.45)[0], yb) for yb in y])
    torch.testing.assert_close(exact, torch.diagonal(J, dim1=1, dim2=2).sum(1), rtol=1e-8, atol=1e-8)
    # Hutchinson with many probes converges to it
    hut = divergence(den, y, 0.45, probes=4000, generator=torch.Generator().manual_seed(0))
    assert (hut - exact).abs().max() < 0.15


def test_errors():
    den = _molrg(4, [1, 1], seed=0)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="A: expected"):
        CD.ambient_posterior_mean(den, x, torch.randn(2, 5, dtype=torch.float64), 1.0, 0.5)
    with pytest.raises(ValueError, match="A: expected a boolean mask"):
        CD.ambient_posterior_mean(den, x, torch.ones(2, 4, dtype=torch.bool), 1.0, 0.5)
    with pytest.raises(ValueError, match="A: expected"):
        CD.measurement_prior(den, torch.randn(2, 3))
    with pytest.raises(ValueError, match="A: expected"):
        CD.LinearMeasurementDenoiser(torch.randn(5, 4), den)
    with pytest.raises(ValueError, match="alpha"):
        CD.LinearMeasurementDenoiser(torch.randn(2, 4), den)(x, 0.5, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        CD.ClassifierGuided(den, 0, -1.0)
    with pytest.raises(ValueError, match="labels"):
        CD.ClassifierGuided(den, 5, 1.0)
    with pytest.raises(TypeError, match="denoiser"):
        CD.ambient_posterior_mean(lambda x, a, s: x, x, torch.randn(2, 4), 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        fastdiff.sure(den, x, 0.0)
    with pytest.raises(ValueError, match="y: expected"):
        fastdiff.sure(den, x[0], 0.5)
    with pytest.raises(ValueError, match="probes"):
        fastdiff.sure(den, x, 0.5, probes=0)
    with pytest.raises(TypeError, match="exact=True"):
        fastdiff.sure(lambda v, a, s: v, x, 0.5, exact=True)
    with pytest.raises(ValueError, match="sigma, sigma_next"):
        CD.consistency_step(x, den, torch.randn(2, 4, dtype=torch.float64), 0.5, 0.7)

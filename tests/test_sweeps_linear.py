"""The linear-diffusion experiment (seed 001): covariance error, exact KL against fused sampling,
the exact test loss."""
import math

import pytest
import torch

from fastdiff import sweeps
from fastdiff.sweeps import linear as L
from fastdiff.sweeps import learners as LR
from sweeps_helpers import gen


def test_acceptance_linear_covariance_error(tmp_path):
    with sweeps.run_sweep("linear-diffusion", {"N": "4,96"}, trials=200, store=str(tmp_path / "s.sqlite"),
                          progress=False) as st:
        rows = st.rows()
    d_eff = rows[0]["d_eff"]
    assert abs(d_eff - (sum(v ** -1 for v in range(1, 33)) ** 2 / sum(v ** -2 for v in range(1, 33)))) < 1e-9
    for N in (4, 96):
        err = [r["cov_error"] for r in rows if r["N"] == N]
        mean = sum(err) / len(err)
        want = ((N - 1) * (d_eff + 1) + 1) / N ** 2      # with the mean subtracted (not (d_eff + 1)/N: 2.80 at N = 4)
        assert all(r["expected_cov_error"] == pytest.approx(want, rel=1e-12) for r in rows if r["N"] == N)
        se = torch.tensor(err).std().item() / math.sqrt(len(err))
        assert abs(mean - want) < 4 * se, (N, mean, want, se)


@pytest.mark.parametrize("n,power,N", [(1, 1.0, 2), (5, 0.5, 3), (32, 1.0, 4)])
def test_expected_cov_error_exact_with_centring(n, power, N):
    """E ||Sigma_0 - Sigma||_F^2 / ||Sigma||_F^2 = ((N - 1)(d_eff + 1) + 1)/N^2 (N Sigma_0 Wishart with
    N - 1 degrees of freedom) against Monte Carlo over 20000 fitted instances: within 5% and
    within 4 standard errors (the relative standard error here is below 1.1%)."""
    _, _, S0 = L.fit_instances(n, power, N, 7, 20000)
    l = L.spectrum(n, power)
    err = (S0 - torch.diag(l)).square().sum((1, 2)) / l.square().sum()
    d_eff = float(l.sum() ** 2 / l.square().sum())
    want = L.expected_cov_error(N, d_eff)
    mean, se = err.mean().item(), err.std().item() / math.sqrt(err.numel())
    assert abs(mean / want - 1) < 0.05 and abs(mean - want) < 4 * se, (mean, want, se)
    if n == 32:
        assert abs(want - 2.16) < 0.01 and abs((d_eff + 1) / N - 2.80) < 0.01   # the numbers


def test_acceptance_linear_kl_exact_vs_fused_sampling(tmp_path):
    with sweeps.run_sweep("linear-diffusion", {"n": 6, "N": "8,40", "mc_samples": 6000, "T": 1000}, trials=2,
                          store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rows = st.rows()
    for r in rows:
        assert abs(r["kl"] - r["kl_mc"]) < 5 * r["kl_mc_se"], r


def test_linear_test_loss_matches_monte_carlo():
    n, N = 4, 10
    _, mu0, S0 = L.fit_instances(n, 1.0, N, 3, 1)
    lam, V = torch.linalg.eigh(S0)
    sched = L._schedule(50)
    exact = L.linear_test_loss(lam, V, mu0, L.spectrum(n, 1.0), sched)[0].item()
    g = gen(0)
    M = 200_000
    t = torch.randint(0, 50, (M,), generator=g)
    a, s = sched.alpha[t][:, None], sched.sigma[t][:, None]
    x0 = torch.randn(M, n, generator=g, dtype=torch.float64) * L.spectrum(n, 1.0).sqrt()
    eps = torch.randn(M, n, generator=g, dtype=torch.float64)
    xt = a * x0 + s * eps
    gain = a * lam / (a * a * lam + s * s)                        # per mode, per sample
    x0h = mu0 + ((xt - a * mu0) @ V[0] * gain) @ V[0].T
    loss = ((eps - (xt - a * x0h) / s) ** 2).sum(1)
    assert abs(loss.mean().item() - exact) < 5 * loss.std().item() / math.sqrt(M)


def test_linear_kl_vanishes_with_many_samples():
    _, mu0, S0 = L.fit_instances(5, 1.0, 200_000, 1, 1)
    lam, V = torch.linalg.eigh(S0)
    mean, var = L.sampled_gaussian(lam, (V.mT @ mu0[..., None])[..., 0], L._schedule(1000))
    assert L.gaussian_kl(mean, var, V, L.spectrum(5, 1.0)).item() < 0.01


def test_linear_train_loss_matches_monte_carlo():
    """train_loss: E ||eps - eps_hat||^2 over the training points themselves (t uniform), with a ridge."""
    n, N, ridge, T = 3, 5, 0.05, 40
    X, mu0, S0 = L.fit_instances(n, 1.0, N, 4, 1)
    lam, V = LR.null_modes(S0, ridge)
    sched = L._schedule(T)
    test, train = L.linear_losses(lam, V, mu0, L.spectrum(n, 1.0), sched, ridge)
    assert test.shape == train.shape == (T, 1)
    g = gen(1)
    M = 200_000
    t = torch.randint(0, T, (M,), generator=g)
    a, s = sched.alpha[t][:, None], sched.sigma[t][:, None]
    x0 = X[0][torch.randint(0, N, (M,), generator=g)]
    eps = torch.randn(M, n, generator=g, dtype=torch.float64)
    xt = a * x0 + s * eps
    x0h = mu0 + ((xt - a * mu0) @ V[0] * (a * lam / (a * a * lam + s * s))) @ V[0].T
    loss = ((eps - (xt - a * x0h) / s) ** 2).sum(1)
    assert abs(loss.mean().item() - train.mean().item()) < 5 * loss.std().item() / math.sqrt(M)
    rows, _ = L._run_batch([{"n": n, "power": 1.0, "N": N, "ridge": ridge, "T": T, "mc_samples": 0}], [4], 1)
    assert rows[0]["train_loss"] == pytest.approx(train.mean().item(), rel=1e-12)

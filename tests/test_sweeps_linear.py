"""The linear-diffusion experiment (seed 001): covariance error, exact KL against fused sampling,
the exact test loss."""
import math

import torch

from fastdiff import sweeps
from fastdiff.sweeps import linear as L
from sweeps_helpers import gen


def test_acceptance_linear_covariance_error(tmp_path):
    with sweeps.run_sweep("linear-diffusion", {"N": "48,96,200"}, trials=200, store=str(tmp_path / "s.sqlite"),
                          progress=False) as st:
        rows = st.rows()
    d_eff = rows[0]["d_eff"]
    assert abs(d_eff - (sum(v ** -1 for v in range(1, 33)) ** 2 / sum(v ** -2 for v in range(1, 33)))) < 1e-9
    for N in (48, 96, 200):
        assert N >= 4 * d_eff
        err = [r["cov_error"] for r in rows if r["N"] == N]
        mean = sum(err) / len(err)
        assert abs(mean / ((d_eff + 1) / N) - 1) < 0.10, (N, mean)


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

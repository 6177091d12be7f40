"""The memorization experiment: the memorized fraction, the distribution-correctness metrics (energy
off the true support, W2 to the truth), the ``linear`` model's transition and the acceptance criterion."""
import math

import pytest
import scipy.linalg
import torch
from scipy.stats import norm

from fastdiff import sweeps
from fastdiff.sweeps import learners as LR
from fastdiff.sweeps import linear as L
from fastdiff.sweeps import memorization as M
from fastdiff.sweeps.subspace import molrg_instances
from sweeps_helpers import gen


def test_memorized_fraction():
    data = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[0.1, 0.0], [5.0, 0.1], [0.0, 9.0], [4.0, 4.0]])
    assert M.memorized_fraction(x, data) == 0.5
    assert M.memorized(x, data[:1]).all()      # one training point: every sample counts as a copy


@pytest.mark.parametrize("I,M_,K,n,d", [(1, 1, 1, 1, 1), (2, 7, 2, 5, 2), (3, 9, 3, 7, 1)])
def test_off_support_and_w2_match_float64_reference(I, M_, K, n, d):
    """Against per-sample loops in numpy/scipy (scipy.linalg.sqrtm for the Bures term)."""
    g = gen(10 * n + K)
    U = torch.linalg.qr(torch.randn(I, K, n, d, generator=g, dtype=torch.float64))[0]
    x = torch.randn(I, M_, n, generator=g, dtype=torch.float64) + 0.3
    x[0, 0] = 0.0                                          # a zero sample: share 0, no NaN
    per, energy = M.off_support(x.float(), U)
    for i in range(I):
        offs, tot = [], 0.0
        for m in range(M_):
            xi = x[i, m].numpy()
            o = min(float(((xi - U[i, k].numpy() @ (U[i, k].numpy().T @ xi)) ** 2).sum()) for k in range(K))
            sq = float((xi ** 2).sum())
            # the input was rounded to float32: shares agree to its rounding
            assert per[i, m].item() == pytest.approx(o / sq if sq else 0.0, abs=1e-6)
            offs.append(o)
            tot += sq
        assert energy[i].item() == pytest.approx(sum(offs) / tot if tot else 0.0, rel=1e-5, abs=1e-7)
    C = U[:, 0] @ U[:, 0].mT + 0.1 * torch.eye(n, dtype=torch.float64)
    w2 = M.gaussian_w2(x, C)
    for i in range(I):
        xi = x[i].numpy()
        m = xi.mean(0)
        S = (xi - m).T @ (xi - m) / M_
        R = scipy.linalg.sqrtm(C[i].numpy()).real
        want = (m @ m + S.trace() + C[i].numpy().trace() - 2 * scipy.linalg.sqrtm(R @ S @ R).real.trace())
        assert w2[i].item() == pytest.approx(math.sqrt(max(want, 0.0)), rel=1e-6, abs=1e-6)


def test_off_support_and_w2_reject_bad_shapes():
    with pytest.raises(ValueError, match="off_support: expected samples"):
        M.off_support(torch.zeros(2, 3, 4), torch.zeros(2, 1, 5, 2))
    with pytest.raises(ValueError, match="gaussian_w2: expected samples"):
        M.gaussian_w2(torch.zeros(2, 3, 4), torch.zeros(2, 3, 3))


def test_psd_project_within_the_stated_tolerance():
    g = gen(12)
    X = torch.randn(3, 8, 4, generator=g) @ torch.linalg.qr(torch.randn(3, 32, 4, generator=g))[0].mT * 3
    mu, S = LR.fit_gaussian(X)                           # float32, rank <= 4: eigenvalues ~ -1e-7 appear
    assert torch.linalg.eigvalsh(S.double()).min() < 0
    P = LR.psd_project(S)
    lam, V = torch.linalg.eigh(S.double())
    want = (V * lam.clamp(min=0)[..., None, :]) @ V.mT
    assert P.dtype == torch.float64 and torch.allclose(P, want, atol=1e-12)
    assert torch.linalg.eigvalsh(P).min() >= -1e-12 * torch.linalg.eigvalsh(P).max()
    bad = torch.diag(torch.tensor([1.0, 0.5, -1e-3]))   # -1e-3 lambda_max: not rounding (tol 4 n eps32 = 1.4e-6)
    with pytest.raises(ValueError, match="positive semi-definite"):
        LR.psd_project(bad)


def _exact_law(X):
    """The fitted Gaussian's DDPM-sampled law (seed 001's schedule, T = 1000), exactly: per-mode
    mean and variance in the eigenbasis of Sigma_0 (the linear-diffusion experiment's recursion)."""
    mu0, S0 = LR.fit_gaussian(X.double())
    lam, V = LR.null_modes(S0, 0.0)
    mean, var = L.sampled_gaussian(lam, (V.mT @ mu0[..., None])[..., 0], L._schedule(1000))
    return mu0, lam, V, mean, var


def test_linear_denoiser_memorizes_at_2_generalizes_from_8():
    """The default sweep's shape (n = 32, d = 4, T = 1000), the ``linear`` denoiser: the sweep's
    memorized fractions (fused DDPM sampling, float32) against independent computations from the
    exact sampled law N(V mean, V diag(var) V^T): at N = 2 in closed form (a line through the two
    points: a sample at u along it from the midpoint, the points at +-h, is a copy for u in
    +-(h/2, 2h)), at N = 8 by direct float64 sampling and brute-force distances."""
    cells = [{"n": 32, "K": 1, "d": 4, "N": N, "denoiser": "linear", "samples": 600, "T": 1000} for N in (2, 8)]
    seeds, trials = [11, 12], 2
    rows, _ = M._run_batch(cells, seeds, trials)
    for ci, (c, seed) in enumerate(zip(cells, seeds)):
        _, X, _ = molrg_instances(32, 1, 4, c["N"], 0.0, "orthogonal", seed, trials)
        mu0, lam, V, mean, var = _exact_law(X)
        for t in range(trials):
            got = next(r["memorized"] for r in rows if r["cell_index"] == ci and r["trial"] == t)
            if c["N"] == 2:
                j = int(lam[t].argmax())
                h = math.sqrt(float(lam[t, j]))
                mu = float(mean[t, j] - (V[t, :, j] @ mu0[t]))      # the sampled mean's offset along the line
                s = math.sqrt(float(var[t, j]))
                p = (norm.cdf((2 * h - mu) / s) - norm.cdf((h / 2 - mu) / s)
                     + norm.cdf((-h / 2 - mu) / s) - norm.cdf((-2 * h - mu) / s))
                assert abs(p - 2 * (norm.cdf(2) - norm.cdf(0.5))) < 0.02     # the sampled law is nearly the fit
            else:
                z = torch.randn(20000, 32, generator=gen(t), dtype=torch.float64)
                xs = (mean[t] + z * var[t].sqrt()) @ V[t].T
                dist = torch.cdist(xs, X[t].double()).sort(1).values
                p = float((dist[:, 0] < dist[:, 1] / 3).double().mean())
            se = math.sqrt(max(p * (1 - p), 1e-3) / c["samples"])
            assert abs(got - p) < 4 * se + 2e-3, (c["N"], t, got, p)
            assert got > 0.5 if c["N"] == 2 else got < 0.1       # memorizes at N = 2, generalizes at N = 8
            r = next(r for r in rows if r["cell_index"] == ci and r["trial"] == t)
            assert r["off_support"] < 1e-6 and 0 < r["w2"] < 3   # on the subspace (Sigma_0's range lies in it)
    assert "linear" in sweeps.EXPERIMENTS["memorization"].param("denoiser").default


def test_acceptance_memorization(tmp_path):
    grid = {"n": 32, "d": 4, "N": "2,4,8,16", "denoiser": "empirical,molrg,linear", "samples": 128}
    with sweeps.run_sweep("memorization", grid, trials=2, store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rows = st.rows()
    assert len(rows) == 4 * 3 * 2
    for r in rows:
        assert 0 <= r["generalization"] <= 1 - r["memorized"] + 1e-12 and 0 <= r["off_support"] <= 1, r
        if r["denoiser"] == "empirical" and r["N"] <= 4:
            assert r["memorized"] > 0.95 and r["generalization"] < 0.05, r
        if r["denoiser"] == "molrg" and r["N"] > 4:
            assert r["memorized"] < 0.1 and r["off_support"] < 0.01 and r["generalization"] > 0.85, r
        if r["denoiser"] == "molrg" and r["N"] == 2:
            # PCA of 2 < d points: half the learned basis is noise, so are half the samples' energy;
            # not memorized, and not generalized either
            assert r["memorized"] < 0.25 and r["off_support"] > 0.3 and r["generalization"] < 0.3, r
        if r["denoiser"] == "linear":
            assert r["off_support"] < 1e-6, r
            if r["N"] == 2:
                assert r["memorized"] > 0.45, r
            if r["N"] >= 8:
                assert r["memorized"] < 0.1 and r["generalization"] > 0.9, r

"""Linear diffusion KL (issue 13 item 9): never negative, +inf where the sampled law is singular,
Monte Carlo estimates flagged where they cannot estimate it."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from fastdiff import sweeps
from fastdiff.sweeps import learners as LR
from fastdiff.sweeps import linear as L


def _dense_kl(n, power, N, ridge, T, seed, trials):
    """KL(sampled || data) from the DDPM recursion written with full n x n matrices (float64, no
    eigen-decomposition): mean m <- M m + b, covariance C <- M C M^T + s^2 I, then the Gaussian KL
    with log-determinants; +inf where C is singular (rank < n)."""
    _, mu0, S0 = L.fit_instances(n, power, N, seed, trials)
    sched = L._schedule(T)
    l_p = L.spectrum(n, power)
    I = torch.eye(n, dtype=torch.float64)
    out = []
    for i in range(trials):
        S = S0[i] + ridge * I
        m, C = torch.zeros(n, dtype=torch.float64), I.clone()
        for t in range(T - 1, -1, -1):
            a, s2, b = math.sqrt(sched.abar[t]), 1 - float(sched.abar[t]), float(sched.beta[t])
            G = a * S @ torch.linalg.inv(a * a * S + s2 * I)          # x0_hat = mu0 + G (x - a mu0)
            # x_{t-1} = (x - b / s2 (x - a x0_hat)) / sqrt(1 - b) + noise
            M = (I - b / s2 * (I - a * G)) / math.sqrt(1 - b)
            c = (b / s2 * a * (I - a * G) @ mu0[i]) / math.sqrt(1 - b)
            m, C = M @ m + c, M @ C @ M.T
            if t > 0:
                C = C + b * (1 - float(sched.abar[t - 1])) / s2 * I
        rank = torch.linalg.matrix_rank(S, hermitian=True).item()
        if rank < n:
            out.append(math.inf)
            continue
        P = torch.diag(1 / l_p)
        kl = 0.5 * (torch.trace(P @ C) + m @ P @ m - n + torch.log(l_p).sum() - torch.linalg.slogdet(C)[1])
        out.append(kl.item())
    return out


@pytest.mark.parametrize("n,N,ridge", [(6, 3, 0.0), (6, 6, 0.0), (6, 7, 0.0), (6, 40, 0.0), (6, 3, 1e-2),
                                       (5, 2000, 0.0)])
def test_linear_kl_is_nonnegative_and_matches_dense_float64(n, N, ridge):
    cell = {"n": n, "power": 1.0, "N": N, "ridge": ridge, "T": 60, "mc_samples": 0}
    rows, _ = L._run_batch([cell], [123], 3)
    ref = _dense_kl(n, 1.0, N, ridge, 60, 123, 3)
    for r, k in zip(rows, ref):
        assert r["kl"] >= 0
        assert r["singular"] == float(math.isinf(k))
        if math.isinf(k):   # Sigma_0 of rank N - 1 < n and no ridge: the sampled law is singular
            assert r["kl"] == math.inf, (r["kl"], N, n)
        else:
            assert r["kl"] == pytest.approx(k, rel=1e-6, abs=1e-9)


def test_linear_kl_tiny_is_not_negative():
    """Near KL = 0 the plain trace/log-det form cancels; the split form stays >= 0."""
    _, mu0, S0 = L.fit_instances(8, 1.0, 400_000, 2, 1)
    lam, V = LR.null_modes(S0, 0.0)
    mean, var = L.sampled_gaussian(lam, (V.mT @ mu0[..., None])[..., 0], L._schedule(1000))
    kl = L.gaussian_kl(mean, var, V, L.spectrum(8, 1.0))
    assert 0 <= kl.item() < 0.01
    # exact Gaussians equal to the target: KL exactly 0, never -1e-16
    V = torch.eye(8, dtype=torch.float64)[None]
    assert L.gaussian_kl(torch.zeros(1, 8, dtype=torch.float64), L.spectrum(8, 1.0)[None], V,
                         L.spectrum(8, 1.0)).item() >= 0


def test_linear_mc_kl_never_negative_and_flagged(tmp_path):
    with sweeps.run_sweep("linear-diffusion", {"n": 8, "N": "4,64", "mc_samples": 400, "T": 100}, trials=3,
                          store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rows = st.rows()
    for r in rows:
        assert r["kl"] >= 0 and r["kl_mc_meaningful"] in (0.0, 1.0)
        assert math.isnan(r["kl_mc"]) or r["kl_mc"] >= 0, r
        if r["N"] == 4:   # rank 3 < 8: singular sampled law, exact KL +inf, the estimate is flagged
            assert r["kl"] == math.inf and r["kl_mc"] == math.inf and r["kl_mc_meaningful"] == 0.0
        else:
            assert r["kl_mc_meaningful"] == 1.0 and abs(r["kl"] - r["kl_mc"]) < 5 * r["kl_mc_se"] + 1e-9


def test_default_linear_sweep_csv_has_no_impossible_kl(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastdiff", "sweep", "linear-diffusion", "--out", str(tmp_path),
                        "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "linear-diffusion.rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 20
    for row in rows:
        kl = float(row["kl"])
        assert not math.isnan(kl) and kl >= 0, row
        # n = 32: Sigma_0 has rank N - 1, so N <= 32 is singular (KL +inf), N > 32 finite
        assert math.isinf(kl) == (int(row["N"]) <= 32), row
    if (tmp_path / "linear-diffusion.csv").exists():      # the plotted table (matplotlib installed)
        with open(tmp_path / "linear-diffusion.csv") as f:
            agg = list(csv.DictReader(f))
        for row in agg:
            assert not math.isnan(float(row["kl_mean"])) and float(row["kl_mean"]) >= 0, row


def test_linear_plot_says_where_kl_is_infinite_or_flagged(tmp_path):
    pytest.importorskip("matplotlib")
    from fastdiff.sweeps import plots

    with sweeps.run_sweep("linear-diffusion", {"n": 6, "N": "4,64", "mc_samples": 200, "T": 60}, trials=2,
                          store=str(tmp_path / "s.sqlite"), progress=False) as st:
        agg = st.aggregate()
    figs = []
    real = plots._save

    def keep(fig, path):
        figs.append(fig)
        real(fig, path)

    plots._save = keep
    try:
        plots._linear(plots._figure_class(), agg, ["n", "power", "N", "ridge", "T", "mc_samples"],
                      str(tmp_path / "p.png"))
    finally:
        plots._save = real
    labels = [t.get_text() for t in figs[0].axes[1].get_legend().get_texts()]
    assert any("+inf" in s for s in labels), labels          # N = 4 < n: singular law, drawn on the top edge
    assert any("not meaningful" in s for s in labels), labels


def test_linear_kl_singular_whatever_the_rounding_of_1_minus_abar0():
    """issue 16: with beta_min = 1e-5 float64 makes 1 - abar_0 differ from beta_0 by 4.6e-12
    relative; a last step that was recognised by |1 - abar_0 - beta_0| <= 1e-12 beta_0 then left the
    null modes a variance ~1e-24 and a finite KL.  The last step is x0_hat exactly, whatever the
    rounding: the null mode's variance is 0, the KL +inf; the other modes as with the default step."""
    from fastdiff.schedules import DDPMSchedule

    sched = DDPMSchedule(beta_min=1e-5, T=50)
    assert abs(1 - float(sched.abar[0]) - float(sched.beta[0])) > 1e-12 * float(sched.beta[0])
    lam = torch.tensor([[0.0, 0.3, 1.0]], dtype=torch.float64)
    mean, var = L.sampled_gaussian(lam, torch.tensor([[0.2, 0.0, -0.1]], dtype=torch.float64), sched)
    assert var[0, 0].item() == 0.0 and mean[0, 0].item() == 0.2 and (var[0, 1:] > 0).all()
    V = torch.eye(3, dtype=torch.float64)[None]
    assert L.gaussian_kl(mean, var, V, L.spectrum(3, 1.0)).item() == math.inf
    ok = L.gaussian_kl(mean[:, 1:], var[:, 1:], V[:, :2, :2], L.spectrum(2, 1.0))
    assert math.isfinite(ok.item()) and ok.item() >= 0

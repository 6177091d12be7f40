"""JMS by its exact split (docs/math.md §8a): the mean chain of ybar (walk-jump at sigma/sqrt m, step g/m)
plus the residuals' exact Gaussian transition, against the law of the m coupled per-measurement chains."""
import math

import pytest
import torch

import fastdiff
from fastdiff import multimeasurement as MM
from fastdiff.denoisers import Gaussian, GaussianMixture, MoLRG

# a diagonal Gaussian model: D(ybar; 1, s) = mu + kappa (ybar - mu), kappa = lam / (lam + s^2), so the JMS
# chain is linear and its law after k steps from a fixed start is an exact Gaussian
LAM = torch.tensor([0.5, 2.0], dtype=torch.float64)
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA, M, STEP, K, K1 = 1.5, 4, 0.3 * 1.5 ** 2, 6, 2     # step 0.3 sigma^2: the residuals contract by 0.7 a step


def _gauss():
    return Gaussian(MU.float(), torch.diag(LAM).float())


def _full_chain_law(y0, steps, start_var=0.0):
    """Exact mean (m n,) and covariance (m n, m n) of vec(y_k), k = 0..steps, of the m coupled chains
    written directly from their update y_j' = a y_j + b D(ybar) + c z_j (no split used):
    vec y' = F vec y + h + c z with F = a I + b (11^T/m) (x) diag(kappa), h = 1 (x) b (1 - kappa) mu.
    ``y0`` (m, n) the mean of the start, ``start_var`` its iid variance.  Returns the lists of means,
    covariances and the matrix F (the cross-covariance of y_k2 and y_k1 is F^(k2 - k1) C_k1)."""
    m, n = y0.shape
    a, b, c = 1 - STEP / SIGMA ** 2, STEP / SIGMA ** 2, math.sqrt(2 * STEP)
    kappa = LAM / (LAM + SIGMA ** 2 / m)
    F = a * torch.eye(m * n, dtype=torch.float64) + b * torch.kron(torch.full((m, m), 1.0 / m, dtype=torch.float64),
                                                                   torch.diag(kappa))
    h = torch.kron(torch.ones(m, dtype=torch.float64), b * (1 - kappa) * MU)
    mean, cov = [y0.reshape(-1).double()], [start_var * torch.eye(m * n, dtype=torch.float64)]
    for _ in range(steps):
        mean.append(F @ mean[-1] + h)
        cov.append(F @ cov[-1] @ F.T + c * c * torch.eye(m * n, dtype=torch.float64))
    return mean, cov, F


def _split_coordinates(m, n):
    """The linear map vec(y) -> (ybar, r_1, .., r_{m-1}) (r_m = -sum of the others is left out)."""
    mean_rows = torch.kron(torch.full((1, m), 1.0 / m, dtype=torch.float64), torch.eye(n, dtype=torch.float64))
    resid_rows = torch.kron(torch.eye(m, dtype=torch.float64) - 1.0 / m, torch.eye(n, dtype=torch.float64))
    return torch.cat([mean_rows, resid_rows[:(m - 1) * n]])


def _max_z(samples, mean, cov):
    """The largest |deviation| / standard error over the mean and covariance entries of ``samples``
    (N, d) against an exact Gaussian (mean, cov): se(mean_i) = sqrt(C_ii / N), se(cov_ij) =
    sqrt((C_ii C_jj + C_ij^2) / N) (the Gaussian fourth moments)."""
    N = samples.shape[0]
    se_mean = (cov.diag() / N).sqrt()
    z_mean = ((samples.mean(0) - mean).abs() / se_mean).max()
    se_cov = ((cov.diag()[:, None] * cov.diag()[None] + cov ** 2) / N).sqrt()
    z_cov = ((torch.cov(samples.T) - cov).abs() / se_cov).max()
    return max(float(z_mean), float(z_cov))


# d = 16 coordinates (two snapshots of m n = 8): 16 means + 136 covariance entries a run, 3 runs: 456 checks.
# At 5 standard errors each fails with probability 5.7e-7 (normal approximation), so a seed fails the
# test with probability <= 3e-4 (union bound).
Z_MAX = 5.0


@pytest.mark.parametrize("start,per_measurement", [("tensor", False), ("shape", False), ("tensor", True)])
def test_split_has_the_law_of_the_coupled_chains(start, per_measurement):
    """Two snapshots (k = 2 and 6) jointly, in the coordinates (ybar, residuals): their means, their
    covariances and the zero cross-covariance of ybar and the residuals (independence, Gaussian) --
    the default JMS (the split) and the per-measurement chains against the same exact law."""
    N, n = 20000, 2
    y0 = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-1.5, 0.0], [1.0, 1.0]], dtype=torch.float64)
    if start == "tensor":
        x, law = y0.float().expand(N, M, n).contiguous(), _full_chain_law(y0, K)
    else:
        x, law = (N, n), _full_chain_law(torch.zeros(M, n, dtype=torch.float64), K, start_var=1 + SIGMA ** 2)
    mean, cov, F = law
    _, traj = fastdiff.sample(_gauss(), x, SIGMA, "jms", measurements=M, steps=K, step_size=STEP,
                              per_measurement=per_measurement, generator=fastdiff.Generator(21), disable=True,
                              return_trajectory=[K1, K])
    P = _split_coordinates(M, n)
    T = torch.block_diag(P, P)
    joint_mean = T @ torch.cat([mean[K1], mean[K]])
    cross = torch.linalg.matrix_power(F, K - K1) @ cov[K1]            # Cov(y_K, y_K1)
    joint_cov = T @ torch.cat([torch.cat([cov[K1], cross.T], 1), torch.cat([cross, cov[K]], 1)]) @ T.T
    # the exact law itself: ybar uncorrelated with the residuals at both steps and across them
    for i in (0, M * n):
        for j in (0, M * n):
            blk = joint_cov[i:i + n, j + n:j + M * n]
            assert blk.abs().max() < 1e-12, (i, j, blk)
    samples = torch.cat([(traj[0].double().reshape(N, -1)), traj[1].double().reshape(N, -1)], 1) @ T.T
    assert _max_z(samples, joint_mean, joint_cov) < Z_MAX
    # the check can fail: residual variances 10 % above the exact law's (10 standard errors) are seen
    wider = joint_cov.clone()
    for i in (0, M * n):
        wider[i + n:i + M * n, :] *= 1.1 ** 0.5
        wider[:, i + n:i + M * n] *= 1.1 ** 0.5
    assert _max_z(samples, joint_mean, wider) > Z_MAX


def test_mean_chain_is_walk_jump_at_sigma_over_sqrt_m():
    """The default JMS runs walk-jump on ybar at sigma / sqrt(m) with step g / m: the same bits."""
    gm = GaussianMixture(torch.stack([torch.full((3,), -2.0), torch.full((3,), 2.0)]), 1.0, pi=[0.4, 0.6])
    for B, m, n, steps in [(7, 5, 3, 9), (1, 1, 3, 1), (3, 2, 3, 4)]:
        y0 = torch.randn(B, m, n, generator=torch.Generator().manual_seed(B)) * 3
        got = fastdiff.sample(gm, y0, 2.0, "jms", measurements=m, steps=steps, step_size=1.1,
                              generator=fastdiff.Generator(4), disable=True)
        want = fastdiff.sample(gm, y0.mean(1), 2.0 / math.sqrt(m), "walk_jump", steps=steps, step_size=1.1 / m,
                               generator=fastdiff.Generator(4), disable=True)
        assert got.shape == (B, n) and torch.equal(got, want)


def test_result_does_not_depend_on_trajectory_or_callback():
    gm = _gauss()
    kw = dict(measurements=3, steps=5, step_size=0.7, disable=True)
    plain = fastdiff.sample(gm, (6, 2), SIGMA, "jms", generator=fastdiff.Generator(2), **kw)
    out, traj = fastdiff.sample(gm, (6, 2), SIGMA, "jms", generator=fastdiff.Generator(2), return_trajectory=True, **kw)
    seen = []
    out_cb, traj_cb = fastdiff.sample(gm, (6, 2), SIGMA, "jms", generator=fastdiff.Generator(2), return_trajectory=True,
                                      callback=lambda info: seen.append(info), **kw)
    assert torch.equal(plain, out) and torch.equal(plain, out_cb)
    assert traj.shape == traj_cb.shape == (7, 6, 3, 2)
    # the jump state is the posterior mean of the last measurements, broadcast (as on the per-measurement loop)
    torch.testing.assert_close(traj[-1], out[:, None].expand(6, 3, 2), rtol=0, atol=0)
    torch.testing.assert_close(out, gm(traj[5].mean(1), 1.0, SIGMA / math.sqrt(3)), rtol=1e-5, atol=1e-5)
    # the callback sees the JMS state, its level and row, and the trajectory holds the same states
    assert [s.i for s in seen] == list(range(6))
    for s in seen:
        assert s.x.shape == (6, 3, 2) and (s.alpha, s.sigma) == (1.0, SIGMA)
        assert s.step.call[0] == ("jump" if s.i == 5 else "langevin_step")
        assert torch.equal(s.x, traj_cb[s.i])
        torch.testing.assert_close(s.x0_hat, gm(s.x.mean(1), 1.0, SIGMA / math.sqrt(3))[:, None].expand(6, 3, 2),
                                   rtol=1e-5, atol=1e-5)


def test_reproducible_and_per_sample_seeds():
    gm = _gauss()
    kw = dict(measurements=4, steps=3, step_size=0.5, disable=True, return_trajectory=[0, 2, 2, 3, 4])
    a = fastdiff.sample(gm, (5, 2), SIGMA, "jms", generator=fastdiff.Generator(8), **kw)
    b = fastdiff.sample(gm, (5, 2), SIGMA, "jms", generator=fastdiff.Generator(8), **kw)
    c = fastdiff.sample(gm, (5, 2), SIGMA, "jms", generator=fastdiff.Generator(9), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1][0], c[1][0])
    assert torch.equal(a[1][1], a[1][2])                               # a repeated step index
    # per-sample seeds: a sample's measurements and result do not depend on its batch
    g3 = fastdiff.Generator(seed=[3, 7, 11])
    batch = fastdiff.sample(gm, (3, 2), SIGMA, "jms", generator=g3, **kw)
    alone = fastdiff.sample(gm, (1, 2), SIGMA, "jms", generator=fastdiff.Generator(seed=[7]), **kw)
    assert torch.equal(batch[0][1:2], alone[0]) and torch.equal(batch[1][:, 1:2], alone[1])
    # the generator ends past the mean chain's draws and the residuals'
    g = fastdiff.Generator(1)
    fastdiff.sample(gm, (5, 2), SIGMA, "jms", generator=g, **kw)
    assert g.offset == (1 + 3) * 12 + 3 * 40                          # (start + 3 steps) x B n; 3 residual draws


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_tensor_start(dtype):
    gm = GaussianMixture(torch.stack([torch.full((5,), -2.0), torch.full((5,), 2.0)]).to(dtype), 1.0)
    y0 = (torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    out, traj = fastdiff.sample(gm, y0, 1.0, "jms", measurements=3, steps=2, generator=fastdiff.Generator(0),
                                return_trajectory=True, disable=True)
    assert out.shape == (4, 5) and traj.shape == (4, 4, 3, 5) and traj.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(traj[0].double(), y0.double(), rtol=4 * eps, atol=8 * eps)   # ybar + r0 = y0
    assert bool(torch.isfinite(traj).all())
    out2 = fastdiff.sample(gm, (4, 5), 1.0, "jms", measurements=3, steps=2, dtype=dtype, disable=True)
    assert out2.dtype == out.dtype and out2.shape == (4, 5)


def test_molrg_mean_chain_on_the_fused_kernel():
    """With a MoLRG the mean chain runs in the fused trajectory kernel: the loop's result to float32."""
    g = torch.Generator().manual_seed(0)
    den = MoLRG([torch.linalg.qr(torch.randn(6, 2, generator=g)).Q for _ in range(2)])
    y0 = torch.randn(9, 4, 6, generator=g)
    kw = dict(measurements=4, steps=7, disable=True, return_trajectory=[0, 3, 7, 8])
    fused = fastdiff.sample(den, y0, 0.8, "jms", fused=True, generator=fastdiff.Generator(5), **kw)
    loop = fastdiff.sample(den, y0, 0.8, "jms", fused=False, generator=fastdiff.Generator(5), **kw)
    torch.testing.assert_close(fused[0], loop[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], loop[1], rtol=1e-5, atol=1e-5)


def test_errors():
    gm = _gauss()
    with pytest.raises(ValueError, match="per_measurement: a bool used by method='jms' only"):
        fastdiff.sample(gm, (4, 2), 1.0, "sms", measurements=2, per_measurement=True, disable=True)
    with pytest.raises(ValueError, match="per_measurement"):
        fastdiff.sample(gm, (4, 2), 1.0, "jms", measurements=2, per_measurement=1, disable=True)
    with pytest.raises(ValueError, match="fused: the fused trajectory kernel cannot run this call"):
        fastdiff.sample(gm, (4, 2), 1.0, "jms", measurements=2, fused=True, disable=True)
    with pytest.raises(ValueError, match="fused: method='jms' with per_measurement=True"):
        fastdiff.sample(gm, (4, 2), 1.0, "jms", measurements=2, fused=True, per_measurement=True, disable=True)
    with pytest.raises(ValueError, match="x: method='jms' expects the state"):
        fastdiff.sample(gm, torch.zeros(4, 3, 2), 1.0, "jms", measurements=2, disable=True)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        fastdiff.sample(gm, torch.zeros(4, 2, 2, dtype=torch.int64), 1.0, "jms", measurements=2, disable=True)
    with pytest.raises(ValueError, match="generator: expected 4 seeds"):
        fastdiff.sample(gm, (4, 2), 1.0, "jms", measurements=2, generator=fastdiff.Generator(seed=[1, 2]), disable=True)
    with pytest.raises(TypeError, match="dtype"):
        fastdiff.sample(gm, (4, 2), 1.0, "jms", measurements=2, dtype=torch.int32, disable=True)
    with pytest.raises(RuntimeError, match="steps must increase"):
        r = MM.ResidualChain([(0.5, 1.0)] * 3, fastdiff.Generator(0), (2, 3, 1), torch.float32, "cpu")
        r.at(2)
        r.at(1)

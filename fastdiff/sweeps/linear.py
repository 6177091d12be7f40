"""Linear diffusion (SPEC 4; seed 001): how many samples does a linear diffusion model need?

Data ``N(0, Sigma)``, ``Sigma = diag(l)`` with a power-law spectrum ``l_v = v^-power`` (v = 1..n;
every quantity below is rotation invariant, so a diagonal Sigma loses nothing).  The linear model
fitted to N samples is the optimal denoiser of ``N(mu_0, Sigma_0 + c I)`` (``mu_0, Sigma_0`` the
empirical mean and covariance (1/N), ``c`` = ``ridge``).  Every DDPM step (seed 001's schedule,
``fixed_small`` variance, from ``x_T ~ N(0, I)``) is then affine per eigenmode ``j`` of
``Sigma_0 + c I`` (eigenvalue ``lam_j``), ``u_{t-1} = A_t u_t + B_t + s_t z``, with
``g = alpha lam / (alpha^2 lam + sigma^2)``, ``k = beta (1 - alpha g) / sigma^2``,
``A = (1 - k)/sqrt(1 - beta)``, ``B = k alpha m_j / sqrt(1 - beta)`` (``m = V^T mu_0``); so the
sampled distribution is exactly ``N(V mean, V diag(var) V^T)`` from the O(T n) recursions
``mean <- A mean + B``, ``var <- A^2 var + s^2``.  Metrics per instance:

- ``kl``: KL(sampled || true) in closed form;
- ``kl_mc`` (with ``mc_samples > 0``): ``mean_i [log q(x_i) - log p(x_i)]`` over samples actually
  drawn with the fused :func:`fastdiff.ddpm_step` (q the exact sampled density), ``kl_mc_se`` its
  standard error; it estimates KL(sampled || true) only if the steps sample q;
- ``test_loss``: ``E ||eps - eps_hat(x_t, t)||^2`` over fresh data and noise, t uniform, exactly:
  ``alpha^2 sum g^2 + alpha^2/sigma^2 sum_j (1 - alpha g_j)^2 ((V^T Sigma V)_jj + (V^T mu_0)_j^2)``;
- ``cov_error``: ``||Sigma - Sigma_0||_F^2 / ||Sigma||_F^2`` (expected ~ (d_eff + 1)/N);
- ``d_eff``: the participation ratio ``(sum l)^2 / sum l^2`` of the data.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

import fastdiff
from fastdiff.sweeps.runner import Experiment, Param, register
from fastdiff.sweeps.subspace import normals

__all__ = ["fit_instances", "sampled_gaussian", "gaussian_kl", "linear_test_loss", "sample_fused"]

DT = torch.float64
_S_DATA, _S_MC = 0, 1


def spectrum(n: int, power: float) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=DT) ** -power


def fit_instances(n: int, power: float, N: int, seed: int, trials: int):
    """Data (T, N, n) and the fitted ``mu_0`` (T, n), ``Sigma_0`` (T, n, n) (ML, 1/N)."""
    X = normals(seed, _S_DATA, trials, N, n) * spectrum(n, power).sqrt()
    mu0 = X.mean(1)
    Xc = X - mu0[:, None]
    return X, mu0, Xc.mT @ Xc / N


def sampled_gaussian(lam: torch.Tensor, m: torch.Tensor, sched: fastdiff.DDPMSchedule):
    """Per-mode mean and variance (T, n) of DDPM sampling with the linear denoiser of eigenvalues
    ``lam`` (T, n) and mean ``m`` (T, n) (in the eigenbasis), from ``x_T ~ N(0, I)``."""
    mean = torch.zeros_like(lam)
    var = torch.ones_like(lam)
    beta, abar = sched.beta, sched.abar
    for t in range(sched.T - 1, -1, -1):
        a, s2 = math.sqrt(abar[t]), 1.0 - float(abar[t])
        b = float(beta[t])
        g = a * lam / (a * a * lam + s2)
        k = b * (1 - a * g) / s2
        A = (1 - k) / math.sqrt(1 - b)
        mean = A * mean + k * a * m / math.sqrt(1 - b)
        var = A * A * var
        if t > 0:  # fixed_small posterior variance, no noise on the last step
            var = var + b * (1 - float(abar[t - 1])) / (1 - float(abar[t]))
    return mean, var


def gaussian_kl(mean_q, var_q, V, l_p):
    """KL(N(V mean_q, V diag(var_q) V^T) || N(0, diag(l_p))) per instance; V (T, n, n)."""
    n = l_p.numel()
    W = (V.square() / l_p[None, :, None]).sum(1)                       # (T, n): (V^T Sigma_p^-1 V)_jj
    mu = (V @ mean_q[..., None])[..., 0]
    return 0.5 * ((W * var_q).sum(1) + (mu.square() / l_p).sum(1) - n + torch.log(l_p).sum() - torch.log(var_q).sum(1))


def linear_test_loss(lam, V, mu0, l_p, sched: fastdiff.DDPMSchedule):
    """``E ||eps - eps_hat||^2`` over fresh data ``N(0, diag(l_p))``, noise and t uniform (exact)."""
    a = sched.alpha[:, None, None]
    s2 = (sched.sigma ** 2)[:, None, None]
    g = a * lam[None] / (a * a * lam[None] + s2)                       # (T_steps, T, n)
    Sjj = (V.square() * l_p[None, :, None]).sum(1)                     # (T, n): (V^T Sigma V)_jj
    dm = (V.mT @ (-mu0)[..., None])[..., 0]                            # V^T (mu - mu_0), mu = 0
    per_t = (a * a * g * g).sum(-1) + (a * a / s2 * (1 - a * g).square() * (Sjj + dm.square())[None]).sum(-1)
    return per_t.mean(0)


def sample_fused(mu0, lam, V, sched, M: int, seed: int, trials: int):
    """M samples per instance (T, M, n) drawn with ``fastdiff.ddpm_step`` (float32, noise in the
    kernel from the cell's Philox stream), the linear denoiser applied batched over instances, on
    the device of the inputs."""
    n = mu0.shape[1]
    gen = fastdiff.Generator(seed, _S_MC << 52)
    x = fastdiff.randn(trials * M, n, generator=gen, device=mu0.device)
    V32, mu32, lam32 = V.float(), mu0.float(), lam.float()
    for t in range(sched.T - 1, -1, -1):
        a, s2 = sched.floats("alpha")[t], sched.floats("sigma")[t] ** 2
        g = a * lam32 / (a * a * lam32 + s2)                                 # (T, n)
        xv = x.view(trials, M, n)
        x0 = mu32[:, None] + (((xv - a * mu32[:, None]) @ V32) * g[:, None]) @ V32.mT
        x = fastdiff.ddpm_step(x, x0.reshape(trials * M, n), t, sched, prediction="x0", generator=gen, out=x)
    return x.view(trials, M, n).double()


def _log_gauss_eig(x, mean, V, var):
    """log N(x; V mean, V diag(var) V^T) for x (T, M, n)."""
    u = x @ V - mean[:, None]
    n = x.shape[-1]
    return -0.5 * ((u.square() / var[:, None]).sum(-1) + torch.log(var).sum(-1)[:, None] + n * math.log(2 * math.pi))


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    """The closed forms (n x n eigendecompositions, float64) run on the CPU; the Monte Carlo sampling
    (``mc_samples`` x T fused steps, the cost of a cell) on ``device``."""
    rows = []
    for ci, (c, seed) in enumerate(zip(cells, seeds)):
        n, N = c["n"], c["N"]
        sched = _schedule(c["T"])
        l_p = spectrum(n, c["power"])
        _, mu0, S0 = fit_instances(n, c["power"], N, seed, trials)
        lam, V = torch.linalg.eigh(S0 + c["ridge"] * torch.eye(n, dtype=DT))
        lam = lam.clamp(min=0)
        m = (V.mT @ mu0[..., None])[..., 0]
        mean, var = sampled_gaussian(lam, m, sched)
        kl = gaussian_kl(mean, var, V, l_p)
        loss = linear_test_loss(lam, V, mu0, l_p, sched)
        cov_err = (S0 - torch.diag(l_p)).square().sum((1, 2)) / l_p.square().sum()
        d_eff = float(l_p.sum() ** 2 / l_p.square().sum())
        kl_mc = kl_se = [float("nan")] * trials
        if c["mc_samples"]:
            x = sample_fused(mu0.to(device), lam.to(device), V.to(device), sched, c["mc_samples"], seed, trials).cpu()
            diff = _log_gauss_eig(x, mean, V, var) - (-0.5 * ((x.square() / l_p).sum(-1) + torch.log(l_p).sum()
                                                              + n * math.log(2 * math.pi)))
            kl_mc = diff.mean(1).tolist()
            kl_se = (diff.std(1) / math.sqrt(c["mc_samples"])).tolist()
        for t in range(trials):
            rows.append({"cell_index": ci, "trial": t, "kl": float(kl[t]), "kl_mc": kl_mc[t], "kl_mc_se": kl_se[t],
                         "test_loss": float(loss[t]), "cov_error": float(cov_err[t]), "d_eff": d_eff,
                         "expected_cov_error": (d_eff + 1) / N})
    backend = fastdiff.backends.resolve("auto", device, torch.float32) if any(c["mc_samples"] for c in cells) \
        else "torch"
    return rows, backend


_SCHEDULES: Dict[int, fastdiff.DDPMSchedule] = {}


def _schedule(T: int) -> fastdiff.DDPMSchedule:
    if T not in _SCHEDULES:
        _SCHEDULES[T] = fastdiff.DDPMSchedule(T=T)
    return _SCHEDULES[T]


def _check(c: Dict) -> None:
    if c["n"] < 1:
        raise ValueError(f"--n: expected n >= 1, got {c['n']}")
    if c["N"] < 1:
        raise ValueError(f"--N: expected N >= 1, got {c['N']}")
    if c["T"] < 2:
        raise ValueError(f"--T: expected T >= 2 steps, got {c['T']}")
    if c["ridge"] < 0:
        raise ValueError(f"--ridge: expected ridge >= 0, got {c['ridge']}")
    if c["mc_samples"] < 0:
        raise ValueError(f"--mc_samples: expected >= 0, got {c['mc_samples']}")
    if c["N"] == 1 and c["ridge"] == 0:
        pass  # a rank-0 covariance is allowed: the model collapses onto mu_0 and the KL is large but finite


register(Experiment(
    name="linear-diffusion",
    description="linear diffusion models vs N (seed 001): KL, test loss, covariance error",
    params=(
        Param("n", int, (32,), "data dimension"),
        Param("power", float, (1.0,), "spectrum l_v = v^-power"),
        Param("N", int, (4, 8, 16, 32, 64, 128, 256, 512, 1024), "training samples"),
        Param("ridge", float, (0.0,), "c of the fitted N(mu_0, Sigma_0 + c I)"),
        Param("T", int, (1000,), "DDPM steps (seed 001 schedule, beta 1e-4..1e-2)"),
        Param("mc_samples", int, (0,), "samples per instance drawn with the fused ddpm_step for kl_mc (0: skip)"),
    ),
    metrics=(("kl", float), ("kl_mc", float), ("kl_mc_se", float), ("test_loss", float), ("cov_error", float),
             ("d_eff", float), ("expected_cov_error", float)),
    run_batch=_run_batch,
    check=_check,
    batch_key=lambda c: (c["n"], c["T"]),
    instance_cost=lambda c: 1.0 + c["mc_samples"] * c["T"] * c["n"] / 2e5,
    max_cost=4096.0,
))

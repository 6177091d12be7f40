"""Linear diffusion (SPEC 4; seed 001): how many samples does a linear diffusion model need?

Data ``N(0, Sigma)``, ``Sigma = diag(l)`` with a power-law spectrum ``l_v = v^-power`` (v = 1..n;
every quantity below is rotation invariant, so a diagonal Sigma loses nothing).  The linear model
fitted to N samples is the optimal denoiser of ``N(mu_0, Sigma_0 + c I)`` (``mu_0, Sigma_0`` the
empirical mean and covariance (1/N), ``c`` = ``ridge``; :mod:`fastdiff.sweeps.learners`).  Every
DDPM step (seed 001's schedule, ``fixed_small`` variance, from ``x_T ~ N(0, I)``) is then affine
per eigenmode ``j`` of ``Sigma_0 + c I`` (eigenvalue ``lam_j``), ``u_{t-1} = A_t u_t + B_t + s_t z``, with
``g = alpha lam / (alpha^2 lam + sigma^2)``, ``k = beta (1 - alpha g) / sigma^2``,
``A = (1 - k)/sqrt(1 - beta)``, ``B = k alpha m_j / sqrt(1 - beta)`` (``m = V^T mu_0``); so the
sampled distribution is exactly ``N(V mean, V diag(var) V^T)`` from the O(T n) recursions
``mean <- A mean + B``, ``var <- A^2 var + s^2``.  Metrics per instance:

- ``kl``: KL(sampled || true) in closed form (float64, >= 0; +inf where the sampled law is singular:
  ``Sigma_0 + ridge I`` of rank < n, e.g. N <= n without a ridge, the regime of memorization;
  the KL is finite from N = n + 1 on, the transition of seed 001 at N ~ n);
- ``singular``: 1 where the sampled law is singular (``kl`` = +inf), else 0;
- ``kl_mc_meaningful``: 1 where ``kl_mc`` estimates the KL, 0 where it cannot (see :func:`mc_kl`);
- ``kl_mc`` (with ``mc_samples > 0``): ``mean_i [log q(x_i) - log p(x_i)]`` over samples actually
  drawn with the fused :func:`fastdiff.ddpm_step` (q the exact sampled density), ``kl_mc_se`` its
  standard error; it estimates KL(sampled || true) only if the steps sample q;
- ``test_loss``: ``E ||eps - eps_hat(x_t, t)||^2`` over fresh data and noise, t uniform, exactly:
  ``alpha^2 sum g^2 + alpha^2/sigma^2 sum_j (1 - alpha g_j)^2 ((V^T Sigma V)_jj + (V^T mu_0)_j^2)``;
- ``train_loss``: the same over the training points (their mean and covariance are ``mu_0`` and
  ``Sigma_0``: ``(V^T Sigma V)_jj + (V^T mu_0)_j^2`` becomes ``lam_j - ridge``); per timestep, both
  are :func:`linear_losses`;
- ``cov_error``: ``||Sigma - Sigma_0||_F^2 / ||Sigma||_F^2``;
- ``expected_cov_error``: its expectation for Gaussian data, with the mean subtracted
  (``N Sigma_0 ~ Wishart(N - 1, Sigma)``; docs/math.md section 4):
  ``((N - 1)(d_eff + 1) + 1) / N^2`` (about ``(d_eff + 1)/N`` for large N only: 2.16, not 2.80,
  at N = 4, n = 32);
- ``d_eff``: the participation ratio ``(sum l)^2 / sum l^2`` of the data.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

import fastdiff
from fastdiff import coefficients as C
from fastdiff import sampling
from fastdiff.sweeps.learners import fit_gaussian, null_modes
from fastdiff.sweeps.params import check_at_least_one, check_ddpm_steps, ddpm_steps, training_samples
from fastdiff.sweeps.runner import Experiment, Param, register
from fastdiff.sweeps.streams import normals

__all__ = ["fit_instances", "sampled_gaussian", "gaussian_kl", "linear_test_loss", "linear_losses",
           "expected_cov_error", "sample_fused"]

DT = torch.float64
_S_DATA, _S_MC = 0, 1


def spectrum(n: int, power: float) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=DT) ** -power


def fit_instances(n: int, power: float, N: int, seed: int, trials: int):
    """Data (T, N, n) and the fitted ``mu_0`` (T, n), ``Sigma_0`` (T, n, n) (ML, 1/N: :func:`fit_gaussian`)."""
    X = normals(seed, _S_DATA, trials, N, n) * spectrum(n, power).sqrt()
    return (X, *fit_gaussian(X))


def sampled_gaussian(lam: torch.Tensor, m: torch.Tensor, sched: fastdiff.DDPMSchedule):
    """Per-mode mean and variance (T, n) of DDPM sampling with the linear denoiser of eigenvalues
    ``lam`` (T, n) and mean ``m`` (T, n) (in the eigenbasis), from ``x_T ~ N(0, I)``.

    The last step (t = 0: ``abar_0 = 1 - beta_0`` by the schedule's definition, ``abar_{-1} = 1``, no
    noise) is the denoiser's prediction ``x0_hat = m + g (u - a m)`` exactly: ``A = g``,
    ``B = (1 - a g) m``.  Written so, whatever float64 makes of ``1 - abar_0``, a mode with
    ``lam = 0`` ends with variance exactly 0 (the sampled law is singular there) instead of a
    rounding residue ~1e-24 whose log made the KL finite and arbitrary (960 at N = 4, n = 32)."""
    mean = torch.zeros_like(lam)
    var = torch.ones_like(lam)
    beta, abar = sched.beta, sched.abar
    for t in range(sched.T - 1, -1, -1):
        a, s2 = math.sqrt(abar[t]), 1.0 - float(abar[t])
        b = float(beta[t])
        g = a * lam / (a * a * lam + s2)
        if t == 0:   # x_{-1} = (x - beta_0 eps_hat / sqrt(1 - abar_0)) / sqrt(alpha_0) = x0_hat
            mean = g * mean + (1 - a * g) * m
            var = g * g * var
            continue
        # the DDPM step's own coefficients, x' = ca u + ce eps_hat + s z (fixed_small, no noise at t = 0),
        # with eps_hat = (u - a x0_hat)/sigma and x0_hat = g u + (1 - a g) m: A = ca + ce (1 - a g)/sigma
        ca, ce, s = C.ddpm(b, float(abar[t]), float(abar[t - 1]) if t > 0 else 1.0, "fixed_small", t > 0)
        r = ce * (1 - a * g) / math.sqrt(s2)
        A = ca + r
        mean = A * mean - r * a * m
        var = A * A * var + s * s
    return mean, var


def gaussian_kl(mean_q, var_q, V, l_p):
    """KL(N(V mean_q, V diag(var_q) V^T) || N(0, diag(l_p))) per instance (float64); V (T, n, n).

    With ``W_j = (V^T Sigma_p^-1 V)_jj`` and ``r_j = W_j var_j`` it is computed as the sum of three
    non-negative parts, so rounding cannot make it negative (the plain
    ``tr - n + log det - log det`` form cancels to ~1e-13 and below):
    ``0.5 [sum_j (r_j - 1 - log r_j) + (sum_j log W_j + sum_v log l_v) + |V mean_q|^2_{Sigma_p^-1}]``;
    the middle part is >= 0 by Hadamard's inequality (``det(V^T Sigma_p^-1 V) = 1 / prod l``).
    A mode with ``var_j = 0`` (a singular sampled law) gives ``+inf``."""
    V, mean_q, var_q, l_p = V.double(), mean_q.double(), var_q.double(), l_p.double()
    W = (V.square() / l_p[None, :, None]).sum(1)                       # (T, n): (V^T Sigma_p^-1 V)_jj
    mu = (V @ mean_q[..., None])[..., 0]
    r = W * var_q
    rm1 = r - 1
    per_mode = torch.where(r > 0, rm1 - torch.log1p(rm1), torch.full_like(r, math.inf))
    # each part is >= 0 exactly; a negative value is rounding (|error| ~ n eps max|log|), dropped
    hadamard = (torch.log(W).sum(1) + torch.log(l_p).sum()).clamp(min=0)
    return 0.5 * (per_mode.clamp(min=0).sum(1) + hadamard + (mu.square() / l_p).sum(1))


def linear_losses(lam, V, mu0, l_p, sched: fastdiff.DDPMSchedule, ridge: float = 0.0):
    """Per-timestep ``(test, train)`` losses (T_steps, T) of the linear denoiser of eigenmodes
    ``(lam, V)`` (``Sigma_0 + ridge I``) and mean ``mu0``: ``E ||eps - eps_hat(x_t, t)||^2`` exactly,
    over fresh data ``N(0, diag(l_p))`` (test) or the training points (train: their mean is
    ``mu0`` and their covariance ``Sigma_0``, ``lam - ridge`` in the eigenbasis)::

        alpha^2 sum_j g_j^2 + alpha^2 / sigma^2 sum_j (1 - alpha g_j)^2 (S_jj + (V^T (mu - mu_0))_j^2)
    """
    a = sched.alpha[:, None, None]
    s2 = (sched.sigma ** 2)[:, None, None]
    g = a * lam[None] / (a * a * lam[None] + s2)                       # (T_steps, T, n)
    Sjj = (V.square() * l_p[None, :, None]).sum(1)                     # (T, n): (V^T Sigma V)_jj
    dm = (V.mT @ (-mu0)[..., None])[..., 0]                            # V^T (mu - mu_0), mu = 0
    noise = (a * a * g * g).sum(-1)
    shrink = a * a / s2 * (1 - a * g).square()
    test = noise + (shrink * (Sjj + dm.square())[None]).sum(-1)
    train = noise + (shrink * (lam - ridge).clamp(min=0)[None]).sum(-1)
    return test, train


def linear_test_loss(lam, V, mu0, l_p, sched: fastdiff.DDPMSchedule):
    """``E ||eps - eps_hat||^2`` over fresh data ``N(0, diag(l_p))``, noise and t uniform (exact)."""
    return linear_losses(lam, V, mu0, l_p, sched)[0].mean(0)


def expected_cov_error(N: int, d_eff: float) -> float:
    """``E ||Sigma_0 - Sigma||_F^2 / ||Sigma||_F^2`` for N Gaussian samples, ``Sigma_0`` the ML
    covariance with the sample mean subtracted (``N Sigma_0 ~ W_n(N - 1, Sigma)``; its second
    moments ``Cov(W_ij, W_kl) = m (S_ik S_jl + S_il S_jk)``; docs/math.md section 4)::

        ((N - 1) (||Sigma||_F^2 + (tr Sigma)^2) + ||Sigma||_F^2) / (N^2 ||Sigma||_F^2)
            = ((N - 1)(d_eff + 1) + 1) / N^2,   d_eff = (tr Sigma)^2 / ||Sigma||_F^2
    """
    return ((N - 1) * (d_eff + 1) + 1) / (N * N)


def sample_fused(mu0, lam, V, sched, M: int, seed: int, trials: int):
    """M samples per instance (T, M, n) drawn with ``fastdiff.ddpm_step`` by the sampler loop
    :func:`fastdiff.sampling.run` (float32, noise in the kernel from the cell's Philox stream), the
    linear denoiser applied batched over instances, on the device of the inputs."""
    n = mu0.shape[1]
    gen = fastdiff.Generator(seed, _S_MC << 52)
    x = fastdiff.randn(trials * M, n, generator=gen, device=mu0.device)
    V32, mu32, lam32 = V.float(), mu0.float(), lam.float()

    def linear_denoisers(x, a, sigma):  # instance t's M chains through its own x0_hat = mu + V g V^T (x - a mu)
        g = a * lam32 / (a * a * lam32 + sigma ** 2)                          # (T, n)
        xv = x.view(trials, M, n)
        return (mu32[:, None] + (((xv - a * mu32[:, None]) @ V32) * g[:, None]) @ V32.mT).reshape(trials * M, n)

    x = sampling.run(linear_denoisers, x, sampling.trajectory_table(sched, "ddpm"), generator=gen, progress=False)
    return x.view(trials, M, n).double()


def _log_gauss_eig(x, mean, V, var):
    """log N(x; V mean, V diag(var) V^T) for x (T, M, n)."""
    u = x @ V - mean[:, None]
    n = x.shape[-1]
    return -0.5 * ((u.square() / var[:, None]).sum(-1) + torch.log(var).sum(-1)[:, None] + n * math.log(2 * math.pi))


MC_NOISE_LIMIT = 4.0   # standard errors: an estimate further below 0 than this is not a KL estimate


def mc_kl(x, mean, V, var, l_p, kl, T: int):
    """``(kl_mc, kl_mc_se, meaningful)`` lists per instance from samples ``x`` (T, M, n) of the fused
    steps: ``mean_i [log q(x_i) - log p(x_i)]`` and its standard error.

    Not meaningful (``meaningful = 0``) where it cannot estimate KL(q || p): where q is singular
    (``kl`` is +inf: ``kl_mc`` is +inf too, the exact value); where q is too thin for float32 samples
    (``min var < 1e4 T eps32^2 max var``: the rounding of T float32 steps, ~sqrt(T) eps32 per
    coordinate, then dominates ``(x - mean)^2 / var``, which gave estimates of -1e15..-5e18; ``kl_mc``
    is NaN); and where the estimate is below 0 by more than ``MC_NOISE_LIMIT`` standard errors
    (NaN).  A negative estimate within that noise is reported as 0 (a KL is >= 0)."""
    n, M = x.shape[-1], x.shape[1]
    log_p = -0.5 * ((x.square() / l_p).sum(-1) + torch.log(l_p).sum() + n * math.log(2 * math.pi))
    eps32 = torch.finfo(torch.float32).eps
    out, ses, oks = [], [], []
    for t in range(x.shape[0]):
        if not math.isfinite(float(kl[t])):
            out.append(math.inf), ses.append(float("nan")), oks.append(0.0)
            continue
        if float(var[t].min()) < 1e4 * T * eps32 ** 2 * float(var[t].max()):
            out.append(float("nan")), ses.append(float("nan")), oks.append(0.0)
            continue
        diff = _log_gauss_eig(x[t:t + 1], mean[t:t + 1], V[t:t + 1], var[t:t + 1])[0] - log_p[t]
        est, se = float(diff.mean()), float(diff.std()) / math.sqrt(M)
        if not math.isfinite(est) or est < -MC_NOISE_LIMIT * se:
            out.append(float("nan")), ses.append(se), oks.append(0.0)
            continue
        out.append(max(est, 0.0)), ses.append(se), oks.append(1.0)
    return out, ses, oks


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    """The closed forms (n x n eigendecompositions, float64) run on the CPU; the Monte Carlo sampling
    (``mc_samples`` x T fused steps, the cost of a cell) on ``device``."""
    rows = []
    for ci, (c, seed) in enumerate(zip(cells, seeds)):
        n, N = c["n"], c["N"]
        sched = _schedule(c["T"])
        l_p = spectrum(n, c["power"])
        _, mu0, S0 = fit_instances(n, c["power"], N, seed, trials)
        lam, V = null_modes(S0, c["ridge"])
        m = (V.mT @ mu0[..., None])[..., 0]
        mean, var = sampled_gaussian(lam, m, sched)
        kl = gaussian_kl(mean, var, V, l_p)
        singular = (var == 0).any(-1)                  # a mode of variance exactly 0: Sigma_0 + ridge I singular
        test, train = linear_losses(lam, V, mu0, l_p, sched, c["ridge"])
        loss, train_loss = test.mean(0), train.mean(0)
        cov_err = (S0 - torch.diag(l_p)).square().sum((1, 2)) / l_p.square().sum()
        d_eff = float(l_p.sum() ** 2 / l_p.square().sum())
        nan = float("nan")
        kl_mc = kl_se = ok = [nan] * trials
        if c["mc_samples"]:
            x = sample_fused(mu0.to(device), lam.to(device), V.to(device), sched, c["mc_samples"], seed, trials).cpu()
            kl_mc, kl_se, ok = mc_kl(x, mean, V, var, l_p, kl, c["T"])
        for t in range(trials):
            rows.append({"cell_index": ci, "trial": t, "kl": float(kl[t]), "kl_mc": kl_mc[t], "kl_mc_se": kl_se[t],
                         "kl_mc_meaningful": ok[t], "singular": float(singular[t]),
                         "test_loss": float(loss[t]), "train_loss": float(train_loss[t]),
                         "cov_error": float(cov_err[t]), "d_eff": d_eff,
                         "expected_cov_error": expected_cov_error(N, d_eff)})
    mc = any(c["mc_samples"] for c in cells)
    backend = fastdiff.dispatch.choose("fused_step", "auto", device, torch.float32) if mc else "torch"
    return rows, backend


_SCHEDULES: Dict[int, fastdiff.DDPMSchedule] = {}


def _schedule(T: int) -> fastdiff.DDPMSchedule:
    if T not in _SCHEDULES:
        _SCHEDULES[T] = fastdiff.DDPMSchedule(T=T)
    return _SCHEDULES[T]


def _check(c: Dict) -> None:
    check_at_least_one(c, ("n", "N"))
    check_ddpm_steps(c)
    if c["ridge"] < 0:
        raise ValueError(f"--ridge: expected ridge >= 0, got {c['ridge']}")
    if c["mc_samples"] < 0:
        raise ValueError(f"--mc-samples: expected >= 0, got {c['mc_samples']}")
    # N = 1 without a ridge is allowed: the model collapses onto mu_0 (a singular law, KL +inf)


register(Experiment(
    name="linear-diffusion",
    description="linear diffusion models vs N (seed 001): KL, test loss, covariance error",
    params=(
        Param("n", int, (32,), "data dimension"),
        Param("power", float, (1.0,), "spectrum l_v = v^-power"),
        training_samples((4, 8, 16, 32, 64, 128, 256, 512, 1024)),
        Param("ridge", float, (0.0,), "c of the fitted N(mu_0, Sigma_0 + c I)"),
        ddpm_steps((1000,), "DDPM steps (seed 001 schedule, beta 1e-4..1e-2)"),
        Param("mc_samples", int, (0,), "samples per instance drawn with the fused ddpm_step for kl_mc (0: skip)"),
    ),
    metrics=(("kl", float), ("kl_mc", float), ("kl_mc_se", float), ("kl_mc_meaningful", float), ("test_loss", float),
             ("cov_error", float),
             ("d_eff", float), ("expected_cov_error", float), ("singular", float), ("train_loss", float)),
    run_batch=_run_batch,
    check=_check,
    batch_key=lambda c: (c["n"], c["T"]),
    instance_cost=lambda c: 1.0 + c["mc_samples"] * c["T"] * c["n"] / 2e5,
    # data (N x n), covariance and eigenvectors (n x n), the (T, n) test-loss terms, the float32 MC chains
    instance_bytes=lambda c: 8.0 * (2 * c["N"] * c["n"] + 8 * c["n"] ** 2 + 3 * c["T"] * c["n"])
                             + 28.0 * c["mc_samples"] * c["n"],
    max_cost=4096.0,
    version=3,   # 2: KL +inf for a singular sampled law, kl_mc_meaningful; 3: singular, train_loss, the exact
                 # (centred) expected_cov_error
))

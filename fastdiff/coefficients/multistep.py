"""Multistep and exponential-integrator coefficients: DPM-Solver++ (2M, 2M/3M-SDE, 2S-ancestral), DPM-2,
LMS, DEIS, iPNDM, the consistency samplers (LCM, TCD) and UniPC (docs/math.md sections 1b, 1e).
See :mod:`fastdiff.coefficients`."""
from __future__ import annotations

import math
from typing import Tuple

import torch

from fastdiff.coefficients.single import ancestral_sigmas, euler, sqrt

__all__ = ["log_snr", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "phi", "dpmpp_2s_ancestral", "dpm_2", "lms",
           "ipndm_v", "ipndm", "deis", "lcm", "lcm_boundary", "tcd", "UNIPC_VARIANTS", "unipc"]


# =========================================================================== exponential-integrator solvers
# DPM-Solver / DPM-Solver++ (Lu et al. 2022, "DPM-Solver", NeurIPS 2022; "DPM-Solver++", arXiv:2211.01095)
# integrate the probability-flow ODE in lambda = log(alpha / sigma) (half the log-SNR) with the linear
# part exact.  With the data prediction D = x0_hat, from level (alpha, sigma) to (alpha_n, sigma_n),
# h = lambda_n - lambda (DPM-Solver++ eq. 9 / Alg. 1):
#
#     x_n = (sigma_n / sigma) x + alpha_n (1 - e^{-h}) D          (first order: DDIM)
#
# and the multistep forms replace D by a finite-difference extrapolation of the earlier D's.  For VE
# levels (alpha = 1) these are k-diffusion's ``sample_dpmpp_*`` (Crowson 2022).  Each function returns
# the coefficients of ``x_n = cx x + sum_j c_j D_{i-j} + cz z``: ``(cx, (c_0, c_1, ...), cz)``.
# docs/math.md section 1b.

def log_snr(alpha: float, sigma: float) -> float:
    """``lambda = log(alpha / sigma)`` (DPM-Solver's half log-SNR; ``+inf`` at ``sigma = 0``, ``-inf`` at
    ``alpha = 0``, the pure noise a flow path starts from, where a step's ``h`` is infinite and its
    first-order update ``x_n = (sigma_n/sigma) x + alpha_n D`` the exact limit)."""
    if sigma == 0.0:
        return math.inf
    return -math.inf if alpha == 0.0 else math.log(alpha / sigma)


def _steps_h(levels):
    """``h_k = lambda_{k+1} - lambda_k`` for consecutive levels (alpha, sigma)."""
    lam = [log_snr(a, s) for a, s in levels]
    return [b - a for a, b in zip(lam, lam[1:])]


def dpmpp_2m(level: Tuple[float, float], level_next: Tuple[float, float], h_last: float = None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2; k-diffusion ``sample_dpmpp_2m``):

        x_n = (sigma_n/sigma) x - alpha_n expm1(-h) D,   D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_last / h

    first order (``h_last`` None) and to ``sigma_n = 0`` (``x_n = alpha_n D_i``, k-diffusion's last step).
    Returns ``(cx, (c_0[, c_1]), 0.0)``."""
    (a, s), (an, sn) = level, level_next
    if sn == 0.0:
        return 0.0, (an,), 0.0
    h = log_snr(an, sn) - log_snr(a, s)
    if h == 0.0:  # no step (a repeated last level, diffusers' final_sigmas_type="sigma_min"): x_n = x
        return sn / s, (0.0,) * (1 if h_last is None else 2), 0.0
    c = -an * math.expm1(-h)
    if h_last is None:
        return sn / s, (c,), 0.0
    r = h_last / h
    return sn / s, (c * (1.0 + 1.0 / (2.0 * r)), -c / (2.0 * r)), 0.0


def dpmpp_2m_sde(level, level_next, h_last=None, *, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5 / App. B; k-diffusion ``sample_dpmpp_2m_sde``), with
    ``eta h`` the share of the step taken as noise (``eta = 0``: the ODE; ``eta = 1``: the SDE):

        x_n = (sigma_n/sigma) e^{-eta h} x + alpha_n (1 - e^{-(1+eta) h}) D_i + corr
              + sigma_n sqrt(1 - e^{-2 eta h}) s_noise z,
        corr = alpha_n (1 - e^{-(1+eta)h}) / (2 r) (D_i - D_{i-1})                        (midpoint)
             = alpha_n ((1 - e^{-(1+eta)h}) / (-(1+eta)h) + 1) / r (D_i - D_{i-1})         (heun)

    ``r = h_last / h``; no correction without ``h_last``; ``x_n = alpha_n D_i`` to ``sigma_n = 0``; no draw
    (``cz = 0``) when ``eta = 0``.  Returns ``(cx, (c_0[, c_1]), cz)``."""
    (a, s), (an, sn) = level, level_next
    if sn == 0.0:
        return 0.0, (an,), 0.0
    h = log_snr(an, sn) - log_snr(a, s)
    if h == 0.0:  # no step: x_n = x
        return sn / s, (0.0,) * (1 if h_last is None else 2), 0.0
    eh = eta * h
    g = -math.expm1(-h - eh)
    c0 = an * g
    cs = ()
    if h_last is not None:
        r = h_last / h
        k = 0.5 * g / r if solver_type == "midpoint" else (g / (-h - eh) + 1.0) / r
        c0, cs = c0 + an * k, (-an * k,)
    cz = sn * math.sqrt(-math.expm1(-2.0 * eh)) * s_noise if eta else 0.0
    return sn / s * math.exp(-eh), (c0,) + cs, cz


def dpmpp_3m_sde(level, level_next, h_1=None, h_2=None, *, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``; ``eta = 0`` is the 3M ODE solver of
    Lu et al. 2022b, App. B), with ``h_eta = (1 + eta) h``, ``phi_2 = expm1(-h_eta)/h_eta + 1``,
    ``phi_3 = phi_2/h_eta - 1/2``, ``r0 = h_1/h``, ``r1 = h_2/h``:

        x_n = (sigma_n/sigma) e^{-eta h} x + alpha_n [(1 - e^{-h_eta}) D_i + phi_2 d1 - phi_3 d2]
              + sigma_n sqrt(1 - e^{-2 eta h}) s_noise z,
        d1_0 = (D_i - D_{i-1})/r0,  d1_1 = (D_{i-1} - D_{i-2})/r1,
        d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1),  d2 = (d1_0 - d1_1)/(r0 + r1)

    (second order, ``x += alpha_n phi_2 (D_i - D_{i-1})/r0``, with ``h_1`` only; first order with neither).
    Returns ``(cx, (c_0, c_1, c_2)[:order], cz)``."""
    (a, s), (an, sn) = level, level_next
    if sn == 0.0:
        return 0.0, (an,), 0.0
    h = log_snr(an, sn) - log_snr(a, s)
    if h == 0.0:  # no step: x_n = x
        return sn / s, (0.0,) * (1 + (h_1 is not None) + (h_2 is not None)), 0.0
    he = h * (eta + 1.0)
    c = [-math.expm1(-he), 0.0, 0.0]
    phi_2 = math.expm1(-he) / he + 1.0
    if h_2 is not None:
        r0, r1 = h_1 / h, h_2 / h
        d10 = (1.0 / r0, -1.0 / r0, 0.0)
        d11 = (0.0, 1.0 / r1, -1.0 / r1)
        diff = [p - q for p, q in zip(d10, d11)]
        d1 = [p + q * r0 / (r0 + r1) for p, q in zip(d10, diff)]
        d2 = [q / (r0 + r1) for q in diff]
        phi_3 = phi_2 / he - 0.5
        c = [cj + phi_2 * p - phi_3 * q for cj, p, q in zip(c, d1, d2)]
        order = 3
    elif h_1 is not None:
        r = h_1 / h
        c = [c[0] + phi_2 / r, -phi_2 / r, 0.0]
        order = 2
    else:
        order = 1
    cz = sn * math.sqrt(-math.expm1(-2.0 * h * eta)) * s_noise if eta else 0.0
    return sn / s * math.exp(-eta * h), tuple(an * cj for cj in c[:order]), cz


def dpmpp_2s_ancestral(sigma: float, sigma_next: float, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral, VE (k-diffusion ``sample_dpmpp_2s_ancestral``): with
    ``(sigma_down, sigma_up)`` of :func:`ancestral_sigmas`, ``t = -log sigma``, ``h = log(sigma/sigma_down)``,
    a single-step second-order move to ``sigma_down`` through the midpoint ``sigma_s = sqrt(sigma sigma_down)``:

        x_2 = (sigma_s/sigma) x - expm1(-h/2) D(x),   x_n = (sigma_down/sigma) x - expm1(-h) D(x_2; sigma_s)
              + s_noise sigma_up z     (no noise to sigma_next = 0)

    and Euler to ``sigma_down = 0``.  Returns ``(predictor, corrector, level2)``: ``predictor = (cx, c0)``
    of x_2, ``corrector = (hx, hm, hxp, hmp, hz)`` of ``x_n = hx x + hm D(x) + hxp x_2 + hmp D(x_2) + hz z``,
    ``level2 = sigma_s`` (None: one stage, ``x_n = hx x + hm D(x) + hz z``)."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    hz = s_noise * sigma_up if sigma_next > 0.0 else 0.0
    if sigma_down == 0.0:
        cx, c0 = euler(sigma, sigma_down)
        return (cx, c0), (cx, c0, 0.0, 0.0, hz), None
    h = math.log(sigma / sigma_down)
    sigma_s = math.exp(-(-math.log(sigma) + 0.5 * h))
    return (sigma_s / sigma, -math.expm1(-0.5 * h)), (sigma_down / sigma, 0.0, 0.0, -math.expm1(-h), hz), sigma_s


def dpm_2(sigma: float, sigma_target: float):
    """DPM-Solver-2 in Karras et al.'s form (k-diffusion ``sample_dpm_2``; Lu et al. 2022a, Alg. 1 with
    the midpoint in log sigma): ``sigma_mid = exp((log sigma + log sigma_target)/2)``,

        x_2 = x + (sigma_mid - sigma) d,          d   = (x - D(x))/sigma,
        x_n = x + (sigma_target - sigma) d_2,     d_2 = (x_2 - D(x_2; sigma_mid))/sigma_mid.

    Returns ``((cx, c0), (hx, hm, hxp, hmp), sigma_mid)``; Euler (``level2`` None) to ``sigma_target = 0``."""
    if sigma_target == 0.0:
        cx, c0 = euler(sigma, sigma_target)
        return (cx, c0), (cx, c0, 0.0, 0.0), None
    sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_target)))
    cx, c0 = euler(sigma, sigma_mid)
    k = (sigma_target - sigma) / sigma_mid
    return (cx, c0), (1.0, 0.0, k, -k), sigma_mid


def lms(sigmas, i: int, order: int = 4):
    """Linear multistep in sigma (k-diffusion ``sample_lms``; Adams-Bashforth on the ODE
    ``dx/dsigma = d = (x - D)/sigma``): ``x_{i+1} = x_i + sum_j c_j d_{i-j}``, j < min(i + 1, order), with

        c_j = integral_{sigma_i}^{sigma_{i+1}} prod_{k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) dtau

    (the Lagrange basis through the last ``order`` levels, integrated exactly: k-diffusion integrates
    it numerically with ``scipy.integrate.quad``, exact for these low-degree polynomials up to rounding).
    Returns the tuple ``(c_0, c_1, ...)``."""
    p = min(i + 1, order)
    t = [float(v) for v in sigmas]
    out = []
    for j in range(p):
        poly = [1.0]  # coefficients, lowest degree first
        for k in range(p):
            if k == j:
                continue
            den = t[i - j] - t[i - k]
            # poly *= (tau - t[i-k]) / den
            poly = [(b - t[i - k] * a) / den for a, b in zip(poly + [0.0], [0.0] + poly)]
        F = lambda u: sum(a * u ** (d + 1) / (d + 1) for d, a in enumerate(poly))  # noqa: E731
        out.append(F(t[i + 1]) - F(t[i]))
    return tuple(out)


# =========================================================================== DEIS and iPNDM (Zhang & Chen 2023)
# Q. Zhang and Y. Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023:
# DEIS writes the probability-flow ODE for y = x / alpha in rho = sigma / alpha as dy/drho = eps(x) (eq. 12 with
# their Prop. 2), so one step is y_{i+1} = y_i + int_{rho_i}^{rho_{i+1}} eps drho, eps replaced by the
# polynomial through the last p outputs (rhoAB-DEIS, eq. 15).  diffusers' DEISMultistepScheduler
# (solver_type "logrho") takes the polynomial in log rho and integrates it exactly.  iPNDM (their App. B /
# Alg. 3) is Adams-Bashforth on dx/dsigma = d = (x - D)/sigma with the equal-step coefficients, warm-started
# at lower orders; ComfyUI's sample_ipndm_v (from zju-pi/diff-sampler) adapts them to the step sizes.
# docs/math.md section 1b.

def _exp_moments(delta: float, k_max: int):
    """``I_k = int_0^delta u^k e^u du`` for ``k = 0 .. k_max`` (``delta = -inf``: ``(-1)^(k+1) k!``).  The
    series ``sum_n delta^(k+n+1) / (n! (k+n+1))`` for ``|delta| <= 1``, where the closed form
    ``e^delta P_k(delta) - P_k(0)``, ``P_k(u) = sum_l (-1)^(k-l) k!/l! u^l``, cancels (short steps)."""
    if delta == -math.inf:
        return [(-1.0) ** (k + 1) * math.factorial(k) for k in range(k_max + 1)]
    if abs(delta) <= 1.0:
        out = []
        for k in range(k_max + 1):
            total, term, n = 0.0, delta ** (k + 1), 0   # term = delta^(k+n+1) / n!
            while n < 40 and (n == 0 or abs(term) > 1e-18 * abs(total)):
                total += term / (k + n + 1)
                n += 1
                term *= delta / n
            out.append(total)
        return out
    e = math.exp(delta)
    return [e * sum((-1.0) ** (k - l) * math.factorial(k) / math.factorial(l) * delta ** l for l in range(k + 1))
            - (-1.0) ** k * math.factorial(k) for k in range(k_max + 1)]


def deis(rhos, i: int, order: int):
    """DEIS in log rho (Zhang & Chen 2023, eq. 15 with the basis in ``log rho``; diffusers'
    ``DEISMultistepScheduler``, ``solver_type="logrho"``): ``y_{i+1} = y_i + sum_j c_j eps_{i-j}``,
    ``y = x / alpha``, ``rho = sigma / alpha``, ``j < order`` (the caller's warm start), with

        c_j = int_{rho_i}^{rho_{i+1}} prod_{k != j} (log r - log rho_{i-k}) / (log rho_{i-j} - log rho_{i-k}) dr

    exactly: with ``u = log(r / rho_i)`` the basis is a polynomial ``sum_m a_jm u^m`` and
    ``c_j = rho_i sum_m a_jm I_m(log(rho_{i+1} / rho_i))`` (:func:`_exp_moments`), also to ``rho_{i+1} = 0``
    (the integrand is ``O(log^k r)``, integrable).  ``order = 1`` is DDIM.  Returns ``(c_0, ...)``."""
    r = [float(v) for v in rhos]
    p = int(order)
    if not all(0.0 < r[i - k] < math.inf for k in range(p)) or not 0.0 <= r[i + 1] < math.inf:
        raise ValueError(f"rhos: DEIS needs finite rho > 0 at its {p} nodes and a finite target, got "
                         f"{[r[i - k] for k in range(p)]} -> {r[i + 1]}")
    u = [math.log(r[i - k] / r[i]) for k in range(p)]
    delta = -math.inf if r[i + 1] == 0.0 else math.log(r[i + 1] / r[i])
    moments = _exp_moments(delta, p - 1)
    out = []
    for j in range(p):
        poly = [1.0]  # lowest degree first
        for k in range(p):
            if k != j:
                den = u[j] - u[k]
                if den == 0.0:
                    raise ValueError(f"rhos: DEIS needs distinct nodes, got rho = {r[i - j]} twice")
                poly = [(b - u[k] * a) / den for a, b in zip(poly + [0.0], [0.0] + poly)]
        out.append(r[i] * sum(a * m for a, m in zip(poly, moments)))
    return tuple(out)


_AB = ((1.0,), (3.0 / 2, -1.0 / 2), (23.0 / 12, -16.0 / 12, 5.0 / 12), (55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24))


def ipndm(sigmas, i: int, order: int = 4):
    """iPNDM (Zhang & Chen 2023, App. B; ComfyUI ``sample_ipndm``): ``x_{i+1} = x_i + sum_j c_j d_{i-j}``,
    ``c_j = (sigma_{i+1} - sigma_i) b_j`` with the equal-step Adams-Bashforth weights ``b`` of order
    ``p = min(i + 1, order)``: ``(1)``, ``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``.
    Returns ``(c_0, ...)``."""
    h = float(sigmas[i + 1]) - float(sigmas[i])
    return tuple(h * b for b in _AB[min(i + 1, order) - 1])


def ipndm_v(sigmas, i: int, order: int = 4):
    """iPNDM-v, variable steps (ComfyUI ``sample_ipndm_v``, from zju-pi/diff-sampler): ``c_j = h coeff_j``
    with ``h = sigma_{i+1} - sigma_i``, ``h_k`` the earlier steps (``h_1 = sigma_i - sigma_{i-1}``, ...),
    ``p = min(i + 1, order)``:

        p = 2:  coeff = (1 + h/(2 h_1), -h/(2 h_1))                        (exact variable-step AB2)
        p = 3:  t1 = (1 - h/(3 (h + h_1)) h (h + h_1) / (h_1 (h_1 + h_2))) / 2,
                coeff = (1 + h/(2 h_1) + t1, -h/(2 h_1) - (1 + h_1/h_2) t1, t1 h_1/h_2)
        p = 4:  p = 3's terms plus t2 = ((1 - h/(3 (h + h_1)))/2 + (1 - h/(2 (h + h_1))) h/(6 (h + h_1 + h_2)))
                  h (h + h_1) (h + h_1 + h_2) / (h_1 (h_1 + h_2) (h_1 + h_2 + h_3)) times
                (1, -(1 + h_1/h_2 + q), h_1/h_2 + q (1 + h_2/h_3), -q h_1/h_2),  q = h_1 (h_1 + h_2) / (h_2 (h_2 + h_3))

    as those samplers write them.  p = 3 is AB3 on equal steps only (third order on smooth grids); p = 4 is
    not AB4 even there (weights (57, -65, 43, -11)/24, third order), and its weights sum to ``h`` only where
    the step ratio is constant: third order on geometric levels, second on Karras levels (docs/math.md 1b).
    Returns ``(c_0, ...)``."""
    t = [float(sigmas[i - k]) for k in range(min(i + 1, order, 4))][::-1] + [float(sigmas[i + 1])]
    p = len(t) - 1
    h = t[-1] - t[-2]
    if p == 1:
        return (h,)
    h1 = t[-2] - t[-3]
    if p == 2:
        return (h * (2 + h / h1) / 2, h * (-(h / h1) / 2))
    h2 = t[-3] - t[-4]
    t1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    c = [(2 + h / h1) / 2 + t1, -(h / h1) / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    if p == 4:
        h3 = t[-4] - t[-5]
        t2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
            * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
        q = h1 * (h1 + h2) / (h2 * (h2 + h3))
        c = [c[0] + t2, c[1] - (1 + h1 / h2 + q) * t2, c[2] + (h1 / h2 + q * (1 + h2 / h3)) * t2, -t2 * q * h1 / h2]
    return tuple(h * v for v in c)


# =========================================================================== consistency samplers
# Latent consistency models (S. Luo, Y. Tan, L. Huang, J. Li and H. Zhao, "Latent Consistency Models",
# arXiv:2310.04378: the c_skip/c_out parameterization and multistep latent consistency sampling, after
# Y. Song, P. Dhariwal, M. Chen and I. Sutskever, "Consistency Models", ICML 2023, Alg. 1) and trajectory
# consistency distillation (J. Zheng, M. Hu, Z. Fan, C. Wang, C. Ding, D. Tao and T.-J. Cham, "Trajectory
# Consistency Distillation", arXiv:2402.19159: "strategic stochastic sampling").  Each step maps x to a consistency output and
# re-noises it: two affine maps, returned separately (diffusers returns the first, docs/math.md 1e).

def lcm_boundary(timestep: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Tuple[float, float]:
    """LCM's boundary-condition scalings (Luo et al. 2023's parameterization, Song et al. 2023's c_skip/c_out
    with sigma_min = 0; diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``): with
    ``u = timestep_scaling * timestep``,

        c_skip = sigma_data^2 / (u^2 + sigma_data^2),   c_out = u / sqrt(u^2 + sigma_data^2),

    so ``f = c_skip x + c_out x0_hat`` is the identity at ``timestep = 0``.  Returns ``(c_skip, c_out)``."""
    u = timestep * timestep_scaling
    d = u * u + sigma_data * sigma_data
    return sigma_data * sigma_data / d, u / math.sqrt(d)


def lcm(level_next: Tuple[float, float], boundary: Tuple[float, float] = (0.0, 1.0)):
    """Multistep latent consistency sampling (Luo et al. 2023; Song et al. 2023, Alg. 1): the consistency output
    ``f = c_skip x + c_out x0_hat`` (``boundary = (c_skip, c_out)``, :func:`lcm_boundary`; ``(0, 1)``: none,
    ``f = x0_hat``), then ``x_next = alpha_n f + sigma_n z`` at ``level_next = (alpha_n, sigma_n)``.
    Returns ``((c_skip, c_out), (alpha_n, sigma_n))``: ``f = fx x + fm x0_hat``, ``x_next = r f + q z``."""
    return (float(boundary[0]), float(boundary[1])), (float(level_next[0]), float(level_next[1]))


def tcd(level: Tuple[float, float], level_s: Tuple[float, float], level_next: Tuple[float, float]):
    """Strategic stochastic sampling (Zheng et al. 2024) from ``level = (alpha, sigma)``
    to ``level_next`` through the intermediate ``level_s`` (``s = (1 - gamma) t_next``): the trajectory
    consistency function's first-order (DDIM) jump to ``s``, then forward diffusion back up to ``t_next``,

        x_s    = alpha_s x0_hat + sigma_s eps_hat = (sigma_s/sigma) x + (alpha_s - sigma_s alpha/sigma) x0_hat,
        x_next = (alpha_n/alpha_s) x_s + sqrt(sigma_n^2 - (alpha_n sigma_s/alpha_s)^2) z

    (``eps_hat = (x - alpha x0_hat)/sigma``; on VP levels the noise is diffusers'
    ``sqrt(1 - abar_n/abar_s)``).  ``gamma = 0`` (``s = t_next``) is DDIM, ``gamma = 1`` (``s = 0``) LCM.
    Returns ``((fx, fm), (r, q))``: ``x_s = fx x + fm x0_hat``, ``x_next = r x_s + q z``."""
    (a, s), (a_s, s_s), (an, sn) = level, level_s, level_next
    k = s_s / s
    r = an / a_s
    return (k, a_s - k * a), (r, sqrt(sn * sn - (r * s_s) ** 2))


# =========================================================================== UniPC
# UniPC (W. Zhao, L. Bai, Y. Rao, J. Zhou and J. Lu, "UniPC: A Unified Predictor-Corrector Framework for
# Fast Sampling of Diffusion Models", NeurIPS 2023, arXiv:2302.04867: UniC-p, Sec. 3.1 and Theorem 3.1;
# UniP-p, Corollary 3.2), data-prediction form, as diffusers' UniPCMultistepScheduler (and the authors'
# code) takes it.  docs/math.md section 1b.
UNIPC_VARIANTS = ("bh1", "bh2")


def phi(k: int, z: float) -> float:
    """The exponential integrator's ``phi_k(z) = sum_j z^j / (j + k)!`` (``phi_0 = e^z``,
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!)/z``): the series for ``|z| < 1``, where the recursion cancels
    (``1/h^k`` amplification of the rounding), the recursion elsewhere."""
    if abs(z) < 1.0:
        term, s = 1.0 / math.factorial(k), 0.0
        for j in range(40):  # |z|^j / (j + k)! < 1e-47 by j = 40
            s += term
            term *= z / (j + k + 1)
        return s
    p = math.exp(z)
    for j in range(k):
        p = (p - 1.0 / math.factorial(j)) / z
    return p


def _solve(A, b):
    """``A^{-1} b`` for a small square system (Gaussian elimination with partial pivoting, float64)."""
    n = len(b)
    M = [list(map(float, row)) + [float(v)] for row, v in zip(A, b)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(M[r][c]))
        M[c], M[piv] = M[piv], M[c]
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            M[r] = [u - f * w for u, w in zip(M[r], M[c])]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (M[r][n] - sum(M[r][j] * out[j] for j in range(r + 1, n))) / M[r][r]
    return out


def unipc(level: Tuple[float, float], level_next: Tuple[float, float], earlier=(), *, variant: str = "bh2"):
    """UniP-p and UniC-p (Zhao et al. 2023, B(h) form; data prediction ``D``), from ``level = (alpha, sigma)``
    (lambda) to ``level_next`` (lambda_n), ``h = lambda_n - lambda``, with ``p = len(earlier) + 1`` and
    ``earlier`` the levels of ``D_{i-1}, ..., D_{i-p+1}`` (latest first), ``r_k = (lambda_{i-k} - lambda)/h``,
    ``D1_k = (D_{i-k} - D_i)/r_k``:

        UniP-p:  x~_n = (sigma_n/sigma) x - alpha_n expm1(-h) D_i - alpha_n B(h) sum_{k<p} rho^p_k D1_k
        UniC-p:  x_n  = (sigma_n/sigma) x - alpha_n expm1(-h) D_i
                        - alpha_n B(h) (sum_{k<p} rho^c_k D1_k + rho^c_p (D(x~_n) - D_i))

    ``B(h) = -h`` (``"bh1"``) or ``expm1(-h)`` (``"bh2"``), ``R_{jk} = r_k^{j-1}`` (``r_p = 1``) and
    ``b_j = j! phi_{j+1}(-h) (-h) / B(h)``: ``rho^c = R^{-1} b`` (p x p; ``1/2`` for p = 1), ``rho^p`` the
    leading (p-1) x (p-1) system (``1/2`` for p = 2, as the authors' and diffusers' code take it).  Both
    share ``x``, so the corrector is the predictor plus ``sum`` of model outputs: it needs no remembered state.

    Returns ``(cx, pred, corr)``: ``x~_n = cx x + sum_j pred[j] D_{i-j}`` (j < p) and
    ``x_n = x~_n + corr[0] D(x~_n) + sum_j corr[1 + j] D_{i-j}`` (j < p); ``corr`` is None where there is
    no corrector: to ``sigma_n = 0`` (``x~_n = alpha_n D_i``; first order only) and from ``alpha = 0``
    (pure noise, ``lambda = -inf``: ``x~_n = sigma_n x + alpha_n D_i``, the exact first-order limit; first
    order only).  ``h = 0`` (a repeated level): ``x~_n = x_n = x``."""
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"variant: expected one of {UNIPC_VARIANTS}, got {variant!r}")
    (a, s), (an, sn) = level, level_next
    p = len(earlier) + 1
    lam = log_snr(a, s)
    h = log_snr(an, sn) - lam
    if h == 0.0:  # no step: x_n = x
        return sn / s, (0.0,) * p, (0.0,) * (p + 1)
    if not math.isfinite(h):  # to sigma_n = 0 or from alpha = 0: the first-order limit (B(h) diverges)
        if earlier:
            raise ValueError("earlier: UniP to sigma = 0 or from alpha = 0 (h infinite) is first order only")
        return sn / s, (an,), None
    z = -h
    B = z if variant == "bh1" else math.expm1(z)
    b = [math.factorial(j) * phi(j + 1, z) * z / B for j in range(1, p + 1)]
    rs = [(log_snr(*lv) - lam) / h for lv in earlier]
    if p == 1:
        rho_p = []
    elif p == 2:
        rho_p = [0.5]
    else:
        rho_p = _solve([[r ** j for r in rs] for j in range(p - 1)], b[:p - 1])
    rc = rs + [1.0]
    rho_c = [0.5] if p == 1 else _solve([[r ** j for r in rc] for j in range(p)], b)
    aB = an * B
    pred = [-an * math.expm1(z) + aB * sum(q / r for q, r in zip(rho_p, rs))] + [-aB * q / r for q, r in zip(rho_p, rs)]
    d = [c - q for c, q in zip(rho_c, rho_p)]  # rho^c_k - rho^p_k, k < p
    corr = [-aB * rho_c[-1], aB * (sum(q / r for q, r in zip(d, rs)) + rho_c[-1])] + [-aB * q / r for q, r in zip(d, rs)]
    return sn / s, tuple(pred), tuple(corr)

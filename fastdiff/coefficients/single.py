"""Single-step coefficients and the shared pieces: float-or-tensor helpers, prediction types, the
timestep spacings, DDPM / DDIM, the EDM / k-diffusion steps and the Langevin family
(docs/math.md section 1).  See :mod:`fastdiff.coefficients`."""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch

__all__ = ["prediction_forms", "score_form", "timesteps", "SPACINGS", "ddpm", "ddim", "euler", "edm_churn",
           "ancestral_sigmas", "euler_ancestral", "heun_corrector", "langevin", "ou_reverse", "merge_x0",
           "sqrt", "minimum", "where", "gt0", "Num", "Form"]

Num = Union[float, torch.Tensor]  # a Python float (scalar step) or a float64 tensor (per sample)
Form = Tuple[Num, Num]            # (fx, fm): the linear form fx x + fm m of the model output m

SPACINGS = ("leading", "trailing", "linspace")


# =========================================================================== float-or-tensor helpers
def sqrt(v: Num) -> Num:
    """``sqrt(max(v, 0))`` (rounding can take ``1 - abar`` and friends a hair below 0)."""
    return v.clamp(min=0).sqrt() if isinstance(v, torch.Tensor) else math.sqrt(max(v, 0.0))


def minimum(a: Num, b: Num) -> Num:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return min(a, b)


def where(cond, a: Num, b: Num) -> Num:
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def gt0(v: Num):
    return v > 0 if isinstance(v, torch.Tensor) else v > 0.0


# =========================================================================== prediction types
def prediction_forms(prediction: str, alpha: Num, sigma: Num) -> Tuple[Form, Form]:
    """Linear forms ``x0_hat = px x + pm m`` and ``eps_hat = ex x + em m`` of the model output ``m``
    (``x = alpha x0 + sigma eps``): eps: ``x0 = (x - sigma eps)/alpha``; x0; v = alpha eps - sigma x0
    (Salimans & Ho 2022); score = -eps/sigma; flow = eps - x0, the rectified-flow velocity
    (Liu et al. 2023, Lipman et al. 2023: ``dx_t/dt`` on the path ``x_t = (1 - t) x0 + t eps``; from
    ``x = (alpha + sigma) x0 + sigma flow``, ``x0 = (x - sigma flow)/(alpha + sigma)`` on any path).
    Returns ``((px, pm), (ex, em))``."""
    if prediction == "flow":
        d = alpha + sigma
        return (1.0 / d, -sigma / d), (1.0 / d, alpha / d)
    if prediction == "eps":
        return (1.0 / alpha, -sigma / alpha), (0.0, 1.0)
    if prediction == "x0":
        return (0.0, 1.0), (1.0 / sigma, -alpha / sigma)
    if prediction == "v":
        d = alpha * alpha + sigma * sigma
        return (alpha / d, -sigma / d), (sigma / d, alpha / d)
    # score = -eps / sigma
    return (1.0 / alpha, sigma * sigma / alpha), (0.0, -sigma)


def score_form(prediction: str, alpha: Num, sigma: Num) -> Form:
    """``score = sx x + sm m`` for the model output ``m``: Tweedie, ``score = (alpha x0_hat - x) / sigma^2``."""
    if prediction == "score":
        return (0.0, 1.0)
    (px, pm), _ = prediction_forms(prediction, alpha, sigma)
    return ((alpha * px - 1.0) / (sigma * sigma), alpha * pm / (sigma * sigma))


def merge_x0(*parts: Tuple[Num, Form, Num]) -> Tuple[Num, Num]:
    """``(cx, cm)`` of ``sum_i [cx_i x + c_i (fx_i x + fm_i m)]``, for ``parts = (cx_i, (fx_i, fm_i), c_i)``.

    The sums are taken in the order :func:`fastdiff.steps` merges repeated tensors (term by term,
    ``x`` first), so a table built from these matches the step call bit for bit."""
    cx = cm = None
    for cxi, (fx, fm), ci in parts:
        tx, tm = cxi + ci * fx, ci * fm * 1.0
        cx, cm = (tx, tm) if cx is None else (cx + tx, cm + tm)
    return cx, cm


# =========================================================================== timestep spacing
def timesteps(T: int, steps: int, spacing: str = "linspace") -> list:
    """The ``steps`` timesteps (ints in ``[0, T)``, decreasing) a DDIM-type sampler visits, as
    diffusers' ``set_timesteps`` defines the spacings (``steps_offset = 0``):

    - ``"linspace"``: ``round((T - 1)(1 - i/(steps - 1)))``, i = 0..steps-1 (diffusers'
      ``np.linspace(0, T - 1, steps).round()[::-1]``): from ``T - 1`` down to ``0``;
      ``steps = 1`` gives ``[T - 1]``.  The default of :func:`fastdiff.sample` and of
      :mod:`fastdiff.guidance`.
    - ``"leading"``: ``(steps - 1 - i) * (T // steps)`` (diffusers' DDIM default): ends at 0,
      starts at ``(steps - 1) (T // steps)``.
    - ``"trailing"``: ``round(T - i T/steps) - 1`` (Lin et al. 2024, "Common diffusion noise
      schedules and sample steps are flawed"): starts at ``T - 1``.

    Distinct for ``1 <= steps <= T`` (every spacing is >= 1).  diffusers computes linspace and
    trailing with ``np.linspace`` / ``np.arange``, whose float values differ from these
    expressions in the last bit, so at an exact .5 tie (a few (T, steps) pairs, e.g. T = 1000,
    steps = 985) the two can round one timestep apart; the expressions here are the pinned ones.  The step after the last goes to
    ``t_prev = -1`` (``abar = 1``)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T: expected a positive int (the schedule length), got {T!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an int in [1, {T}] (the schedule length), got {steps!r}")
    n = steps
    if spacing == "linspace":
        return [round((T - 1) * (1.0 - i / (n - 1))) if n > 1 else T - 1 for i in range(n)]
    if spacing == "leading":
        r = T // n
        return [(n - 1 - i) * r for i in range(n)]
    if spacing == "trailing":
        r = T / n
        return [round(T - i * r) - 1 for i in range(n)]
    raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")


# =========================================================================== DDPM / DDIM (VP)
def ddpm(beta: Num, abar: Num, abar_prev: Num, variance: str, noisy) -> Tuple[Num, Num, Num]:
    """DDPM ancestral step (Ho et al. 2020, eq. 11 and Sec. 3.2): ``x_{t-1} = a x_t + c eps_hat + s z``,

        a = 1/sqrt(1 - beta_t),   c = -beta_t / (sqrt(1 - abar_t) sqrt(1 - beta_t)),
        s^2 = beta_t ("fixed_large")  or  beta_t (1 - abar_{t-1}) / (1 - abar_t) ("fixed_small"),

    and ``s = 0`` where ``noisy`` is false (the last step, t = 0).  Returns ``(a, c, s)``."""
    sigma = sqrt(1.0 - abar)
    var = beta if variance == "fixed_large" else beta * (1.0 - abar_prev) / (1.0 - abar)
    s = where(noisy, sqrt(var), 0.0)
    a = 1.0 / sqrt(1.0 - beta)
    c = -beta / (sigma * sqrt(1.0 - beta))
    return a, c, s


def ddim(abar: Num, abar_prev: Num, eta: Num) -> Tuple[Num, Num, Num]:
    """DDIM step (Song et al. 2021, eq. 12 with eq. 16's sigma): ``x_p = c0 x0_hat + ce eps_hat + s z``,

        s  = eta sqrt((1 - abar_p)/(1 - abar_t)) sqrt(1 - abar_t/abar_p),
        c0 = sqrt(abar_p),   ce = sqrt(1 - abar_p - s^2).

    Returns ``(c0, ce, s)``."""
    s = eta * sqrt((1.0 - abar_prev) / (1.0 - abar)) * sqrt(1.0 - abar / abar_prev)
    return sqrt(abar_prev), sqrt(1.0 - abar_prev - s * s), s


# =========================================================================== EDM / k-diffusion (alpha = 1)
def euler(sigma: Num, sigma_next: Num) -> Tuple[Num, Num]:
    """Euler step of the probability-flow ODE (Karras et al. 2022, Alg. 2 line 6; k-diffusion's
    ``to_d``): ``d = (x - x0_hat)/sigma``, ``x_next = x + (sigma_next - sigma) d = cx x + c0 x0_hat``
    with ``h = (sigma_next - sigma)/sigma``, ``cx = 1 + h``, ``c0 = -h``.  Returns ``(cx, c0)``."""
    h = (sigma_next - sigma) / sigma
    return 1.0 + h, -h


def edm_churn(sigma: Num, gamma: Num, s_noise: Num) -> Tuple[Num, Num]:
    """EDM stochastic churn (Karras et al. 2022, Alg. 2 lines 4-5): ``sigma_hat = sigma (1 + gamma)``,
    ``x_hat = x + s z`` with ``s = sqrt(sigma_hat^2 - sigma^2) S_noise``.  Returns ``(sigma_hat, s)``."""
    sigma_hat = sigma * (1.0 + gamma)
    return sigma_hat, sqrt(sigma_hat * sigma_hat - sigma * sigma) * s_noise


def ancestral_sigmas(sigma: Num, sigma_next: Num, eta: Num) -> Tuple[Num, Num]:
    """k-diffusion's ``get_ancestral_step``: ``(sigma_down, sigma_up)`` with

        sigma_up   = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)."""
    up = eta * sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
    sigma_up = minimum(sigma_next, up)
    return sqrt(sigma_next * sigma_next - sigma_up * sigma_up), sigma_up


def euler_ancestral(sigma: Num, sigma_next: Num, eta: Num, s_noise: Num) -> Tuple[Num, Num, Num]:
    """Euler ancestral step (k-diffusion ``sample_euler_ancestral``): Euler to ``sigma_down``, then
    ``S_noise sigma_up z`` (:func:`ancestral_sigmas`).  Returns ``(cx, c0, s)`` of ``cx x + c0 x0_hat + s z``."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    h = (sigma_down - sigma) / sigma
    return 1.0 + h, -h, s_noise * sigma_up


def heun_corrector(sigma: Num, sigma_next: Num) -> Tuple[Num, Num, Num, Num, Num]:
    """Heun's corrector (Karras et al. 2022, Alg. 2 lines 7-8):
    ``x_next = x + (sigma_next - sigma)(d + d')/2``, ``d = (x - x0_hat)/sigma``,
    ``d' = (x_pred - x0_hat(x_pred))/sigma_next``, i.e.
    ``x_next = cx x + c0 x0_hat + cxp x_pred + c0p x0_hat(x_pred)``; where ``sigma_next = 0`` it is
    the Euler step (``x_next = x_pred``), as EDM does.  Returns ``(cx, c0, cxp, c0p, level)`` with
    ``level`` the sigma to read ``x0_hat(x_pred)`` at (``sigma_next``, 1 where it is 0)."""
    dt = sigma_next - sigma
    h1 = dt / (2.0 * sigma)
    corr = where(gt0(sigma_next), 1.0, 0.0)  # 0 where sigma_next == 0: x_next = x_pred (Euler)
    safe_next = where(gt0(sigma_next), sigma_next, 1.0)
    h2 = dt / (2.0 * safe_next)
    return corr * (1.0 + h1), -h1 * corr, corr * h2 + (1.0 - corr), -h2 * corr, safe_next


# =========================================================================== Langevin family
def langevin(step_size: Num) -> Tuple[Num, Num, Num]:
    """Unadjusted Langevin step: ``x + gamma score + sqrt(2 gamma) z``.  Returns ``(cx, c_score, s)``."""
    return 1.0, step_size, sqrt(2.0 * step_size)


def ou_reverse(step_size: Num) -> Tuple[Num, Num, Num]:
    """Euler-Maruyama step of the reverse Ornstein-Uhlenbeck SDE:
    ``y + gamma y + 2 gamma score + sqrt(2 gamma) z``.  Returns ``(cx, c_score, s)``."""
    return 1.0 + step_size, 2.0 * step_size, sqrt(2.0 * step_size)

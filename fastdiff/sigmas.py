"""Noise-level schedules: the sigmas a sampler walks, as in k-diffusion, ComfyUI and diffusers.

Every function is host-side and returns a 1-D float64 CPU tensor of decreasing noise levels: ``n``
levels from the highest down to the lowest, then the final level chosen by ``final``:

- ``final="zero"`` appends 0 (k-diffusion's ``append_zero``, ComfyUI, diffusers' ``final_sigmas_type="zero"``);
- ``final="last"`` repeats the last level (diffusers' ``final_sigmas_type="sigma_min"``: for the
  ``use_*_sigmas`` conversions the last level *is* ``sigma_min``);
- ``final=None`` appends nothing (``n`` levels).

Three families (docs/math.md section 5, with the papers):

- VE / k-diffusion: :func:`karras`, :func:`exponential`, :func:`polyexponential`, :func:`vp`
  (k-diffusion's ``get_sigmas_*``), :func:`kl_optimal` (Align Your Steps' KL-optimal schedule).
- From a discrete VP table ``sigma_t = sqrt((1 - abar_t) / abar_t)``, ``t = 0 .. T-1`` (increasing;
  a :class:`~fastdiff.DDPMSchedule` is accepted and its ``sigma_ve`` used): ComfyUI's
  :func:`simple`, :func:`normal`, :func:`sgm_uniform`, :func:`beta`, and diffusers' ``use_karras_sigmas``
  / ``use_exponential_sigmas`` / ``use_beta_sigmas`` conversions (:func:`diffusers_karras`,
  :func:`diffusers_exponential`, :func:`diffusers_beta`).
- Flow matching (``x_t = (1 - t) x_0 + t eps``, the "sigma" is ``t``): :func:`flow` (diffusers'
  ``FlowMatchEulerDiscreteScheduler``), :func:`flow_mu` (SD3 / Flux resolution-dependent ``mu``),
  :func:`linear_quadratic` (Mochi / ComfyUI).

The originals compute in float32 (torch's default dtype, ComfyUI's ``FloatTensor``, diffusers' final
cast); these compute every formula in float64 and agree with them to float32 rounding, and with
k-diffusion run in float64 to a few ulp (tests/test_sigmas.py).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from fastdiff._args import check_number

__all__ = [
    "karras", "exponential", "polyexponential", "vp", "kl_optimal",
    "simple", "normal", "sgm_uniform", "beta", "diffusers_karras", "diffusers_exponential", "diffusers_beta",
    "flow", "flow_mu", "linear_quadratic", "FINALS", "TIME_SHIFTS",
]

FINALS = ("zero", "last", None)
_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# shared argument checks and the final level
# ---------------------------------------------------------------------------------------------

def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):  # np.int64 is an Integral
        raise TypeError(f"n: expected an int (the number of noise levels), got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected n >= 1, got {n}")
    return int(n)


def _check_final(final):
    if not (final is None or (isinstance(final, str) and final in FINALS)):
        raise ValueError(f"final: expected 'zero', 'last' or None, got {final!r}")
    return final


def _check_range(sigma_min, sigma_max):
    """``0 < sigma_min < sigma_max`` (strict: ``n > 1`` levels must strictly decrease)."""
    lo = check_number("sigma_min", sigma_min, strict=True)
    hi = check_number("sigma_max", sigma_max, strict=True)
    if not lo < hi:
        raise ValueError(f"sigma_min: expected sigma_min < sigma_max ({hi}), got {lo}")
    return lo, hi


def _finish(levels: torch.Tensor, final) -> torch.Tensor:
    """``levels`` (n,) then the final level: 0 (``"zero"``), ``levels[-1]`` (``"last"``) or nothing (None)."""
    if final is None:
        return levels.contiguous()
    tail = levels.new_zeros(1) if final == "zero" else levels[-1:]
    return torch.cat([levels, tail])


def _ramp(start: float, end: float, n: int) -> torch.Tensor:
    """``torch.linspace(start, end, n)`` in float64 (the ramp k-diffusion uses; n = 1 gives ``[start]``)."""
    return torch.linspace(start, end, n, dtype=_F64)


# ---------------------------------------------------------------------------------------------
# VE / k-diffusion
# ---------------------------------------------------------------------------------------------

def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, final: Optional[str] = "zero") -> torch.Tensor:
    """Karras et al. (2022) eq. 5: ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``,
    ``i = 0 .. n-1`` (``n = 1``: ``[smax]``).  k-diffusion's ``get_sigmas_karras``; diffusers'
    ``_convert_to_karras`` is the same with ``smin, smax`` the ends of the training table
    (:func:`diffusers_karras`).  Returns float64 (n + 1,) for ``final="zero"``."""
    n = _check_n(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    rho = check_number("rho", rho, strict=True)
    final = _check_final(final)
    lo_r, hi_r = lo ** (1 / rho), hi ** (1 / rho)
    return _finish((hi_r + _ramp(0.0, 1.0, n) * (lo_r - hi_r)) ** rho, final)


def exponential(n: int, sigma_min: float, sigma_max: float, *, final: Optional[str] = "zero") -> torch.Tensor:
    """Uniform in ``log sigma``: ``sigma_i = exp(log smax + i/(n-1) (log smin - log smax))``.
    k-diffusion's ``get_sigmas_exponential`` (diffusers' ``_convert_to_exponential``; ComfyUI "exponential")."""
    n = _check_n(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    final = _check_final(final)
    return _finish(_ramp(math.log(hi), math.log(lo), n).exp(), final)


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *,
                    final: Optional[str] = "zero") -> torch.Tensor:
    """Polynomial in ``log sigma``: ``sigma_i = exp(r_i^rho (log smax - log smin) + log smin)``,
    ``r_i = 1 - i/(n-1)``; ``rho = 1`` is :func:`exponential`.  k-diffusion's ``get_sigmas_polyexponential``."""
    n = _check_n(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    rho = check_number("rho", rho, strict=True)
    final = _check_final(final)
    ramp = _ramp(1.0, 0.0, n) ** rho
    return _finish(torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)), final)


def vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, *,
       final: Optional[str] = "zero") -> torch.Tensor:
    """The continuous VP SDE's levels (Song et al. 2021, *Score-Based Generative Modeling through SDEs*: the VP
    perturbation kernel with ``beta(t) = beta_min + t beta_d`` in VE form, ``sigma = sqrt(1 - abar) / sqrt(abar)``,
    ``abar(t) = exp(-beta_d t^2/2 - beta_min t)``): ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``
    at ``t_i = 1 + i/(n-1) (eps_s - 1)``.  k-diffusion's ``get_sigmas_vp`` (computed with ``expm1``: the
    same value, without the cancellation of ``exp(x) - 1`` near ``t = eps_s``)."""
    n = _check_n(n)
    beta_d = check_number("beta_d", beta_d, strict=True)
    beta_min = check_number("beta_min", beta_min)
    eps_s = check_number("eps_s", eps_s, strict=True)
    if not eps_s < 1.0:
        raise ValueError(f"eps_s: expected 0 < eps_s < 1, got {eps_s}")
    final = _check_final(final)
    t = _ramp(1.0, eps_s, n)
    return _finish(torch.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt(), final)


def kl_optimal(n: int, sigma_min: float, sigma_max: float, *, final: Optional[str] = "zero") -> torch.Tensor:
    """The KL-optimal schedule of Sabour, Fidler and Kreis (2024), *Align Your Steps* (arXiv:2404.14507):
    uniform steps in ``atan(sigma)``, ``sigma_i = tan((1 - t_i) atan(smax) + t_i atan(smin))``, ``t_i = i/(n-1)``.
    ComfyUI's ``kl_optimal_scheduler`` (after AUTOMATIC1111 PR 15608; it gives NaN for ``n = 1``, here ``[smax]``)."""
    n = _check_n(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    final = _check_final(final)
    t = _ramp(0.0, 1.0, n)
    return _finish(torch.tan(t * math.atan(lo) + (1 - t) * math.atan(hi)), final)


# ---------------------------------------------------------------------------------------------
# from a discrete VP table (ComfyUI's ModelSamplingDiscrete, diffusers' set_timesteps)
# ---------------------------------------------------------------------------------------------

def _table(sigmas) -> torch.Tensor:
    """The training table ``sigma_t``, ``t = 0 .. T-1``, as float64 CPU (T,): a DDPMSchedule (its
    ``sigma_ve``) or a 1-D tensor / array / sequence; finite, positive, strictly increasing, ``T >= 2``."""
    if hasattr(sigmas, "sigma_ve"):
        sigmas = sigmas.sigma_ve
    if isinstance(sigmas, (str, bytes)) or isinstance(sigmas, numbers.Number):
        raise TypeError(f"sigmas: expected a DDPMSchedule or a 1-D sequence of sigma_t, got {type(sigmas).__name__}")
    try:
        t = torch.as_tensor(sigmas, dtype=_F64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"sigmas: expected a DDPMSchedule or a 1-D sequence of sigma_t, got {type(sigmas).__name__}") from e
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"sigmas: expected a 1-D table of T >= 2 levels sigma_t, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError("sigmas: expected finite, positive levels sigma_t = sqrt((1 - abar_t) / abar_t)")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError("sigmas: expected levels strictly increasing in t (sigma_0 lowest, sigma_{T-1} highest)")
    return t


def _sigma_at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``ModelSamplingDiscrete.sigma``: ``exp`` of ``log sigma`` interpolated linearly at fractional ``t``."""
    t = t.clamp(0, table.numel() - 1)
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    log_s = table.log()
    return torch.exp((1 - w) * log_s[lo] + w * log_s[hi])


def simple(sigmas, n: int, *, final: Optional[str] = "zero") -> torch.Tensor:
    """ComfyUI's ``simple_scheduler``: every ``T/n``-th level of the table from the top,
    ``sigma_{T-1-floor(i T/n)}``, ``i = 0 .. n-1``.  ``n <= T`` (more would repeat levels)."""
    table = _table(sigmas)
    n = _check_n(n)
    final = _check_final(final)
    T = table.numel()
    if n > T:
        raise ValueError(f"n: expected n <= T = {T} (the table's length) for the simple schedule, got {n}")
    ss = T / n  # the float stride, as ComfyUI: int(i * ss), not i * T // n
    idx = torch.tensor([T - 1 - int(i * ss) for i in range(n)])
    return _finish(table[idx], final)


def normal(sigmas, n: int, *, final: Optional[str] = "zero") -> torch.Tensor:
    """ComfyUI's ``normal_scheduler``: ``n`` timesteps uniform from ``T-1`` to 0 (both included),
    ``sigma(t)`` log-linearly interpolated in the table.  (ComfyUI's branch for a table whose lowest
    level is 0 cannot arise: the table is positive.)"""
    table = _table(sigmas)
    n = _check_n(n)
    final = _check_final(final)
    return _finish(_sigma_at(table, _ramp(table.numel() - 1, 0.0, n)), final)


def sgm_uniform(sigmas, n: int, *, final: Optional[str] = "zero") -> torch.Tensor:
    """ComfyUI's ``sgm_uniform`` (``normal_scheduler(sgm=True)``, the Stability ``sgm`` discretization):
    ``n + 1`` timesteps uniform from ``T-1`` to 0, the last dropped, ``sigma(t)`` log-linearly interpolated."""
    table = _table(sigmas)
    n = _check_n(n)
    final = _check_final(final)
    return _finish(_sigma_at(table, _ramp(table.numel() - 1, 0.0, n + 1)[:-1]), final)


def _beta_ppf(q, a: float, b: float):
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as e:  # scipy is optional: only the beta schedules need it
        raise ImportError("the beta schedules need scipy (scipy.stats.beta.ppf): pip install scipy") from e
    return beta_dist.ppf(q, a, b)


def _check_ab(alpha, beta_):
    return check_number("alpha", alpha, strict=True), check_number("beta", beta_, strict=True)


def beta(sigmas, n: int, alpha: float = 0.6, beta: float = 0.6, *, final: Optional[str] = "zero") -> torch.Tensor:
    """*Beta Sampling is All You Need* (arXiv:2407.12173, 2024), as ComfyUI's
    ``beta_scheduler``: timesteps ``rint(F^-1(1 - i/n) (T-1))``, ``i = 0 .. n-1``, ``F^-1`` the
    Beta(alpha, beta) quantile (``scipy.stats.beta.ppf``), repeated consecutive timesteps dropped (so
    *at most* ``n`` levels), the table's levels there.  Needs scipy."""
    table = _table(sigmas)
    n = _check_n(n)
    a, b = _check_ab(alpha, beta)
    final = _check_final(final)
    import numpy as np
    T = table.numel()
    ts = np.rint(_beta_ppf(1 - np.linspace(0, 1, n, endpoint=False), a, b) * (T - 1)).astype(np.int64)
    keep = [int(ts[0])] + [int(t) for p, t in zip(ts[:-1], ts[1:]) if t != p]
    return _finish(table[torch.tensor(keep)], final)


def diffusers_karras(sigmas, n: int, *, final: Optional[str] = "zero") -> torch.Tensor:
    """diffusers' ``use_karras_sigmas=True`` (``_convert_to_karras`` in ``set_timesteps`` of
    ``DPMSolverMultistepScheduler`` and others): :func:`karras` with ``rho = 7`` between the table's
    ends ``sigma_0`` and ``sigma_{T-1}``."""
    table = _table(sigmas)
    return karras(n, float(table[0]), float(table[-1]), 7.0, final=final)


def diffusers_exponential(sigmas, n: int, *, final: Optional[str] = "zero") -> torch.Tensor:
    """diffusers' ``use_exponential_sigmas=True`` (``_convert_to_exponential``): :func:`exponential`
    between the table's ends ``sigma_0`` and ``sigma_{T-1}``."""
    table = _table(sigmas)
    return exponential(n, float(table[0]), float(table[-1]), final=final)


def diffusers_beta(sigmas, n: int, alpha: float = 0.6, beta: float = 0.6, *,
                   final: Optional[str] = "zero") -> torch.Tensor:
    """diffusers' ``use_beta_sigmas=True`` (``_convert_to_beta``; arXiv:2407.12173):
    ``sigma_i = smin + F^-1(1 - i/(n-1)) (smax - smin)``, ``F^-1`` the Beta(alpha, beta) quantile, ``smin, smax``
    the table's ends; continuous levels, not table entries (unlike ComfyUI's :func:`beta`).  Needs scipy."""
    table = _table(sigmas)
    n = _check_n(n)
    a, b = _check_ab(alpha, beta)
    final = _check_final(final)
    import numpy as np
    lo, hi = float(table[0]), float(table[-1])
    q = torch.as_tensor(_beta_ppf(1 - np.linspace(0, 1, n), a, b), dtype=_F64)
    return _finish(lo + q * (hi - lo), final)


# ---------------------------------------------------------------------------------------------
# flow matching (rectified flow: x_t = (1 - t) x_0 + t eps)
# ---------------------------------------------------------------------------------------------

TIME_SHIFTS = ("exponential", "linear")


def flow(n: int, shift: float = 1.0, *, mu: Optional[float] = None, shift_terminal: Optional[float] = None,
         num_train_timesteps: int = 1000, time_shift: str = "exponential", final: Optional[str] = "zero") -> torch.Tensor:
    """diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(n, mu=mu)`` sigmas (SD3 / Flux / LTX).

    With ``N = num_train_timesteps`` and ``g`` the shift: ``t_i`` uniform from 1 to ``t_min``
    (``i = 0 .. n-1``), then ``sigma_i = g(t_i)``:

    - static shift (``mu=None``; the resolution-dependent timestep shift of Esser et al. 2024, *Scaling
      Rectified Flow Transformers*, arXiv:2403.03206, SD3):
      ``g(t) = s t / (1 + (s - 1) t)``, and ``t_min = g(1/N)`` (diffusers shifts its lowest training level
      in ``__init__`` and again in ``set_timesteps``; matched, not corrected);
    - dynamic shift (``mu`` given, ``shift`` must stay 1): ``t_min = 1/N`` and
      ``g(t) = e^mu / (e^mu + 1/t - 1)`` (``time_shift="exponential"``, i.e. ``s = e^mu``) or
      ``g(t) = mu / (mu + 1/t - 1)`` (``"linear"``, ``mu > 0``); ``mu`` from :func:`flow_mu`;
    - ``shift_terminal`` in (0, 1) (LTX-Video): ``sigma <- 1 - (1 - sigma) (1 - shift_terminal) / (1 - sigma_{n-1})``,
      so the last level is ``shift_terminal`` (needs ``n >= 2``).

    ``final="zero"`` is diffusers' appended 0.  Returns float64 (n + 1,): levels in (0, 1], decreasing, then 0.
    """
    n = _check_n(n)
    shift = check_number("shift", shift, strict=True)
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral):
        raise TypeError(f"num_train_timesteps: expected an int, got {type(num_train_timesteps).__name__}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps: expected num_train_timesteps >= 2, got {num_train_timesteps}")
    if not (isinstance(time_shift, str) and time_shift in TIME_SHIFTS):
        raise ValueError(f"time_shift: expected 'exponential' or 'linear', got {time_shift!r}")
    if shift_terminal is not None:
        st = check_number("shift_terminal", shift_terminal, strict=True)
        if not st < 1.0:
            raise ValueError(f"shift_terminal: expected 0 < shift_terminal < 1, got {st}")
        if n < 2:
            raise ValueError("shift_terminal: needs n >= 2 (with one level sigma = 1 cannot be stretched)")
    final = _check_final(final)
    N = int(num_train_timesteps)
    if mu is None:
        def g(t):
            return shift * t / (1 + (shift - 1) * t)
    else:
        if shift != 1.0:
            raise ValueError(f"shift: a static shift ({shift}) and a dynamic mu ({mu}) exclude each other; pass one")
        if time_shift == "exponential":
            mu = check_number("mu", mu, lo=-math.inf)
            if mu > 700:  # e^mu overflows float64
                raise ValueError(f"mu: expected mu <= 700 (e^mu must be finite), got {mu}")
            s = math.exp(mu)
        else:
            s = check_number("mu", mu, strict=True)  # the linear shift mu / (mu + 1/t - 1) needs mu > 0

        def g(t):
            return s / (s + (1 / t - 1))
    t_min = g(torch.tensor(1.0 / N, dtype=_F64)).item() if mu is None else 1.0 / N
    # diffusers: linspace(t_max N, t_min N, n) / N, t_max = 1 (its top training level, g(1) = 1)
    sig = g(_ramp(1.0 * N, t_min * N, n) / N)
    if shift_terminal is not None:
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - st))
    return _finish(sig, final)


def flow_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution-dependent ``mu`` of the SD3 / Flux pipelines (diffusers' ``calculate_shift``): linear
    in the latent sequence length through ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``,
    ``mu = base_shift + (L - base_seq_len) (max_shift - base_shift) / (max_seq_len - base_seq_len)``
    (extrapolated outside that range, as diffusers)."""
    L = check_number("image_seq_len", image_seq_len, strict=True)
    b0 = check_number("base_seq_len", base_seq_len, strict=True)
    b1 = check_number("max_seq_len", max_seq_len, strict=True)
    if not b0 < b1:
        raise ValueError(f"base_seq_len: expected base_seq_len < max_seq_len ({b1}), got {b0}")
    s0 = check_number("base_shift", base_shift, lo=-math.inf)
    s1 = check_number("max_shift", max_shift, lo=-math.inf)
    m = (s1 - s0) / (b1 - b0)  # the same two-line form as diffusers, for bitwise-equal floats
    b = s0 - m * b0
    return L * m + b


def linear_quadratic(n: int, sigma_max: float = 1.0, *, threshold_noise: float = 0.025,
                     linear_steps: Optional[int] = None, final: Optional[str] = "zero") -> torch.Tensor:
    """Mochi's (Genmo 2024, ``mochi_preview/infer.py``) linear-quadratic schedule, as ComfyUI's
    ``linear_quadratic_schedule``: with ``L = linear_steps`` (default ``n // 2``) and ``Q = n - L``,
    ``u_i = i thr / L`` for ``i < L`` and ``u_i = a i^2 + b i + c`` for ``L <= i < n``, where
    ``d = L - thr n``, ``a = d / (L Q^2)``, ``b = thr/L - 2 d / Q^2``, ``c = a L^2`` (continuous at ``i = L``,
    reaching 1 at ``i = n``); ``sigma_i = sigma_max (1 - u_i)``.  ``n = 1``: ``[sigma_max]``."""
    n = _check_n(n)
    smax = check_number("sigma_max", sigma_max, strict=True)
    thr = check_number("threshold_noise", threshold_noise, strict=True)
    if not thr < 1.0:
        raise ValueError(f"threshold_noise: expected 0 < threshold_noise < 1, got {thr}")
    final = _check_final(final)
    if n == 1:
        return _finish(torch.tensor([smax], dtype=_F64), final)
    if linear_steps is None:
        L = n // 2
    elif isinstance(linear_steps, bool) or not isinstance(linear_steps, numbers.Integral):
        raise TypeError(f"linear_steps: expected an int or None, got {type(linear_steps).__name__}")
    else:
        L = int(linear_steps)
        if not 1 <= L < n:
            raise ValueError(f"linear_steps: expected 1 <= linear_steps < n ({n}), got {L}")
    Q = n - L
    d = L - thr * n
    a = d / (L * Q**2)
    b = thr / L - 2 * d / Q**2
    c = a * L**2
    i = torch.arange(n, dtype=_F64)
    u = torch.where(i < L, i * thr / L, a * i**2 + b * i + c)
    sig = smax * (1 - u)
    if not bool((sig[1:] < sig[:-1]).all()) or not bool((sig > 0).all()):
        # a large threshold_noise (d = L - thr n small or negative) bends the quadratic over: u > 1 before i = n
        raise ValueError(f"threshold_noise, linear_steps: threshold_noise={thr} with linear_steps={L} give levels "
                         f"that do not strictly decrease in (0, sigma_max] for n={n}")
    return _finish(sig, final)

"""Multi-measurement sampling and stochastic localization (seed 003, "Multimeasurement generative
models" onwards; docs/math.md §8).

Measurements ``Y_i = X + sigma N_i`` (i = 1..m, independent ``N_i ~ N(0, I)``).  Their mean
``ybar = (1/m) sum_i Y_i`` is a sufficient statistic for ``X`` and ``ybar = X + (sigma/sqrt m) N``,
so the multi-measurement posterior mean is the single-measurement denoiser at ``ybar`` with noise
``sigma / sqrt(m)`` (seed 003, "Empirical Bayes with multiple measurements")::

    E[X | y_1..y_m] = ybar + (sigma^2/m) grad log q_{sigma/sqrt m}(ybar) = D(ybar; 1, sigma/sqrt m)

:func:`posterior_mean` computes it for any denoiser ``D(x, alpha, sigma)`` (every analytic one of
:mod:`fastdiff.denoisers`).  The scores the samplers need (seed 003, "Sequential denoising")::

    grad_{y_i} log p(y_i | y_1..y_{i-1}) = (D(ybar_{1:i}; 1, sigma/sqrt i) - y_i) / sigma^2   (SMS)
    grad_{y_j} log p(y_1..y_m)           = (D(ybar_{1:m}; 1, sigma/sqrt m) - y_j) / sigma^2   (JMS)

so both are Langevin steps at level ``sigma`` whose "denoiser output" is the posterior mean of the
measurements so far: :class:`JointDenoiser` (the state is ``(B, m, n)``, all measurements) and
:class:`SequentialDenoiser` (the state is the current ``y_i``, the running sum of the earlier ones
kept inside).  :func:`fastdiff.sample` runs them on its one loop (:func:`fastdiff.sampling.run`):
the rows are walk-jump's (Langevin steps, then the jump ``x = E[X | y_1..y_m]``), every step one
fused pass with its noise drawn in the kernel.  JMS by default runs its exact split instead
(:func:`fastdiff.sampling._sample_jms`, docs/math.md §8a): the mean ``ybar`` is walk-jump at ``sigma / sqrt m`` with step
``g / m`` on its own, the residuals ``y_j - ybar`` a Gaussian recursion free of ``D``
(:class:`ResidualChain`), drawn only where a trajectory or callback asks (``per_measurement=True``:
the coupled chains above).

Stochastic localization (Montanari 2023; seed 003 Facts 1-3): ``Z_t = t X + B_t``, so ``Z_t`` is
``x_t = alpha x_0 + sigma eps`` with ``(alpha, sigma) = (t, sqrt t)`` and
``E[X | Z_t] = D(Z_t; t, sqrt t) = D(Z_t / t; 1, 1/sqrt t)`` (Fact 3).  Euler-Maruyama on
``dZ = E[X | Z_t] dt + dB_t`` (Fact 2) is the affine row ``Z' = Z + delta D(Z; t, sqrt t) + sqrt(delta) z``
(:func:`localization_coefficients`); the increments ``Y_k = (Z_{k delta} - Z_{(k-1) delta}) / delta``
are measurements of ``X`` with noise ``1/sqrt(delta)``.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch

from fastdiff import steps as S
from fastdiff.solvers import Step, _row

__all__ = ["posterior_mean", "sms_score", "jms_score", "JointDenoiser", "SequentialDenoiser", "initial_shape", "wrap",
           "ResidualChain", "localization_times", "localization_table", "localization_coefficients", "METHODS"]

METHODS = ("sms", "jms", "stochastic_localization")
# E[X | Z_0] = E[X] for every model; a denoiser takes alpha, sigma > 0, so the first drift of a
# localization run from t = 0 is evaluated at t = _T0 * t_1, where D(0; t, sqrt t) = E[X] + O(t)
_T0 = 1e-9


def check_measurements(m) -> int:
    """``m`` as a positive int (ValueError naming ``measurements`` otherwise)."""
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"measurements: expected an integer m >= 1 (the number of noisy measurements), got {m!r}")
    return int(m)


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma: expected the measurement noise level, a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_y(y) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y: expected a floating-point tensor of measurements (B, m, n), got {type(y).__name__}")
    if y.ndim != 3 or y.shape[1] < 1:
        raise ValueError(f"y: expected shape (B, m, n) with m >= 1 measurements per sample, got {tuple(y.shape)}")
    return y


# =========================================================================== posterior mean and scores
def posterior_mean(denoiser, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """``E[X | y_1..y_m]`` (B, n) for measurements ``y`` (B, m, n) of ``Y_i = X + sigma N_i``:
    ``denoiser(ybar, 1, sigma / sqrt m)`` (module docstring)."""
    y = _check_y(y)
    sigma = _check_sigma(sigma)
    m = y.shape[1]
    return denoiser(y.mean(1), 1.0, sigma / math.sqrt(m))


def jms_score(denoiser, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """``grad_{y_j} log p(y_1..y_m)`` (B, m, n): ``(E[X | y_1..y_m] - y_j) / sigma^2`` for every j."""
    x0 = posterior_mean(denoiser, y, sigma)
    return (x0[:, None, :] - y) / (sigma * sigma)


def sms_score(denoiser, y_i: torch.Tensor, y_prev: Optional[torch.Tensor], sigma: float) -> torch.Tensor:
    """``grad_{y_i} log p(y_i | y_1..y_{i-1})`` (B, n) with ``y_prev`` (B, i-1, n) the earlier
    measurements (None or i - 1 = 0: the score of ``q_sigma`` itself)."""
    if y_prev is None or y_prev.shape[1] == 0:
        y = y_i[:, None, :]
    else:
        y = torch.cat([_check_y(y_prev), y_i[:, None, :]], 1)
    return (posterior_mean(denoiser, y, sigma) - y_i) / (_check_sigma(sigma) ** 2)


class JointDenoiser:
    """JMS's "denoiser": for a state ``Y`` (B, m, n) at level ``(1, sigma)`` it returns
    ``E[X | y_1..y_m]`` broadcast to every measurement, so the Langevin row
    ``y_j + g (out_j - y_j)/sigma^2 + sqrt(2g) z_j`` is a Langevin step on the joint density."""

    def __init__(self, denoiser, m: int):
        self.denoiser, self.m = denoiser, check_measurements(m)
        self._buf = None

    def __call__(self, y, alpha, sigma):
        x0 = self.denoiser(y.mean(1), 1.0, sigma / math.sqrt(self.m))
        if torch.is_grad_enabled() and (y.requires_grad or x0.requires_grad):
            return x0[:, None, :].expand(y.shape).contiguous()
        # the fused step reads a tensor of y's shape: one reused buffer (a fresh 16 MiB each step costs
        # its page faults), its own memory, never y's
        if self._buf is None or self._buf.shape != y.shape or self._buf.dtype != x0.dtype or self._buf.device != y.device:
            self._buf = torch.empty(y.shape, dtype=x0.dtype, device=y.device)
        return self._buf.copy_(x0[:, None, :].expand(y.shape))


class SequentialDenoiser:
    """SMS's "denoiser" for a run of ``m`` stages of ``steps`` Langevin rows and the final jump: call ``c``
    belongs to stage ``i = c // steps + 1``; at the first call of each stage after the first, the state
    (the last stage's final ``y_{i-1}``) joins the running sum and stays the warm start of ``y_i``.
    Returns ``E[X | y_1..y_{i-1}, y_i] = D((sum + y_i)/i; 1, sigma/sqrt i)``.  One object per run
    (it counts its calls)."""

    def __init__(self, denoiser, m: int, steps: int):
        self.denoiser, self.m, self.steps = denoiser, check_measurements(m), int(steps)
        self.calls, self.total = 0, None

    def __call__(self, y, alpha, sigma):
        c, self.calls = self.calls, self.calls + 1
        stage = min(c // self.steps, self.m - 1)  # 0-based; the jump (c = m steps) stays in the last
        if c and c % self.steps == 0 and c // self.steps <= self.m - 1:
            self.total = y.clone() if self.total is None else self.total.add_(y)
        i = stage + 1
        ybar = y if self.total is None else (self.total + y).div_(i)   # in place: one (B, n) temporary
        return self.denoiser(ybar, 1.0, sigma / math.sqrt(i))


def initial_shape(method: str, x, m: Optional[int], schedule, steps):
    """:func:`fastdiff.sample`'s ``x`` for these methods: a tensor as it is; a JMS shape (B, n) as the state
    shape (B, m, n); a localization shape (starting from ``Z_0 = 0``: its times must start at 0) checked."""
    if isinstance(x, torch.Tensor):
        return x
    shape = (int(x),) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x
    if not isinstance(shape, (tuple, list, torch.Size)) or \
            not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in shape):
        raise TypeError(f"x: expected the initial state or a shape (tuple of ints), got {x!r}")
    if method == "jms":
        if len(shape) != 2:
            raise TypeError(f"x: method='jms' expects the shape (B, n) of the output or the state (B, m, n), got {x!r}")
        return (int(shape[0]), m, int(shape[1]))
    if method == "stochastic_localization" and localization_times(schedule, steps)[0] != 0.0:
        raise ValueError("x: a shape starts stochastic localization from Z_0 = 0, so the times must start at 0 "
                         "(or pass the state Z_{t_0} as x)")
    return tuple(int(v) for v in shape)


def _check_jms_state(x: torch.Tensor, m: int) -> torch.Tensor:
    if x.ndim != 3 or x.shape[1] != m:
        raise ValueError(f"x: method='jms' expects the state (B, m, n) with m = {m} measurements, got {tuple(x.shape)}")
    return x


def wrap(method: str, denoiser, m: Optional[int], steps: Optional[int], x: torch.Tensor):
    """The denoiser the loop calls for ``method`` (the state ``x`` checked for JMS)."""
    if method == "jms":
        _check_jms_state(x, m)
        return JointDenoiser(denoiser, m)
    if method == "sms":
        return SequentialDenoiser(denoiser, m, 100 if steps is None else steps)
    return denoiser


# =========================================================================== JMS as its mean chain
class ResidualChain:
    """The residuals ``r_j = y_j - ybar`` (B, m, n) of a JMS run, drawn only at the steps asked for
    (docs/math.md §8a, "the exact split").  Row k moves them by ``r' = a_k r + c_k (z_j - zbar)``
    (``a_k, c_k`` the JMS row's ``cx, cz``), independently of the mean chain and of ``D``; so from the
    last drawn ``r`` (step k0) the state at step k is, exactly in law,

        r_k = A r + sqrt(V) (w - wbar),   A = prod a_l,   V = sum_l (prod_{l' > l} a_l')^2 c_l^2

    (the rows l = k0 .. k-1; ``w ~ N(0, I)`` of shape (B, m, n), ``w - wbar`` has covariance
    ``I - 11^T/m`` over the measurements), tracked by the recursion ``A <- a A, V <- a^2 V + c^2``.
    ``r0 = None`` with ``var0 = s^2``: the start ``y_j ~ s N(0, I)`` iid, whose residual is
    ``N(0, s^2 (I - 11^T/m))``.  Steps must be asked for in increasing order (a Markov chain)."""

    def __init__(self, rows: Sequence[Tuple[float, float]], gen, shape, dtype, device, r0=None, var0: float = 0.0):
        self.rows, self.gen, self.shape, self.dtype, self.device = list(rows), gen, tuple(shape), dtype, device
        self.k, self.r, self.A, self.V = 0, r0, 1.0, float(var0)

    def at(self, k: int) -> torch.Tensor:
        """``r_k`` (B, m, n); the tensor is kept as the chain's state: do not modify it."""
        if k < self.k:
            raise RuntimeError(f"ResidualChain.at: steps must increase (asked {k} after {self.k})")
        for a, c in self.rows[self.k:k]:
            self.A, self.V = a * self.A, a * a * self.V + c * c
        self.k = k
        if self.V > 0.0:
            w = S.randn(self.shape, generator=self.gen, dtype=self.dtype, device=self.device)
            r = w.sub_(w.mean(1, keepdim=True)).mul_(math.sqrt(self.V))
            if self.r is not None:
                r.add_(self.r, alpha=self.A)
        elif self.r is None:
            r = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        else:
            r = self.r if self.A == 1.0 else self.r * self.A
        self.r, self.A, self.V = r, 1.0, 0.0
        return r


def _skip_draws(gen, count: int, draws: int):
    """A clone of ``gen`` advanced past ``draws`` draws of ``count`` normals (per sample for a
    per-sample generator): where the mean chain will have left ``gen``."""
    ahead = gen.clone()
    for _ in range(draws):
        ahead.draw(count)
    return ahead


# =========================================================================== stochastic localization
def table(schedule, method: str, steps: Optional[int], step_size, measurements, trajectory_table) -> List[Step]:
    """The rows of ``method`` (one of :data:`METHODS`) for :func:`fastdiff.sampling.trajectory_table`:
    SMS / JMS are walk-jump's rows (``steps`` Langevin steps, per stage for SMS's m stages; default
    100), stochastic localization :func:`localization_table`.  ``measurements`` must be given exactly
    for SMS / JMS.

    In :func:`fastdiff.sample`: for SMS / JMS ``schedule`` is the measurement noise sigma, ``x`` a shape
    (B, n) (JMS draws (B, m, n)) or the initial state (SMS: y_1 (B, n); JMS: (B, m, n)); the result is
    ``E[X | y_1..y_m]`` (B, n) and the trajectory holds the measurements.  For stochastic localization
    ``schedule`` is a final time T (``steps``) or increasing times from 0; a shape starts from
    ``Z_0 = 0``, a tensor is ``Z_{t_0}``; the result is ``E[X | Z_T]`` and the trajectory holds ``Z_t``."""
    if (measurements is not None) != (method in ("sms", "jms")):
        raise ValueError(f"measurements: required by method='sms' / 'jms' (the number m of measurements) and "
                         f"used by no other method, got measurements={measurements!r} with method={method!r}")
    if method == "stochastic_localization":
        if step_size is not None:
            raise ValueError("step_size: not used by stochastic_localization (its steps are the time increments)")
        return localization_table(localization_times(schedule, steps))
    m = check_measurements(measurements)
    k = 100 if steps is None else int(steps)
    return trajectory_table(schedule, "walk_jump", steps=k * m if method == "sms" else k, step_size=step_size)


def localization_coefficients(t: float, t_next: float) -> Tuple[float, float, float]:
    """Euler-Maruyama on ``dZ = E[X | Z_t] dt + dB_t`` from t to t_next: ``(cx, cm, cz) = (1, delta, sqrt delta)``
    in ``Z' = cx Z + cm E[X | Z_t] + cz z`` (seed 003 Fact 2)."""
    delta = t_next - t
    return 1.0, delta, math.sqrt(delta)


def localization_times(schedule, steps: Optional[int]) -> List[float]:
    """The increasing times ``0 = t_0 < ... < t_N`` (or ``t_0 > 0``: a given ``Z_{t_0}``): a final time T
    (a number; ``steps`` uniform steps, default 100) or a 1-D sequence of increasing times."""
    if isinstance(schedule, bool):
        raise TypeError("schedule: expected the final time T (a number) or increasing times, got bool")
    if isinstance(schedule, numbers.Real):
        T = float(schedule)
        if not math.isfinite(T) or T <= 0:
            raise ValueError(f"schedule: expected a final time T > 0, got {schedule!r}")
        n = 100 if steps is None else int(steps)
        return [T * k / n for k in range(n + 1)]
    if isinstance(schedule, (list, tuple, torch.Tensor)):
        ts = [float(v) for v in torch.as_tensor(schedule, dtype=torch.float64).reshape(-1).tolist()]
    else:
        raise TypeError(f"schedule: method='stochastic_localization' expects a final time T or increasing times, "
                        f"got {type(schedule).__name__}")
    if len(ts) < 2 or not all(math.isfinite(v) and v >= 0 for v in ts) or any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"schedule: expected at least two finite, strictly increasing times >= 0, got {ts}")
    if steps not in (None, len(ts) - 1):
        raise ValueError(f"steps: expected None or the schedule's {len(ts) - 1} steps, got {steps}")
    return ts


def localization_table(times: Sequence[float]) -> List[Step]:
    """One affine row per step (the denoiser at ``(t, sqrt t)``: ``Z_t = t X + sqrt(t) eps`` in law), then
    the jump ``x = E[X | Z_T]`` at the last time."""
    rows = []
    for t, tn in zip(times, times[1:]):
        te = t if t > 0 else _T0 * times[1]
        cx, cm, cz = localization_coefficients(t, tn)
        rows.append(_row((te, math.sqrt(te)), cx, cm, cz=cz, call_args=(t, tn)))
    T = times[-1]
    rows.append(Step((T, math.sqrt(T)), 0.0, 0.0, 1.0, 0.0, None, 0, 0, 0, 0, ("jump", (T,), {})))
    return rows

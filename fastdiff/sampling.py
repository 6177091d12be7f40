"""Whole sampling trajectories: ``fastdiff.sample`` (SPEC 1 steps driven by a denoiser).

A sampler alternates a denoiser evaluation ``x0_hat = D(x; alpha, sigma)`` with a reverse step.
With ``x0_hat`` as the model output every step of SPEC 1 is, per sample, the affine map

    x <- x + s1 z1                                   (EDM churn; s1 = 0: none)
    x' = cx x + cm D(x; level) + cz z2               (the step; cz = 0: no draw)
    x  <- hx x + hm D(x; level) + hxp x' + hmp D(x'; level2)   (Heun's corrector, else x <- x')

so a trajectory is a ``(T, ...)`` table of float64 coefficients computed once on the host (the
same expressions, in the same order, as the step functions of :mod:`fastdiff.steps`, so the
float32 coefficients agree bit for bit), the denoiser's per-level parameter rows
(:func:`fastdiff.denoisers.molrg.molrg_params`) and the Philox offsets each step draws at (the offsets
the step-by-step loop takes from the generator).

- With a :class:`fastdiff.denoisers.MoLRG` (or a list of them / a ``(I, K, n, d)`` bases tensor:
  ``I`` independent instances, ``x`` of shape ``(I, B, n)``) the whole trajectory runs in one
  fused kernel (C++/OpenMP on CPU, Triton on CUDA): each thread / program keeps a tile of
  samples on chip for all T steps, draws its noise in the kernel, and reads the bases from cache.
- With any other callable ``denoiser(x, alpha, sigma) -> x0_hat`` (or with a ``callback``) it runs
  :func:`run`, the one step-by-step sampler loop of fastdiff: one denoiser call and one fused step
  (:func:`fastdiff.ddpm_step`, ...) per table row, drawing from the same generator.  Both paths
  give the same result for the same seed (to float32 rounding).  :mod:`fastdiff.guidance`,
  :func:`fastdiff.jacobian_rank_trajectory`, the sweeps and the demo run :func:`run` too.

Methods (``schedule`` kind):

=================  ======================  ================================================
``ddpm``           DDPMSchedule            ancestral, every t = T-1 .. 0 (``variance=``)
``ddim``           DDPMSchedule            ``steps`` timesteps, ``coefficients.timesteps``, ``eta``
``euler``          VE levels (below)       probability-flow ODE, optional ``churn``
``euler_ancestral`` VE levels              ``eta``, ``s_noise``
``heun``           VE levels               EDM Alg. 2 (``churn``, ``s_noise``)
``langevin``       noise level(s) sigma    ``steps`` Langevin steps per level (annealed)
``walk_jump``      noise level sigma       Langevin "walk", then the "jump" ``x0_hat(y)``
``ou_reverse``     final time T or times   reverse OU SDE, Euler-Maruyama (:func:`fastdiff.solvers.ou_reverse_table`)
``jms``            noise level sigma       walk-jump on m measurements jointly, as their mean's chain (math.md §8a)
``sms``            noise level sigma       m sequential Langevin stages, ``steps`` each, then the jump
``stochastic_localization``  final time T  Euler-Maruyama on ``dZ = E[X|Z_t] dt + dB`` (or increasing times)
=================  ======================  ================================================

VE levels: a :class:`fastdiff.KarrasSchedule`, or a 1-D tensor / sequence of strictly decreasing
sigmas, all but the last > 0 (a last 0 ends on an Euler step, as EDM does).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from fastdiff import coefficients as C
from fastdiff import multimeasurement as MM
from fastdiff import steps as S
from fastdiff import trajectory as fused_impl
from fastdiff._args import check_number as _check_number
from fastdiff._interop import accepts_arrays
from fastdiff.denoisers import MoLRG
from fastdiff.gaussian_exact import gaussian_sampler_variance  # noqa: F401  (moved there; importable here)
from fastdiff.generator import Generator, default_generator
from fastdiff.loop import StepInfo, _snapshots, run
from fastdiff.schedules import DDPMSchedule, KarrasSchedule
from fastdiff.solvers import MULTISTEP_METHODS, Step, ou_reverse_table, solver_table

__all__ = ["sample", "run", "StepInfo", "METHODS", "Step", "trajectory_table", "gaussian_sampler_variance"]

METHODS = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "langevin", "walk_jump", "ou_reverse", *MULTISTEP_METHODS,
           *MM.METHODS)
VE_METHODS = ("euler", "euler_ancestral", "heun") + MULTISTEP_METHODS
_SQRT2M1 = math.sqrt(2.0) - 1.0


# =========================================================================== per-step coefficients
# Each step's coefficients come from fastdiff.coefficients, the functions fastdiff.steps calls,
# merged with prediction="x0" in the order the step call merges its terms (C.merge_x0), so the
# coefficients round to the same float32 as the step-by-step loop's.
def _vp_level(sched: DDPMSchedule, t: int) -> Tuple[float, float]:
    """The level the denoiser sees at timestep t: the schedule's own ``alpha_t, sigma_t`` tables,
    the values guidance and the sweeps have always passed.  (The step coefficients keep
    ``C.sqrt(abar)``, as the step functions compute them: the tables' torch sqrt differs from
    ``math.sqrt`` in the last bit at a few t.)"""
    return sched.floats("alpha")[t], sched.floats("sigma")[t]


def _ddpm(sched: DDPMSchedule, t: int, variance: str) -> Step:
    beta, abar = sched.floats("beta")[t], sched.floats("abar")[t]
    alpha, sigma = C.sqrt(abar), C.sqrt(1.0 - abar)
    abar_prev = sched.floats("abar")[t - 1] if t > 0 else 1.0
    a, c, s = C.ddpm(beta, abar, abar_prev, variance, t > 0)
    _, eps_form = C.prediction_forms("x0", alpha, sigma)
    cx, cm = C.merge_x0((a, eps_form, c))
    return Step(_vp_level(sched, t), 0.0, cx, cm, s, None, 0, 0, 0, 0,
                ("ddpm_step", (t, sched), {"variance": variance}))


def _ddim(sched: DDPMSchedule, t: int, t_prev: int, eta: float) -> Step:
    abar = sched.floats("abar")[t]
    abar_p = sched.floats("abar")[t_prev] if t_prev >= 0 else 1.0
    alpha, sigma = C.sqrt(abar), C.sqrt(1.0 - abar)
    alpha_p, ce, s = C.ddim(abar, abar_p, eta)
    x0_form, eps_form = C.prediction_forms("x0", alpha, sigma)
    cx, cm = C.merge_x0((0.0, x0_form, alpha_p), (0.0, eps_form, ce))
    return Step(_vp_level(sched, t), 0.0, cx, cm, s, None, 0, 0, 0, 0,
                ("ddim_step", (t, t_prev, sched), {"eta": eta}))


def _euler_like(sigma: float, sigma_next: float, gamma: float, s_noise: float, method: str, eta: float) -> Step:
    churn, sigma_hat = 0.0, sigma
    if gamma > 0.0:
        sigma_hat, churn = C.edm_churn(sigma, gamma, s_noise)
    if method == "euler_ancestral":
        ax, a0, az = C.euler_ancestral(sigma, sigma_next, eta, s_noise)
        cx, cm = C.merge_x0((ax, C.prediction_forms("x0", 1.0, sigma)[0], a0))
        return Step((1.0, sigma), 0.0, cx, cm, az, None, 0, 0, 0, 0,
                    ("euler_ancestral_step", (sigma, sigma_next), {"eta": eta, "s_noise": s_noise}))
    ex, e0 = C.euler(sigma_hat, sigma_next)
    cx, cm = C.merge_x0((ex, C.prediction_forms("x0", 1.0, sigma_hat)[0], e0))
    call = ("euler_step", (sigma, sigma_next), {"gamma": gamma, "s_noise": s_noise})
    if method == "euler" or sigma_next <= 0.0:  # EDM: the last step (sigma_next = 0) is Euler
        return Step((1.0, sigma_hat), churn, cx, cm, 0.0, None, 0, 0, 0, 0, call)
    hx, h0, hxp, h0p, level2 = C.heun_corrector(sigma_hat, sigma_next)
    hx, hm = C.merge_x0((hx, C.prediction_forms("x0", 1.0, sigma_hat)[0], h0))
    hxp, hmp = C.merge_x0((hxp, C.prediction_forms("x0", 1.0, level2)[0], h0p))
    return Step((1.0, sigma_hat), churn, cx, cm, 0.0, (1.0, sigma_next), hx, hm, hxp, hmp,
                ("heun_step", (sigma, sigma_next), {"gamma": gamma, "s_noise": s_noise}))


def _langevin(sigma: float, g: float) -> Step:
    # langevin_step with prediction="x0", alpha = 1: score = (x0_hat - x) / sigma^2
    lx, ls, lz = C.langevin(g)
    cx, cm = C.merge_x0((lx, C.score_form("x0", 1.0, sigma), ls))
    return Step((1.0, sigma), 0.0, cx, cm, lz, None, 0, 0, 0, 0, ("langevin_step", (g,), {"sigma": sigma}))


def _jump(sigma: float) -> Step:
    # predict_x0 with prediction="x0": 0 x + 1 x0_hat
    cx, cm = C.merge_x0((0.0, C.prediction_forms("x0", 1.0, sigma)[0], 1.0))
    return Step((1.0, sigma), 0.0, cx, cm, 0.0, None, 0, 0, 0, 0, ("jump", (sigma,), {}))


def _levels(name: str, schedule) -> List[float]:
    if isinstance(schedule, bool):
        raise TypeError(f"{name}: expected a noise level or a sequence of levels, got bool")
    if isinstance(schedule, numbers.Real):
        vals = [float(schedule)]
    elif isinstance(schedule, (list, tuple, torch.Tensor)):
        vals = [float(v) for v in torch.as_tensor(schedule, dtype=torch.float64).reshape(-1).tolist()]
    else:
        raise TypeError(f"{name}: expected a noise level sigma (float) or a sequence of levels for this method, "
                        f"got {type(schedule).__name__}")
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"{name}: expected finite noise levels > 0, got {vals}")
    return vals


def _ve_sigmas(method: str, schedule) -> List[float]:
    """The VE levels ``sigma_0 > ... > sigma_n >= 0`` of a KarrasSchedule or a 1-D sequence of sigmas."""
    if isinstance(schedule, KarrasSchedule):
        return schedule.floats("sigmas")
    want = f"schedule: method={method!r} expects a fastdiff.KarrasSchedule or a 1-D sequence of decreasing noise levels"
    if isinstance(schedule, torch.Tensor):
        if schedule.ndim != 1 or not schedule.is_floating_point():
            raise TypeError(f"{want}, got a {schedule.dtype} tensor of shape {tuple(schedule.shape)}")
        sig = schedule.detach().double().cpu().tolist()
    elif isinstance(schedule, (list, tuple)) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                     for v in schedule):
        sig = [float(v) for v in schedule]
    else:
        raise TypeError(f"{want}, got {type(schedule).__name__}")
    if len(sig) < 2 or not all(math.isfinite(v) and v >= 0 for v in sig) or \
            any(b >= a for a, b in zip(sig, sig[1:])) or sig[-2] <= 0:
        raise ValueError(f"schedule: expected at least two finite, strictly decreasing noise levels, all but the "
                         f"last > 0, got {sig}")
    return sig


def trajectory_table(schedule, method: str = "ddpm", *, steps: Optional[int] = None, eta: Optional[float] = None,
                     churn: float = 0.0, s_noise: float = 1.0, variance: str = "fixed_small",
                     step_size: Optional[float] = None, spacing: str = "linspace", solver_type: str = "midpoint",
                     order: Optional[int] = None, path: str = "ve", measurements: Optional[int] = None) -> List[Step]:
    """The trajectory as a list of :class:`Step` (float64 coefficients; see the module docstring).

    ``schedule``: a :class:`fastdiff.DDPMSchedule` (ddpm, ddim), VE levels (euler, heun,
    euler_ancestral: a :class:`fastdiff.KarrasSchedule` or a 1-D sequence of decreasing sigmas, all
    but the last > 0), noise level(s) (langevin, walk_jump).  On a DDPMSchedule the denoiser sees
    the schedule's ``alpha_t, sigma_t``.
    ``steps``: ddpm: None or T; ddim: number of timesteps (default T); euler / heun /
    euler_ancestral: None or the number of levels minus one; langevin / walk_jump: Langevin steps per level
    (default 100).  ``eta``: DDIM stochasticity (default 0), Euler-ancestral's (default 1).
    ``churn``: EDM's S_churn, ``gamma_i = min(churn / n, sqrt 2 - 1)``.  ``step_size``: Langevin
    gamma (default ``0.1 sigma^2`` per level).  ``spacing``: ddim's timesteps,
    :func:`fastdiff.coefficients.timesteps` (``"linspace"``: T-1 down to 0, the default and what
    :mod:`fastdiff.guidance` uses; ``"leading"``, ``"trailing"`` as in diffusers).

    The multistep and exponential-integrator solvers (:data:`fastdiff.solvers.MULTISTEP_METHODS`:
    ``dpmpp_2m``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``, ``dpmpp_2s_ancestral``, ``dpm_2``,
    ``dpm_2_ancestral``, ``lms``, ``deis``, ``ipndm``, ``ipndm_v``, ``unipc``, ``lcm``, ``tcd``) take VE levels like
    euler; ``eta`` (the SDE / ancestral ones, default 1; TCD's gamma), ``churn`` (dpm_2), ``solver_type``
    (dpmpp_2m_sde: ``"midpoint"`` or ``"heun"``), ``order`` (lms, ipndm, ipndm_v: 1..4, default 4; deis: 1..3,
    default 3; unipc: 1..3, default 2, UniPC-bh2 with its corrector; its other options):
    :func:`fastdiff.solvers.solver_table`.  ``path="flow"`` (those methods and euler / heun): the levels
    are rectified-flow times ``t`` in [0, 1], the denoiser sees ``(alpha, sigma) = (1 - t, t)``
    (``method="euler"`` is FlowMatch Euler).
    ``jms`` / ``sms`` (``measurements`` m): walk_jump's rows, ``steps`` Langevin steps (SMS: per stage,
    m stages) and the jump, applied with :mod:`fastdiff.multimeasurement`'s denoisers;
    ``stochastic_localization``: :func:`fastdiff.multimeasurement.localization_table` over a final time
    T (``steps`` uniform steps, default 100) or increasing times.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
        raise ValueError(f"steps: expected a positive int or None, got {steps!r}")
    if (measurements is not None) != (method in ("sms", "jms")) or method in MM.METHODS:
        return MM.table(schedule, method, steps, step_size, measurements, trajectory_table)
    if method == "ou_reverse":
        return ou_reverse_table(schedule, steps)
    churn = _check_number("churn", churn)
    s_noise = _check_number("s_noise", s_noise)
    if spacing not in C.SPACINGS:
        raise ValueError(f"spacing: expected one of {C.SPACINGS}, got {spacing!r}")
    if path != "ve" and method not in VE_METHODS:
        raise ValueError(f"path: only used by the methods on noise levels {VE_METHODS}, got path={path!r} with "
                         f"method={method!r}")
    if method not in MULTISTEP_METHODS and (solver_type != "midpoint" or order is not None):
        raise ValueError(f"solver_type, order: only used by the multistep solvers {MULTISTEP_METHODS}, "
                         f"got solver_type={solver_type!r}, order={order!r} with method={method!r}")
    if spacing != "linspace" and method != "ddim":
        raise ValueError(f"spacing: only used by method='ddim' (its timesteps), got spacing={spacing!r} with method={method!r}")
    if method in ("ddpm", "ddim"):
        if not isinstance(schedule, DDPMSchedule):
            raise TypeError(f"schedule: method={method!r} expects a fastdiff.DDPMSchedule, got {type(schedule).__name__}")
        T = schedule.T
        if method == "ddpm":
            if variance not in ("fixed_small", "fixed_large"):
                raise ValueError(f"variance: expected 'fixed_small' or 'fixed_large', got {variance!r}")
            if steps not in (None, T):
                raise ValueError(f"steps: DDPM takes every timestep of its schedule (None or {T}), got {steps}; "
                                 "use method='ddim' for fewer steps")
            return [_ddpm(schedule, t, variance) for t in range(T - 1, -1, -1)]
        n = T if steps is None else int(steps)
        if n > T:
            raise ValueError(f"steps: expected at most T = {T} DDIM steps, got {n}")
        eta = 0.0 if eta is None else _check_number("eta", eta)
        # default: evenly spaced from T-1 down to 0 (diffusers' "linspace"; guidance's DDIM loop uses the same)
        ts = C.timesteps(T, n, spacing)
        return [_ddim(schedule, t, ts[i + 1] if i + 1 < n else -1, eta) for i, t in enumerate(ts)]
    if method in VE_METHODS:
        sig = _ve_sigmas(method, schedule)
        n = len(sig) - 1
        if steps not in (None, n):
            raise ValueError(f"steps: expected None or the schedule's n = {n}, got {steps}")
        if method in MULTISTEP_METHODS or path != "ve":
            return solver_table(method, sig, path=path, eta=None if eta is None else _check_number("eta", eta),
                                s_noise=s_noise, churn=churn, solver_type=solver_type, order=order)
        if method == "euler_ancestral" and churn:
            raise ValueError("churn: not used by euler_ancestral (its noise is set by eta)")
        eta = 1.0 if eta is None else _check_number("eta", eta)
        if method != "euler_ancestral" and eta != 1.0:
            raise ValueError(f"eta: only used by ddim and euler_ancestral, got eta={eta} with method={method!r}")
        gamma = min(churn / n, _SQRT2M1) if churn > 0 else 0.0
        return [_euler_like(sig[i], sig[i + 1], gamma, s_noise, method, eta) for i in range(n)]
    levels = _levels("schedule", schedule)
    if method == "walk_jump" and len(levels) != 1:
        raise ValueError(f"schedule: walk_jump runs at one noise level, got {len(levels)}")
    n = 100 if steps is None else int(steps)
    table = []
    for sigma in levels:
        g = 0.1 * sigma * sigma if step_size is None else _check_number("step_size", step_size, strict=True)
        table += [_langevin(sigma, g)] * n
    if method == "walk_jump":
        table.append(_jump(levels[0]))
    return table


# =========================================================================== denoisers
class _Instances:
    """I independent MoLRG problems with the same n and component dims (x: (I, B, n))."""

    def __init__(self, models: List[MoLRG]):
        if not models:
            raise ValueError("denoiser: expected at least one MoLRG instance")
        m0 = models[0]
        for i, m in enumerate(models):
            if not isinstance(m, MoLRG):
                raise TypeError(f"denoiser[{i}]: expected a fastdiff.denoisers.MoLRG, got {type(m).__name__}")
            if m.n != m0.n or m.dims != m0.dims:
                raise ValueError(f"denoiser[{i}]: expected n = {m0.n} and dims {m0.dims} like denoiser[0], "
                                 f"got n = {m.n}, dims {m.dims}")
            if m.ucat.device != m0.ucat.device:
                raise ValueError(f"denoiser[{i}]: expected bases on {m0.ucat.device} like denoiser[0]")
        self.models = models
        self.I, self.n, self.dims = len(models), m0.n, m0.dims
        self.mode = getattr(m0, "mode", "soft")

    def __call__(self, x, alpha, sigma, labels=None, guidance=None, **kwargs):
        outs = []
        for i, m in enumerate(self.models):
            kw = {} if labels is None else {"labels": labels[i], "guidance": guidance}
            outs.append(m(x[i], alpha, sigma, **kw, **kwargs))
        return torch.stack(outs)


def _as_denoiser(denoiser):
    """(models or None, callable): ``models`` is a list of MoLRG when the fused kernels apply."""
    if isinstance(denoiser, torch.Tensor) and denoiser.ndim == 4:
        return _Instances([MoLRG(b) for b in denoiser.unbind(0)])
    if isinstance(denoiser, (list, tuple)):
        return _Instances(list(denoiser))
    if isinstance(denoiser, MoLRG):
        return denoiser
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable denoiser(x, alpha, sigma) -> x0_hat, a fastdiff.denoisers.MoLRG, "
                        f"a list of them or a (I, K, n, d) bases tensor, got {type(denoiser).__name__}")
    return denoiser


# =========================================================================== the sampler
@accepts_arrays
def sample(denoiser, x, schedule, method: str = "ddpm", *, steps: Optional[int] = None,
           generator: Optional[Generator] = None, eta: Optional[float] = None, churn: float = 0.0,
           s_noise: float = 1.0, variance: str = "fixed_small", step_size: Optional[float] = None,
           spacing: str = "linspace", solver_type: str = "midpoint", order: Optional[int] = None, path: str = "ve",
           labels=None, guidance: Optional[float] = None, return_trajectory=None, dtype=torch.float32,
           device=None, fused: Optional[bool] = None, backend: str = "auto", progress: bool = True,
           disable: Optional[bool] = None, callback: Optional[Callable[["StepInfo"], None]] = None,
           measurements: Optional[int] = None, per_measurement: bool = False):
    """Run a whole sampling trajectory; returns the final x (and the trajectory, if asked).

    denoiser: a :class:`fastdiff.denoisers.MoLRG` (fused kernel), a list of them or a (I, K, n, d)
        bases tensor (I instances in one call; ``x`` is (I, B, n)), or any callable
        ``denoiser(x, alpha, sigma[, labels=, guidance=]) -> x0_hat`` (loop over fused steps).
    x: the initial state x_T (a tensor, not modified), or a shape: then x_T is drawn from
        ``generator`` as ``scale * N(0, I)`` (scale 1 for ddpm/ddim, sigma_max for the Karras
        methods (t_0 on the flow path), sqrt(1 + sigma^2) for langevin/walk_jump) in ``dtype`` on ``device``.
    schedule, method, steps, eta, churn, s_noise, variance, step_size, spacing, solver_type, order, path: see
        :func:`trajectory_table` (the multistep solvers, ``dpmpp_2m`` and the rest, and the flow path run the loop).
    generator: :class:`fastdiff.Generator` (default :data:`fastdiff.default_generator`); each
        stochastic step draws ``x.numel()`` normals from it, exactly as the step-by-step loop.
    labels, guidance: per-sample class labels ((B,), or (I, B) for instances) and the CFG weight
        w: ``x0 = (1 - w) x0_hat + w x0_hat(x | y)`` (passed to the denoiser).
    return_trajectory: None; True (every state 0..T); or step indices k (state after k steps,
        0 = x_T).  Then returns ``(x, trajectory)`` with trajectory (len(indices), *x.shape).
    fused: None (fused kernel when the denoiser is a MoLRG, a kernel runs here and there is no
        ``callback``), True (required), False (the loop, :func:`run`).  backend: for the kernels
        and steps (``"torch"``: pure torch).
    callback: called once per step with a :class:`StepInfo` (see :func:`run`); runs the loop.
    progress / disable: tqdm progress bar (``disable=True`` hides it, as in k-diffusion); it
        only appears for runs longer than a second.
    measurements: m, for ``method="sms"`` / ``"jms"``; what ``schedule``, ``x`` and the result mean for
        those and ``stochastic_localization``: :func:`fastdiff.multimeasurement.table`.
    per_measurement: JMS only.  False (default): the exact split of docs/math.md §8a -- the chain of the
        mean ``ybar`` (B, n), walk-jump at ``sigma / sqrt m`` with step ``g / m`` (the loop, or the fused
        kernel for a MoLRG: ``fused`` as above), the residuals ``y_j - ybar`` drawn only where the
        trajectory / callback asks; every state has the law of the m coupled chains, the noise differs.
        True: the m coupled per-measurement chains as written (B m n normals a step; the loop only).
    """
    if per_measurement is not False and (per_measurement is not True or method != "jms"):
        raise ValueError(f"per_measurement: a bool used by method='jms' only, got {per_measurement!r} with "
                         f"method={method!r}")
    table = trajectory_table(schedule, method, steps=steps, eta=eta, churn=churn, s_noise=s_noise,
                             variance=variance, step_size=step_size, spacing=spacing, solver_type=solver_type,
                             order=order, path=path, measurements=measurements)
    den = _as_denoiser(denoiser)
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(f"generator: expected a fastdiff.Generator, got {type(generator).__name__}")
    gen = generator if generator is not None else default_generator
    if method in MM.METHODS:
        return _sample_mm(den, x, table, schedule, method, measurements, steps, gen, dtype, device, labels,
                         _snapshots(return_trajectory, len(table)), fused, backend, progress and not disable, callback,
                         per_measurement)
    x = _initial(x, table, method, schedule, gen, dtype, device, den)  # flow: scale t_0 (1: pure noise)
    labels, guidance = _check_labels(labels, guidance, x, den)
    snaps = _snapshots(return_trajectory, len(table))
    show = progress and not disable
    if _use_fused(fused, den, x, backend, callback, method if path == "ve" else "flow", gen):
        out, traj = fused_impl.run(den, x, table, gen, labels, guidance, snaps, backend, show)
        return (out, traj) if snaps is not None else out
    kw = {} if labels is None else {"labels": labels, "guidance": guidance}
    if backend != "auto" and isinstance(den, (MoLRG, _Instances)):
        kw["backend"] = backend
    fn = (lambda x, alpha, sigma: den(x, alpha, sigma, **kw)) if kw else den
    return run(fn, x, table, generator=gen, callback=callback, return_trajectory=snaps, backend=backend, progress=show)


def _initial(x, table, method, schedule, gen, dtype, device, den):
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        xt = x.clone(memory_format=torch.contiguous_format)
    else:
        if isinstance(x, numbers.Integral) and not isinstance(x, bool):
            x = (int(x),)
        if not isinstance(x, (tuple, list, torch.Size)) or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in x):
            raise TypeError(f"x: expected the initial tensor x_T or a shape (tuple of ints), got {x!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        if device is None:
            device = den.models[0].ucat.device if isinstance(den, _Instances) else \
                (den.ucat.device if isinstance(den, MoLRG) else "cpu")
        if method in ("ddpm", "ddim", "ou_reverse"):   # N(0, I): the OU process's stationary law
            scale = 1.0
        elif method in VE_METHODS:
            scale = _ve_sigmas(method, schedule)[0]
        else:
            scale = math.sqrt(1.0 + table[0].level[1] ** 2)
        xt = S.randn(tuple(int(v) for v in x), generator=gen, dtype=dtype, device=device)
        if scale != 1.0:
            xt.mul_(scale)
    want_ndim = 3 if isinstance(den, _Instances) else None
    if want_ndim and (xt.ndim != 3 or xt.shape[0] != den.I or xt.shape[2] != den.n):
        raise ValueError(f"x: expected shape (I, B, n) = ({den.I}, B, {den.n}) for {den.I} instances, got {tuple(xt.shape)}")
    if isinstance(den, MoLRG) and (xt.ndim != 2 or xt.shape[1] != den.n):
        raise ValueError(f"x: expected shape (B, n) with n = {den.n} for this MoLRG, got {tuple(xt.shape)}")
    if xt.ndim < 1:
        raise ValueError("x: expected a tensor of shape (B, ...), got a 0-d tensor")
    return xt


def _check_labels(labels, guidance, x, den):
    if labels is None:
        if guidance is not None:
            raise ValueError("guidance: given without labels (the CFG weight needs per-sample labels)")
        return None, None
    if guidance is None:
        raise ValueError("guidance: required with labels (the CFG weight w)")
    guidance = _check_number("guidance", guidance, lo=-math.inf)
    labels = torch.as_tensor(labels, device=x.device)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected integer class labels, got {labels.dtype}")
    want = tuple(x.shape[:-1])
    if labels.numel() != math.prod(want):
        raise ValueError(f"labels: expected shape {want} (one per sample), got {tuple(labels.shape)}")
    labels = labels.reshape(want).long().contiguous()
    K = len(den.dims) if isinstance(den, (_Instances, MoLRG)) else None
    if K is not None and labels.numel() and not bool(((labels >= 0) & (labels < K)).all()):
        raise ValueError(f"labels: expected values in [0, {K}) (one per component)")
    return labels, guidance


def _use_fused(fused, den, x, backend, callback, method, gen=None) -> bool:
    if fused is False:
        return False
    if method in MULTISTEP_METHODS or method == "flow":
        if fused:
            what = "the flow path" if method == "flow" else f"method={method!r}"
            raise ValueError(f"fused: the fused trajectory kernel runs the single-step VE/VP methods; {what} "
                             "runs the step-by-step loop (fused=None or False)")
        return False
    if callback is not None:
        if fused:
            raise ValueError("fused: the fused trajectory kernel cannot call a per-step callback (use fused=None or False)")
        return False
    ok, why = fused_impl.supported(den, x, backend, gen)
    if fused and not ok:
        raise ValueError(f"fused: the fused trajectory kernel cannot run this call: {why}")
    return ok


# =========================================================================== fastdiff.sample for these methods
def _sample_mm(den, x, table, schedule, method, m, steps, gen, dtype, device, labels, snaps, fused, backend, show, callback,
           per_measurement: bool = False):
    """:func:`fastdiff.sample` for :data:`METHODS`: JMS by its mean chain (:func:`_sample_jms`) unless
    ``per_measurement``; SMS, per-measurement JMS and stochastic localization on the loop
    :func:`fastdiff.sampling.run` with the wrapper denoisers above."""
    if isinstance(den, _Instances):
        raise ValueError(f"denoiser: method={method!r} takes one denoiser (not a list of instances)")
    if labels is not None:
        raise ValueError(f"labels: not used by method={method!r} (guide through the denoiser instead)")
    collapsed = method == "jms" and not per_measurement
    if fused and not collapsed:
        raise ValueError(f"fused: method={method!r}{' with per_measurement=True' if method == 'jms' else ''} runs the "
                         "step-by-step loop (its denoiser sees the mean of the measurements, which the fused trajectory "
                         "kernel does not form); use fused=None or False")
    if device is None and isinstance(den, MoLRG):
        device = den.ucat.device
    x = MM.initial_shape(method, x, m, schedule, steps)  # JMS: (B, n) -> (B, m, n)
    if collapsed:
        return _sample_jms(den, x, table, m, gen, dtype, device, snaps, fused, backend, show, callback)
    if method == "stochastic_localization" and not isinstance(x, torch.Tensor):
        xt = torch.zeros(x, dtype=dtype, device=device or "cpu")  # Z_0 = 0
    else:
        xt = _initial(x, table, method, schedule, gen, dtype, device, None)
    fn = MM.wrap(method, den, m, steps, xt)
    res = run(fn, xt, table, generator=gen, callback=callback, return_trajectory=snaps, backend=backend,
                 progress=show, desc=method)
    out, traj = res if snaps is not None else (res, None)
    if method == "jms":
        out = out[:, 0].contiguous()
    return (out, traj) if snaps is not None else out



def _sample_jms(den, x, table: Sequence[Step], m: int, gen, dtype, device, snaps: Optional[List[int]], fused, backend,
               show: bool, callback):
    """JMS by its exact split (docs/math.md §8a): the walk-jump chain of ``ybar`` (B, n) at level
    ``sigma / sqrt m`` with step ``g / m`` -- the same rows, coefficients ``(1 - g/sigma^2, g/sigma^2,
    sqrt(2g/m))`` -- on :func:`fastdiff.sampling.run` (or the fused trajectory kernel for a MoLRG), and
    the residuals (:class:`fastdiff.multimeasurement.ResidualChain`) drawn only at the snapshot / callback steps.  ``x``: the state
    (B, m, n) or its shape; ``table``: JMS's rows at ``sigma``.  Each step draws B n normals (not B m n);
    the residuals draw from the stream after the mean chain's window, so the result does not depend
    on ``snaps`` or ``callback``.  Returns what :func:`fastdiff.sample` returns for JMS."""
    langevin = table[:-1]
    sigma, K, g = table[0].level[1], len(langevin), langevin[0].call[1][0]
    if any(st.call[0] != "langevin_step" for st in langevin) or table[-1].call[0] != "jump":
        raise ValueError("table: expected JMS's rows (Langevin steps, then the jump)")
    mean_table = trajectory_table(sigma / math.sqrt(m), "walk_jump", steps=K, step_size=g / m)
    need_r = snaps is not None or callback is not None
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        y0 = MM._check_jms_state(x, m)
        acc = torch.promote_types(y0.dtype, torch.float32)        # the mean over m in at least float32
        ybar = y0.to(acc).mean(1).to(y0.dtype)
        r0 = y0.to(acc) - ybar.to(acc)[:, None] if need_r else None
        var0, state_dtype = 0.0, y0.dtype
    else:
        B, _, n = x
        # y_j ~ s N(0, I) iid, s^2 = 1 + sigma^2 (what walk-jump starts from): ybar ~ (s / sqrt m) N(0, I)
        ybar = S.randn((B, n), generator=gen, dtype=dtype, device=device or "cpu").mul_(math.sqrt((1 + sigma ** 2) / m))
        r0, var0, state_dtype = None, 1.0 + sigma ** 2, dtype
    B, n = ybar.shape
    if gen.per_sample:
        gen.check_batch(B)
    per = n if gen.per_sample else B * n
    res_gen = MM._skip_draws(gen, per, K)
    window = res_gen.offset
    acc = torch.promote_types(state_dtype, torch.float32)
    res = MM.ResidualChain([(st.cx, st.cz) for st in langevin], res_gen, (B, m, n), acc, ybar.device, r0, var0) \
        if need_r else None
    traj = None if snaps is None else torch.empty((len(snaps), B, m, n), dtype=state_dtype, device=ybar.device)

    def state(k, yb):  # y_k (B, m, n) = ybar_k + r_k, saved where the trajectory asks for step k
        y = res.at(k).add(yb.to(acc)[:, None]).to(state_dtype)
        for j, s in enumerate(snaps or ()):
            if s == k:
                traj[j].copy_(y)
        return y

    cb = None
    if callback is not None:
        def cb(info):  # the callback sees the JMS state and row, as on the per-measurement loop
            y = state(info.i, info.x)
            callback(StepInfo(info.i, y, 1.0, sigma, info.x0_hat[:, None].expand(y.shape), table[info.i]))
    mean_snaps = None if snaps is None or callback is not None else sorted({k for k in snaps if k <= K}) or None
    if _use_fused(fused, den, ybar, backend, callback, "walk_jump", gen):
        out, mean_traj = fused_impl.run(den, ybar, mean_table, gen, None, None, mean_snaps, backend, show)
    else:
        got = run(den, ybar, mean_table, generator=gen, callback=cb, return_trajectory=mean_snaps, backend=backend,
                     progress=show, desc="jms")
        out, mean_traj = got if mean_snaps is not None else (got, None)
    if gen.offset != window:  # the residuals' window must start where the mean chain stopped drawing
        raise RuntimeError(f"jms: the mean chain left the generator at offset {gen.offset}, expected {window}")
    if snaps is not None:
        for j, k in enumerate(mean_snaps or ()):
            state(k, mean_traj[j])
        for j, s in enumerate(snaps):
            if s == K + 1:
                traj[j].copy_(out[:, None].expand(B, m, n))
    gen.offset = res_gen.offset
    return (out, traj) if snaps is not None else out

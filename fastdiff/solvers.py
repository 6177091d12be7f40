"""Trajectory rows: the :class:`Step` every sampler is a table of, and the rows of the multistep and
exponential-integrator solvers (DPM-Solver++, DPM-Solver-2, LMS, DEIS, iPNDM, UniPC, LCM, TCD).

With ``D = x0_hat`` the denoiser's output, every solver step is, per sample, an affine map of the
state, the current and earlier denoiser outputs and a normal draw, with scalar coefficients computed
once on the host (:mod:`fastdiff.coefficients`).  One :class:`Step` row says which::

    x <- x + churn z1                                           (EDM churn; 0: none)
    m  = D(x; level)
    x' = cx x + cm m + sum_j hist[j] h_{i-1-j} + cz z2          (the step; hist: earlier rows' pushes)
    x  <- hx x + hm m + hxp x' + hmp D(x'; level2) + hz z3      (a second stage where level2 is set)
    h_i = push[0] x + push[1] m                                 (remembered where push is set)

``h_i`` is what the multistep solvers remember: the data prediction itself (``push = (0, 1)``: DPM-Solver++,
kept without a copy), the ODE derivative ``d = (x - D)/sigma`` (``push = (1/sigma, -1/sigma)``: LMS, iPNDM)
or the noise prediction ``eps = (x - alpha D)/sigma`` (``push = (1/sigma, -alpha/sigma)``: DEIS).
UniPC's corrector fits the same rows: its corrected state is the predicted one (the row's ``x``) plus a sum
of remembered outputs, so a row is corrector-then-predictor in one map of ``x``, ``m`` and ``hist``.
The single-step methods of :mod:`fastdiff.sampling` fill only the first two lines and the Heun stage.
:func:`fastdiff.sampling.run` applies a table step by step (one fused pass per line, coefficients as
kernel arguments); :func:`fastdiff.gaussian_exact.gaussian_sampler_law` pushes a Gaussian through it exactly.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from fastdiff import coefficients as C
from fastdiff.steps import affine_step

__all__ = ["Step", "MULTISTEP_METHODS", "FLOW_METHODS", "CONSISTENCY_METHODS", "PATHS", "solver_table", "level_of", "apply_row",
           "history_length", "ou_reverse_table"]


class Step(NamedTuple):
    """One trajectory row as an affine map of x and the denoiser outputs (see the module docstring).

    ``call`` is the step-function call of the loop path: ``(name, args, kwargs)``; rows of the solvers
    here have ``name = "affine"`` and are applied from their coefficients alone.
    """
    level: Tuple[float, float]            # (alpha, sigma) the denoiser sees at x (after churn)
    churn: float                          # s1: x += s1 z1 first (0: none)
    cx: float
    cm: float
    cz: float                             # 0: no draw
    level2: Optional[Tuple[float, float]]  # the second stage's evaluation at x' (None: no second stage)
    hx: float
    hm: float
    hxp: float
    hmp: float
    call: Tuple[str, tuple, dict]
    hist: Tuple[float, ...] = ()          # coefficients of h_{i-1}, h_{i-2}, ... in x'
    push: Optional[Tuple[float, float]] = None  # h_i = push[0] x + push[1] m (None: nothing remembered)
    hz: float = 0.0                       # noise of the second stage (0: no draw)


MULTISTEP_METHODS = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral", "dpm_2",
                     "dpm_2_ancestral", "lms", "deis", "ipndm", "ipndm_v", "unipc")
# the methods taking ``order``: its highest and its default
_ORDERS = {"lms": (4, 4), "deis": (3, 3), "ipndm": (4, 4), "ipndm_v": (4, 4), "unipc": (3, 2)}
_D = (0.0, 1.0)  # push the data prediction itself


def _row(level, cx, cm, *, hist=(), cz=0.0, push=None, churn=0.0, level2=None, second=(0.0, 0.0, 0.0, 0.0),
         hz=0.0, call_args=(), call_kw=None) -> Step:
    hx, hm, hxp, hmp = second
    return Step(level, churn, cx, cm, cz, level2, hx, hm, hxp, hmp, ("affine", call_args, call_kw or {}),
                tuple(hist), push, hz)


PATHS = ("ve", "flow")
FLOW_METHODS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpm_2", "lms", "deis", "ipndm",
                "ipndm_v", "unipc")
# the consistency samplers (LCM, TCD: _consistency_rows) are solver rows on both paths
CONSISTENCY_METHODS = ("lcm", "tcd")
MULTISTEP_METHODS = MULTISTEP_METHODS + CONSISTENCY_METHODS
FLOW_METHODS = FLOW_METHODS + CONSISTENCY_METHODS


def level_of(path: str, s: float) -> Tuple[float, float]:
    """The denoiser's ``(alpha, sigma)`` at the schedule value ``s``: VE ``(1, s)``; flow (rectified flow,
    ``x_t = (1 - t) x0 + t eps``) ``(1 - t, t)``."""
    return (1.0, s) if path == "ve" else (1.0 - s, s)


def ou_reverse_table(schedule, steps: Optional[int] = None) -> List[Step]:
    """Euler-Maruyama on the reverse Ornstein-Uhlenbeck SDE (seed 003; docs/math.md section 1):
    forward ``dX = -X dt + sqrt 2 dB``, so ``X_t = alpha X_0 + sigma Z`` with ``alpha = e^-t``,
    ``sigma^2 = 1 - e^-2t``, and the reverse step from t to t - gamma is
    ``y <- y + gamma y + 2 gamma score_t(y) + sqrt(2 gamma) z``, ``score_t = (alpha x0_hat - y) / sigma^2``
    (:func:`fastdiff.coefficients.ou_reverse`, the score taken at the step's start).

    ``schedule``: a final time T > 0 (``steps`` uniform steps down to 0, default 100) or a strictly
    decreasing sequence of times t_0 > ... > t_K >= 0 (``steps`` None or K)."""
    if isinstance(schedule, bool) or not isinstance(schedule, (int, float, list, tuple, torch.Tensor)):
        raise TypeError(f"schedule: expected a final time T or a sequence of decreasing times, got {type(schedule).__name__}")
    times = [float(v) for v in torch.as_tensor(schedule, dtype=torch.float64).reshape(-1).tolist()]
    if len(times) == 1:
        n = 100 if steps is None else int(steps)
        times = [times[0] * (n - k) / n for k in range(n + 1)]
    elif steps is not None and int(steps) != len(times) - 1:
        raise ValueError(f"steps: expected None or len(schedule) - 1 = {len(times) - 1}, got {steps}")
    if not all(math.isfinite(t) for t in times) or times[0] <= 0 or times[-1] < 0 or \
            any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"schedule: expected finite times decreasing strictly from t_0 > 0 to t_K >= 0, got {times}")
    rows = []
    for t, t_next in zip(times, times[1:]):
        alpha, sigma = math.exp(-t), math.sqrt(-math.expm1(-2.0 * t))
        lx, ls, lz = C.ou_reverse(t - t_next)
        cx, cm = C.merge_x0((lx, C.score_form("x0", alpha, sigma), ls))
        rows.append(_row((alpha, sigma), cx, cm, cz=lz, call_kw={"method": "ou_reverse"}))
    return rows


def solver_table(method: str, sigmas: Sequence[float], *, path: str = "ve", eta: Optional[float] = None,
                 s_noise: float = 1.0, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 solver_type: str = "midpoint", order: Optional[int] = None,
                 timesteps: Optional[Sequence[float]] = None, timestep_scaling: float = 10.0,
                 variant: Optional[str] = None, corrector: bool = True, disable_corrector: Sequence[int] = (),
                 lower_order_final: bool = True) -> List[Step]:
    """The rows of ``method`` over the decreasing levels ``sigmas`` (the last may be 0), as k-diffusion's
    samplers of the same names take their steps (:mod:`fastdiff.coefficients`).

    ``path``: ``"ve"`` (``x = x0 + sigma eps``, k-diffusion's convention) or ``"flow"`` (``x_t = (1 - t) x0 +
    t eps``, ``sigmas`` the times ``t`` in (0, 1]: SD3 / Flux's FlowMatch samplers).  The probability-flow ODE
    is ``dx/ds = (x - D)/s`` on both paths, so Euler (FlowMatch Euler on ``"flow"``), Heun, DPM-2 and LMS
    take the same steps in ``s``; the DPM-Solver++ ones use the path's ``(alpha, sigma)``; the ancestral
    ones are VE only.  Methods:

    ``dpmpp_2m``; ``dpmpp_2m_sde`` (``eta`` default 1, ``solver_type`` ``"midpoint"`` / ``"heun"``);
    ``dpmpp_3m_sde`` (``eta`` default 1; ``eta = 0`` is DPM-Solver++(3M)); ``dpmpp_2s_ancestral`` and
    ``dpm_2_ancestral`` (``eta`` default 1); ``dpm_2`` (EDM churn ``churn``, ``gamma = min(churn/n, sqrt 2 - 1)`` where ``s_tmin <= sigma <= s_tmax``);
    ``lms`` (``order`` 1..4, default 4); ``deis`` (``order`` 1..3, default 3: :func:`_deis_rows`);
    ``ipndm``, ``ipndm_v`` (``order`` 1..4, default 4: :func:`_ipndm_rows`); ``unipc`` (:func:`_unipc_rows`:
    ``order`` 1..3, default 2, ``variant`` ``"bh1"`` / ``"bh2"`` (default), ``corrector``, ``disable_corrector``,
    ``lower_order_final``); ``lcm`` and ``tcd`` (``eta`` is TCD's gamma, default 0.3, as diffusers'
    ``TCDScheduler``; ``timesteps`` and ``timestep_scaling``: LCM's boundary condition,
    :func:`_consistency_rows`).  ``s_noise`` scales every draw."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if method not in (MULTISTEP_METHODS if path == "ve" else FLOW_METHODS):
        raise ValueError(f"method: expected one of {MULTISTEP_METHODS if path == 've' else FLOW_METHODS} on the "
                         f"{path!r} path, got {method!r}")
    if path == "flow" and not all(0.0 <= float(t) <= 1.0 for t in sigmas):
        raise ValueError("sigmas: the flow path's times t must lie in [0, 1]")
    if path == "flow" and churn:
        raise ValueError("churn: VE only (EDM churn adds noise at constant signal scale)")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    if order is not None and method not in _ORDERS:
        raise ValueError(f"order: only used by method='lms', 'deis', 'ipndm', 'ipndm_v' or 'unipc', got order={order} "
                         f"with method={method!r}")
    top, default = _ORDERS.get(method, (4, 4))
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= top):
        raise ValueError(f"order: expected an int in [1, {top}] ({method}), got {order!r}")
    order = default if order is None else order
    if method != "unipc" and (variant is not None or corrector is not True or tuple(disable_corrector)
                              or lower_order_final is not True):
        raise ValueError("variant, corrector, disable_corrector, lower_order_final: only used by method='unipc', "
                         f"got them with method={method!r}")
    if method != "dpmpp_2m_sde" and solver_type != "midpoint":
        raise ValueError(f"solver_type: only used by method='dpmpp_2m_sde', got {solver_type!r} with method={method!r}")
    if churn and method != "dpm_2":
        raise ValueError(f"churn: used by euler, heun and dpm_2, got churn={churn} with method={method!r}")
    if eta is not None and method in ("euler", "heun", "dpmpp_2m", "dpm_2") + tuple(_ORDERS):
        raise ValueError(f"eta: not used by method={method!r} (a deterministic solver)")
    if method not in CONSISTENCY_METHODS and (timesteps is not None or timestep_scaling != 10.0):
        raise ValueError(f"timesteps, timestep_scaling: only used by method='lcm', got them with method={method!r}")
    sig = [float(s) for s in sigmas]
    lev = [level_of(path, s) for s in sig]
    if method in CONSISTENCY_METHODS:
        return _consistency_rows(method, sig, path, eta, s_noise, timesteps, timestep_scaling)
    eta = 1.0 if eta is None else eta
    n = len(sig) - 1
    rows: List[Step] = []

    def h_between(j, k):  # lambda_k - lambda_j; None (no usable history) for the infinite step from pure noise
        h = C.log_snr(*lev[k]) - C.log_snr(*lev[j])
        return h if math.isfinite(h) else None
    if method == "euler":  # on the flow path: FlowMatch Euler, x + (t_next - t) flow
        for i in range(n):
            cx, c0 = C.euler(sig[i], sig[i + 1])
            rows.append(_row(lev[i], cx, c0, call_args=(sig[i], sig[i + 1])))
    elif method == "heun":
        for i in range(n):
            cx, c0 = C.euler(sig[i], sig[i + 1])
            if sig[i + 1] == 0.0:  # the last step is Euler, as EDM's
                rows.append(_row(lev[i], cx, c0, call_args=(sig[i], sig[i + 1])))
                continue
            hx, h0, hxp, h0p, level2 = C.heun_corrector(sig[i], sig[i + 1])
            rows.append(_row(lev[i], cx, c0, level2=level_of(path, level2), second=(hx, h0, hxp, h0p),
                             call_args=(sig[i], sig[i + 1])))
    elif method == "dpmpp_2m":
        for i in range(n):
            h_last = None if i == 0 else h_between(i - 1, i)
            cx, cs, _ = C.dpmpp_2m(lev[i], lev[i + 1], h_last)
            rows.append(_row(lev[i], cx, cs[0], hist=cs[1:], push=_D, call_args=(sig[i], sig[i + 1])))
    elif method == "dpmpp_2m_sde":
        for i in range(n):
            h_last = None if i == 0 else h_between(i - 1, i)
            cx, cs, cz = C.dpmpp_2m_sde(lev[i], lev[i + 1], h_last, eta=eta, s_noise=s_noise, solver_type=solver_type)
            rows.append(_row(lev[i], cx, cs[0], hist=cs[1:], cz=cz, push=_D, call_args=(sig[i], sig[i + 1])))
    elif method == "dpmpp_3m_sde":
        hs: List[float] = []  # h of the earlier steps, latest first (k-diffusion's h_1, h_2)
        for i in range(n):
            h1, h2 = (hs + [None, None])[:2]
            cx, cs, cz = C.dpmpp_3m_sde(lev[i], lev[i + 1], h1, h2, eta=eta, s_noise=s_noise)
            rows.append(_row(lev[i], cx, cs[0], hist=cs[1:], cz=cz, push=_D, call_args=(sig[i], sig[i + 1])))
            if sig[i + 1] > 0.0:
                h = h_between(i, i + 1)
                hs = [] if h is None else [h] + hs
    elif method == "dpmpp_2s_ancestral":
        for i in range(n):
            (cx, c0), second, mid = C.dpmpp_2s_ancestral(sig[i], sig[i + 1], eta, s_noise)
            if mid is None:  # one stage: Euler to sigma_down, then the noise
                rows.append(_row((1.0, sig[i]), second[0], second[1], cz=second[4], call_args=(sig[i], sig[i + 1])))
            else:
                rows.append(_row((1.0, sig[i]), cx, c0, level2=(1.0, mid), second=second[:4], hz=second[4],
                                 call_args=(sig[i], sig[i + 1])))
    elif method in ("dpm_2", "dpm_2_ancestral"):
        gamma = min(churn / n, math.sqrt(2.0) - 1.0) if churn > 0 else 0.0
        for i in range(n):
            if method == "dpm_2":
                s_hat, s1, target, hz = sig[i], 0.0, sig[i + 1], 0.0
                g = gamma if s_tmin <= sig[i] <= s_tmax else 0.0
                if g > 0.0:
                    s_hat, s1 = C.edm_churn(sig[i], g, s_noise)
            else:
                s_hat, s1, g = sig[i], 0.0, 0.0
                target, up = C.ancestral_sigmas(sig[i], sig[i + 1], eta)
                hz = s_noise * up
            (cx, c0), second, mid = C.dpm_2(s_hat, target)
            kw = {"gamma": g, "s_noise": s_noise} if g > 0.0 else {}
            if mid is None:  # Euler to the target; k-diffusion's dpm_2_ancestral then adds no noise
                rows.append(_row(level_of(path, s_hat), cx, c0, churn=s1, call_args=(sig[i], sig[i + 1]), call_kw=kw))
            else:
                rows.append(_row(level_of(path, s_hat), cx, c0, churn=s1, level2=level_of(path, mid), second=second,
                                 hz=hz, call_args=(sig[i], sig[i + 1]), call_kw=kw))
    elif method == "deis":
        rows = _deis_rows(sig, lev, order)
    elif method in ("ipndm", "ipndm_v"):
        rows = _ipndm_rows(method, sig, lev, order)
    elif method == "unipc":
        rows = _unipc_rows(sig, lev, order, "bh2" if variant is None else variant, corrector, disable_corrector,
                           lower_order_final)
    else:  # lms: x_{i+1} = x_i + sum_j c_j d_{i-j}, d = (x - D)/sigma remembered
        for i in range(n):
            cs = C.lms(sig, i, order)
            s = sig[i]
            rows.append(_row(lev[i], 1.0 + cs[0] / s, -cs[0] / s, hist=cs[1:], push=(1.0 / s, -1.0 / s),
                             call_args=(sig[i], sig[i + 1])))
    return rows


def _deis_rows(sig, lev, order) -> List[Step]:
    """DEIS rows (:func:`fastdiff.coefficients.deis`): with ``eps_j = (x_j - alpha_j D_j)/sigma_j`` remembered,

        x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_{j<p} c_j eps_{i-j}),   p = min(order, i + 1),

    ``p`` also capped at the nodes with a finite ``rho = sigma/alpha`` (the flow path's ``t = 1`` has
    ``alpha = 0``).  A first-order row is DDIM, ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (alpha_{i+1} -
    sigma_{i+1} alpha_i/sigma_i) D_i`` (the same map, finite at ``alpha_i = 0``)."""
    rho = [s / a if a > 0.0 else math.inf for a, s in lev]
    rows: List[Step] = []
    for i in range(len(sig) - 1):
        (a, s), (an, sn) = lev[i], lev[i + 1]
        p = 1
        while p < min(order, i + 1) and math.isfinite(rho[i - p]):
            p += 1
        push = (1.0 / s, -a / s)
        if p == 1:
            rows.append(_row(lev[i], sn / s, an - sn * a / s, push=push, call_args=(sig[i], sig[i + 1])))
            continue
        cs = C.deis(rho, i, p)
        rows.append(_row(lev[i], an / a + an * cs[0] / s, -an * cs[0] * a / s, hist=[an * c for c in cs[1:]],
                         push=push, call_args=(sig[i], sig[i + 1])))
    return rows


def _ipndm_rows(method, sig, lev, order) -> List[Step]:
    """iPNDM / iPNDM-v rows (:func:`fastdiff.coefficients.ipndm`, :func:`~fastdiff.coefficients.ipndm_v`):
    ``x_{i+1} = x_i + sum_j c_j d_{i-j}`` with ``d = (x - D)/s`` remembered, as LMS; the step to ``s = 0``
    is ``x = D`` (ComfyUI's "denoising step"), on both paths (``alpha = 1`` there)."""
    coef = C.ipndm if method == "ipndm" else C.ipndm_v
    rows: List[Step] = []
    for i in range(len(sig) - 1):
        s = sig[i]
        if sig[i + 1] == 0.0:
            rows.append(_row(lev[i], 0.0, 1.0, call_args=(sig[i], sig[i + 1])))
            continue
        cs = coef(sig, i, order)
        rows.append(_row(lev[i], 1.0 + cs[0] / s, -cs[0] / s, hist=cs[1:], push=(1.0 / s, -1.0 / s),
                         call_args=(sig[i], sig[i + 1])))
    return rows


def _consistency_rows(method, sig, path, eta, s_noise, timesteps, timestep_scaling) -> List[Step]:
    """The rows of the consistency samplers (:func:`fastdiff.coefficients.lcm` / :func:`~fastdiff.coefficients.tcd`;
    docs/math.md 1e), one evaluation and one fused pass each, the noise drawn in the kernel (``cz``):

    ``lcm``: ``x_{i+1} = alpha_{i+1} (c_skip x_i + c_out D_i) + sigma_{i+1} s_noise z``, ComfyUI's ``sample_lcm``
    on VE levels (``x = D + sigma_{i+1} z``, no draw to ``sigma = 0``) without a boundary condition; with
    ``timesteps`` (one per row: the discrete timestep a distilled model was trained at, e.g. diffusers'
    ``LCMScheduler.timesteps``), ``(c_skip, c_out) = lcm_boundary(timesteps[i], timestep_scaling)`` mixes in the
    state x as the path carries it (diffusers' ``LCMScheduler`` does on its VP sample).

    ``tcd``: through ``s_i = (1 - gamma) sigma_{i+1}`` (the schedule value: sigma on VE, t on the flow path),
    ``x_{i+1} = (alpha_{i+1}/alpha_s)(alpha_s D_i + sigma_s eps_hat) + sqrt(sigma_{i+1}^2 - (alpha_{i+1} sigma_s /
    alpha_s)^2) s_noise z``; ``gamma = eta`` in [0, 1], default 0.3."""
    n = len(sig) - 1
    if method == "lcm":
        if eta is not None:
            raise ValueError("eta: not used by method='lcm' (its noise is set by the levels); TCD's gamma is "
                             "method='tcd', eta=")
        if timesteps is not None:
            timesteps = [float(t) for t in timesteps]
            if len(timesteps) != n or not all(math.isfinite(t) and t >= 0 for t in timesteps):
                raise ValueError(f"timesteps: expected {n} finite timesteps >= 0 (one per step), got {timesteps}")
        if not (isinstance(timestep_scaling, (int, float)) and not isinstance(timestep_scaling, bool)
                and math.isfinite(timestep_scaling) and timestep_scaling >= 0):
            raise ValueError(f"timestep_scaling: expected a finite number >= 0, got {timestep_scaling!r}")
    else:
        if timesteps is not None or timestep_scaling != 10.0:
            raise ValueError("timesteps, timestep_scaling: LCM's boundary condition, not used by method='tcd' "
                             "(its jump to s is the identity at s = t by construction)")
        gamma = 0.3 if eta is None else eta
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"eta: TCD's gamma, expected a number in [0, 1], got {gamma}")
    rows: List[Step] = []
    for i in range(n):
        level, level_next = level_of(path, sig[i]), level_of(path, sig[i + 1])
        if method == "lcm":
            b = (0.0, 1.0) if timesteps is None else C.lcm_boundary(timesteps[i], timestep_scaling)
            (fx, fm), (r, q) = C.lcm(level_next, b)
        else:
            (fx, fm), (r, q) = C.tcd(level, level_of(path, (1.0 - gamma) * sig[i + 1]), level_next)
        rows.append(_row(level, r * fx, r * fm, cz=q * s_noise, call_args=(sig[i], sig[i + 1])))
    return rows


def _unipc_rows(sig, lev, order, variant, corrector, disable_corrector, lower_order_final) -> List[Step]:
    """UniPC-p rows (Zhao et al. 2023; :func:`fastdiff.coefficients.unipc`), as diffusers'
    ``UniPCMultistepScheduler`` steps: at step i the state is the predicted ``x~_i``; ``m_i = D(x~_i)`` first
    corrects it, ``x_i = x~_i + sum_j e_j m_{i-j}`` (UniC with the order of step i-1's predictor; not where
    ``corrector`` is false, on step 0, or where ``i - 1`` is in ``disable_corrector``, diffusers' list), then
    UniP of order ``p_i = min(order, i + 1, n - i)`` (``n - i`` only with ``lower_order_final``: diffusers'
    warm-up and final steps) predicts ``x~_{i+1} = cx x_i + sum_j c_j m_{i-j}``.  One row is the composition
    ``x~_{i+1} = cx x~_i + sum_j (c_j + cx e_j) m_{i-j}``, ``m`` remembered (``push = (0, 1)``); the final
    state is a prediction, as diffusers returns it.  To ``sigma = 0`` the step is first order
    (``x = alpha D``: higher orders divide by ``r = 0``), and the history never reaches back to a level with
    ``alpha = 0`` (the flow path's ``t = 1``, ``lambda = -inf``), nor is that first step corrected."""
    if not isinstance(corrector, bool):
        raise TypeError(f"corrector: expected True or False, got {type(corrector).__name__}")
    if isinstance(disable_corrector, (str, bytes)) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in disable_corrector):
        raise TypeError(f"disable_corrector: expected a sequence of step indices (ints), got {disable_corrector!r}")
    if not isinstance(lower_order_final, bool):
        raise TypeError(f"lower_order_final: expected True or False, got {type(lower_order_final).__name__}")
    off = set(disable_corrector)
    n = len(sig) - 1
    finite = [math.isfinite(C.log_snr(*lv)) for lv in lev]
    rows: List[Step] = []
    e: Optional[Tuple[float, ...]] = None  # the correction of this row's x~_i: e_j multiplies m_{i-j}
    for i in range(n):
        p = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        back = 0  # earlier levels the history may use: consecutive, finite lambda
        while back < p - 1 and finite[i - 1 - back]:
            back += 1
        p = 1 if sig[i + 1] == 0.0 or not finite[i] else 1 + back
        cx, pred, corr = C.unipc(lev[i], lev[i + 1], [lev[i - k] for k in range(1, p)], variant=variant)
        cs = list(pred) + [0.0] * (len(e or ()) - len(pred))
        for j, c in enumerate(e or ()):
            cs[j] += cx * c
        rows.append(_row(lev[i], cx, cs[0], hist=cs[1:], push=_D, call_args=(sig[i], sig[i + 1]),
                         call_kw={"order": p, "corrected": e is not None}))
        e = corr if corrector and i not in off else None
    return rows


def history_length(table: Sequence[Step]) -> int:
    """How many earlier pushes a table's rows read at most."""
    n = 0
    for st in table:  # a loop, not max(..., default=): dynamo traces this inside the sampler loop
        n = max(n, len(st.hist))
    return n


def apply_row(denoiser, x, m, st: Step, i, history, keep, gen, noise, out, x_pred, backend):
    """Apply one ``"affine"`` row for :func:`fastdiff.sampling.run`, after its churn and first evaluation
    ``m = D(x; row.level)``: the push, the step, the second stage (module docstring).  ``history``: the
    earlier pushes, latest first, kept to ``keep`` entries (updated in place); ``noise(i, row)``: tensors
    in place of the generator's draws (None: the generator); ``out``: x's buffer or None (autograd);
    ``x_pred``: the second stage's buffer, reused.  Returns ``(x, x_pred)``."""
    def draw(coef):
        return None if coef == 0.0 or noise is None else noise(i, st)

    h = None
    if st.push is not None and keep:
        # (not while torch.compile traces: the traced graph allocates every output afresh)
        if not torch.compiler.is_compiling() and any(m.data_ptr() == r.data_ptr() for r in history if r.numel()):
            raise ValueError("denoiser: returned the memory of an earlier step's output, which this multistep "
                             "solver still needs; return a fresh tensor (e.g. .clone())")
        # the data prediction itself is kept as it is; anything else (LMS's derivative) is computed
        # before x is overwritten in place
        h = m if st.push == (0.0, 1.0) else affine_step([(x, st.push[0]), (m, st.push[1])], backend=backend)
    terms = [(x, st.cx), (m, st.cm)] + list(zip(history, st.hist))
    if st.level2 is None:
        x = affine_step(terms, st.cz, noise=draw(st.cz), generator=gen, out=out, backend=backend)
    else:
        x_pred = affine_step(terms, st.cz, noise=draw(st.cz), generator=gen,
                               out=x_pred if out is not None else None, backend=backend)
        m2 = denoiser(x_pred, *st.level2)
        x = affine_step([(x, st.hx), (m, st.hm), (x_pred, st.hxp), (m2, st.hmp)], st.hz, noise=draw(st.hz),
                          generator=gen, out=out, backend=backend)
    if h is not None:
        history.insert(0, h)
        del history[keep:]
    return x, x_pred

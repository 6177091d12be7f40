"""Trajectory rows: the :class:`Step` every sampler is a table of, and the rows of the multistep and
exponential-integrator solvers (DPM-Solver++, DPM-Solver-2, LMS).

With ``D = x0_hat`` the denoiser's output, every solver step is, per sample, an affine map of the
state, the current and earlier denoiser outputs and a normal draw, with scalar coefficients computed
once on the host (:mod:`fastdiff.coefficients`).  One :class:`Step` row says which::

    x <- x + churn z1                                           (EDM churn; 0: none)
    m  = D(x; level)
    x' = cx x + cm m + sum_j hist[j] h_{i-1-j} + cz z2          (the step; hist: earlier rows' pushes)
    x  <- hx x + hm m + hxp x' + hmp D(x'; level2) + hz z3      (a second stage where level2 is set)
    h_i = push[0] x + push[1] m                                 (remembered where push is set)

``h_i`` is what the multistep solvers remember: the data prediction itself (``push = (0, 1)``: DPM-Solver++,
kept without a copy) or the ODE derivative ``d = (x - D)/sigma`` (``push = (1/sigma, -1/sigma)``: LMS).
The single-step methods of :mod:`fastdiff.sampling` fill only the first two lines and the Heun stage.
:func:`fastdiff.sampling.run` applies a table step by step (one fused pass per line, coefficients as
kernel arguments); :func:`fastdiff.sampling.gaussian_sampler_variance` pushes a Gaussian through it exactly.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from fastdiff import coefficients as C
from fastdiff.steps import affine_step

__all__ = ["Step", "MULTISTEP_METHODS", "ve_solver_table", "apply_row", "history_length"]


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
                     "dpm_2_ancestral", "lms")
_D = (0.0, 1.0)  # push the data prediction itself


def _row(level, cx, cm, *, hist=(), cz=0.0, push=None, churn=0.0, level2=None, second=(0.0, 0.0, 0.0, 0.0),
         hz=0.0, call_args=(), call_kw=None) -> Step:
    hx, hm, hxp, hmp = second
    return Step(level, churn, cx, cm, cz, level2, hx, hm, hxp, hmp, ("affine", call_args, call_kw or {}),
                tuple(hist), push, hz)


def ve_solver_table(method: str, sigmas: Sequence[float], *, eta: Optional[float] = None, s_noise: float = 1.0,
                    churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, solver_type: str = "midpoint",
                    order: int = 4) -> List[Step]:
    """The rows of ``method`` over the VE levels ``sigmas`` (``alpha = 1``, decreasing, last may be 0), as
    k-diffusion's samplers of the same names take their steps (:mod:`fastdiff.coefficients`):

    ``dpmpp_2m``; ``dpmpp_2m_sde`` (``eta`` default 1, ``solver_type`` ``"midpoint"`` / ``"heun"``);
    ``dpmpp_3m_sde`` (``eta`` default 1; ``eta = 0`` is DPM-Solver++(3M)); ``dpmpp_2s_ancestral`` and
    ``dpm_2_ancestral`` (``eta`` default 1); ``dpm_2`` (EDM churn ``churn``, ``gamma = min(churn/n, sqrt 2 - 1)`` where ``s_tmin <= sigma <= s_tmax``);
    ``lms`` (``order`` 1..4, default 4).  ``s_noise`` scales every draw."""
    if method not in MULTISTEP_METHODS:
        raise ValueError(f"method: expected one of {MULTISTEP_METHODS}, got {method!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"order: expected an int in [1, 4] (LMS), got {order!r}")
    if method != "lms" and order != 4:
        raise ValueError(f"order: only used by method='lms', got order={order} with method={method!r}")
    if method != "dpmpp_2m_sde" and solver_type != "midpoint":
        raise ValueError(f"solver_type: only used by method='dpmpp_2m_sde', got {solver_type!r} with method={method!r}")
    if churn and method != "dpm_2":
        raise ValueError(f"churn: used by euler, heun and dpm_2, got churn={churn} with method={method!r}")
    if eta is not None and method in ("dpmpp_2m", "dpm_2", "lms"):
        raise ValueError(f"eta: not used by method={method!r} (a deterministic solver)")
    eta = 1.0 if eta is None else eta
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    rows: List[Step] = []
    if method == "dpmpp_2m":
        for i in range(n):
            h_last = None if i == 0 else C.log_snr(1.0, sig[i]) - C.log_snr(1.0, sig[i - 1])
            cx, cs, _ = C.dpmpp_2m((1.0, sig[i]), (1.0, sig[i + 1]), h_last)
            rows.append(_row((1.0, sig[i]), cx, cs[0], hist=cs[1:], push=_D, call_args=(sig[i], sig[i + 1])))
    elif method == "dpmpp_2m_sde":
        for i in range(n):
            h_last = None if i == 0 else C.log_snr(1.0, sig[i]) - C.log_snr(1.0, sig[i - 1])
            cx, cs, cz = C.dpmpp_2m_sde((1.0, sig[i]), (1.0, sig[i + 1]), h_last, eta=eta, s_noise=s_noise,
                                        solver_type=solver_type)
            rows.append(_row((1.0, sig[i]), cx, cs[0], hist=cs[1:], cz=cz, push=_D, call_args=(sig[i], sig[i + 1])))
    elif method == "dpmpp_3m_sde":
        hs: List[float] = []  # h of the earlier steps, latest first (k-diffusion's h_1, h_2)
        for i in range(n):
            h1, h2 = (hs + [None, None])[:2]
            cx, cs, cz = C.dpmpp_3m_sde((1.0, sig[i]), (1.0, sig[i + 1]), h1, h2, eta=eta, s_noise=s_noise)
            rows.append(_row((1.0, sig[i]), cx, cs[0], hist=cs[1:], cz=cz, push=_D, call_args=(sig[i], sig[i + 1])))
            if sig[i + 1] > 0.0:
                hs.insert(0, C.log_snr(1.0, sig[i + 1]) - C.log_snr(1.0, sig[i]))
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
                rows.append(_row((1.0, s_hat), cx, c0, churn=s1, call_args=(sig[i], sig[i + 1]), call_kw=kw))
            else:
                rows.append(_row((1.0, s_hat), cx, c0, churn=s1, level2=(1.0, mid), second=second, hz=hz,
                                 call_args=(sig[i], sig[i + 1]), call_kw=kw))
    else:  # lms: x_{i+1} = x_i + sum_j c_j d_{i-j}, d = (x - D)/sigma remembered
        for i in range(n):
            cs = C.lms(sig, i, order)
            s = sig[i]
            rows.append(_row((1.0, s), 1.0 + cs[0] / s, -cs[0] / s, hist=cs[1:], push=(1.0 / s, -1.0 / s),
                             call_args=(sig[i], sig[i + 1])))
    return rows


def history_length(table: Sequence[Step]) -> int:
    """How many earlier pushes a table's rows read at most."""
    return max((len(st.hist) for st in table), default=0)


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
        if any(m.data_ptr() == r.data_ptr() for r in history if r.numel()):
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

"""Fused reverse-step updates (SPEC 1).

Every step here is, per sample, an affine combination of its input tensors and one normal
draw: ``x_next = a x + c m + s z`` (Heun's corrector reads four tensors, classifier-free
guidance splits ``m`` into its unconditional and conditional halves).  Each function computes
its per-sample coefficients ``(a, c, s)`` in float64 from the schedule and the prediction type
(the formulas live once, in :mod:`fastdiff.coefficients`, shared with the trajectory tables),
then makes **one** pass over memory with the fused-step op (:mod:`fastdiff.ops.fused_step`): 2
reads and 1 write for a DDPM step, noise drawn in the kernel, compute in float32, output in x's
dtype.

Conventions shared by every step:

- ``x`` is ``(B, ...)``; timesteps / noise levels are scalars (Python numbers or 0-d tensors)
  or per-sample ``(B,)`` tensors.
- ``model_output`` is the network's output in the form named by ``prediction``
  (``"eps"``, ``"x0"``, ``"v"``, ``"score"`` or ``"flow"``) and is converted inside the kernel:
  ``x0_hat = (x - sigma eps)/alpha``, ``v = alpha eps - sigma x0``, ``score = -eps/sigma``,
  ``flow = eps - x0`` (the rectified-flow velocity: ``x0_hat = (x - sigma flow)/(alpha + sigma)``).
- Classifier-free guidance: pass ``model_output=(uncond, cond)`` and ``guidance=w``;
  ``x0_hat = (1 - w) x0_hat(uncond) + w x0_hat(cond)`` (scalar or ``(B,)`` ``w``).
- Noise: ``noise=`` (a tensor like ``x``, for bitwise agreement with code that draws its own)
  or ``generator=`` (:class:`fastdiff.Generator`; default :data:`fastdiff.default_generator`),
  whose Philox stream is drawn inside the kernel and advanced by ``x.numel()``.
- ``out=`` writes in place and is returned (a NumPy ``out=`` comes back as that same array).  It
  may be an input exactly (``out=x``) or share no memory with the inputs; a partial overlap, a
  read-only NumPy array, an inference tensor outside inference mode or a leaf that requires grad
  raises ``ValueError``.  ``backend=`` forces a backend.
- Invalid Python/CPU arguments raise ``ValueError``/``TypeError`` naming the argument.  Per-sample
  values on a CUDA device are not checked on the host (that would synchronize); an invalid
  entry makes that sample's output NaN instead, so nothing is silently wrong.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch

from fastdiff import dispatch
from fastdiff import coefficients as C
from fastdiff._interop import (accepts_arrays, check_float_dtype as _check_float_dtype, check_float_tensor,
                               check_no_partial_overlap, check_not_meta, check_out_writable)
from fastdiff.generator import Generator, default_generator
from fastdiff.ops.fused_step import MAX_INPUTS, _fused_step
from fastdiff.schedules import DDPMSchedule, KarrasSchedule

__all__ = [
    "PREDICTIONS",
    "affine_step",
    "ddpm_step",
    "ddim_step",
    "euler_step",
    "edm_churn",
    "euler_ancestral_step",
    "heun_step",
    "langevin_step",
    "ou_reverse_step",
    "predict_x0",
    "randn",
]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")
Num = Union[float, torch.Tensor]  # a coefficient: Python float (scalar step) or float64 tensor (R,)


# =========================================================================== argument handling
class _Call:
    """Validation and coefficient packing for one step call.

    Scalar arguments stay Python floats, so a scalar-timestep step computes its coefficients on
    the host and launches with them as kernel arguments (no device buffer, no copy, no sync).
    Per-sample arguments become float64 tensors on ``x``'s device.
    """

    def __init__(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, NumPy or CuPy array, got {type(x).__name__}")
        check_float_tensor("x", x)
        if x.ndim < 1:
            raise ValueError("x: expected a tensor of shape (B, ...), got a 0-d tensor")
        self.x = x
        self.B = x.shape[0]
        self.device = x.device
        self.invalid: Optional[torch.Tensor] = None  # device-side validity failures (per sample)
        self.inputs: List[Tuple[str, torch.Tensor]] = [("x", x)]  # what out= must not partially overlap

    # ---- tensors
    def like_x(self, name: str, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor like x, got {type(t).__name__}")
        if t.shape != self.x.shape:
            raise ValueError(f"{name}: expected shape {tuple(self.x.shape)} (the shape of x), got {tuple(t.shape)}")
        if t.dtype != self.x.dtype:
            raise TypeError(f"{name}: expected dtype {self.x.dtype} (the dtype of x), got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name}: expected a tensor on {self.device} (the device of x), got {t.device}")
        if name != "out":
            self.inputs.append((name, t))
        return t

    def model_output(self, name: str, m, guidance) -> List[Tuple[torch.Tensor, Num]]:
        """``[(tensor, weight)]`` whose weighted sum is the (guided) model output."""
        if isinstance(m, (tuple, list)):
            if len(m) != 2:
                raise ValueError(f"{name}: a guidance pair must be (uncond, cond), got {len(m)} tensors")
            if guidance is None:
                raise ValueError(f"guidance: required when {name} is an (uncond, cond) pair")
            w = self.value("guidance", guidance)
            return [(self.like_x(f"{name}[0]", m[0]), 1.0 - w), (self.like_x(f"{name}[1]", m[1]), w)]
        if guidance is not None:
            raise ValueError(f"guidance: given, but {name} is a single tensor; pass (uncond, cond)")
        return [(self.like_x(name, m), 1.0)]

    # ---- per-sample values
    def value(self, name: str, v, *, min_value=None, strict=True) -> Num:
        """A finite scalar (-> float) or per-sample (B,) tensor (-> float64 on x's device)."""
        if type(v) is not float and type(v) is not int:  # the common call, a plain number, skips these
            if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu" and v.ndim <= 1:
                v = v.item() if v.ndim == 0 or self.B != 1 else v
            if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)):
                raise TypeError(f"{name}: expected a number or a (B,) tensor, got {type(v).__name__}")
        if not isinstance(v, torch.Tensor):
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite value, got {v}")
            if min_value is not None and (v <= min_value if strict else v < min_value):
                raise ValueError(f"{name}: expected {name} {'>' if strict else '>='} {min_value}, got {v}")
            return v
        if v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name}: expected real numbers (a float or integer tensor), got dtype {v.dtype}")
        if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, self.B)):
            raise ValueError(f"{name}: expected a scalar or a ({self.B},) tensor (one per sample), got shape {tuple(v.shape)}")
        if v.device.type != "cpu" and v.device != self.device:
            raise ValueError(f"{name}: expected a tensor on {self._host_or_x()}, got {v.device}")
        v = v.to(self.device, torch.float64).reshape(-1)
        ok = torch.isfinite(v)
        if min_value is not None:
            ok &= (v > min_value) if strict else (v >= min_value)
        self._require(ok, f"{name}: expected finite values{'' if min_value is None else (' > ' if strict else ' >= ') + str(min_value)}")
        return v

    def timestep(self, name: str, t, T: int, *, allow_final=False):
        """An integer timestep in [0, T) ([-1, T) with ``allow_final``): int, or (B,) int64 tensor."""
        lo = -1 if allow_final else 0
        if type(t) is not int:  # the common call, a plain int, skips these (numbers.Integral is an ABC lookup)
            if isinstance(t, torch.Tensor):
                if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                    raise TypeError(f"{name}: expected integer timesteps, got dtype {t.dtype}")
                if t.numel() == 1 and t.ndim <= 1 and t.device.type == "cpu" and (t.ndim == 0 or self.B != 1):
                    t = int(t.item())
            elif isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"{name}: expected an int or an integer (B,) tensor, got {type(t).__name__}")
        if not isinstance(t, torch.Tensor):
            t = int(t)
            if not lo <= t < T:
                raise ValueError(f"{name}: expected {lo} <= {name} < {T} (schedule length), got {t}")
            return t
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, self.B)):
            raise ValueError(f"{name}: expected an int or a ({self.B},) tensor, got shape {tuple(t.shape)}")
        if t.device.type != "cpu" and t.device != self.device:
            raise ValueError(f"{name}: expected a tensor on {self._host_or_x()}, got {t.device}")
        t = t.to(self.device, torch.int64).reshape(-1)
        self._require((t >= lo) & (t < T), f"{name}: expected {lo} <= {name} < {T} (schedule length)")
        return t

    def _host_or_x(self) -> str:
        return "cpu" if self.device.type == "cpu" else f"cpu or {self.device}"

    def _require(self, ok: torch.Tensor, message: str) -> None:
        if ok.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(ok.all()):
                bad = int((~ok).nonzero()[0, 0])
                raise ValueError(f"{message}; sample {bad} is not")
        else:  # no host sync (CUDA, or traced): poison the failing samples' coefficients instead
            bad = ~ok
            self.invalid = bad if self.invalid is None else (self.invalid | bad)

    @staticmethod
    def lookup(table_owner, name: str, t) -> Num:
        """Schedule value at timestep ``t`` (float for an int ``t``, gathered tensor otherwise)."""
        if isinstance(t, int):
            return table_owner.floats(name)[t]
        table = table_owner.table(name, t.device)
        return table[t.clamp(0, table.numel() - 1)]  # invalid t were flagged by timestep(); never index out of bounds

    # ---- launch
    def launch(self, terms: Sequence[Tuple[torch.Tensor, Num]], noise_coef: Num = 0.0, *,
               noise=None, generator=None, out=None, backend="auto") -> torch.Tensor:
        x = self.x
        if out is not None:
            self.like_x("out", out)
            check_out_writable(out)
        if noise is not None:
            self.like_x("noise", noise)
        if out is not None:
            check_no_partial_overlap(out, self.inputs)
        if x.numel() == 0:
            dispatch.check_backend("fused_step", backend)  # a bad name is an error on every input
            return out if out is not None else torch.empty_like(x)
        if generator is not None and not isinstance(generator, Generator):
            raise TypeError(f"generator: expected a fastdiff.Generator, got {type(generator).__name__}")
        if generator is not None:
            generator.check_batch(self.B)
        # merge repeated tensors (x appears in several terms) so each is read once
        merged: List[Tuple[torch.Tensor, Num]] = []
        for t, c in terms:
            for i, (u, cu) in enumerate(merged):
                if u is t:
                    merged[i] = (u, cu + c)
                    break
            else:
                merged.append((t, c))
        coefs = [c for _, c in merged] + [noise_coef]
        wants_noise = not (isinstance(noise_coef, float) and noise_coef == 0.0)
        if all(isinstance(c, float) for c in coefs) and self.invalid is None:
            packed: Union[List[float], torch.Tensor] = coefs
        else:
            rows = [c.reshape(-1) if isinstance(c, torch.Tensor) else torch.full((1,), c, dtype=torch.float64, device=x.device)
                    for c in coefs]
            R = max(r.numel() for r in rows)
            packed = torch.stack([r.expand(R) for r in rows], dim=1)
            if self.invalid is not None:
                packed = torch.where(self.invalid.reshape(-1, 1).expand(R, 1), float("nan"), packed)
            packed = packed.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
        # contiguous tensors go to the op as they are (it reads them flat; a view per tensor costs
        # more than a small step's kernel), strided ones as contiguous copies
        ins = [t if t.is_contiguous() else t.contiguous() for t, _ in merged]
        target = out if (out is not None and out.is_contiguous()) else torch.empty_like(x, memory_format=torch.contiguous_format)
        seed = offset = 0
        philox = False
        if wants_noise and noise is None:
            gen = generator if generator is not None else default_generator
            if gen.per_sample:  # sample b draws x.numel() / B normals of its own stream (fastdiff.generator)
                gen.check_batch(self.B)
                seed, offset, philox = gen.seed_tensor(x.device), gen.draw(x.numel() // self.B), True
            else:
                seed, offset, philox = gen.seed, gen.draw(x.numel()), True
        _fused_step(
            target, ins, packed,
            noise=(noise if noise.is_contiguous() else noise.contiguous()) if (wants_noise and noise is not None) else None,
            seed=seed, offset=offset, philox=philox,
            backend=dispatch.choose("fused_step", backend, x.device, x.dtype),
        )
        if out is not None and target is not out:
            out.copy_(target)
            return out
        return target


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    return prediction


_x0_eps_forms = C.prediction_forms
_sqrt = C.sqrt


def _terms(x, mterms, cx: Num, form, c_on: Num):
    """Terms of ``cx * x + c_on * (form applied to the guided model output)``."""
    fx, fm = form
    return [(x, cx + c_on * fx)] + [(m, c_on * fm * w) for m, w in mterms]


# =========================================================================== DDPM-family steps
def _check_schedule(schedule, kind=DDPMSchedule):
    if not isinstance(schedule, kind):
        raise TypeError(f"schedule: expected a fastdiff.{kind.__name__}, got {type(schedule).__name__}")
    return schedule


@accepts_arrays
def ddpm_step(x, model_output, t, schedule: DDPMSchedule, *, prediction: str = "eps",
              variance: str = "fixed_small", guidance=None, noise=None, generator: Optional[Generator] = None,
              out=None, backend: str = "auto"):
    """DDPM ancestral step ``x_t -> x_{t-1}`` (Ho et al. 2020; seed 001):

        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(1 - beta_t) + s_t z

    with ``s_t^2 = beta_t`` (``variance="fixed_large"``) or
    ``beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (``"fixed_small"``, diffusers' default), and no
    noise on the last step (``t = 0``).  ``t``: int or (B,) int tensor in ``[0, T)``.
    """
    call = _Call(x)
    _check_schedule(schedule)
    _check_prediction(prediction)
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance: expected 'fixed_small' or 'fixed_large', got {variance!r}")
    t = call.timestep("t", t, schedule.T)
    mterms = call.model_output("model_output", model_output, guidance)
    beta = call.lookup(schedule, "beta", t)
    abar = call.lookup(schedule, "abar", t)
    alpha, sigma = _sqrt(abar), _sqrt(1.0 - abar)
    if isinstance(t, int):
        abar_prev = schedule.floats("abar")[t - 1] if t > 0 else 1.0
    else:
        abar_prev = torch.where(t > 0, schedule.table("abar", call.device)[(t - 1).clamp(0, schedule.T - 1)], 1.0)
    a, c, s = C.ddpm(beta, abar, abar_prev, variance, t > 0)  # no noise on the last step
    _, eps_form = _x0_eps_forms(prediction, alpha, sigma)
    return call.launch(_terms(x, mterms, a, eps_form, c), s, noise=noise, generator=generator, out=out, backend=backend)


@accepts_arrays
def ddim_step(x, model_output, t, t_prev, schedule: DDPMSchedule, *, eta: float = 0.0, prediction: str = "eps",
              guidance=None, noise=None, generator: Optional[Generator] = None, out=None, backend: str = "auto"):
    """DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021) with stochasticity ``eta``:

        x0 = (x_t - sigma_t eps_hat) / alpha_t
        s  = eta sqrt((1 - abar_p)/(1 - abar_t)) sqrt(1 - abar_t/abar_p)
        x_p = alpha_p x0 + sqrt(1 - abar_p - s^2) eps_hat + s z

    ``eta = 0`` is deterministic (seed 004: ``x_p = (sigma_p/sigma_t) x_t + (alpha_p - (sigma_p/sigma_t) alpha_t) x0``);
    ``eta = 1`` is DDPM's ``fixed_small`` posterior.  ``t_prev = -1`` means the end (``abar = 1``).
    """
    call = _Call(x)
    _check_schedule(schedule)
    _check_prediction(prediction)
    eta = call.value("eta", eta, min_value=0.0, strict=False)
    t = call.timestep("t", t, schedule.T)
    t_prev = call.timestep("t_prev", t_prev, schedule.T, allow_final=True)
    mterms = call.model_output("model_output", model_output, guidance)
    abar = call.lookup(schedule, "abar", t)
    if isinstance(t_prev, int):
        abar_p = schedule.floats("abar")[t_prev] if t_prev >= 0 else 1.0
    else:
        abar_p = torch.where(t_prev >= 0, schedule.table("abar", call.device)[t_prev.clamp(0, schedule.T - 1)], 1.0)
    alpha, sigma = _sqrt(abar), _sqrt(1.0 - abar)
    alpha_p, ce, s = C.ddim(abar, abar_p, eta)
    x0_form, eps_form = _x0_eps_forms(prediction, alpha, sigma)
    terms = _terms(x, mterms, 0.0, x0_form, alpha_p) + _terms(x, mterms, 0.0, eps_form, ce)
    return call.launch(terms, s, noise=noise, generator=generator, out=out, backend=backend)


# =========================================================================== EDM / k-diffusion steps (alpha = 1)
def _edm_forms(prediction, sigma):
    x0_form, _ = _x0_eps_forms(prediction, 1.0, sigma)
    return x0_form


@accepts_arrays
def euler_step(x, model_output, sigma, sigma_next, *, prediction: str = "x0", guidance=None, out=None,
               backend: str = "auto"):
    """Euler step of the probability-flow ODE (EDM / k-diffusion ``sample_euler``), ``alpha = 1``:

        d = (x - x0_hat) / sigma,   x_next = x + (sigma_next - sigma) d

    ``sigma`` is the level the model was evaluated at (``sigma_hat`` after :func:`edm_churn`).
    """
    call = _Call(x)
    _check_prediction(prediction)
    sigma = call.value("sigma", sigma, min_value=0.0)
    sigma_next = call.value("sigma_next", sigma_next, min_value=0.0, strict=False)
    mterms = call.model_output("model_output", model_output, guidance)
    cx, c0 = C.euler(sigma, sigma_next)
    return call.launch(_terms(x, mterms, cx, _edm_forms(prediction, sigma), c0), out=out, backend=backend)


@accepts_arrays
def edm_churn(x, sigma, gamma, *, s_noise: float = 1.0, noise=None, generator: Optional[Generator] = None,
              out=None, backend: str = "auto"):
    """EDM stochastic churn (Karras et al. Alg. 2), done before the model evaluation of a step:

        sigma_hat = sigma (1 + gamma),   x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z

    Returns ``(x_hat, sigma_hat)``; pass ``sigma_hat`` as ``sigma`` to the following
    :func:`euler_step` / :func:`heun_step`.  ``gamma = 0`` returns ``x`` itself (no copy, no draw).
    """
    call = _Call(x)
    sigma = call.value("sigma", sigma, min_value=0.0)
    gamma = call.value("gamma", gamma, min_value=0.0, strict=False)
    s_noise = call.value("s_noise", s_noise)
    sigma_hat, s = C.edm_churn(sigma, gamma, s_noise)
    if isinstance(gamma, float) and gamma == 0.0 and out is None:
        return x, sigma_hat
    return call.launch([(x, 1.0)], s, noise=noise, generator=generator, out=out, backend=backend), sigma_hat


@accepts_arrays
def euler_ancestral_step(x, model_output, sigma, sigma_next, *, eta: float = 1.0, s_noise: float = 1.0,
                         prediction: str = "x0", guidance=None, noise=None, generator: Optional[Generator] = None,
                         out=None, backend: str = "auto"):
    """Euler ancestral step (k-diffusion ``sample_euler_ancestral``):

        sigma_up   = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        x_next = x + (sigma_down - sigma) d + S_noise sigma_up z,   d = (x - x0_hat) / sigma
    """
    call = _Call(x)
    _check_prediction(prediction)
    sigma = call.value("sigma", sigma, min_value=0.0)
    sigma_next = call.value("sigma_next", sigma_next, min_value=0.0, strict=False)
    eta = call.value("eta", eta, min_value=0.0, strict=False)
    s_noise = call.value("s_noise", s_noise)
    mterms = call.model_output("model_output", model_output, guidance)
    cx, c0, cz = C.euler_ancestral(sigma, sigma_next, eta, s_noise)
    return call.launch(_terms(x, mterms, cx, _edm_forms(prediction, sigma), c0), cz,
                       noise=noise, generator=generator, out=out, backend=backend)


@accepts_arrays
def heun_step(x, model_output, sigma, sigma_next, *, x_pred=None, model_output_pred=None, prediction: str = "x0",
              guidance=None, out=None, backend: str = "auto"):
    """Heun's 2nd-order step (EDM Alg. 2), in two calls:

    - predictor (``x_pred`` not given): ``x_pred = x + (sigma_next - sigma) d``, ``d = (x - x0_hat)/sigma``
      (the Euler step); evaluate the model at ``(x_pred, sigma_next)``;
    - corrector (``x_pred`` and ``model_output_pred`` given):
      ``x_next = x + (sigma_next - sigma) (d + d') / 2``, ``d' = (x_pred - x0_hat(x_pred)) / sigma_next``.

    Where ``sigma_next = 0`` the corrector returns the Euler step (``x_pred``), as EDM does.
    """
    if x_pred is None:
        if model_output_pred is not None:
            raise ValueError("x_pred: required with model_output_pred (the corrector needs both)")
        return euler_step(x, model_output, sigma, sigma_next, prediction=prediction, guidance=guidance,
                          out=out, backend=backend)
    if model_output_pred is None:
        raise ValueError("model_output_pred: required with x_pred (the model output at (x_pred, sigma_next))")
    call = _Call(x)
    _check_prediction(prediction)
    sigma = call.value("sigma", sigma, min_value=0.0)
    sigma_next = call.value("sigma_next", sigma_next, min_value=0.0, strict=False)
    x_pred = call.like_x("x_pred", x_pred)
    m1 = call.model_output("model_output", model_output, guidance)
    m2 = call.model_output("model_output_pred", model_output_pred, guidance)
    hx, hm, hxp, hmp, safe_next = C.heun_corrector(sigma, sigma_next)
    terms = _terms(x, m1, hx, _edm_forms(prediction, sigma), hm)
    terms += _terms(x_pred, m2, hxp, _edm_forms(prediction, safe_next), hmp)
    return call.launch(terms, out=out, backend=backend)


# =========================================================================== Langevin family (seed 003)
def _score_form(call, prediction, alpha, sigma):
    """``score = sx x + sm m`` for the model output ``m``."""
    if prediction == "score":
        return (0.0, 1.0)
    if sigma is None:
        raise ValueError(f"sigma: required to convert prediction={prediction!r} into a score")
    sigma = call.value("sigma", sigma, min_value=0.0)
    alpha = call.value("alpha", alpha, min_value=0.0)
    return C.score_form(prediction, alpha, sigma)


def _score_step(coefficients, x, model_output, step_size, prediction, alpha, sigma, guidance, noise, generator, out,
                backend):
    """A step ``cx x + cs score(x) + cz z`` whose ``(cx, cs, cz) = coefficients(step_size)``."""
    call = _Call(x)
    _check_prediction(prediction)
    g = call.value("step_size", step_size, min_value=0.0)
    mterms = call.model_output("model_output", model_output, guidance)
    form = _score_form(call, prediction, alpha, sigma)
    cx, cs, cz = coefficients(g)
    return call.launch(_terms(x, mterms, cx, form, cs), cz, noise=noise, generator=generator,
                       out=out, backend=backend)


@accepts_arrays
def langevin_step(x, model_output, step_size, *, prediction: str = "score", alpha: float = 1.0, sigma=None,
                  guidance=None, noise=None, generator: Optional[Generator] = None, out=None, backend: str = "auto"):
    """Unadjusted Langevin step (seed 003): ``x_{k+1} = x_k + gamma score(x_k) + sqrt(2 gamma) z``.

    ``step_size`` is gamma.  A non-score ``prediction`` is converted with ``alpha``/``sigma``
    (``score = (alpha x0_hat - x) / sigma^2``).  At fixed ``sigma`` this is the "walk" of walk-jump
    sampling; the "jump" is :func:`predict_x0`.
    """
    return _score_step(C.langevin, x, model_output, step_size, prediction, alpha, sigma, guidance, noise, generator,
                       out, backend)


@accepts_arrays
def ou_reverse_step(x, model_output, step_size, *, prediction: str = "score", alpha: float = 1.0, sigma=None,
                    guidance=None, noise=None, generator: Optional[Generator] = None, out=None, backend: str = "auto"):
    """Euler-Maruyama step of the reverse Ornstein-Uhlenbeck SDE (seed 003):

        y_{k+1} = y_k + gamma y_k + 2 gamma score(y_k) + sqrt(2 gamma) z
    """
    return _score_step(C.ou_reverse, x, model_output, step_size, prediction, alpha, sigma, guidance, noise, generator,
                       out, backend)


# =========================================================================== the primitive itself
def affine_step(terms: Sequence[Tuple[torch.Tensor, Num]], noise_coef: Num = 0.0, *, noise=None,
                generator: Optional[Generator] = None, out=None, backend: str = "auto"):
    """``out = sum_j c_j t_j + noise_coef z`` in one pass: the fused step with the coefficients given.

    Every solver step is this map (:mod:`fastdiff.solvers`); the multistep solvers of
    :func:`fastdiff.sample` run on it, and it is the building block for a solver fastdiff lacks.
    ``terms``: ``(tensor, c)`` pairs, at least one, the tensors alike (shape, dtype, device: the first's),
    at most six distinct (a tensor repeated is read once), ``c`` a number or a per-sample ``(B,)``
    tensor; ``z``: ``noise`` or the in-kernel Philox stream of ``generator`` (drawn only where
    ``noise_coef`` is not 0).  ``out`` as for every step.
    """
    if isinstance(terms, torch.Tensor) or not isinstance(terms, (list, tuple)) or not terms:
        raise TypeError("terms: expected a non-empty sequence of (tensor, coefficient) pairs")
    for k, term in enumerate(terms):
        if not isinstance(term, (tuple, list)) or len(term) != 2:
            raise TypeError(f"terms[{k}]: expected a (tensor, coefficient) pair, got {type(term).__name__}")
    call = _Call(terms[0][0])
    tensors = [(call.like_x(f"terms[{k}]", t) if k else t, call.value(f"terms[{k}] coefficient", c))
               for k, (t, c) in enumerate(terms)]
    if len({id(t) for t, _ in tensors}) > MAX_INPUTS:
        raise ValueError(f"terms: at most {MAX_INPUTS} distinct tensors in one step, got {len({id(t) for t, _ in tensors})}")
    return call.launch(tensors, call.value("noise_coef", noise_coef), noise=noise, generator=generator, out=out,
                       backend=backend)


# =========================================================================== conversions and noise
@accepts_arrays
def predict_x0(x, model_output, alpha, sigma, *, prediction: str = "eps", guidance=None, out=None,
               backend: str = "auto"):
    """Tweedie's posterior mean from a model output: ``x0_hat`` for ``prediction`` in eps/x0/v/score,
    fused (one pass).  With ``alpha = 1`` and a score this is the "jump" ``y + sigma^2 score(y)``."""
    call = _Call(x)
    _check_prediction(prediction)
    alpha = call.value("alpha", alpha, min_value=0.0)
    sigma = call.value("sigma", sigma, min_value=0.0)
    mterms = call.model_output("model_output", model_output, guidance)
    x0_form, _ = _x0_eps_forms(prediction, alpha, sigma)
    return call.launch(_terms(x, mterms, 0.0, x0_form, 1.0), out=out, backend=backend)


@accepts_arrays
def randn(*shape, generator: Optional[Generator] = None, dtype=torch.float32, device="cpu", out=None,
          backend: str = "auto") -> torch.Tensor:
    """Normals from the shared Philox stream (the noise every fused step draws), advancing ``generator``.

    A per-sample ``generator`` (``Generator(seed=[s_0, ..., s_{B-1}])``) needs ``shape = (B, ...)``:
    sample ``b`` is ``s_b``'s stream from the generator's offset, whatever ``B``.

    ``shape``: non-negative ints (or one tuple of them); with ``out=`` (a tensor or NumPy array,
    written and returned) it may be omitted, else it must be ``out``'s shape.  ``dtype``: one of
    float16, bfloat16, float32, float64 (``out``'s own dtype when ``out`` is given).
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    shape = tuple(_dim(i, v) for i, v in enumerate(shape))
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(f"generator: expected a fastdiff.Generator, got {type(generator).__name__}")
    if out is None:
        _check_float_dtype("dtype", dtype)
        device = torch.device(device)
        if device.type == "meta":
            raise ValueError("device: meta tensors hold no data to compute with; expected a cpu or cuda device")
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a tensor or NumPy array, got {type(out).__name__}")
        _check_float_dtype("out", out.dtype)
        check_not_meta("out", out)
        if shape and shape != tuple(out.shape):
            raise ValueError(f"out: expected shape {shape} (the shape asked for), got {tuple(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("out: expected a contiguous tensor")
        check_out_writable(out)
    if out.numel() == 0:
        dispatch.check_backend("fused_step", backend)  # a bad name is an error on every input
        return out
    gen = generator if generator is not None else default_generator
    seed, per = gen.seed, out.numel()
    if gen.per_sample:  # shape (B, ...): sample b from its own stream
        if out.ndim == 0:
            raise ValueError("shape: per-sample seeds need a shape (B, ...), got a 0-d shape")
        gen.check_batch(out.shape[0], "shape")
        seed, per = gen.seed_tensor(out.device), out.numel() // out.shape[0]
    _fused_step(out, [], [1.0], seed=seed, offset=gen.draw(per), philox=True,
                backend=dispatch.choose("fused_step", backend, out.device, out.dtype))
    return out


def _dim(i: int, v) -> int:
    if isinstance(v, bool) or isinstance(v, float):
        raise TypeError(f"shape: expected ints, got {type(v).__name__} {v!r} at position {i}")
    try:
        v = operator.index(v)  # int, np.int64, 0-d integer tensor
    except TypeError:
        raise TypeError(f"shape: expected ints, got {type(v).__name__} at position {i}") from None
    if v < 0:
        raise ValueError(f"shape: expected non-negative sizes, got {v} at position {i}")
    return v

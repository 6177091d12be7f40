"""diffusers' k-diffusion-style schedulers (Euler ancestral, Heun, LMS) whose ``step`` runs fastdiff's fused kernels.

    from fastdiff.adapters.diffusers_k import EulerAncestralDiscreteScheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)

Same constructor, config, state and ``step`` signature and return types as diffusers' classes.  All
three run on diffusers' own float32 ``sigmas`` (read in float64, coefficients computed on the host in
float64), so they agree with the originals to float32 rounding (docs/math.md 1f).  Every prediction
type is converted as diffusers writes it on the VE-scaled sample: ``epsilon`` ``x0 = x - sigma m``,
``v_prediction`` ``x0 = x/(1 + sigma^2) - sigma/sqrt(1 + sigma^2) m`` (:func:`fastdiff.predict_x0`'s eps
form with ``alpha' = 1 + sigma^2``, ``sigma' = sigma sqrt(1 + sigma^2)``), ``sample`` ``x0 = m``.

``EulerAncestralDiscreteScheduler``: ``pred_original_sample`` (one pass) and the ancestral step
``x + (sigma_down - sigma) d + sigma_up z`` (:func:`fastdiff.euler_ancestral_step`, ``eta = 1``: one
pass), computed in float32 like diffusers, ``prev_sample`` in the model output's dtype.  Noise:
a ``torch.Generator`` or a list of them (one per sample) draws exactly diffusers' tensor (``randn_tensor``
in the model output's dtype, on every step, the last one too, where ``sigma_up = 0``), so a loop agrees
with the original's and a shared generator stays aligned; a :class:`fastdiff.Generator` (per-sample
seeds too) or ``None`` (:data:`fastdiff.default_generator`) draws the Philox stream inside the kernel (no
noise tensor; none at all on the last step).  ``prediction_type="sample"``, which diffusers' own step
rejects (``NotImplementedError``), is fused here (``x0 = m``, as its EulerDiscrete does).

``HeunDiscreteScheduler``: diffusers calls ``step`` twice per noise level (``state_in_first_order``);
the first call is ``x0`` plus the Euler predictor (two passes), the second ``x0`` at ``x_pred`` plus the
corrector ``x + (sigma_next - sigma)(d + d')/2`` reading ``x``, ``x0``, ``x_pred``, ``x0'`` in one pass
(:func:`fastdiff.heun_step`).  The state is diffusers' (``dt``, ``sample``, ``prev_derivative``), except
that ``prev_derivative`` is computed (diffusers' expression) only when something reads it -- diffusers'
own step when a second stage falls back -- so the fused first stage writes no derivative tensor.
``clip_sample`` clamps ``x0`` as diffusers does.  Like diffusers it computes in the inputs' dtype
(the kernel in float32 for half inputs).

``LMSDiscreteScheduler``: ``x0``, the derivative ``d = (x - x0)/sigma`` (kept in ``derivatives``, as
diffusers keeps it) and the update ``x + sum_j c_j d_{i-j}`` (one pass over ``x`` and up to five
derivatives), with ``c_j`` the Lagrange-basis integrals of :func:`fastdiff.coefficients.lms` in closed
form, where diffusers integrates the basis numerically (``scipy.integrate.quad``, the integrand in float32).
``order`` as diffusers takes it (1 to 5 fused; beyond, diffusers' step).

Handed to diffusers' own ``step`` (``super().step``), unchanged: a prediction type diffusers does not
know; a model output whose shape or device differs from the sample's or which is not floating point;
sigmas that are not finite and positive but for a last 0 (a pathological ``trained_betas``), and
Euler ancestral sigmas that increase; an integer timestep where diffusers rejects it; a Heun second
stage whose first ran diffusers' step; an LMS ``order`` that is not an int in [1, 5].
``fastdiff_supports(...)`` tells which path a call takes (it never raises); a fastdiff.Generator given
to such a call seeds a torch.Generator from its stream (reproducible).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Union

import torch
from diffusers import EulerAncestralDiscreteScheduler as _EulerAncestralDiscreteScheduler
from diffusers import HeunDiscreteScheduler as _HeunDiscreteScheduler
from diffusers import LMSDiscreteScheduler as _LMSDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import logger as _ancestral_logger
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

from fastdiff import coefficients as C
from fastdiff import steps
from fastdiff.adapters.diffusers import _cached, _for_diffusers, _noise_source
from fastdiff.generator import Generator
from fastdiff.ops.fused_step import MAX_INPUTS

__all__ = ["EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"]

# schedulers are handed torch tensors only: the steps without their NumPy/CuPy wrapper (~5 us a call)
predict_x0, euler_step = steps.predict_x0.__wrapped__, steps.euler_step.__wrapped__
euler_ancestral_step, heun_step = steps.euler_ancestral_step.__wrapped__, steps.heun_step.__wrapped__
affine_step = steps.affine_step

PREDICTIONS = ("epsilon", "v_prediction", "sample")
MAX_LMS_ORDER = MAX_INPUTS - 1  # x and the derivatives: one fused pass reads at most MAX_INPUTS tensors


def _sigmas(self):
    """``(sigmas as floats, usable)``: the fused steps need finite sigmas, positive but for a last 0
    (a ``trained_betas`` with ``beta >= 1`` gives diffusers an infinite or NaN sigma: its own step runs)."""
    sig = self.sigmas.detach().double().cpu().tolist()
    usable = all(math.isfinite(s) and s > 0 for s in sig[:-1]) and math.isfinite(sig[-1]) and sig[-1] >= 0
    return sig, usable


def _layout(model_output, sample) -> bool:
    """Tensors alike in shape and device, floating point (the dtypes may differ: promoted as diffusers does)."""
    return (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
            and model_output.shape == sample.shape and model_output.device == sample.device
            and model_output.is_floating_point() and sample.is_floating_point())


def _x0(prediction: str, x: torch.Tensor, m: torch.Tensor, sigma: float) -> torch.Tensor:
    """diffusers' data prediction on the VE-scaled sample (module docstring), one fused pass (``m`` itself
    for ``sample``)."""
    if prediction == "epsilon":
        return predict_x0(x, m, 1.0, sigma, prediction="eps")
    if prediction == "v_prediction":  # x/(1+s^2) - s/sqrt(1+s^2) m = (x - s sqrt(1+s^2) m)/(1+s^2)
        return predict_x0(x, m, 1.0 + sigma * sigma, sigma * math.sqrt(1.0 + sigma * sigma), prediction="eps")
    return m


# =========================================================================== Euler ancestral
def _ancestral_sigmas(self):
    """:func:`_sigmas`, usable only where they do not increase (diffusers' ``sigma_up`` is NaN there)."""
    sig, usable = _sigmas(self)
    return sig, usable and all(a >= b for a, b in zip(sig, sig[1:]))


class EulerAncestralDiscreteScheduler(_EulerAncestralDiscreteScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` with a fused ``step`` (module docstring: noise, fallbacks).

    Like diffusers it computes in float32 and returns ``prev_sample`` in the model output's dtype.
    """

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        try:
            return (self.config.prediction_type in PREDICTIONS
                    and not isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))
                    and _layout(model_output, sample) and _cached(self, (self.sigmas,), _ancestral_sigmas)[1])
        except Exception:  # noqa: BLE001 - a question about a call must not raise
            return False

    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor], sample: torch.Tensor,
             generator: Union[torch.Generator, list, Generator, None] = None,
             return_dict: bool = True) -> Union[EulerAncestralDiscreteSchedulerOutput, tuple]:
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, generator=_for_diffusers(generator, sample),
                                return_dict=return_dict)
        if not self.is_scale_input_called:
            _ancestral_logger.warning("The `scale_model_input` function should be called before `step` to ensure "
                                      "correct denoising. See `StableDiffusionPipeline` for a usage example.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sig, _ = _cached(self, (self.sigmas,), _ancestral_sigmas)
        i = self.step_index
        sigma, sigma_next = sig[i], sig[i + 1]
        x = sample.to(torch.float32)  # diffusers' upcast
        m = model_output.to(torch.float32)
        # diffusers draws randn_tensor(model_output.shape, dtype=model_output.dtype) on every step
        noise, gen = _noise_source(generator, model_output.shape, model_output)
        if noise is not None:
            noise = noise.to(torch.float32)
        pred = self.config.prediction_type
        x0 = _x0(pred, x, m, sigma)
        # eps: the step straight from the model output (independent of the x0 pass); else from x0
        prev = euler_ancestral_step(x, m if pred == "epsilon" else x0, sigma, sigma_next,
                                    prediction="eps" if pred == "epsilon" else "x0", noise=noise, generator=gen)
        prev = prev.to(model_output.dtype)
        if pred == "sample":
            x0 = model_output
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# =========================================================================== Heun
def _heun_table(self):
    """:func:`_sigmas` plus diffusers' ``dt = sigma_next - sigma`` of every first stage as the float32
    0-d tensors its own step stores (so a second stage handed to diffusers reads what it would have)."""
    sig, usable = _sigmas(self)
    s = self.sigmas
    return sig, usable, [s[i + 1] - s[i] for i in range(len(sig) - 1)]


class HeunDiscreteScheduler(_HeunDiscreteScheduler):
    """diffusers' ``HeunDiscreteScheduler`` with both stages of its ``step`` fused (module docstring).

    ``prev_derivative`` is diffusers' attribute, computed from the fused first stage's ``x0`` when read.
    """

    @property
    def prev_derivative(self):
        pending = self.__dict__.get("_fastdiff_stage1")
        if pending is not None and self.__dict__.get("_prev_derivative") is None:
            x0, sigma = pending  # diffusers' expression: (sample - pred_original_sample) / sigma_hat
            self.__dict__["_prev_derivative"] = (self.sample - x0) / sigma
        return self.__dict__.get("_prev_derivative")

    @prev_derivative.setter
    def prev_derivative(self, value):
        self.__dict__["_prev_derivative"] = value
        self.__dict__["_fastdiff_stage1"] = None

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``): a second
        stage only after a fused first.  Never raises."""
        try:
            if self.config.prediction_type not in PREDICTIONS or not _layout(model_output, sample):
                return False
            if not _cached(self, (self.sigmas,), _heun_table)[1]:
                return False
            if self.state_in_first_order:
                return True
            pending = self.__dict__.get("_fastdiff_stage1")
            return (pending is not None and self.__dict__.get("_prev_derivative") is None
                    and isinstance(self.sample, torch.Tensor) and self.sample.shape == sample.shape
                    and self.sample.device == sample.device and self.sample.is_floating_point())
        except Exception:  # noqa: BLE001 - a question about a call must not raise
            return False

    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor], sample: torch.Tensor,
             return_dict: bool = True) -> Union[HeunDiscreteSchedulerOutput, tuple]:
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sig, _, dts = _cached(self, (self.sigmas,), _heun_table)
        i = self.step_index
        first = self.state_in_first_order
        # the first stage steps sigmas[i] -> sigmas[i+1]; the second re-evaluates at sigmas[i] (diffusers'
        # repeated entries), correcting the step from sigmas[i-1]
        sigma, sigma_next = (sig[i], sig[i + 1]) if first else (sig[i - 1], sig[i])
        dt = torch.promote_types(sample.dtype, model_output.dtype)
        if not first:
            dt = torch.promote_types(dt, self.sample.dtype)
        x, m = sample.to(dt), model_output.to(dt)
        pred = self.config.prediction_type
        x0 = _x0(pred, x, m, sigma if first else sigma_next)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r) if x0 is m else x0.clamp_(-r, r)
        if first:
            prev = euler_step(x, x0, sigma, sigma_next, prediction="x0")
            self.dt = dts[i]
            self.sample = sample
            self.prev_derivative = None
            self.__dict__["_fastdiff_stage1"] = (x0, self.sigmas[i])
        else:
            x_prev, x0_prev = self.sample.to(dt), self._fastdiff_stage1[0].to(dt)
            prev = heun_step(x_prev, x0_prev, sigma, sigma_next, x_pred=x, model_output_pred=x0.to(dt),
                             prediction="x0")
            self.prev_derivative = None  # back to the first order, as diffusers frees its state
            self.dt = None
            self.sample = None
        if pred == "sample" and not self.config.clip_sample:
            x0 = model_output
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return HeunDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# =========================================================================== LMS
def _lms_table(self):
    """:func:`_sigmas` plus a memo of the LMS coefficients by ``(step, order)``."""
    sig, usable = _sigmas(self)
    return sig, usable, {}


def _lms_order(order) -> bool:
    return isinstance(order, numbers.Integral) and not isinstance(order, bool) and 1 <= order <= MAX_LMS_ORDER


class LMSDiscreteScheduler(_LMSDiscreteScheduler):
    """diffusers' ``LMSDiscreteScheduler`` with a fused ``step`` (module docstring).

    ``derivatives`` holds diffusers' derivative tensors; the coefficients are the exact Lagrange integrals.
    """

    def fastdiff_supports(self, model_output, timestep, sample, order: int = 4) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        try:
            return (self.config.prediction_type in PREDICTIONS and _lms_order(order) and _layout(model_output, sample)
                    and _cached(self, (self.sigmas,), _lms_table)[1]
                    and all(isinstance(d, torch.Tensor) and d.shape == sample.shape and d.device == sample.device
                            for d in self.derivatives))
        except Exception:  # noqa: BLE001 - a question about a call must not raise
            return False

    def fastdiff_lms_coefficients(self, order: int = 4) -> List[float]:
        """The coefficients of the derivatives, latest first, at the current step: diffusers'
        ``get_lms_coefficient(min(step_index + 1, order), step_index, j)`` in closed form (float64)."""
        sig, _, memo = _cached(self, (self.sigmas,), _lms_table)
        key = (self.step_index, order)
        if key not in memo:
            memo[key] = C.lms(sig, self.step_index, order)
        return memo[key]

    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor], sample: torch.Tensor,
             order: int = 4, return_dict: bool = True) -> Union[LMSDiscreteSchedulerOutput, tuple]:
        if not self.fastdiff_supports(model_output, timestep, sample, order):
            return super().step(model_output, timestep, sample, order=order, return_dict=return_dict)
        if not self.is_scale_input_called:
            warnings.warn("The `scale_model_input` function should be called before `step` to ensure correct "
                          "denoising. See `StableDiffusionPipeline` for a usage example.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sig, _, _ = _cached(self, (self.sigmas,), _lms_table)
        sigma = sig[self.step_index]
        dt = torch.promote_types(sample.dtype, model_output.dtype)
        x, m = sample.to(dt), model_output.to(dt)
        x0 = _x0(self.config.prediction_type, x, m, sigma)
        derivative = affine_step([(x, 1.0 / sigma), (x0, -1.0 / sigma)])  # (x - x0)/sigma, diffusers' form
        self.derivatives.append(derivative)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # diffusers zips the coefficients with the derivatives it holds (fewer when it began mid-schedule)
        cs = self.fastdiff_lms_coefficients(order)[:len(self.derivatives)]
        terms = [(x, 1.0)] + [(d.to(dt), c) for c, d in zip(cs, reversed(self.derivatives))]
        prev = affine_step(terms)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return LMSDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

"""diffusers' consistency-model schedulers (LCM, TCD) whose ``step`` runs fastdiff's fused kernels.

    from fastdiff.adapters.diffusers_consistency import LCMScheduler, TCDScheduler
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

The same constructor, config, state (``timesteps``, ``step_index``, ``begin_index``) and ``step``
signature and return types as diffusers' (``prev_sample`` with ``denoised`` / ``pred_noised_sample``, or a
tuple with ``return_dict=False``).  A step is two fused passes where diffusers runs ~8 elementwise ops:

- LCM (Luo et al. 2023): ``denoised = c_skip x + c_out x0_hat`` straight from the model output (the
  prediction type's ``x0_hat`` merged into the coefficients), then ``prev = sqrt(abar_prev) denoised +
  sqrt(1 - abar_prev) z`` (:func:`fastdiff.coefficients.lcm`, with diffusers' boundary condition
  :func:`fastdiff.coefficients.lcm_boundary`: ``timestep_scaling``, ``sigma_data = 0.5``);
- TCD (Zheng et al. 2024): ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat`` at diffusers'
  ``s = floor((1 - eta) t_prev)``, then ``prev = sqrt(abar_prev/abar_s) x_s + sqrt(1 - abar_prev/abar_s) z``
  (:func:`fastdiff.coefficients.tcd`).

The coefficients are float64 on the host from diffusers' own float32 ``alphas_cumprod``, so a step agrees
with diffusers' to float32 rounding.  The schedule is whatever diffusers' ``set_timesteps`` built
(``original_inference_steps``, ``timesteps`` given explicitly, ``strength``; ``timestep_spacing`` is a
config entry diffusers' consistency schedulers do not read): ``step`` follows diffusers' own indexing --
the current level from the ``timestep`` passed, the next from ``step_index + 1`` (the passed timestep
again after the last), no noise on the step whose index is ``num_inference_steps - 1``.

Fused: ``prediction_type`` epsilon / sample / v_prediction; LCM's ``clip_sample`` (three passes: the
clipped ``x0_hat``, then the two above).  Handed to diffusers' own ``step`` (``super().step``), unchanged:
``thresholding``; any other prediction type; a model output whose shape, dtype or device differs from the
sample's; a timestep that is not an integer in ``[0, num_train_timesteps)`` or not in ``timesteps``;
a step whose coefficients are not finite (e.g. epsilon prediction at a zero-terminal-SNR ``abar = 0``)
or that reads a negative timestep; TCD's ``eta`` outside [0, 1] (diffusers asserts); anything diffusers
itself rejects (it raises its own error).  ``fastdiff_supports(...)`` tells which path a call takes
(it never raises).

Noise: as the DDPM adapter's (:mod:`fastdiff.adapters.diffusers`): a ``torch.Generator`` or a list of
them (one per sample) gives exactly diffusers' draw (``randn_tensor``, on the steps diffusers draws), so a
loop agrees with the original's; a :class:`fastdiff.Generator` (one seed, or per-sample seeds) or
``None`` draws the Philox stream in the kernel (no noise tensor written or read).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from diffusers import LCMScheduler as _LCMScheduler
from diffusers import TCDScheduler as _TCDScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

from fastdiff import coefficients as C
from fastdiff import steps
from fastdiff.adapters.diffusers import PREDICTIONS, _cached, _for_diffusers, _noise_source, _same_layout
from fastdiff.generator import Generator

__all__ = ["LCMScheduler", "TCDScheduler"]

# schedulers are handed torch tensors only: the steps without their NumPy/CuPy conversion wrapper
affine_step = steps.affine_step
_FUSED = ("epsilon", "sample", "v_prediction")


def _abar(self):
    """diffusers' ``alphas_cumprod`` as float64 host floats (one copy per table)."""
    return self.alphas_cumprod.detach().double().cpu().tolist()


def _timesteps(self):
    return [int(t) for t in self.timesteps.tolist()]


def _int_timestep(timestep) -> Optional[int]:
    """The timestep as an int where diffusers indexes ``alphas_cumprod`` with it (a Python / NumPy integer
    or a one-element integer tensor), else None (a float timestep: diffusers' indexing raises)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1 or timestep.dtype.is_floating_point or timestep.dtype == torch.bool \
                or timestep.is_complex():
            return None
        return int(timestep.reshape(()).item())
    if isinstance(timestep, numbers.Integral) and not isinstance(timestep, bool):
        return int(timestep)
    return None


def _index(self, timestep) -> Optional[int]:
    """The step index diffusers' ``step`` uses (its ``_init_step_index`` when unset, without setting it),
    or None where diffusers' own lookup fails."""
    if self.step_index is not None:
        return self.step_index
    if self.begin_index is not None:
        return self.begin_index
    t = _int_timestep(timestep)
    ts = _cached(self, (self.timesteps,), _timesteps)
    hits = [k for k, v in enumerate(ts) if v == t]
    return None if not hits else hits[1 if len(hits) > 1 else 0]


def _level(abar: float):
    return C.sqrt(abar), C.sqrt(1.0 - abar)


def _x0_form(self, abar_t: float):
    """``x0_hat = px x + pm m`` of diffusers' conversion for the prediction type (:func:`C.prediction_forms`)."""
    return C.prediction_forms(PREDICTIONS[self.config.prediction_type], *_level(abar_t))[0]


def _finite(*vals) -> bool:
    return all(math.isfinite(v) for v in vals)


def _common(self, model_output, timestep, sample):
    """``(t, index, prev_t, last)`` of a call that can run fused, else None (never raises)."""
    cfg = self.config
    if self.num_inference_steps is None or cfg.thresholding or cfg.prediction_type not in _FUSED:
        return None
    t = _int_timestep(timestep)
    if t is None or not 0 <= t < len(self.alphas_cumprod) or not _same_layout(model_output, sample):
        return None
    i = _index(self, timestep)
    if i is None:
        return None
    ts = _cached(self, (self.timesteps,), _timesteps)
    if not 0 <= i < len(ts):
        return None
    return t, i, (ts[i + 1] if i + 1 < len(ts) else None), i == self.num_inference_steps - 1


def _draw(generator, model_output):
    """(noise tensor, fastdiff generator) of one draw: diffusers' ``randn_tensor`` for torch generators."""
    return _noise_source(generator, model_output.shape, model_output)


# =========================================================================== LCM
def _lcm_plan(self, model_output, timestep, sample):
    """``(index, (px, pm), (c_skip, c_out), (r, q), last)`` of a fused LCM step, or None."""
    try:
        got = _common(self, model_output, timestep, sample)
        if got is None:
            return None
        t, i, prev_t, last = got
        abar = _cached(self, (self.alphas_cumprod,), _abar)
        prev_t = t if prev_t is None else prev_t  # diffusers: the passed timestep again after the last
        if prev_t >= len(abar):
            return None
        abar_prev = abar[prev_t] if prev_t >= 0 else float(self.final_alpha_cumprod)
        px, pm = _x0_form(self, abar[t])
        (c_skip, c_out), (r, q) = C.lcm(_level(abar_prev), C.lcm_boundary(t, self.config.timestep_scaling))
        if not _finite(px, pm, c_skip, c_out, r, q):
            return None
        return i, (px, pm), (c_skip, c_out), (r, q), last
    except Exception:  # noqa: BLE001 - a question about a call must not raise
        return None


class LCMScheduler(_LCMScheduler):
    """diffusers' ``LCMScheduler`` with a fused ``step`` (module docstring: what is fused, noise)."""

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        return _lcm_plan(self, model_output, timestep, sample) is not None

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator: Union[torch.Generator, list, Generator, None] = None,
             return_dict: bool = True) -> Union[LCMSchedulerOutput, tuple]:
        plan = _lcm_plan(self, model_output, timestep, sample)
        if plan is None:
            return super().step(model_output, timestep, sample, generator=_for_diffusers(generator, sample),
                                return_dict=return_dict)
        i, (px, pm), (c_skip, c_out), (r, q), last = plan
        if self.step_index is None:
            self._init_step_index(timestep)
        self.sigma_data = 0.5  # as diffusers' get_scalings_for_boundary_condition_discrete sets it
        if self.config.clip_sample:  # the clamp acts on x0_hat itself: its own pass first
            x0 = model_output if (px, pm) == (0.0, 1.0) else affine_step([(sample, px), (model_output, pm)])
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
            denoised = affine_step([(sample, c_skip), (x0, c_out)])
        else:  # c_skip x + c_out (px x + pm m): one pass from the model output
            cx, cm = C.merge_x0((c_skip, (px, pm), c_out))
            denoised = affine_step([(sample, cx), (model_output, cm)])
        if last:
            prev = denoised
        else:
            noise, gen = _draw(generator, model_output)
            prev = affine_step([(denoised, r)], q, noise=noise, generator=gen)
        self._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)


# =========================================================================== TCD
def _tcd_plan(self, model_output, timestep, sample, eta):
    """``(index, (cx, cm), (r, q), noisy)`` of a fused TCD step (``x_s = cx x + cm m``), or None."""
    try:
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
            return None
        got = _common(self, model_output, timestep, sample)
        if got is None:
            return None
        t, i, prev_t, last = got
        abar = _cached(self, (self.alphas_cumprod,), _abar)
        prev_t = 0 if prev_t is None else prev_t  # diffusers: 0 after the last
        # diffusers' s = floor((1 - eta) t_prev), in its own (float32) tensor arithmetic
        s = int(torch.floor((1 - eta) * torch.tensor(prev_t)).to(dtype=torch.long))
        if not (0 <= prev_t < len(abar) and 0 <= s < len(abar)):
            return None
        lev, lev_s, lev_prev = _level(abar[t]), _level(abar[s]), _level(abar[prev_t])
        (fx, fm), (r, q) = C.tcd(lev, lev_s, lev_prev)
        cx, cm = C.merge_x0((fx, _x0_form(self, abar[t]), fm))
        if not _finite(cx, cm, r, q):
            return None
        return i, (cx, cm), (r, q), eta > 0 and not last
    except Exception:  # noqa: BLE001 - a question about a call must not raise
        return None


class TCDScheduler(_TCDScheduler):
    """diffusers' ``TCDScheduler`` with a fused ``step`` (module docstring: what is fused, noise)."""

    def fastdiff_supports(self, model_output, timestep, sample, eta: float = 0.3) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        return _tcd_plan(self, model_output, timestep, sample, eta) is not None

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             eta: float = 0.3, generator: Union[torch.Generator, list, Generator, None] = None,
             return_dict: bool = True) -> Union[TCDSchedulerOutput, tuple]:
        plan = _tcd_plan(self, model_output, timestep, sample, eta)
        if plan is None:
            return super().step(model_output, timestep, sample, eta=eta, generator=_for_diffusers(generator, sample),
                                return_dict=return_dict)
        i, (cx, cm), (r, q), noisy = plan
        if self.step_index is None:
            self._init_step_index(timestep)
        # x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat, both forms of the model output merged
        x_s = affine_step([(sample, cx), (model_output, cm)])
        if noisy:
            noise, gen = _draw(generator, model_output)
            prev = affine_step([(x_s, r)], q, noise=noise, generator=gen)
        else:  # eta = 0 or the last step: diffusers returns x_s itself
            prev = x_s
        self._step_index += 1
        if not return_dict:
            return (prev, x_s)
        return TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=x_s)

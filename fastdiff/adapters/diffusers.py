"""diffusers schedulers whose ``step`` runs fastdiff's fused kernels.

    from fastdiff.adapters.diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

Same constructor and config, same ``step`` signature and return types (``prev_sample`` and
``pred_original_sample``, or a tuple with ``return_dict=False``), every prediction type
(``epsilon``, ``sample``, ``v_prediction``) and ``clip_sample``.  A step is two fused passes
instead of diffusers' chain of ~10 elementwise ops: ``pred_original_sample`` by
:func:`fastdiff.predict_x0`, and the update by :func:`fastdiff.ddpm_step` / :func:`fastdiff.ddim_step` /
:func:`fastdiff.euler_step` (with :func:`fastdiff.edm_churn` first when ``s_churn`` applies).

The schedule is diffusers' own: the float32 ``alphas_cumprod`` (and Euler's ``sigmas``) it built,
read in float64, so the coefficients are diffusers' up to float32 rounding.

Noise (DDPM, DDIM with ``eta > 0``, Euler churn):

- a ``torch.Generator``, or a list of them (one per sample), draws exactly the tensors diffusers
  would draw (``randn_tensor``), on the same steps -- DDPM's last step too when its timestep is
  > 0 (diffusers then adds noise at its clamped variance 1e-20) -- so a loop agrees with the
  original's to float32 rounding and a generator shared by several loops stays aligned; DDIM's
  ``variance_noise=`` likewise;
- a :class:`fastdiff.Generator`, or ``None`` (:data:`fastdiff.default_generator`), draws the
  shared Philox stream inside the kernel: no noise tensor is written or read (faster; the same
  distribution, not diffusers' numbers -- seed with :func:`fastdiff.manual_seed`).

Configurations handed to diffusers' own ``step`` (``super().step``), unchanged: ``thresholding``;
DDPM ``variance_type`` other than ``fixed_small`` / ``fixed_small_log`` / ``fixed_large`` (the
learned ones, ``fixed_large_log``); a model output whose shape, dtype or device differs from the
sample's (DDPM, DDIM; Euler computes in float32 like diffusers); a DDPM timestep outside the
scheduler's timesteps; DDPM ``fixed_large`` on a final step whose timestep is not 0 (diffusers then
adds ``sqrt(1 - abar_t)`` noise, which no DDPM step of ours does); DDPM/DDIM steps touching
``alphas_cumprod`` entries our :class:`DDPMSchedule` cannot hold (a zero-terminal-SNR table's
``abar = 0``, i.e. ``beta = 1``, from ``rescale_betas_zero_snr``; ``trained_betas`` outside (0, 1)):
from the first such entry up (:func:`_chain`), the steps below stay fused; Euler sigmas that are not
finite and positive (the whole config); anything diffusers itself rejects (it raises its own
error).  ``fastdiff_supports(...)`` tells which path a call takes, for any config and arguments (it
never raises); a fastdiff.Generator given to such a call seeds a torch.Generator from its stream
(reproducible).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from diffusers import DDIMScheduler as _DDIMScheduler
from diffusers import DDPMScheduler as _DDPMScheduler
from diffusers import EulerDiscreteScheduler as _EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import logger as _euler_logger
from diffusers.utils.torch_utils import randn_tensor

from fastdiff.generator import Generator
from fastdiff.schedules import DDPMSchedule
from fastdiff import steps

__all__ = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"]

# schedulers are handed torch tensors only: call the steps without their NumPy/CuPy conversion
# wrapper (``accepts_arrays``), which costs ~5 us a call -- comparable to a whole fused pass on a
# 4 x 4 x 64 x 64 latent
ddpm_step, ddim_step, euler_step = steps.ddpm_step.__wrapped__, steps.ddim_step.__wrapped__, steps.euler_step.__wrapped__
edm_churn, predict_x0 = steps.edm_churn.__wrapped__, steps.predict_x0.__wrapped__

PREDICTIONS = {"epsilon": "eps", "sample": "x0", "original_sample": "x0", "v_prediction": "v"}
DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


def _chain(alphas_cumprod: torch.Tensor):
    """``(schedule, n)``: a :class:`DDPMSchedule` whose ``abar`` is the first ``n`` entries of
    ``alphas_cumprod`` (float64 of diffusers' float32 values), ``beta_j = 1 - abar_j / abar_{j-1}``
    making its cumulative product reproduce them; ``n`` is the longest prefix whose betas lie in
    (0, 1), the schedule's domain (``None`` when ``n = 0``).  A zero-terminal-SNR table
    (``rescale_betas_zero_snr``: last ``abar = 0``, so ``beta = 1``) loses its last entry, a
    pathological ``trained_betas`` (``beta <= 0``, ``>= 1``, NaN) everything from the first bad one:
    steps touching those entries run diffusers' own ``step``."""
    abar = alphas_cumprod.detach().double().cpu().flatten()
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1.0 - abar / prev
    ok = torch.isfinite(betas) & (betas > 0) & (betas < 1)
    n = int(ok.cumprod(0).sum())
    return (DDPMSchedule(betas=betas[:n]) if n else None), n


def _timestep(timestep) -> Optional[int]:
    """``int(timestep)`` of a number or a one-element tensor, or None where that fails (diffusers'
    step then raises its own error)."""
    if not isinstance(timestep, (numbers.Real, torch.Tensor)):
        return None
    try:
        return int(timestep)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


def _check_generators(generator: list, batch: int) -> None:
    """A list is diffusers' one-generator-per-sample form (``randn_tensor``: sample ``b`` draws from
    ``generator[b]``; a 1-element list is one generator for the whole batch)."""
    for i, g in enumerate(generator):
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator: expected a list of torch.Generators, got {type(g).__name__} at position {i}")
    if not generator or 1 < len(generator) < batch:
        raise ValueError(f"generator: expected one torch.Generator per sample ({batch}) or a single one, "
                         f"got a list of {len(generator)}")


def _noise_source(generator, shape, like: torch.Tensor):
    """``(noise tensor, fastdiff generator)``: diffusers' own draw for a torch.Generator or a list of
    them, else in-kernel."""
    if isinstance(generator, list):
        _check_generators(generator, shape[0])
    if isinstance(generator, (torch.Generator, list)):
        return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype), None
    if generator is None or isinstance(generator, Generator):
        return None, generator
    raise TypeError("generator: expected a torch.Generator, a list of them (one per sample), a fastdiff.Generator "
                    f"or None, got {type(generator).__name__}")


def _for_diffusers(generator, like: torch.Tensor):
    """The generator for a call handed to diffusers' own step: a fastdiff.Generator becomes a
    torch.Generator seeded from its stream position (and advances it), so the run stays reproducible."""
    if isinstance(generator, Generator):
        if generator.per_sample:  # diffusers' step draws the whole batch from one torch.Generator
            raise ValueError("generator: per-sample seeds need fastdiff's fused step; this configuration runs "
                             "diffusers' own step, which draws from one torch.Generator (pass one seed)")
        seed = (generator.seed * 0x9E3779B97F4A7C15 + generator.draw(like.numel())) % (1 << 63)
        return torch.Generator(device=like.device).manual_seed(seed)
    return generator


def _same_tensors(model_output, sample) -> bool:
    """Floating tensors of one shape on one device (the multistep adapters mix dtypes as diffusers does)."""
    return (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
            and model_output.shape == sample.shape and model_output.device == sample.device
            and model_output.is_floating_point() and sample.is_floating_point())


def _same_layout(model_output, sample) -> bool:
    """:func:`_same_tensors` of one dtype too."""
    return _same_tensors(model_output, sample) and model_output.dtype == sample.dtype


def _find_step_index(scheduler, timestep) -> None:
    """What diffusers' multistep ``step`` does first: find the step index (the order at a step depends on it)."""
    if scheduler.num_inference_steps is not None and scheduler.step_index is None:
        scheduler._init_step_index(timestep)


def _cached(owner, key, build):
    """A per-scheduler cache entry rebuilt when one of the objects in ``key`` is replaced
    (diffusers assigns new tensors in ``set_timesteps``; identity, not value, is compared)."""
    slot = "_fastdiff_" + build.__name__
    hit = owner.__dict__.get(slot)
    if hit is not None and len(hit[0]) == len(key) and all(a is b for a, b in zip(hit[0], key)):
        return hit[1]
    value = build(owner)
    owner.__dict__[slot] = (key, value)
    return value


# =========================================================================== DDPM
def _ddpm_chain(self):
    """The inference chain ``t_0 > t_1 > ... > t_{n-1}`` as a DDPMSchedule indexed j = n-1-i, plus
    ``{t: j}`` for the timesteps whose ``previous_timestep`` is the next one in the chain (-1 after
    the last): diffusers' rule since it has ``previous_timestep``; any other goes to diffusers, as
    do those above the representable prefix (:func:`_chain`: zero terminal SNR's ``abar = 0``)."""
    ts = [int(t) for t in self.timesteps.tolist()]
    asc = ts[::-1]
    sched, n = _chain(self.alphas_cumprod.detach().double().cpu()[torch.tensor(asc, dtype=torch.long)])
    index = {}
    for i, t in enumerate(ts):
        expected = ts[i + 1] if i + 1 < len(ts) else -1
        j = len(ts) - 1 - i
        if j < n and hasattr(self, "previous_timestep") and int(self.previous_timestep(t)) == expected:
            index[t] = j
    return sched, index


# diffusers' variance on a last step (abar_prev = 1, so beta_t (1 - abar_prev)/(1 - abar_t) = 0)
# after its clamp(min=1e-20), as the standard deviation each variance type multiplies the noise by
_FLOOR = torch.tensor(1e-20)
FLOOR_STD = {"fixed_small": float(_FLOOR**0.5), "fixed_small_log": float(torch.exp(0.5 * torch.log(_FLOOR)))}


class DDPMScheduler(_DDPMScheduler):
    """diffusers' ``DDPMScheduler`` with a fused ``step`` (module docstring: noise, fallbacks)."""

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``).
        Answers for every config and argument, never raising (False for a timestep that is not a number)."""
        if self.config.thresholding or self.config.prediction_type not in PREDICTIONS or \
                self.config.prediction_type == "original_sample" or self.variance_type not in DDPM_VARIANCES:
            return False
        t = _timestep(timestep)
        if t is None or not _same_layout(model_output, sample):
            return False
        _, index = _cached(self, (self.timesteps, self.alphas_cumprod), _ddpm_chain)
        if t not in index:
            return False
        return not (index[t] == 0 and t > 0 and self.variance_type == "fixed_large")

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: Union[torch.Generator, list, Generator, None] = None,
             return_dict: bool = True) -> Union[DDPMSchedulerOutput, tuple]:
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, generator=_for_diffusers(generator, sample),
                                return_dict=return_dict)
        sched, index = _cached(self, (self.timesteps, self.alphas_cumprod), _ddpm_chain)
        t = int(timestep)
        j = index[t]
        prediction = PREDICTIONS[self.config.prediction_type]
        abar = sched.floats("abar")[j]
        x0 = predict_x0(sample, model_output, math.sqrt(abar), math.sqrt(1.0 - abar), prediction=prediction)
        # diffusers draws noise whenever t > 0, so also on a last step at t > 0 (steps_offset=1, trailing
        # spacing), scaled by its clamped zero variance; our step adds noise on every step but the chain's
        # last.  There a torch.Generator still draws, as diffusers does, and the draw is added at
        # diffusers' scale (so later draws from a shared generator stay aligned); in-kernel noise skips it
        noise, gen = _noise_source(generator, model_output.shape, model_output) if j > 0 or t > 0 else (None, None)
        last_noise, noise, gen = (noise, None, None) if j == 0 else (None, noise, gen)
        variance = DDPM_VARIANCES[self.variance_type]
        if self.config.clip_sample:
            x0.clamp_(-self.config.clip_sample_range, self.config.clip_sample_range)
            prev = ddpm_step(sample, x0, j, sched, prediction="x0", variance=variance, noise=noise, generator=gen)
        else:  # the same update straight from the model output (independent of the x0 pass)
            prev = ddpm_step(sample, model_output, j, sched, prediction=prediction, variance=variance, noise=noise,
                             generator=gen)
        if last_noise is not None:
            prev.add_(last_noise, alpha=FLOOR_STD[self.variance_type])
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# =========================================================================== DDIM
def _ddim_table(self):
    return _chain(self.alphas_cumprod)


class DDIMScheduler(_DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with a fused ``step`` (module docstring: noise, fallbacks)."""

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``):
        ``timestep`` (and so its predecessor) within the representable prefix of ``alphas_cumprod``
        (:func:`_chain`).  Answers for every config and argument, never raising."""
        if self.num_inference_steps is None or self.config.thresholding or \
                self.config.prediction_type not in ("epsilon", "sample", "v_prediction"):
            return False
        t = _timestep(timestep)
        if t is None or not _same_layout(model_output, sample):
            return False
        _, n = _cached(self, (self.alphas_cumprod,), _ddim_table)
        return 0 <= t < min(n, self.config.num_train_timesteps)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Union[torch.Generator, list, Generator, None] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True) -> Union[DDIMSchedulerOutput, tuple]:
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                                generator=_for_diffusers(generator, sample), variance_noise=variance_noise,
                                return_dict=return_dict)
        sched, _ = _cached(self, (self.alphas_cumprod,), _ddim_table)
        t = int(timestep)
        t_prev = t - self.config.num_train_timesteps // self.num_inference_steps
        if t_prev < 0:  # final_alpha_cumprod: 1 (t_prev = -1 in our step) or alphas_cumprod[0]
            t_prev = -1 if self.config.set_alpha_to_one else 0
        prediction = PREDICTIONS[self.config.prediction_type]
        abar = sched.floats("abar")[t]
        x0 = predict_x0(sample, model_output, math.sqrt(abar), math.sqrt(1.0 - abar), prediction=prediction)
        noise = gen = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise, gen = (variance_noise, None) if variance_noise is not None else \
                _noise_source(generator, model_output.shape, model_output)
        kw = dict(eta=eta, noise=noise, generator=gen)
        if not self.config.clip_sample:
            prev = ddim_step(sample, model_output, t, t_prev, sched, prediction=prediction, **kw)
        elif use_clipped_model_output:  # eps recomputed from the clipped x0: the x0-form step
            x0.clamp_(-self.config.clip_sample_range, self.config.clip_sample_range)
            prev = ddim_step(sample, x0, t, t_prev, sched, prediction="x0", **kw)
        else:
            # clipped x0 with the model's own eps: the unclipped step plus alpha_prev (x0_clipped - x0),
            # which is zero wherever the clip did not act
            x0_clipped = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
            prev = ddim_step(sample, model_output, t, t_prev, sched, prediction=prediction, **kw)
            abar_prev = sched.floats("abar")[t_prev] if t_prev >= 0 else 1.0
            prev.add_(x0_clipped - x0, alpha=math.sqrt(abar_prev))
            x0 = x0_clipped
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# =========================================================================== Euler
def _euler_sigmas(self):
    """``(sigmas as floats, usable)``: the fused steps need finite sigmas, positive but for a last 0
    (a ``trained_betas`` with ``beta >= 1`` gives diffusers an infinite or NaN sigma: its own step runs)."""
    sigmas = self.sigmas.detach().double().cpu().tolist()
    usable = all(math.isfinite(s) and s > 0 for s in sigmas[:-1]) and math.isfinite(sigmas[-1]) and sigmas[-1] >= 0
    return sigmas, usable


class EulerDiscreteScheduler(_EulerDiscreteScheduler):
    """diffusers' ``EulerDiscreteScheduler`` with a fused ``step`` (module docstring: noise, fallbacks).

    Like diffusers it computes in float32 and returns ``prev_sample`` in the model output's dtype.
    """

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``).
        Answers for every config and argument, never raising."""
        return (self.config.prediction_type in PREDICTIONS and not isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))
                and isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
                and model_output.shape == sample.shape and model_output.device == sample.device
                and model_output.is_floating_point()
                and _cached(self, (self.sigmas,), _euler_sigmas)[1])

    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor], sample: torch.Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Union[torch.Generator, list, Generator, None] = None,
             return_dict: bool = True) -> Union[EulerDiscreteSchedulerOutput, tuple]:
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=_for_diffusers(generator, sample), return_dict=return_dict)
        if not self.is_scale_input_called:
            _euler_logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                                  "denoising. See `StableDiffusionPipeline` for a usage example.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigmas, _ = _cached(self, (self.sigmas,), _euler_sigmas)
        i = self.step_index
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sample = sample.to(torch.float32)
        m = model_output.to(torch.float32)
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise, gen = _noise_source(generator, model_output.shape, model_output)
            sample, sigma_hat = edm_churn(sample, sigma, gamma, s_noise=s_noise,
                                          noise=None if noise is None else noise.to(torch.float32), generator=gen)
        prediction = PREDICTIONS[self.config.prediction_type]
        if prediction == "x0":
            x0 = model_output
        elif prediction == "eps":
            x0 = predict_x0(sample, m, 1.0, sigma_hat, prediction="eps")
        else:
            # diffusers' v conversion on the VE-scaled sample, x/(1+s^2) - s/sqrt(1+s^2) v (s = sigma, not
            # sigma_hat), is predict_x0's eps form (x - sigma' m)/alpha' with alpha' = 1+s^2, sigma' = s sqrt(1+s^2)
            x0 = predict_x0(sample, m, 1.0 + sigma * sigma, sigma * math.sqrt(1.0 + sigma * sigma), prediction="eps")
        prev = euler_step(sample, m if prediction == "x0" else x0, sigma_hat, sigma_next, prediction="x0")
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

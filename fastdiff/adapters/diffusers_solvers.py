"""diffusers' DPM-Solver, UniPC and FlowMatch schedulers whose ``step`` runs fastdiff's fused kernels.

    from fastdiff.adapters.diffusers_solvers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)

``DPMSolverMultistepScheduler``: the same constructor, config, state (``model_outputs``,
``lower_order_nums``, ``step_index``) and ``step`` signature and return type as diffusers'.  A step is
at most two fused passes where diffusers runs ~10-15 elementwise ops: the data prediction
``x0`` (kept in ``model_outputs``, as diffusers keeps it) and the update
``x_t = cx x + c_0 x0_i + c_1 x0_{i-1} + c_2 x0_{i-2} + cz z`` (:func:`fastdiff.affine_step`), its
coefficients from :func:`fastdiff.coefficients.dpmpp_2m_sde` / :func:`~fastdiff.coefficients.dpmpp_3m_sde`
(DPM-Solver++, Lu et al. 2022b; ``eta = 0`` for ``dpmsolver++``, ``eta = 1`` for
``sde-dpmsolver++``) in float64 on the host from diffusers' own ``sigmas``.

Fused: ``algorithm_type`` ``dpmsolver++`` (orders 1-3, ``solver_type`` midpoint / heun) and
``sde-dpmsolver++`` (orders 1-2); ``prediction_type`` epsilon / sample / v_prediction /
flow_prediction (diffusers' conversions, as diffusers writes them); every sigma option
(``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``, ``use_lu_lambdas``,
``use_flow_sigmas``), ``timestep_spacing``, ``final_sigmas_type``, ``lower_order_final``,
``euler_at_final``.  Handed to diffusers' own ``step``: ``thresholding``; learned variances; the
noise-prediction ``dpmsolver`` / ``sde-dpmsolver``; a model output whose shape or device differs from
the sample's; and ``sde-dpmsolver++``'s third-order steps, whose diffusers formula weights ``D2`` by
``(1 - e^{-2h} - 2h)/(2h)^2 - 1/2`` where k-diffusion's ``sample_dpmpp_3m_sde`` (and fastdiff's
``method="dpmpp_3m_sde"``) has ``... + 1/2``, an O(1) difference on an O(h^2) term, so the drop-in keeps
diffusers' own numbers there.  (Both the ODE and the SDE 3M weights of ``D2 = h^2 D''/2`` are half the
exponential integrator's, which makes the deterministic 3M second order: docs/math.md 1d.)
``fastdiff_supports`` tells which path a call takes.

Noise (``sde-dpmsolver++``): a ``torch.Generator`` or ``variance_noise`` gives exactly diffusers' draw
(``randn_tensor``, float32, on every step as diffusers draws); a :class:`fastdiff.Generator` or ``None``
draws the Philox stream in the kernel (no noise tensor; seed with :func:`fastdiff.manual_seed`).

``UniPCMultistepScheduler``: diffusers' config, state (``model_outputs``, ``timestep_list``,
``last_sample``, ``this_order``, ``lower_order_nums``, ``step_index``) and ``step``, with a step of three
fused passes where diffusers runs ~30 ops: the data prediction ``x0_i`` (as for DPM-Solver), UniC's
corrected state ``x_i = cx x_{i-1} + c x0_i + sum_j c_j x0_{i-1-j}`` (kept as ``last_sample``, as diffusers
keeps it) and UniP's ``x~_{i+1} = cx' x_i + sum_j c'_j x0_{i-j}``, coefficients from
:func:`fastdiff.coefficients.unipc` (UniPC, Zhao et al. 2023; B(h) ``bh1`` / ``bh2``) in float64 from
diffusers' ``sigmas``.  Fused: ``predict_x0=True``, ``solver_type`` bh1 / bh2, ``solver_order`` 1-3,
``prediction_type`` epsilon / sample / v_prediction / flow_prediction, every sigma option
(karras / exponential / beta / flow sigmas, ``flow_shift``, dynamic shifting), ``timestep_spacing``,
``final_sigmas_type``, ``lower_order_final``, ``disable_corrector``.  Handed to diffusers' own ``step``:
``predict_x0=False`` (the noise-prediction form), ``thresholding``, ``solver_p``, ``solver_order > 3``, a
model output whose shape or device differs from the sample's, and the steps whose formula has no finite
value (a step of order >= 2 to ``sigma = 0``, reachable with ``lower_order_final=False``: it divides by
``r_k = 0``; a corrector out of ``alpha = 0``), so the drop-in keeps diffusers' numbers there.  Where
diffusers' float arithmetic is not finite but the step has a limit, the fused step takes the limit
instead: ``bh1``'s step to ``sigma = 0`` (diffusers computes ``B(h) * 0 = -inf * 0``, NaN: its whole
``bh1`` + ``final_sigmas_type="zero"`` output; here ``x = x0``, bh2's value) and order 3 on the repeated
last level of ``final_sigmas_type="sigma_min"`` (``h = 0``; diffusers' solve raises; here ``x`` unchanged).

``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, HunyuanVideo, LTX, CogView4): the step
``x + (t_next - t) v`` is one fused pass, and so is ``stochastic_sampling``'s
``(1 - t_next)(x - t v) + t_next z``.  ``per_token_timesteps`` (a ``(B, T)`` tensor of per-token
timesteps for a ``(B, T, ...)`` sample, as video models pass them) gives a coefficient per token,
broadcast over the token's elements in the same kernel.  ``s_churn`` and friends are accepted and
ignored, as diffusers ignores them.
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch
from diffusers import DPMSolverMultistepScheduler as _DPMSolverMultistepScheduler
from diffusers import FlowMatchEulerDiscreteScheduler as _FlowMatchEulerDiscreteScheduler
from diffusers import UniPCMultistepScheduler as _UniPCMultistepScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff import coefficients as C
from fastdiff import steps
from fastdiff.adapters.diffusers import _cached, _find_step_index, _for_diffusers, _noise_source, _same_tensors
from fastdiff.generator import Generator
from fastdiff.ops.fused_step import _fused_step
from fastdiff import dispatch

__all__ = ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"]

affine_step = steps.affine_step
_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _levels(self) -> List[Tuple[float, float]]:
    """``(alpha_t, sigma_t)`` of every entry of ``self.sigmas``, in float64: diffusers'
    ``_sigma_to_alpha_sigma_t`` (``1 - s, s`` on flow sigmas; ``1/sqrt(1 + s^2), s/sqrt(1 + s^2)`` else)."""
    out = []
    for s in self.sigmas.detach().double().cpu().tolist():
        if self.config.use_flow_sigmas:
            out.append((1.0 - s, s))
        else:
            a = 1.0 / math.sqrt(s * s + 1.0)
            out.append((a, s * a))
    return out


def _raw_sigmas(self) -> List[float]:
    return self.sigmas.detach().double().cpu().tolist()


def _data_prediction(self, model_output, sample, a, s, i):
    """The data prediction ``x0`` at level ``(a, s)`` (step ``i``), as diffusers' ``convert_model_output``
    writes it (its arithmetic promotes: the sample's and the output's common dtype)."""
    pred = self.config.prediction_type
    dt = torch.promote_types(sample.dtype, model_output.dtype)
    xs, ms = sample.to(dt), model_output.to(dt)
    if pred == "sample":
        return model_output
    if pred == "epsilon":
        return affine_step([(xs, 1.0 / a), (ms, -s / a)])
    if pred == "v_prediction":
        return affine_step([(xs, a), (ms, -s)])
    # flow_prediction: diffusers takes the raw sigma
    return affine_step([(xs, 1.0), (ms, -_cached(self, (self.sigmas,), _raw_sigmas)[i])])


class DPMSolverMultistepScheduler(_DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` with a fused ``step`` (module docstring: what is fused)."""

    def _order_of_this_step(self) -> int:
        """diffusers' choice of the update's order at ``step_index`` (its ``step``, verbatim in logic)."""
        i, n = self.step_index, len(self.timesteps)
        lower_order_final = (i == n - 1) and (self.config.euler_at_final or (self.config.lower_order_final and n < 15)
                                              or self.config.final_sigmas_type == "zero")
        lower_order_second = (i == n - 2) and self.config.lower_order_final and n < 15
        if self.config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            return 1
        if self.config.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            return 2
        return 3

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        try:
            cfg = self.config
            if (cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") or cfg.thresholding
                    or cfg.variance_type is not None or cfg.prediction_type not in _PREDICTIONS
                    or self.num_inference_steps is None):
                return False
            if not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
                    and model_output.shape == sample.shape and model_output.device == sample.device
                    and model_output.is_floating_point() and sample.is_floating_point()):
                return False
            if cfg.algorithm_type == "sde-dpmsolver++" and cfg.solver_order >= 3:
                if self.step_index is None:
                    return False  # the order depends on the step; diffusers' own step finds it
                return self._order_of_this_step() < 3
            return True
        except Exception:  # noqa: BLE001 - a question about a config must not raise
            return False

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator: Union[torch.Generator, Generator, None] = None, variance_noise=None,
             return_dict: bool = True) -> Union[SchedulerOutput, tuple]:
        _find_step_index(self, timestep)
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, generator=_for_diffusers(generator, sample),
                                variance_noise=variance_noise, return_dict=return_dict)
        levels = _cached(self, (self.sigmas,), _levels)
        i = self.step_index
        order = self._order_of_this_step()
        a, s = levels[i]
        x0 = _data_prediction(self, model_output, sample, a, s, i)
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = x0
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        noise, gen = None, None
        if sde:
            if variance_noise is not None:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            else:
                # diffusers draws float32 noise on the model output's device, on every step
                noise, gen = _noise_source(generator, model_output.shape,
                                           torch.empty(0, dtype=torch.float32, device=model_output.device))
        eta = 1.0 if sde else 0.0

        def h(j, k):  # lambda_k - lambda_j
            return C.log_snr(*levels[k]) - C.log_snr(*levels[j])
        if order == 1:
            cx, cs, cz = C.dpmpp_2m_sde(levels[i], levels[i + 1], None, eta=eta)
        elif order == 2:
            cx, cs, cz = C.dpmpp_2m_sde(levels[i], levels[i + 1], h(i - 1, i), eta=eta,
                                        solver_type=self.config.solver_type)
        else:
            cx, cs, cz = C.dpmpp_3m_sde(levels[i], levels[i + 1], h(i - 1, i), h(i - 2, i - 1), eta=eta)
        sample32 = sample.to(torch.float32)
        hist = [self.model_outputs[-1 - j].to(torch.float32) for j in range(len(cs))]
        prev = affine_step([(sample32, cx)] + list(zip(hist, cs)), cz, noise=noise, generator=gen)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


# =========================================================================== UniPC
class UniPCMultistepScheduler(_UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` with a fused ``step`` (module docstring: what is fused)."""

    def _plan(self):
        """``(corrector, predictor)`` at ``step_index`` as diffusers' ``step`` decides them: each None or
        ``(cx, pred, corr, p)`` of :func:`fastdiff.coefficients.unipc` (the corrector's from the last step's
        level to this one, of the last predictor's order; the predictor's of this step's order)."""
        cfg, i = self.config, self.step_index
        levels = _cached(self, (self.sigmas,), _levels)
        n = len(self.timesteps)
        use_corrector = i > 0 and i - 1 not in self.disable_corrector and self.last_sample is not None
        corrector = None
        if use_corrector:
            p = self.this_order
            corrector = C.unipc(levels[i - 1], levels[i], [levels[i - 1 - k] for k in range(1, p)],
                                variant=cfg.solver_type) + (p,)
        p = min(cfg.solver_order, n - i) if cfg.lower_order_final else cfg.solver_order
        p = min(p, min(self.lower_order_nums, cfg.solver_order) + 1)
        predictor = C.unipc(levels[i], levels[i + 1], [levels[i - k] for k in range(1, p)],
                            variant=cfg.solver_type) + (p,)
        return corrector, predictor

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        try:
            cfg = self.config
            if (not self.predict_x0 or cfg.thresholding or self.solver_p is not None
                    or cfg.solver_type not in C.UNIPC_VARIANTS or cfg.solver_order not in (1, 2, 3)
                    or cfg.prediction_type not in _PREDICTIONS or self.num_inference_steps is None
                    or not _same_tensors(model_output, sample)):
                return False
            if self.step_index is None:
                return True  # step finds the index first; the per-step checks below need it
            corrector, _ = self._plan()  # raises on a step of order >= 2 to sigma = 0 (r_k = 0: no limit)
            return corrector is None or corrector[2] is not None  # no corrector out of alpha = 0
        except Exception:  # noqa: BLE001 - a question about a config must not raise (C.unipc's first-order-only cases too)
            return False

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             return_dict: bool = True) -> Union[SchedulerOutput, tuple]:
        _find_step_index(self, timestep)
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        corrector, (cx, pred, _, p) = self._plan()
        i = self.step_index
        a, s = _cached(self, (self.sigmas,), _levels)[i]
        x0 = _data_prediction(self, model_output, sample, a, s, i)
        dt = torch.promote_types(sample.dtype, x0.dtype)
        if corrector is not None:  # UniC: x_i from x_{i-1} (last_sample), x0_i and the remembered x0's
            ccx, cpred, corr, cp = corrector
            last = self.last_sample
            terms = [(last.to(dt), ccx), (x0.to(dt), corr[0])]
            terms += [(self.model_outputs[-1 - j].to(dt), cpred[j] + corr[1 + j]) for j in range(cp)]
            sample = affine_step(terms).to(last.dtype)
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
            self.timestep_list[k] = self.timestep_list[k + 1]
        self.model_outputs[-1] = x0
        self.timestep_list[-1] = timestep
        self.this_order = p
        self.last_sample = sample
        terms = [(sample.to(dt), cx)] + [(self.model_outputs[-1 - j].to(dt), pred[j]) for j in range(p)]
        prev = affine_step(terms).to(sample.dtype)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


# =========================================================================== FlowMatch Euler
class FlowMatchEulerDiscreteScheduler(_FlowMatchEulerDiscreteScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with a fused ``step`` (module docstring)."""

    def fastdiff_supports(self, model_output, timestep, sample, per_token_timesteps=None) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        try:
            if self.sigmas is None or self.timesteps is None or isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
                return False
            if not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
                    and model_output.shape == sample.shape and model_output.device == sample.device
                    and model_output.is_floating_point() and sample.is_floating_point()):
                return False
            if per_token_timesteps is not None:
                pt = per_token_timesteps
                return (isinstance(pt, torch.Tensor) and pt.ndim == 2 and sample.ndim >= 3
                        and tuple(pt.shape) == tuple(sample.shape[:2]) and pt.is_floating_point())
            return True
        except Exception:  # noqa: BLE001 - a question about a call must not raise
            return False

    def step(self, model_output: torch.FloatTensor, timestep, sample: torch.FloatTensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Union[torch.Generator, Generator, None] = None, per_token_timesteps=None,
             return_dict: bool = True):
        if not self.fastdiff_supports(model_output, timestep, sample, per_token_timesteps):
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=_for_diffusers(generator, sample),
                                per_token_timesteps=per_token_timesteps, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)  # diffusers' upcast
        m = model_output.to(torch.float32)
        stochastic = self.config.stochastic_sampling
        noise = gen = None
        if stochastic:
            noise, gen = _noise_source(generator, sample.shape, sample)
        if per_token_timesteps is None:
            sigmas = _cached(self, (self.sigmas,), _raw_sigmas)
            s, sn = sigmas[self.step_index], sigmas[self.step_index + 1]
            if stochastic:  # (1 - t_next)(x - t v) + t_next z
                prev = affine_step([(sample, 1.0 - sn), (m, -(1.0 - sn) * s)], sn, noise=noise, generator=gen)
            else:
                prev = affine_step([(sample, 1.0), (m, sn - s)])
            prev = prev.to(model_output.dtype)
        else:
            prev = self._per_token(sample, m, per_token_timesteps, stochastic, noise, gen)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)

    def _per_token(self, sample, m, per_token_timesteps, stochastic, noise, gen):
        """One coefficient row per token: diffusers' per-token sigma and the next lower schedule sigma
        (device ops on the (B, T) timesteps only), then the fused pass with rows of ``numel / (B T)``."""
        t = per_token_timesteps.to(device=sample.device, dtype=torch.float32) / self.config.num_train_timesteps
        sig = self.sigmas.to(device=sample.device, dtype=torch.float32)[:, None, None]
        nxt = ((sig < t[None] - 1e-6) * sig).max(dim=0).values
        t, nxt = t.reshape(-1).double(), nxt.reshape(-1).double()
        if stochastic:
            rows = [1.0 - nxt, -(1.0 - nxt) * t, nxt]
        else:
            # diffusers' per-token dt is t - t_next (the scalar path's is t_next - t): kept as diffusers has it
            rows = [torch.ones_like(t), t - nxt, torch.zeros_like(t)]
        coefs = torch.stack(rows, dim=1).to(torch.float32).contiguous()
        out = torch.empty_like(sample)
        seed = offset = 0
        philox = stochastic and noise is None
        if philox:
            from fastdiff.generator import default_generator
            g = gen if gen is not None else default_generator
            seed, offset = g.seed, g.draw(sample.numel())
        _fused_step(out, [sample.contiguous(), m.contiguous()], coefs,
                    noise=None if noise is None else noise.to(torch.float32).contiguous(), seed=seed, offset=offset,
                    philox=philox, backend=dispatch.choose("fused_step", "auto", sample.device, sample.dtype))
        return out  # diffusers leaves the per-token result in float32

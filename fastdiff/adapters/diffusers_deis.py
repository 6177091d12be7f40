"""diffusers' ``DEISMultistepScheduler`` whose ``step`` runs fastdiff's fused kernels.

    from fastdiff.adapters.diffusers_deis import DEISMultistepScheduler
    pipe.scheduler = DEISMultistepScheduler.from_config(pipe.scheduler.config)

The same constructor, config, state (``model_outputs``: the noise predictions ``eps``, as diffusers keeps
them; ``lower_order_nums``, ``step_index``) and ``step`` signature and return type as diffusers'.  A step is
two fused passes where diffusers runs ~10-25 ops: ``eps = (x - alpha_s x0)/sigma_s`` straight from the model
output (one affine map of ``x`` and the output per prediction type; the output itself for ``epsilon``), and

    x_t = alpha_t (x / alpha_s + c_0 eps_i + c_1 eps_{i-1} + c_2 eps_{i-2})        (:func:`fastdiff.affine_step`)

with ``c_j`` the exact integrals over ``rho = sigma/alpha`` of the Lagrange basis in ``log rho``
(:func:`fastdiff.coefficients.deis`; Zhang & Chen 2023, eq. 15 with diffusers' ``logrho`` basis), computed
in float64 on the host from diffusers' own ``sigmas``.  diffusers evaluates the same integrals in float32
through an antiderivative ``r P(log r)`` that cancels for short steps; fastdiff's series form does not, so
the two agree to float32 rounding of each step.

Fused: ``algorithm_type="deis"``, ``solver_type="logrho"`` (what diffusers registers for any other name it
accepts), ``solver_order`` 1-3 with diffusers' warm start and ``lower_order_final``; ``prediction_type``
epsilon / sample / v_prediction / flow_prediction; every sigma option (``use_karras_sigmas``,
``use_exponential_sigmas``, ``use_beta_sigmas``, ``use_flow_sigmas``), ``timestep_spacing``,
``steps_offset``.  Handed to diffusers' own ``step``: ``thresholding`` (it clips ``x0`` by a per-sample
quantile); a model output whose shape or device differs from the sample's; a step whose levels give no
finite, distinct ``rho > 0`` at its nodes (``alpha = 0``); anything diffusers itself rejects.  The result has
diffusers' dtype, ``promote_types(sample, model_output)``.  ``fastdiff_supports`` tells which path a call
takes (it never raises).
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch
from diffusers import DEISMultistepScheduler as _DEISMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff import coefficients as C
from fastdiff import steps
from fastdiff.adapters.diffusers import _cached, _find_step_index, _same_tensors

__all__ = ["DEISMultistepScheduler"]

affine_step = steps.affine_step
_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _deis_levels(self) -> Tuple[List[Tuple[float, float]], List[float], List[float], dict]:
    """``(levels, rho, raw sigmas, coefficient cache)`` of ``self.sigmas`` in float64: diffusers'
    ``_sigma_to_alpha_sigma_t`` (``1 - s, s`` on flow sigmas; ``1/sqrt(1 + s^2), s/sqrt(1 + s^2)`` else) and
    ``rho = sigma_t / alpha_t`` (``inf`` where ``alpha_t = 0``)."""
    raw = self.sigmas.detach().double().cpu().tolist()
    levels = []
    for s in raw:
        if self.config.use_flow_sigmas:
            levels.append((1.0 - s, s))
        else:
            a = 1.0 / math.sqrt(s * s + 1.0)
            levels.append((a, s * a))
    rho = [s / a if a > 0.0 else math.inf for a, s in levels]
    return levels, rho, raw, {}


class DEISMultistepScheduler(_DEISMultistepScheduler):
    """diffusers' ``DEISMultistepScheduler`` with a fused ``step`` (module docstring: what is fused)."""

    def _fastdiff_index(self, timestep) -> int:
        """The step index diffusers' ``step`` would take (its ``_init_step_index``, without setting it)."""
        if self.step_index is not None:
            return self.step_index
        if self.begin_index is not None:
            return self.begin_index
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(self.timesteps.device)
        return self.index_for_timestep(timestep)

    def _fastdiff_order(self, i: int) -> int:
        """diffusers' choice of the update's order at step ``i`` (its ``step``, the same logic)."""
        n = len(self.timesteps)
        lower_order_final = i == n - 1 and self.config.lower_order_final and n < 15
        lower_order_second = i == n - 2 and self.config.lower_order_final and n < 15
        if self.config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            return 1
        if self.config.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            return 2
        return 3

    def _fastdiff_coefficients(self, i: int, p: int):
        """``c_j`` of step ``i`` at order ``p`` (cached per ``sigmas``), or None where the nodes have no finite,
        distinct ``rho > 0`` (diffusers' own step then runs)."""
        _, rho, _, cache = _cached(self, (self.sigmas,), _deis_levels)
        if (i, p) not in cache:
            try:
                cache[(i, p)] = C.deis(rho, i, p) if 0 <= i - p + 1 and i + 1 < len(rho) else None
            except (ValueError, ZeroDivisionError, OverflowError):
                cache[(i, p)] = None
        return cache[(i, p)]

    def fastdiff_supports(self, model_output, timestep, sample) -> bool:
        """Whether :meth:`step` runs the fused kernels for these arguments (else ``super().step``); never raises."""
        try:
            cfg = self.config
            if (cfg.algorithm_type != "deis" or cfg.solver_type != "logrho" or cfg.thresholding
                    or cfg.prediction_type not in _PREDICTIONS or cfg.solver_order not in (1, 2, 3)
                    or self.num_inference_steps is None):
                return False
            if not _same_tensors(model_output, sample):
                return False
            i = self._fastdiff_index(timestep)
            p = self._fastdiff_order(i)
            if p > 1 and any(m is None for m in self.model_outputs[-p:-1]):
                return False
            levels = _cached(self, (self.sigmas,), _deis_levels)[0]
            return levels[i][0] > 0.0 and levels[i][1] > 0.0 and self._fastdiff_coefficients(i, p) is not None
        except Exception:  # noqa: BLE001 - a question about a call must not raise
            return False

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             return_dict: bool = True) -> Union[SchedulerOutput, tuple]:
        _find_step_index(self, timestep)
        if not self.fastdiff_supports(model_output, timestep, sample):
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        levels, _, raw, _ = _cached(self, (self.sigmas,), _deis_levels)
        i = self.step_index
        p = self._fastdiff_order(i)
        cs = self._fastdiff_coefficients(i, p)
        (a, s), (at, _) = levels[i], levels[i + 1]
        # eps = (x - a x0)/s with x0 diffusers' conversion of the output, as one affine map of (x, output)
        pred = self.config.prediction_type
        dt = torch.promote_types(sample.dtype, model_output.dtype)
        xs, ms = sample.to(dt), model_output.to(dt)
        if pred == "epsilon":        # x0 = (x - s m)/a: eps = m
            eps = ms
        elif pred == "sample":       # x0 = m
            eps = affine_step([(xs, 1.0 / s), (ms, -a / s)])
        elif pred == "v_prediction":  # x0 = a x - s m
            eps = affine_step([(xs, (1.0 - a * a) / s), (ms, a)])
        else:                        # flow_prediction: x0 = x - sigma m, diffusers' raw sigma
            eps = affine_step([(xs, (1.0 - a) / s), (ms, a * raw[i] / s)])
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = eps
        hist = [eps] + [self.model_outputs[-1 - j].to(dt) for j in range(1, p)]
        prev = affine_step([(xs, at / a)] + [(e, at * c) for e, c in zip(hist, cs)])
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

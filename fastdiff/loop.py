"""The one sampler loop: a table of :class:`~fastdiff.solvers.Step` rows applied step by step, one
denoiser evaluation and one fused step a row (:func:`run`), with a per-step callback (:class:`StepInfo`).

Every sampler of the package runs on it: :func:`fastdiff.sample` (for callables, the multistep and
flow methods, and the multi-measurement ones), guidance, ``jacobian_rank_trajectory``, the sweeps and
the demo.  It is importable as ``fastdiff.sampling.run``; it lives apart from :mod:`fastdiff.sampling`
so that the modules :mod:`fastdiff.sampling` builds on can use it without importing the sampler API.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from fastdiff import steps as S
from fastdiff import trajectory as fused_impl
from fastdiff.generator import Generator, default_generator
from fastdiff.solvers import Step, apply_row, history_length

__all__ = ["run", "StepInfo"]


def _snapshots(spec, nsteps) -> Optional[List[int]]:
    if spec is None or spec is False:
        return None
    if spec is True:
        return list(range(nsteps + 1))
    idx = torch.as_tensor(spec).reshape(-1)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"return_trajectory: expected True or integer step indices, got dtype {idx.dtype}")
    idx = idx.tolist()
    if not all(0 <= k <= nsteps for k in idx):
        raise ValueError(f"return_trajectory: expected step indices in [0, {nsteps}] (state after k steps), got {idx}")
    return idx


class StepInfo(NamedTuple):
    """What :func:`run` passes to its ``callback``, once per table row (k-diffusion's callback dict)."""
    i: int                 # the row, 0 .. len(table) - 1
    x: torch.Tensor        # the state the denoiser saw: x after i steps (and after this step's EDM churn)
    alpha: float           # the level of that evaluation (sigma = sigma_hat after churn)
    sigma: float
    x0_hat: torch.Tensor   # the denoiser's output D(x; alpha, sigma)
    step: Step             # the row about to be applied


def run(denoiser: Callable, x: torch.Tensor, table: Sequence[Step], *, generator: Optional[Generator] = None,
        callback: Optional[Callable[[StepInfo], None]] = None, return_trajectory=None, backend: str = "auto",
        progress: bool = True, desc: Optional[str] = None, noise: Optional[Callable[[int, Step], torch.Tensor]] = None):
    """The step-by-step sampler loop: for each :class:`Step` of ``table`` (:func:`trajectory_table`),
    one evaluation ``x0_hat = denoiser(x, alpha, sigma)`` at the row's level and one fused step
    (:func:`fastdiff.ddpm_step`, :func:`fastdiff.ddim_step`, :func:`fastdiff.euler_step`, ...) with
    ``x0_hat`` as the model output; Heun rows evaluate once more at the predictor (``row.level2``).

    denoiser: ``denoiser(x, alpha, sigma) -> x0_hat``, x's shape (alpha, sigma Python floats).
    x: x_T, any shape (not modified: the loop runs on a copy, updated in place by ``out=`` steps).
    generator: the Philox stream every stochastic step (and EDM churn) draws ``x.numel()`` normals
        from, in table order (default :data:`fastdiff.default_generator`).
    callback: called once per row, after the row's (first) denoiser evaluation and before the
        update, with a :class:`StepInfo` ``(i, x, alpha, sigma, x0_hat, step)``; ``x`` is the state
        after i rows -- ``trajectory[i]`` unless the row churns, then the churned state the denoiser
        saw -- and is overwritten by the update: clone what you keep.  Not called after the last
        row (the result is the return value).
    return_trajectory: as in :func:`fastdiff.sample` (states after k rows, k = 0 .. len(table)).
    backend: the fused steps' backend.  progress / desc: a tqdm bar (shown for runs over a second).
    noise: ``noise(i, row) -> tensor like x``, called for each draw of the solver rows of
        :mod:`fastdiff.solvers` (``"affine"`` rows) in place of the generator (k-diffusion's
        ``noise_sampler``); the other rows always draw from ``generator``.
    Multistep rows remember earlier denoiser outputs (``Step.push``), so ``denoiser`` must return a
    tensor it does not overwrite later (a fresh one, as a model call does); an output that reuses a
    remembered one's memory raises ``ValueError``.
    Returns x after every row (and the trajectory, if asked).  Every coefficient is a host float,
    so the loop never synchronizes with the device.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable denoiser(x, alpha, sigma) -> x0_hat, got {type(denoiser).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(f"generator: expected a fastdiff.Generator, got {type(generator).__name__}")
    gen = default_generator if generator is None else generator
    snaps = _snapshots(return_trajectory, len(table))
    x = x.clone(memory_format=torch.contiguous_format)
    x_pred = None  # Heun's predictor, one buffer for the whole run
    traj = None
    if snaps is not None:
        traj = torch.empty((len(snaps),) + tuple(x.shape), dtype=x.dtype, device=x.device)
        _save(traj, snaps, 0, x)
    bar = fused_impl._progress(len(table), progress)
    if bar is not None and desc:
        bar.set_description(desc, refresh=False)
    history: List[torch.Tensor] = []  # the multistep rows' pushes h_{i-1}, h_{i-2}, ..., latest first
    keep = history_length(table)
    for i, st in enumerate(table):
        name, args, kw = st.call
        sigma_hat = st.level[1]
        if kw.get("gamma", 0.0) > 0:  # gamma, not st.churn: s_noise = 0 still draws
            x, sigma_hat = S.edm_churn(x, args[0], kw["gamma"], s_noise=kw["s_noise"], generator=gen,
                                       out=_inplace(x), backend=backend)
        m = denoiser(x, *st.level)
        if callback is not None:
            callback(StepInfo(i, x, st.level[0], st.level[1], m, st))
        out = _inplace(x, m)
        if name == "affine":
            x, x_pred = apply_row(denoiser, x, m, st, i, history, keep, gen, noise, out, x_pred, backend)
        elif name in ("ddpm_step", "ddim_step"):
            x = getattr(S, name)(x, m, *args, prediction="x0", generator=gen, out=out, backend=backend, **kw)
        elif name == "euler_ancestral_step":
            x = S.euler_ancestral_step(x, m, *args, generator=gen, out=out, backend=backend, **kw)
        elif name in ("euler_step", "heun_step"):
            sigma_next = args[1]
            if st.level2 is None:  # Euler (also Heun's last step, to sigma_next = 0)
                x = S.euler_step(x, m, sigma_hat, sigma_next, out=out, backend=backend)
            else:
                x_pred = S.euler_step(x, m, sigma_hat, sigma_next, out=x_pred if out is not None else None,
                                      backend=backend)
                x = S.heun_step(x, m, sigma_hat, sigma_next, x_pred=x_pred,
                                model_output_pred=denoiser(x_pred, *st.level2), out=out, backend=backend)
        elif name == "langevin_step":
            x = S.langevin_step(x, m, args[0], prediction="x0", sigma=kw["sigma"], generator=gen, out=out,
                                backend=backend)
        else:  # the jump of walk-jump: x = x0_hat(y)
            x = m
        if traj is not None:
            _save(traj, snaps, i + 1, x)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return (x, traj) if snaps is not None else x


def _inplace(x: torch.Tensor, *outputs: torch.Tensor) -> Optional[torch.Tensor]:
    """``x`` as the step's ``out=`` buffer, or None (a fresh tensor) while autograd records the
    trajectory: a denoiser's backward may have saved ``x`` (a MoLRG does), and overwriting it would
    make ``backward`` raise."""
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in outputs)):
        return None
    return x


def _save(traj, snaps, k, x):
    for j, s in enumerate(snaps):
        if s == k:
            traj[j].copy_(x)

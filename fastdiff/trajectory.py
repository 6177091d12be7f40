"""The fused MoLRG trajectory, public side: which denoisers it runs, and its tables built from a
sampler's steps (:func:`fastdiff.sampling.trajectory_table` rows); the op (its contract, the
table layout, the launch) is :mod:`fastdiff.ops.trajectory`.

:func:`fastdiff.sample` asks :func:`supported`, then calls :func:`run` for MoLRG denoisers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from fastdiff import dispatch
from fastdiff.ops.molrg import offsets as _offsets
from fastdiff.denoisers.molrg import _molrg_params_scalar
from fastdiff.denoisers import MoLRG
from fastdiff.ops.trajectory import NCOEF, NIDX, _trajectory

__all__ = ["supported", "run", "tables"]

# steps per launch while a progress bar is shown (~50 updates per run)
PROGRESS_UPDATES = 50


def _progress(total, show):
    """A tqdm bar for ``total`` steps (None when not shown); shared with the loop of :func:`fastdiff.sample`."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, delay=1.0, unit="step", leave=False)


def _models(den) -> Optional[List[MoLRG]]:
    if isinstance(den, MoLRG):
        return [den]
    models = getattr(den, "models", None)
    return models if isinstance(models, list) and all(isinstance(m, MoLRG) for m in models) else None


def _requires_grad(model: MoLRG) -> bool:
    vals = list(vars(model).values()) + list(getattr(model, "bases", []))
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in vals)


def supported(den, x: torch.Tensor, backend: str, gen=None) -> Tuple[bool, str]:
    """Whether the fused trajectory kernel runs this denoiser from ``x`` with generator ``gen``
    (else why not)."""
    models = _models(den)
    if gen is not None and gen.per_sample:
        dispatch.choose("trajectory", backend, x.device, x.dtype)  # an unknown backend name still raises
        return False, ("the generator has per-sample seeds, and the fused trajectory kernel draws from one "
                       "seed (the step-by-step loop draws each sample's own stream)")
    if models is None:
        dispatch.choose("trajectory", backend, x.device, x.dtype)  # an unknown backend name still raises
        return False, "the denoiser is not a fastdiff.denoisers.MoLRG (or a list of them)"
    impl, why = _choose(models[0], x, backend)
    if impl == "loop":
        return False, why
    if torch.is_grad_enabled() and (x.requires_grad or any(_requires_grad(m) for m in models)):
        # the kernel overwrites its state through a raw pointer: the graph would say dx_T/dx = I
        return False, ("x or the denoiser's tensors require grad, and the fused kernel has no backward "
                       "(the loop keeps the graph)")
    return True, ""


def _choose(m0: MoLRG, x: torch.Tensor, backend: str) -> Tuple[str, str]:
    return dispatch.choose("trajectory", backend, x.device, x.dtype, explain=True, n=m0.n, D=sum(m0.dims),
                           K=len(m0.dims))


def tables(models: Sequence[MoLRG], table, numel: int, gen, guidance, snaps, device):
    """(coef, idx, params, params_istride, dup) for the kernels; advances ``gen`` as the loop would."""
    K = len(models[0].dims)
    level_row = {}
    coef = torch.zeros(len(table), NCOEF, dtype=torch.float64)
    idx = torch.full((len(table), NIDX), -1, dtype=torch.int64)
    first_slot = {}
    for j, k in enumerate(snaps or []):
        first_slot.setdefault(k, j)
    for t, st in enumerate(table):
        coef[t] = torch.tensor([st.churn, st.cx, st.cm, st.cz, st.hx, st.hm, st.hxp, st.hmp], dtype=torch.float64)
        if st.churn != 0.0:
            idx[t, 0] = gen.draw(numel)
        if st.cz != 0.0:
            # no method churns and adds step noise in one step; the Triton kernel relies on it
            assert st.churn == 0.0, "a step with two noise draws"
            idx[t, 1] = gen.draw(numel)
        idx[t, 2] = level_row.setdefault(st.level, len(level_row))
        if st.level2 is not None:
            idx[t, 3] = level_row.setdefault(st.level2, len(level_row))
        idx[t, 4] = first_slot.get(t + 1, -1)
    gw = 0.0 if guidance is None else float(guidance)
    shared = all(m is models[0] or (torch.equal(m.pi, models[0].pi) and torch.equal(m.tau, models[0].tau) and
                                    m.delta == models[0].delta) for m in models)
    per = [models[0]] if shared else list(models)
    params = torch.stack([
        torch.cat([_molrg_params_scalar(a, s, m.dims, m.pi, m.tau, m.delta, "x0", gw) for (a, s) in level_row])
        for m in per]).to(torch.float32)
    istride = 0 if shared else len(level_row) * (3 * K + 2)
    return (coef.to(torch.float32).to(device), idx.to(device), params.contiguous().to(device), istride)


def run(den, x: torch.Tensor, table, gen, labels, guidance, snaps, backend: str, show: bool):
    """The fused trajectory from ``x`` (not modified); returns (x_final, trajectory or None)."""
    models = _models(den)
    m0 = models[0]
    impl, _ = _choose(m0, x, backend)
    coef, idx, params, istride = tables(models, table, x.numel(), gen, guidance, snaps, x.device)
    ucat = torch.stack([m.ucat for m in models]).to(x.device, torch.float32).contiguous()  # (I, n, D)
    lab = labels.reshape(-1).to(x.device).contiguous() if labels is not None else None
    T = len(table)
    bar = _progress(T, show)
    state, traj = _trajectory(x, ucat, _offsets(m0.dims), params, istride, lab, m0.mode == "hard", coef, idx,
                              len(snaps) if snaps is not None else None, gen.seed, backend=impl,
                              chunk=T if not show else max(1, -(-T // PROGRESS_UPDATES)),
                              progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    out = state.view(x.shape).to(x.dtype)
    if traj is None:
        return out, None
    traj = traj.view((len(snaps),) + tuple(x.shape))
    for j, k in enumerate(snaps):
        if k == 0:
            traj[j].copy_(x)
        elif snaps.index(k) != j:  # a repeated index: the kernel wrote its first slot only
            traj[j].copy_(traj[snaps.index(k)])
    return out, traj.to(x.dtype)

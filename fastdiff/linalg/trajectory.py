"""Jacobian ranks along an EDM Heun sampling trajectory (seed 002 Fig. 3)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from fastdiff._args import _check_x
from fastdiff.linalg.jacobian import jacobian_rank
from fastdiff.linalg.molrg_jacobian import molrg_jacobian_rank
from fastdiff.linalg.svd import _check_eta

__all__ = ["TrajectoryRanks", "jacobian_rank_trajectory"]


class TrajectoryRanks(NamedTuple):
    """Ranks along an EDM Heun trajectory (seed 002 Fig. 3): one entry per visited noise level."""
    sigma: torch.Tensor   # (S,) float64, the noise levels visited (decreasing, > 0)
    snr: torch.Tensor     # (S,) 1 / sigma (alpha = 1)
    ranks: torch.Tensor   # (S, B) int64, rank_eta of J = d x0_hat / d x at each point
    ratio: torch.Tensor   # (S,) float64, mean over the batch of rank / n
    x: torch.Tensor       # (B, n) the final sample


def jacobian_rank_trajectory(denoiser, noise, *, schedule=None, eta: float = 0.99, method: str = "dense",
                             chunk: Optional[int] = None, backend: str = "auto", progress: bool = False) -> TrajectoryRanks:
    """Ranks of the denoiser's Jacobian at the points an EDM Heun sampler visits (seed 002 Fig. 3).

    ``noise`` (B, n) standard normal; the sampler starts at ``x = sigma_0 noise`` and runs
    :func:`fastdiff.heun_step` over ``schedule`` (default ``KarrasSchedule(18)``: 18 steps, EDM).
    At every level sigma_i > 0 the rank of ``d x0_hat(x_i, sigma_i) / d x_i`` is taken before
    stepping.  ``denoiser`` is a :class:`fastdiff.denoisers.MoLRG` (closed form,
    :func:`molrg_jacobian_rank`) or any callable ``den(x, alpha, sigma) -> x0_hat``
    (:func:`jacobian_rank` with ``method``).  NumPy noise gives NumPy arrays in the result.
    """
    from fastdiff.denoisers import MoLRG
    from fastdiff.schedules import KarrasSchedule
    from fastdiff.steps import heun_step

    eta = _check_eta(eta)
    is_numpy = isinstance(noise, np.ndarray)
    x = torch.from_numpy(noise) if is_numpy else noise
    x = _check_x(x)
    sched = KarrasSchedule(18) if schedule is None else schedule
    sigmas = [float(s) for s in sched.sigmas] if hasattr(sched, "sigmas") else [float(s) for s in sched]
    if len(sigmas) < 2 or any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise ValueError("schedule: expected at least two finite non-negative noise levels (a KarrasSchedule)")
    x = x * sigmas[0]
    levels, ranks = [], []

    den = denoiser
    steps = range(len(sigmas) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="jacobian ranks", leave=False)
    for i in steps:
        s, s_next = sigmas[i], sigmas[i + 1]
        if s <= 0:
            break
        if isinstance(denoiser, MoLRG):
            r = molrg_jacobian_rank(x, denoiser.bases, 1.0, s, eta=eta, pi=denoiser.pi, tau=denoiser.tau,
                                    delta=denoiser.delta, backend=backend)
        else:
            r = jacobian_rank(lambda z: denoiser(z, 1.0, s), x, eta=eta, method=method, chunk=chunk, backend=backend)
        levels.append(s)
        ranks.append(r.cpu())
        with torch.no_grad():
            x0 = den(x, 1.0, s)
            x_pred = heun_step(x, x0, s, s_next)
            if s_next > 0:
                x = heun_step(x, x0, s, s_next, x_pred=x_pred, model_output_pred=den(x_pred, 1.0, s_next))
            else:
                x = x_pred
    sig = torch.tensor(levels, dtype=torch.float64)
    R = torch.stack(ranks)
    out = TrajectoryRanks(sig, 1.0 / sig, R, R.double().mean(1) / x.shape[1], x)
    if is_numpy:
        out = TrajectoryRanks(*(t.numpy() for t in out))
    return out

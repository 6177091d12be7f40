"""Jacobian ranks along an EDM Heun sampling trajectory (seed 002 Fig. 3)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from fastdiff import dispatch
from fastdiff._args import _check_x
from fastdiff.linalg.jacobian import jacobian_rank
from fastdiff.linalg.molrg_jacobian import molrg_jacobian_rank
from fastdiff._args import check_eta

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

    ``noise`` (B, n) standard normal; the sampler (:func:`fastdiff.sampling.run` over the
    ``"heun"`` :func:`fastdiff.sampling.trajectory_table`) starts at ``x = sigma_0 noise`` and runs
    over ``schedule`` (default ``KarrasSchedule(18)``: 18 steps, EDM; or a 1-D sequence of
    decreasing sigmas, all but the last > 0).  At every level sigma_i > 0 the rank of
    ``d x0_hat(x_i, sigma_i) / d x_i`` is taken before stepping (the loop's per-step callback).
    ``denoiser`` is a :class:`fastdiff.denoisers.MoLRG` (closed form, :func:`molrg_jacobian_rank`,
    in the model's own ``mode``) or any callable ``den(x, alpha, sigma) -> x0_hat``
    (:func:`jacobian_rank` with ``method``).  ``backend``: the rank's SVD.  NumPy noise gives
    NumPy arrays in the result.
    """
    dispatch.check_backend("svd", backend)  # an unknown name is an error on every input, empty ones too
    from fastdiff.denoisers import MoLRG
    from fastdiff.sampling import run, trajectory_table
    from fastdiff.schedules import KarrasSchedule

    eta = check_eta(eta)
    is_numpy = isinstance(noise, np.ndarray)
    x = torch.from_numpy(noise) if is_numpy else noise
    x = _check_x(x)
    table = trajectory_table(KarrasSchedule(18) if schedule is None else schedule, "heun")
    levels, ranks = [], []

    def rank_before_step(info):
        s = info.sigma  # alpha = 1
        if isinstance(denoiser, MoLRG):
            r = molrg_jacobian_rank(info.x, denoiser.bases, 1.0, s, eta=eta, pi=denoiser.pi, tau=denoiser.tau,
                                    delta=denoiser.delta, mode=denoiser.mode, backend=backend)
        else:
            r = jacobian_rank(lambda z: denoiser(z, 1.0, s), info.x, eta=eta, method=method, chunk=chunk,
                              backend=backend)
        levels.append(s)
        ranks.append(r.cpu())

    def no_grad_denoiser(z, alpha, sigma):
        with torch.no_grad():
            return denoiser(z, alpha, sigma)

    x = run(no_grad_denoiser, x * table[0].level[1], table, callback=rank_before_step, progress=progress,
            desc="jacobian ranks")
    sig = torch.tensor(levels, dtype=torch.float64)
    R = torch.stack(ranks)
    out = TrajectoryRanks(sig, 1.0 / sig, R, R.double().mean(1) / x.shape[1], x)
    if is_numpy:
        out = TrajectoryRanks(*(t.numpy() for t in out))
    return out

"""The random numbers of a sweep cell: windows of its counter-based Philox stream (docs/math.md, Sec. 0).

A cell's key ``seed = cell_seed(experiment, sweep seed, params)`` (:mod:`fastdiff.sweeps.runner`)
names one Philox stream; ``stream`` selects a window at offset ``stream << 52`` and ``step`` a
sub-window at ``step << 32`` within it, each drawn trial-major, so trial ``t`` of a cell reads the
same numbers whichever batch, executor or trial count runs it.

The windows of the MoLRG experiments (subspace recovery, and the memorization and Jacobian-rank
experiments that draw the same data) are numbered here, so that no two uses collide;
linear-diffusion and memorization number their own further windows in their modules.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

import fastdiff
from fastdiff.generator import Generator

__all__ = ["normals", "draw_per_cell", "MOLRG_DATA", "LEARNER_INIT", "LEARNER_SGD", "TRAJECTORY_NOISE"]

MOLRG_DATA = 0          # bases, coefficients, labels and noise of the MoLRG data (subspace.molrg_batch)
LEARNER_INIT = 1        # the learners' random starts (learners.fit_bases)
LEARNER_SGD = 2         # the sgd / adam learners' draws, one sub-window per step (alg1.alg1_bases, learners.adam_bases)
TRAJECTORY_NOISE = 3    # the jacobian-rank trajectories' starting noise


def normals(seed: int, stream: int, *shape, step: int = 0, device="cpu") -> torch.Tensor:
    """Normals (float32) from the Philox stream ``(seed, (stream << 52) + step * 2^32)``, drawn
    on ``device`` (the CPU and Triton generators give the same numbers)."""
    gen = Generator(seed, (stream << 52) + (step << 32))
    return fastdiff.randn(*shape, generator=gen, device=device).to(torch.float32)


def draw_per_cell(seeds_per_row: Sequence[Tuple[int, int]], B: int, width: int, draw: Callable) -> torch.Tensor:
    """Rows (B, width) of random numbers, row b from its cell's stream: one ``draw(seed, trials,
    width)`` (trial-major windows) per cell, so a row does not depend on its batch-mates."""
    by_cell: Dict[int, List[Tuple[int, int]]] = {}
    for row, (s, t) in enumerate(seeds_per_row):
        by_cell.setdefault(s, []).append((row, t))
    if len(by_cell) == 1:                        # one cell, its trials in order: the draw itself
        (s, rows), = by_cell.items()
        if [r for r, _ in rows] == list(range(B)) and [t for _, t in rows] == list(range(B)):
            return draw(s, B, width)
    out = None
    for s, rows in by_cell.items():
        z = draw(s, max(t for _, t in rows) + 1, width)
        if out is None:
            out = z.new_empty(B, width)
        dst, src = (torch.tensor(v, device=z.device) for v in zip(*rows))
        out[dst] = z[src]
    return out

"""K-subspaces clustering: Lloyd iterations between assigning each point to the subspace with the
largest projected energy and refitting each subspace's top-d basis (seed 002, Sec. 3.2; docs/math.md)."""
from __future__ import annotations

import torch

from fastdiff.ops.table import CPU, TORCH, Impl, Op

__all__ = ["ROW"]

ROW = Op("ksubspaces", what="K-subspaces", names=("auto", "cpp", "torch"), impls=(
    Impl("cpp", CPU, (torch.float32,), cpp_symbol="ksubspaces", limit="float32"),
    TORCH),
    auto={"cpu": ("cpp",)})

"""Argument checks shared by the public API (validate once, at the boundary; one message per error):
numbers, ``x`` (B, n), per-sample scalars, finiteness, generators.  Ops and launchers assume
checked input."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from fastdiff._interop import check_float_tensor

OUTPUTS = ("x0", "eps", "score")


def check_number(name: str, v, *, lo: float = 0.0, strict: bool = False) -> float:
    """A finite real ``v >= lo`` (``> lo`` if ``strict``) as a float; TypeError / ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if (v <= lo) if strict else (v < lo):
        raise ValueError(f"{name}: expected {name} {'>' if strict else '>='} {lo}, got {v}")
    return float(v)


def _check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, NumPy or CuPy array, got {type(x).__name__}")
    check_float_tensor("x", x)
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (B, n), got {tuple(x.shape)}")
    return x


def _per_sample(name: str, v, B: int, device, *, positive=True, allow_zero=False) -> torch.Tensor:
    """A scalar or (B,) value as a float64 tensor of shape (1,) or (B,), validated."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name}: expected a number or a (B,) tensor, got {type(v).__name__}")
    t = torch.as_tensor(v, dtype=torch.float64).to(device).reshape(-1)
    if t.numel() not in (1, B):
        raise ValueError(f"{name}: expected a scalar or a ({B},) tensor (one per sample), got {t.numel()} values")
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected finite values")
        if positive and not bool((t > 0).all() if not allow_zero else (t >= 0).all()):
            raise ValueError(f"{name}: expected {name} {'>=' if allow_zero else '>'} 0")
    return t


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.device.type == "cpu" and not torch.compiler.is_compiling() \
            and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values (got NaN or Inf)")


def _torch_generator(generator, device) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator(device=device).manual_seed(int(generator))


def check_positive(name: str, v, *, allow_zero=False) -> float:
    """A finite real ``v > 0`` (``>= 0`` with ``allow_zero``) as a float; one ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or \
            (v < 0 if allow_zero else v <= 0):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {v!r}")
    return float(v)


def check_eta(eta) -> float:
    """The energy fraction of a rank, ``0 < eta <= 1`` (seed 002 eq. 12), as a float."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta: expected a number in (0, 1], got {type(eta).__name__}")
    eta = float(eta)
    if not 0.0 < eta <= 1.0:  # NaN fails too
        raise ValueError(f"eta: expected a value in (0, 1], got {eta}")
    return eta


def check_binary(name: str, t) -> torch.Tensor:
    """A real tensor whose entries are all -1 or +1 (the discrete models' data, seed 003); one
    ValueError naming ``name`` otherwise (a {0, 1} tensor is told to map with ``2 x - 1``).  Checked
    on every device (one-time checks of data and initial states: the host sync is worth it; the
    per-step check of a state rides in the flip kernel instead, fastdiff/ops/discrete_langevin.py)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor with entries in {{-1, +1}}, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real tensor with entries in {{-1, +1}}, got dtype {t.dtype}")
    if not torch.compiler.is_compiling():
        bad = (t != 1) & (t != -1)
        if bool(bad.any()):
            v = t[bad].reshape(-1)[0].item()
            hint = " (a {0, 1} tensor maps to {-1, +1} by 2 x - 1)" if bool(((t == 0) | (t == 1)).all()) else ""
            raise ValueError(f"{name}: expected binary entries in {{-1, +1}}, got {v!r}{hint}")
    return t

"""The shape of a dispatch-table row: :class:`Op` (one per op) and :class:`Impl` (one per backend);
and :class:`Launchers`, the shape of an op's table of launchers.

Pure data, so that every ``fastdiff/ops/<op>.py`` can declare its ``ROW`` next to its contract
and :mod:`fastdiff.dispatch` can collect the rows without either importing the other's logic.
"""
from __future__ import annotations

import importlib

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from fastdiff.backends import BACKENDS, KERNEL_DTYPES

__all__ = ["Impl", "Op", "Launchers", "Fits", "ANY_DTYPE", "CPU", "CUDA", "ALL", "TORCH", "fits_always"]

ANY_DTYPE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CPU, CUDA, ALL = ("cpu",), ("cuda",), ("cpu", "cuda")

Fits = Callable[..., Tuple[bool, str]]


def fits_always(**_) -> Tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.  ``fits`` is a hard limit (a forced backend is refused or falls
    back outside it); ``prefer`` an extra condition for ``auto`` only (where it is the faster one)."""
    backend: str
    devices: Tuple[str, ...]                 # device types; Triton also CPU under TRITON_INTERPRET=1 when forced
    dtypes: Tuple[torch.dtype, ...] = KERNEL_DTYPES
    cpp_symbol: Optional[str] = None         # fastdiff._C.<symbol> must exist ("cpp")
    triton_module: Optional[str] = None      # fastdiff.kernels.<module> must import ("triton")
    fits: Fits = fits_always
    prefer: Fits = fits_always
    limit: str = ""


@dataclass(frozen=True)
class Op:
    """An op's table.  ``auto``: preference order per device type (torch / ``fallback`` last).
    ``fallback``: what runs when no kernel does ("torch"; "loop" for the step-by-step sampler loop).
    ``soft``: refusals of a forced backend that fall back instead of raising ("dtype", "fits", or
    "all").  ``names``: the backend names the op accepts.  ``what``: its name in error messages."""
    name: str
    impls: Tuple[Impl, ...]
    auto: Dict[str, Tuple[str, ...]]
    what: str
    fallback: str = "torch"
    soft: Tuple[str, ...] = ()
    names: Tuple[str, ...] = BACKENDS


TORCH = Impl("torch", ALL, ANY_DTYPE, limit="any device, any float dtype")


class Launchers(dict):
    """An op's launchers, ``{backend: launcher}``.  A backend not in the table yet is imported from
    ``paths[backend]`` (``"module:function"``: a backend's code, Triton or CuPy, loads only in a
    process that runs it) and kept; ``ready`` are the launchers that need no import."""

    def __init__(self, op: str, paths: Dict[str, str], **ready: Callable):
        super().__init__(ready)
        self._op, self._paths = op, dict(paths)

    def __missing__(self, backend: str) -> Callable:
        if backend not in self._paths:
            raise ValueError(f"backend: expected a concrete {self._op} backend "
                             f"({', '.join(sorted({*self._paths, *self}))}), got {backend!r}")
        module, name = self._paths[backend].split(":")
        fn = self[backend] = getattr(importlib.import_module(module), name)
        return fn

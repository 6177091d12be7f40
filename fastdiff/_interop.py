"""NumPy and CuPy arrays in, the same kind out (zero-copy: ``torch.from_numpy`` / DLPack)."""
from __future__ import annotations

import functools
import sys

import numpy as np
import torch


def _is_cupy(a) -> bool:
    cp = sys.modules.get("cupy")  # never import cupy ourselves: a user who passes one has imported it
    return cp is not None and isinstance(a, cp.ndarray)


def _to_torch(a):
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a), "numpy"
    if _is_cupy(a):
        return torch.from_dlpack(a), "cupy"
    if isinstance(a, (list, tuple)) and any(isinstance(v, np.ndarray) or _is_cupy(v) for v in a):
        items = [_to_torch(v) for v in a]
        kind = next((k for _, k in items if k), None)
        return type(a)(v for v, _ in items), kind
    return a, None


def _from_torch(r, kind):
    if isinstance(r, torch.Tensor):
        if kind == "numpy":
            return r.numpy()
        if kind == "cupy":
            import cupy

            return cupy.from_dlpack(r)
        return r
    if isinstance(r, tuple):
        return tuple(_from_torch(v, kind) for v in r)
    return r


def accepts_arrays(fn):
    """Decorator: NumPy/CuPy arguments become tensors (sharing memory); tensor results come back
    as the kind of the first array argument.  ``out=`` arrays are written in place."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kind = None
        new_args = []
        for a in args:
            a, k = _to_torch(a)
            kind = kind or k
            new_args.append(a)
        out_array = kwargs.get("out")
        for key, v in list(kwargs.items()):
            v, k = _to_torch(v)
            kind = kind or k
            kwargs[key] = v
        r = fn(*new_args, **kwargs)
        if kind is None:
            return r
        if out_array is not None and isinstance(r, torch.Tensor) and not isinstance(out_array, torch.Tensor):
            return out_array  # the kernel wrote into the array's memory
        return _from_torch(r, kind)

    return wrapper

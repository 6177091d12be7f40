"""NumPy and CuPy arrays in, the same kind out (zero-copy: ``torch.from_numpy`` / DLPack), and the
checks every ``out=`` goes through before a kernel writes into it."""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Iterable, Tuple

import numpy as np
import torch


def _is_cupy(a) -> bool:
    cp = sys.modules.get("cupy")  # never import cupy ourselves: a user who passes one has imported it
    return cp is not None and isinstance(a, cp.ndarray)


def _to_torch(a):
    if isinstance(a, np.ndarray):
        with warnings.catch_warnings():
            # a read-only input is fine: inputs are only read (a read-only out= is refused before this)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a), "numpy"
    if _is_cupy(a):
        return torch.from_dlpack(a), "cupy"
    if isinstance(a, (list, tuple)) and any(isinstance(v, np.ndarray) or _is_cupy(v) for v in a):
        items = [_to_torch(v) for v in a]
        kind = next((k for _, k in items if k), None)
        return type(a)(v for v, _ in items), kind
    return a, None


def _from_torch(r, kind, out_tensor=None, out_array=None):
    if out_tensor is not None and r is out_tensor:
        return out_array  # the result is the caller's own out= object, whatever its kind
    if isinstance(r, torch.Tensor):
        if kind == "numpy":
            return r.numpy()
        if kind == "cupy":
            import cupy

            return cupy.from_dlpack(r)
        return r
    if isinstance(r, tuple):
        vals = (_from_torch(v, kind, out_tensor, out_array) for v in r)
        return type(r)(*vals) if hasattr(r, "_fields") else tuple(vals)  # a NamedTuple keeps its fields
    return r


# what _to_torch may convert (with cupy.ndarray once cupy is imported); anything else passes as is
_CONVERTIBLE = (np.ndarray, list, tuple)


def accepts_arrays(fn):
    """Decorator: NumPy/CuPy arguments become tensors (sharing memory); tensor results come back
    as the kind of the first array argument.  ``out=`` arrays are written in place and returned
    as themselves (a read-only NumPy ``out=`` raises ValueError, as NumPy's own ufuncs do)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cp = sys.modules.get("cupy")
        kinds = _CONVERTIBLE if cp is None else (*_CONVERTIBLE, cp.ndarray)
        for a in args:
            if isinstance(a, kinds):
                break
        else:
            for v in kwargs.values():
                if isinstance(v, kinds):
                    break
            else:  # no array, and no list or tuple that could hold one: nothing to convert (the common call)
                return fn(*args, **kwargs)
        kind = None
        new_args = []
        for a in args:
            a, k = _to_torch(a)
            kind = kind or k
            new_args.append(a)
        out_array = kwargs.get("out")
        if isinstance(out_array, np.ndarray) and not out_array.flags.writeable:
            raise ValueError("out: expected a writeable array, got a read-only NumPy array "
                             "(flags.writeable is False, e.g. a mode='r' memmap)")
        for key, v in list(kwargs.items()):
            v, k = _to_torch(v)
            kind = kind or k
            kwargs[key] = v
        r = fn(*new_args, **kwargs)
        if kind is None:
            return r
        return _from_torch(r, kind, kwargs.get("out"), out_array)

    return wrapper


# --------------------------------------------------------------------------- out= checks
def check_out_writable(out: torch.Tensor, name: str = "out") -> None:
    """Refuse an ``out=`` that torch's own in-place ops refuse: the compiled kernels write through a
    raw pointer, so without this they would write where torch never could.  (Traced code writes
    through the registered op, whose functionalization torch checks itself.)"""
    if torch.compiler.is_compiling():
        return
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name}: an inference tensor can't be written outside torch.inference_mode()")
    if out.requires_grad and out.is_leaf and torch.is_grad_enabled():
        raise ValueError(f"{name}: a leaf tensor that requires grad can't be written in place "
                         "(pass out=None, or write under torch.no_grad())")
    if not out.is_contiguous() and torch._debug_has_internal_overlap(out) == 1:  # contiguous: distinct
        raise ValueError(f"{name}: expected a tensor whose elements have distinct memory, got an "
                         f"expanded (stride-0) view with strides {out.stride()}")


def check_no_partial_overlap(out: torch.Tensor, inputs: Iterable[Tuple[str, torch.Tensor]], name: str = "out") -> None:
    """``out`` may be exactly one of the inputs (``out=x``: every kernel is elementwise) or share no
    memory with them; a partial overlap raises (the kernel would read elements it already wrote).

    Checked, as torch's own ``out=`` ops do, where the kernel writes ``out`` directly: both
    contiguous (a strided ``out`` is written through a private buffer, a strided input is read
    from a contiguous copy), so the byte ranges are exact.  (Every step call runs this: the common
    case, disjoint ranges, costs two comparisons per input.)
    """
    if torch.compiler.is_compiling() or not out.is_contiguous():
        return
    lo = out.data_ptr()
    hi = lo + out.numel() * out.element_size()
    for in_name, t in inputs:
        if t is out:
            continue
        a = t.data_ptr()
        if a >= hi:
            continue
        b = a + t.numel() * t.element_size()
        if b <= lo or (a == lo and b == hi) or not t.is_contiguous() or t.device != out.device:
            continue
        raise ValueError(f"{name}: partially overlaps {in_name} in memory (bytes [{lo}, {hi}) vs [{a}, {b})); "
                         f"pass out={in_name} exactly, or a tensor that shares no memory with it")


# --------------------------------------------------------------------------- input dtypes
FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def check_float_dtype(name: str, dtype) -> None:
    """Real floating point only: an int output would truncate, a complex one drop the imaginary part."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {dtype}")


def check_not_meta(name: str, t: torch.Tensor) -> None:
    if t.is_meta:
        raise ValueError(f"{name}: meta tensors hold no data to compute with; expected a cpu or cuda tensor")


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    """A real floating-point tensor that holds data (not int, complex, bool or meta)."""
    check_float_dtype(name, t.dtype)
    check_not_meta(name, t)


def check_real(name: str, v):
    """A tensor argument holding real numbers (float or integer values; not complex, bool or meta)."""
    if isinstance(v, torch.Tensor):
        check_not_meta(name, v)
        if v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name}: expected a real tensor (floating point or integer), got {v.dtype}")
    return v

"""The MoLRG bases packed side by side, ``Ucat`` (n, D = sum d_k), and the thread-safe cache that
keeps the packing (and :mod:`fastdiff.linalg`'s derived tables) across calls with unmodified tensors."""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch


def pack_bases(bases, n: Optional[int] = None, *, check_orthonormal: bool = False, atol: float = 1e-4):
    """``(Ucat (n, D), dims [d_k])`` from a (K, n, d) tensor or a list of (n, d_k) tensors."""
    if isinstance(bases, torch.Tensor):
        if bases.ndim != 3:
            raise ValueError(f"bases: expected a (K, n, d) tensor or a list of (n, d_k) tensors, got shape {tuple(bases.shape)}")
        mats = list(bases.unbind(0))
    elif isinstance(bases, (list, tuple)):
        mats = list(bases)
        for i, U in enumerate(mats):
            if not isinstance(U, torch.Tensor) or U.ndim != 2:
                raise ValueError(f"bases[{i}]: expected an (n, d_k) tensor, got {getattr(U, 'shape', type(U).__name__)}")
    else:
        raise TypeError(f"bases: expected a (K, n, d) tensor or a list of (n, d_k) tensors, got {type(bases).__name__}")
    if len(mats) == 0:
        raise ValueError("bases: expected at least one component (K >= 1), got K = 0")
    n_b = mats[0].shape[0]
    for i, U in enumerate(mats):
        if U.shape[0] != n_b:
            raise ValueError(f"bases[{i}]: expected {n_b} rows like bases[0], got {U.shape[0]}")
        if U.shape[1] < 1 or U.shape[1] > U.shape[0]:
            raise ValueError(f"bases[{i}]: expected 1 <= d_k <= n = {U.shape[0]}, got d_k = {U.shape[1]}")
        if not U.is_floating_point():
            raise TypeError(f"bases[{i}]: expected a floating-point tensor, got {U.dtype}")
    if n is not None and n_b != n:
        raise ValueError(f"bases: expected n = {n} rows (x has shape (B, {n})), got {n_b}")
    if check_orthonormal:
        for i, U in enumerate(mats):
            G = U.double().T @ U.double()
            err = (G - torch.eye(G.shape[0], dtype=torch.float64, device=G.device)).abs().max().item()
            if not err <= atol:
                raise ValueError(f"bases[{i}]: not orthonormal (max |U^T U - I| = {err:.3g} > {atol})")
    dims = [int(U.shape[1]) for U in mats]
    if isinstance(bases, torch.Tensor):  # one strided copy; its backward is a view (no stack of dU)
        return bases.permute(1, 0, 2).reshape(n_b, -1), dims
    return torch.cat(mats, 1), dims


_PACK_CACHE: dict = {}
_PACK_LOCK = threading.Lock()  # sweeps call the denoisers from worker threads: eviction must not race


def _tensor_key(ts, extra=()):
    """A cache key for the current contents of the tensors ``ts``: identity, storage pointer,
    version counter (bumped by every in-place write, the kernels' included), layout and dtype;
    None for inference tensors (they have no version counter, so an in-place write could not be
    seen: they are never cached) and for torch.func wrappers."""
    if any(t.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts):
        return None  # (functorch wrappers: no storage, and a fresh wrapper every call)
    return tuple((id(t), t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)
                 for t in ts) + tuple(extra)


def cache_get(cache: dict, key, ts):
    """The value cached under ``key`` for the tensors ``ts`` (held by weak reference: a freed
    tensor whose id was reused misses), or None.  Thread-safe (``_PACK_LOCK``)."""
    if key is None:
        return None
    with _PACK_LOCK:
        hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(ts) and all(r() is t for r, t in zip(hit[0], ts)):
        return hit[1]
    return None


def cache_put(cache: dict, key, ts, value, size: int = 16) -> None:
    """Store ``value`` under ``key`` (oldest entries evicted beyond ``size``).  Nothing is stored
    under torch.inference_mode: a value made there is an inference tensor, which a later call
    outside it could not save for backward."""
    if key is None or torch.is_inference_mode_enabled():
        return
    refs = [weakref.ref(t) for t in ts]
    with _PACK_LOCK:
        while len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = (refs, value)


def _packed(bases, n, check_orthonormal):
    """``pack_bases`` with a small cache for repeated calls with the same, unmodified tensors
    (samplers call the denoiser thousands of times with one set of bases): keyed by
    :func:`_tensor_key`, so a freed or modified tensor misses."""
    mats = bases.unbind(0) if isinstance(bases, torch.Tensor) and bases.ndim == 3 else bases
    if (check_orthonormal or not isinstance(mats, (list, tuple)) or torch.is_grad_enabled() and
            any(isinstance(t, torch.Tensor) and t.requires_grad for t in mats) or torch.compiler.is_compiling()):
        return pack_bases(bases, n, check_orthonormal=check_orthonormal)
    src = [bases] if isinstance(bases, torch.Tensor) else list(bases)
    if not all(isinstance(t, torch.Tensor) for t in src):
        return pack_bases(bases, n)
    key = _tensor_key(src)
    hit = cache_get(_PACK_CACHE, key, src)
    if hit is not None:
        ucat, dims = hit
        if n is not None and ucat.shape[0] != n:
            raise ValueError(f"bases: expected n = {n} rows (x has shape (B, {n})), got {ucat.shape[0]}")
        return ucat, dims
    packed = pack_bases(bases, n)
    cache_put(_PACK_CACHE, key, src, packed)
    return packed

"""CUDA C++ backend: ``csrc/cuda/fused_step.cu`` compiled at run time with NVRTC through CuPy.

The source ships as package data of ``fastdiff._csrc``; it is compiled once per device (CuPy
also caches the binary on disk) and launched on torch tensors' pointers, on torch's current
stream, so it orders with surrounding torch work without a sync.  CuPy is imported lazily: this
module imports without it, and :func:`available` says why the backend cannot run.
"""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Tuple

import torch

MAX_INPUTS = 6
THREADS = 256            # threads per block; one thread = one quad of 4 elements
CHUNK = 1 << 30          # elements per launch (int32 local indices); a multiple of 4
_ENTRY = {torch.float32: "fused_step_f32", torch.float16: "fused_step_f16", torch.bfloat16: "fused_step_bf16"}


def source() -> str:
    """The kernel source: the installed package data, else the repository's csrc/."""
    try:
        return (importlib.resources.files("fastdiff._csrc") / "cuda" / "fused_step.cu").read_text()
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return (Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "fused_step.cu").read_text()


def available() -> Tuple[bool, str]:
    """``(works_here, reason)``: CuPy importable, a CUDA device visible to torch, NVRTC loadable, source found."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return False, f"cupy is not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return False, f"cupy {cupy.__version__} installed, but torch sees no CUDA device"
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
        source()
    except Exception as e:
        return False, f"cupy {cupy.__version__}: {type(e).__name__}: {e}"
    return True, f"cupy {cupy.__version__}, NVRTC {major}.{minor}"


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, dtype: torch.dtype):
    """The compiled entry point for ``dtype`` on one device (module compiled once per device)."""
    import cupy

    with cupy.cuda.Device(device_index):
        fn = _module(device_index).get_function(_ENTRY[dtype])
    return fn


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=source(), options=("-std=c++17",))


@functools.lru_cache(maxsize=64)
def _stream(handle: int):
    import cupy

    return cupy.cuda.ExternalStream(handle)


def fused_step(out, ins, coefs, inner, noise_mode, noise, seed, offset, start=0):
    """Same contract as ``fastdiff.kernels.fused_step.fused_step``, on CUDA tensors.

    out: tensor (n,) contiguous; ins: list of 0..6 tensors; coefs: list of k+1 floats or a
    float32 contiguous (R, k+1) tensor; inner: elements per coefficient row; noise_mode 0/1/2;
    noise: tensor or None; seed, offset: ints (offset % 4 == 0 for the Philox stream); ``seed`` an
    int64 (B,) CUDA tensor: per-sample seeds, element ``start + i = b per + j`` from
    ``(seed[b], offset + j)``, ``per = (start + n) // B``, read through its pointer (no sync).
    """
    import cupy
    import numpy as np

    n = out.numel()
    k = len(ins)
    if n == 0:
        return out
    dev = out.device.index if out.device.index is not None else torch.cuda.current_device()
    fn = _kernel(dev, out.dtype)
    es = out.element_size()
    per_sample = isinstance(coefs, torch.Tensor)
    if per_sample:
        cs = [0.0] * 7
        coef_ptr = coefs.data_ptr()
    else:  # inputs' coefficients in c0..c5, the noise coefficient in cz (slot 6)
        cs = [float(c) for c in coefs[:k]] + [0.0] * (MAX_INPUTS - k) + [float(coefs[k]) if noise_mode else 0.0]
        coef_ptr = 0
    ptrs = [t.data_ptr() for t in ins]
    noise_ptr = noise.data_ptr() if noise_mode == 1 else 0
    # vector loads / stores when every streamed pointer is aligned to a quad (4 elements);
    # chunk starts are multiples of CHUNK, so this holds for every chunk alike
    vec = all(p % (4 * es) == 0 for p in [out.data_ptr(), *ptrs] + ([noise_ptr] if noise_mode == 1 else []))
    ptrs += [out.data_ptr()] * (MAX_INPUTS - k)  # unused slots
    if noise_mode != 1:
        noise_ptr = out.data_ptr()
    scalars = [np.float32(c) for c in cs]
    seeds_ptr, per = 0, 0
    if isinstance(seed, torch.Tensor):
        seeds_ptr, per, seed = seed.data_ptr(), (start + n) // seed.numel(), 0
    seed64 = np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    with cupy.cuda.Device(dev), _stream(torch.cuda.current_stream(out.device).cuda_stream):
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            d = s * es
            grid = ((m + 3) // 4 + THREADS - 1) // THREADS
            fn((grid,), (THREADS,), (
                np.uint64(out.data_ptr() + d), *(np.uint64(p + d) for p in ptrs), np.uint64(noise_ptr + d),
                np.uint64(coef_ptr), *scalars, np.int32(m), np.int64(inner), np.int64(start + s), seed64,
                np.int64(offset), np.uint64(seeds_ptr), np.int64(per), np.int32(k), np.int32(noise_mode), np.int32(per_sample), np.int32(vec),
            ))
    return out

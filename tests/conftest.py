"""Shared fixtures: which (backend, device) pairs this machine can test.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set
before any kernel is decorated, hence here, at import).  With a GPU every test also runs on
CUDA with the Triton, CUDA-C++ and torch backends.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdiff import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _pairs():
    pairs = [("torch", "cpu")]
    if backends.available()["cpp"][0]:
        pairs.append(("cpp", "cpu"))
    elif os.environ.get("CI"):
        pairs.append(("cpp", "cpu"))  # in CI a missing build must fail, not skip
    if not HAS_CUDA and backends.available()["triton"][0]:
        pairs.append(("triton", "cpu"))  # interpreter
    if HAS_CUDA:
        pairs += [("torch", "cuda"), ("triton", "cuda")]
        if backends.available()["cuda"][0]:
            pairs.append(("cuda", "cuda"))
    return pairs


BACKEND_DEVICES = _pairs()
KERNEL_BACKEND_DEVICES = [p for p in BACKEND_DEVICES if p[0] != "torch"]


def pytest_generate_tests(metafunc):
    if "backend_device" in metafunc.fixturenames:
        metafunc.parametrize("backend_device", BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
    if "kernel_backend_device" in metafunc.fixturenames:
        metafunc.parametrize("kernel_backend_device", KERNEL_BACKEND_DEVICES,
                             ids=[f"{b}-{d}" for b, d in KERNEL_BACKEND_DEVICES])


def is_interpreter(backend, device):
    return backend == "triton" and device == "cpu"


# float32 compute, output rounded to the dtype: one rounding of the output dominates for halves
# (2^-11 for fp16, 2^-8 for bf16 -> 2 ulps), float32 arithmetic for float32 (a few ulps of the
# largest term; 1e-5 of the output scale is the acceptance bound).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close_scaled(out, ref, dtype, scale=None):
    """|out - ref| <= tol * (|ref| + mean|ref|), elementwise: relative, with the output's scale
    as the floor where terms cancel to near zero."""
    tol = TOLERANCE[dtype]
    ref = ref.double().cpu()
    out = out.double().cpu()
    if scale is None:
        scale = ref.abs().mean().item() if ref.numel() else 0.0
    assert torch.isfinite(out).all() == torch.isfinite(ref).all(), "finite pattern differs"
    err = (out - ref).abs()
    bound = tol * (ref.abs() + scale) + 1e-30
    worst = (err / bound).max().item() if ref.numel() else 0.0
    assert worst <= 1.0, f"max err/bound = {worst:.3g} (max abs err {err.max().item():.3g}, tol {tol})"

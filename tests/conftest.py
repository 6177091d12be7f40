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

from fastdiff import dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def backend_devices(op, torch_=True):
    """The (backend, device) pairs to test ``op`` on, from :data:`fastdiff.dispatch.OPS`: each
    implementation that exists here on each device it runs on (Triton on CPU: the interpreter, only
    without a GPU); ``torch_=False`` leaves out the torch one.  In CI a missing cpp build must fail,
    not skip, so there the C++ implementations are always listed."""
    pairs = []
    for device in ("cpu", "cuda") if HAS_CUDA else ("cpu",):
        for name in ("torch", "cpp", "triton", "cuda"):
            impl = next((i for i in dispatch.OPS[op].impls if i.backend == name), None)
            if impl is None or name == "torch" and not torch_:
                continue
            if device not in impl.devices and not (name == "triton" and not HAS_CUDA):
                continue
            if dispatch.exists(op, name) or name == "cpp" and os.environ.get("CI"):
                pairs.append((name, device))
    return pairs


def _pairs():
    return backend_devices("fused_step")


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


def random_molrg(B, n, dims, gen):
    """A random MoLRG problem in float64, drawn from ``gen`` in this order: orthonormal bases
    U_k (n, d_k) (QR of Gaussians), mixing weights pi (K,) (normalised uniforms + 0.2), scales
    tau (K,) (uniform in [0.5, 1.5)) and points x (B, n) (Gaussian, standard deviation 1.5)."""
    U = [torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0] for d in dims]
    pi = torch.rand(len(dims), generator=gen, dtype=torch.float64) + 0.2
    tau = torch.rand(len(dims), generator=gen, dtype=torch.float64) + 0.5
    x = torch.randn(B, n, generator=gen, dtype=torch.float64) * 1.5
    return U, pi / pi.sum(), tau, x

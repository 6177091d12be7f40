"""The one primitive every step reduces to, on each kernel backend, against float64 NumPy:

    out[i] = sum_{j<k} c[b, j] in_j[i] + c[b, k] z[i],   b = (start + i) // inner

k = 0..6 inputs, no / tensor / Philox noise, scalar or per-sample coefficients, every dtype,
odd sizes; windows whose global index passes 2^31 and 2^34 (the 64-bit row and counter math,
tested on small buffers instead of 8 GB); the Triton/CUDA launchers' chunking.
"""
import numpy as np
import pytest
import torch

from fastdiff.ops import fused_step as fused_step_op
from fastdiff.reference import rng as ref_rng
from conftest import TOLERANCE, is_interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _launch(backend, *args, **kwargs):
    fused_step_op.LAUNCHERS[backend](*args, **kwargs)


def _case(k, noise_mode, per_sample, dtype, device, n, inner, start, seed=1234, offset=8, gen=None):
    gen = gen or torch.Generator().manual_seed(k * 100 + noise_mode * 10 + n)
    ins = [torch.randn(n, generator=gen).to(dtype).to(device) for _ in range(k)]
    noise = torch.randn(n, generator=gen).to(dtype).to(device) if noise_mode == 1 else None
    rows = (start + n - 1) // inner - start // inner + 1
    b0 = start // inner
    if per_sample:
        table = torch.randn(b0 + rows, k + 1, generator=gen)  # rows before b0 exist but are unused
        coefs = table.to(device)
        c = table.double().numpy()[(start + np.arange(n)) // inner]
    else:
        vals = torch.randn(k + 1, generator=gen).tolist()
        coefs = vals
        c = np.tile(np.asarray(vals, dtype=np.float32).astype(np.float64), (n, 1))
    ref = sum(c[:, j] * ins[j].double().cpu().numpy() for j in range(k)) if k else np.zeros(n)
    if noise_mode == 1:
        ref = ref + c[:, k] * noise.double().cpu().numpy()
    elif noise_mode == 2:
        ref = ref + c[:, k] * ref_rng.randn_at(seed, offset + start + np.arange(n, dtype=np.int64)).astype(np.float64)
    return ins, noise, coefs, ref, c


def _check(out, ref, c, ins, noise_mode, dtype):
    got = out.double().cpu().numpy()
    # bound: tol * (|ref| + sum |c_j x_j| + |c_z z|): relative to the terms being summed
    mag = np.abs(ref) + sum(np.abs(c[:, j] * t.double().cpu().numpy()) for j, t in enumerate(ins)) + (np.abs(c[:, -1]) * 5 if noise_mode else 0)
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got)), "unwritten (NaN-poisoned) or non-finite output"
    # plus one subnormal ulp: below finfo.tiny a half's spacing is fixed (2^-24 for float16)
    fi = torch.finfo(dtype)
    assert np.all(err <= TOLERANCE[dtype] * mag + fi.tiny * fi.eps + 1e-30), f"max err {err.max():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise_mode", [0, 1, 2])
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "rows"])
def test_primitive(kernel_backend_device, dtype, noise_mode, per_sample):
    backend, device = kernel_backend_device
    sizes = [1, 3, 4, 5, 1023, 4097] if is_interpreter(backend, device) else [1, 3, 4, 5, 1023, 4097, 100_003]
    for k in range(0, 7):
        if k == 0 and noise_mode != 2:
            continue
        for n in sizes:
            for inner in {1, 3, max(n // 3, 1), n}:
                ins, noise, coefs, ref, c = _case(k, noise_mode, per_sample, dtype, device, n, inner, 0)
                out = torch.full((n,), float("nan"), dtype=dtype, device=device)
                _launch(backend, out, ins, coefs, inner, noise_mode, noise, 1234, 8)
                _check(out, ref, c, ins, noise_mode, dtype)


@pytest.mark.parametrize("start", [2**31 - 8, 2**31 + 4096, 2**32 + 12, 2**34 + 4 * 4099])
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "rows"])
def test_window_past_2_31(kernel_backend_device, start, per_sample):
    """A window of a logical tensor larger than 2^31 elements: rows and Philox counters use the
    global 64-bit index start + i."""
    backend, device = kernel_backend_device
    n, inner = 5000, 2**31 - 1  # a row boundary near 2^31 and 2^32 multiples
    for noise_mode, k in ((2, 2), (1, 3), (0, 6)):
        ins, noise, coefs, ref, c = _case(k, noise_mode, per_sample, torch.float32, device, n, inner, start, seed=99, offset=2**40)
        out = torch.full((n,), float("nan"), device=device)
        _launch(backend, out, ins, coefs, inner, noise_mode, noise, 99, 2**40, start=start)
        _check(out, ref, c, ins, noise_mode, torch.float32)


@pytest.mark.parametrize("module", ["fastdiff.kernels.fused_step", "fastdiff._cuda"])
def test_launcher_chunking(kernel_backend_device, module, monkeypatch):
    """Tensors longer than CHUNK are launched as several windows; results equal one launch."""
    backend, device = kernel_backend_device
    if {"fastdiff.kernels.fused_step": "triton", "fastdiff._cuda": "cuda"}[module] != backend:
        pytest.skip("launcher of another backend")
    import importlib

    mod = importlib.import_module(module)
    chunk = getattr(mod, "BLOCK", 4096)
    monkeypatch.setattr(mod, "CHUNK", chunk)
    n, inner = 3 * chunk + 5, 1000
    for noise_mode in (1, 2):
        ins, noise, coefs, ref, c = _case(2, noise_mode, True, torch.float32, device, n, inner, 0)
        out = torch.full((n,), float("nan"), device=device)
        mod.fused_step(out, ins, coefs, inner, noise_mode, noise, 1234, 8)
        _check(out, ref, c, ins, noise_mode, torch.float32)


def test_triton_block_size_keeps_the_stream(kernel_backend_device, monkeypatch):
    """The heavy float32 paths (Philox with per-row coefficients, per-element per-sample seeds)
    run 512 elements a program (kernels/fused_step.py: registers); the bits do not depend on it:
    equal to the 1024-element launch and to the reference stream (the exact Philox normals)."""
    backend, device = kernel_backend_device
    if backend != "triton":
        pytest.skip("the Triton launcher's block size")
    from fastdiff.kernels import fused_step as tk

    assert tk.block_for(2, True, 0, 4) == tk.HEAVY_BLOCK == 512 and tk.block_for(2, False, 2, 4) == 512
    assert tk.block_for(2, True, 0, 2) == tk.block_for(2, False, 1, 4) == tk.block_for(1, True, 0, 4) == tk.BLOCK
    n = 2 * 1024 + 515
    seeds = torch.tensor([7, 2**40 + 3, 11], device=device)  # n / 3 elements a sample, not a multiple of 4
    for inner, seed in ((1000, 1234), (7, 1234), (n, seeds)):
        ins, _, coefs, _, c = _case(2, 2, True, torch.float32, device, n, inner, 0)
        outs = []
        for block in (512, 1024):
            monkeypatch.setattr(tk, "HEAVY_BLOCK", block)
            out = torch.full((n,), float("nan"), device=device)
            tk.fused_step(out, ins, coefs, inner, 2, None, seed, 8)
            outs.append(out.cpu())
        assert torch.equal(outs[0], outs[1]), inner
        if isinstance(seed, int):  # the noise alone: c_z z_i with z_i the stream's normal at 8 + i
            zero = [torch.zeros_like(t) for t in ins]
            out = torch.full((n,), float("nan"), device=device)
            monkeypatch.setattr(tk, "HEAVY_BLOCK", 512)
            tk.fused_step(out, zero, coefs, inner, 2, None, seed, 8)
            z = torch.from_numpy(ref_rng.randn_at(seed, 8 + np.arange(n, dtype=np.int64)))
            assert torch.equal(out.cpu(), torch.from_numpy(c[:, 2]).float() * z.float()), inner


def test_nan_and_inf_propagate(kernel_backend_device):
    backend, device = kernel_backend_device
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0, 0.5], device=device)
    out = torch.full_like(x, 7.0)
    _launch(backend, out, [x], [2.0, 0.0], 5, 0, None, 0, 0)
    got = out.cpu()
    assert got[0] == 2.0 and torch.isnan(got[1]) and got[2] == float("inf") and got[3] == -4.0


def test_seeds_past_2_63(kernel_backend_device):
    backend, device = kernel_backend_device
    for seed in (2**63 + 5, 2**64 - 1):
        out = torch.full((37,), float("nan"), device=device)
        _launch(backend, out, [], [1.0], 37, 2, None, seed, 0)
        np.testing.assert_allclose(out.cpu().numpy(), ref_rng.randn(seed, 0, 37), rtol=0, atol=5e-6)

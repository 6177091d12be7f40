"""Per-sample seeds: ``fastdiff.Generator(seed=[s_0, ..., s_{B-1}])``.

Element ``j`` of sample ``b`` is ``philox_normal(key = s_b, counter = offset + j)``
(fastdiff/reference/rng.py ``randn_per_sample``), so sample ``b``'s noise is bitwise the same in
any batch, at any position.  Checked on every fused-step backend here (torch form, C++ on its
selected SIMD path and on the portable one, Triton under the interpreter) through ``randn``, the
launchers and the steps, for per-sample sizes that are and are not multiples of 4 (a Philox quad
straddling two samples), plus statistics, reproducibility and the argument errors.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import fastdiff
from fastdiff import backends
from fastdiff.ops import fused_step as fused_step_op
from fastdiff.reference import rng as ref_rng
from conftest import BACKEND_DEVICES, is_interpreter

SEEDS = [3, 2**64 - 5, 7, 2**63, 0, 12345678901234, 11, 2**32 + 1]  # both u64 halves, >= 2**63 included
PERS = [1, 3, 4, 5, 7, 64, 1001]
# the C++ kernels use Cephes float32 log / sincos and the torch form torch's: a few float32 ulp from
# NumPy's (tests/test_rng.py uses the same bound); Triton's interpreter is NumPy itself: exact
REF_ATOL = 5e-6


def _randn(backend, device, seeds, offset, shape):
    g = fastdiff.Generator(seeds, offset)
    out = fastdiff.randn(*shape, generator=g, device=device, backend=backend).cpu()
    return out, g


@pytest.mark.parametrize("per", PERS)
def test_stream_matches_reference_and_single_seed(backend_device, per):
    """(B, per) draws: row b is seed b's own stream, bitwise the backend's single-seed stream and
    equal to the NumPy reference (exactly under the Triton interpreter)."""
    backend, device = backend_device
    seeds, offset = SEEDS[:3], 8
    out, g = _randn(backend, device, seeds, offset, (3, per))
    assert g.offset == offset + ((per + 3) // 4) * 4  # advanced by the per-sample count, whole quads
    ref = ref_rng.randn_per_sample(seeds, offset, per)
    if is_interpreter(backend, device):
        np.testing.assert_array_equal(out.numpy(), ref)
    else:
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=REF_ATOL)
    for b, s in enumerate(seeds):
        single = fastdiff.randn(per, generator=fastdiff.Generator(s, offset), device=device, backend=backend).cpu()
        assert torch.equal(out[b], single), f"sample {b} differs from seed {s}'s stream"


@pytest.mark.parametrize("per", [1, 3, 5, 7, 64, 1001])
def test_sample_independent_of_batch_and_position(backend_device, per):
    """Sample with seed s gives the same bits alone (B = 1), in B = 3 and B = 8, at any position."""
    backend, device = backend_device
    solo = {s: _randn(backend, device, [s], 4, (1, per))[0][0] for s in SEEDS}
    for seeds in (SEEDS[:3], SEEDS, SEEDS[::-1], [SEEDS[5], SEEDS[1], SEEDS[5]]):
        out, _ = _randn(backend, device, seeds, 4, (len(seeds), per))
        for b, s in enumerate(seeds):
            assert torch.equal(out[b], solo[s]), f"seed {s} at position {b} of B = {len(seeds)}"


def test_trailing_shape_is_flattened_per_sample(backend_device):
    """x of shape (B, 3, 5): 15 elements per sample, the sample's stream in row-major order."""
    backend, device = backend_device
    out, _ = _randn(backend, device, SEEDS[:4], 0, (4, 3, 5))
    np.testing.assert_allclose(out.reshape(4, 15).numpy(), ref_rng.randn_per_sample(SEEDS[:4], 0, 15),
                               rtol=0, atol=REF_ATOL)


@pytest.mark.parametrize("per", [5, 4, 1001])
def test_launcher_with_coefficients_and_inputs(kernel_backend_device, per):
    """The fused step itself, out = c0 x + c1 z (scalar and per-row coefficients, fp32 / fp16):
    the kernel's z is the per-sample stream.  Large enough (B per > 2 blocks) to cross the C++
    kernel's 2048-element blocks and the Triton programs mid-sample."""
    backend, device = kernel_backend_device
    B = 7
    n = B * per
    gen = torch.Generator().manual_seed(per)
    x = torch.randn(n, generator=gen)
    rows = torch.randn(B, 2, generator=gen)
    seeds = fastdiff.Generator(SEEDS[:B]).seed_tensor(device)
    z = torch.from_numpy(ref_rng.randn_per_sample(SEEDS[:B], 12, per).reshape(-1)).double()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for coefs, c in (([0.5, -1.5], torch.tensor([[0.5, -1.5]]).double().expand(n, 2)),
                         (rows.to(device), rows.double().repeat_interleave(per, 0))):
            out = torch.full((n,), float("nan"), dtype=dtype, device=device)
            xin = x.to(dtype).to(device)
            fused_step_op.LAUNCHERS[backend](out, [xin], coefs, per, fused_step_op.NOISE_PHILOX, None, seeds, 12)
            ref = c[:, 0] * xin.double().cpu() + c[:, 1] * z
            err = (out.double().cpu() - ref).abs() / (ref.abs() + 1.0)
            assert err.max().item() <= tol, (dtype, err.max().item())


def test_triton_chunked_launch_crosses_samples():
    """The Triton launcher's chunks (CHUNK monkeypatched small) cut samples mid-way: same bits."""
    if not any(b == "triton" for b, _ in BACKEND_DEVICES):
        pytest.skip("triton not testable here")
    from fastdiff.kernels import fused_step as tk

    device = "cpu" if not torch.cuda.is_available() else "cuda"
    full, _ = _randn("triton", device, SEEDS[:3], 0, (3, 1001))
    old = tk.CHUNK
    try:
        tk.CHUNK = 1024  # a multiple of BLOCK: chunks start mid-sample (1001 per sample)
        chunked, _ = _randn("triton", device, SEEDS[:3], 0, (3, 1001))
    finally:
        tk.CHUNK = old
    assert torch.equal(full, chunked)


@pytest.mark.skipif(not backends.available()["cpp"][0], reason="fastdiff._C not built")
def test_cpp_portable_path():
    """The C++ kernel forced onto its portable (non-AVX2) path draws the same per-sample stream."""
    code = (
        "import torch, fastdiff, numpy as np\n"
        "from fastdiff import _C\n"
        "from fastdiff.reference import rng\n"
        "assert _C.simd() == 'sse2'\n"
        f"seeds = {SEEDS[:5]!r}\n"
        "for per in (1, 3, 5, 7, 1001):\n"
        "    out = fastdiff.randn(5, per, generator=fastdiff.Generator(seeds, 4), backend='cpp')\n"
        "    np.testing.assert_allclose(out.numpy(), rng.randn_per_sample(seeds, 4, per), rtol=0, atol=5e-6)\n"
        "    for b, s in enumerate(seeds):\n"
        "        one = fastdiff.randn(per, generator=fastdiff.Generator(s, 4), backend='cpp')\n"
        "        assert torch.equal(out[b], one), (per, b)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTDIFF_CPU_SIMD="sse2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-2000:]


def test_steps_per_sample_noise_independent_of_batch(backend_device):
    """A DDPM step and an Euler-ancestral step with per-sample seeds: sample b's output in a batch
    equals its output alone, and the generator advances by the per-sample count."""
    backend, device = backend_device
    sched = fastdiff.DDPMSchedule()
    gen = torch.Generator().manual_seed(0)
    B, shape = 5, (3, 7)  # 21 per sample: quads straddle samples
    x = torch.randn(B, *shape, generator=gen).to(device)
    eps = torch.randn(B, *shape, generator=gen).to(device)
    t = torch.tensor([10, 500, 999, 1, 250]).to(device)
    seeds = SEEDS[:B]
    g = fastdiff.Generator(seeds)
    full = fastdiff.ddpm_step(x, eps, t, sched, generator=g, backend=backend)
    assert g.offset == 24
    for b in range(B):
        one = fastdiff.ddpm_step(x[b:b + 1], eps[b:b + 1], t[b:b + 1], sched, generator=fastdiff.Generator([seeds[b]]),
                                 backend=backend)
        assert torch.equal(full[b], one[0]), f"sample {b}"
    # the noise is the sample's stream: explicit noise= from the reference gives the same step
    z = torch.from_numpy(ref_rng.randn_per_sample(seeds, 0, 21)).reshape(B, *shape).to(device)
    explicit = fastdiff.ddpm_step(x, eps, t, sched, noise=z, backend=backend)
    torch.testing.assert_close(full, explicit, rtol=0, atol=1e-5)
    # Karras-family step with scalar sigmas
    g2 = fastdiff.Generator(seeds)
    a = fastdiff.euler_ancestral_step(x, eps, 2.0, 1.0, generator=g2, backend=backend)
    b2 = fastdiff.euler_ancestral_step(x[1:2], eps[1:2], 2.0, 1.0, generator=fastdiff.Generator([seeds[1]]),
                                       backend=backend)
    assert torch.equal(a[1], b2[0])


def test_reproducible_and_advancing():
    g1, g2 = fastdiff.Generator([1, 2, 3]), fastdiff.Generator(torch.tensor([1, 2, 3]))
    a1, a2 = fastdiff.randn(3, 10, generator=g1), fastdiff.randn(3, 10, generator=g2)
    assert torch.equal(a1, a2)
    b1 = fastdiff.randn(3, 10, generator=g1)
    assert not torch.equal(a1, b1) and g1.offset == 24  # consecutive draws never reuse noise
    g3 = fastdiff.Generator([1, 2, 3])
    g3.set_state(g1.get_state())
    assert torch.equal(fastdiff.randn(3, 10, generator=g3), fastdiff.randn(3, 10, generator=g1.clone()))
    assert g1.per_sample and not fastdiff.Generator(5).per_sample
    assert repr(fastdiff.Generator([1, 2], 8)) == "fastdiff.Generator(seed=[1, 2], offset=8)"
    g1.manual_seed(9)  # back to one seed
    assert not g1.per_sample and g1.offset == 0


def test_seed_tensor_cached_and_bits():
    g = fastdiff.Generator([5, 2**64 - 1, 2**63])
    t = g.seed_tensor("cpu")
    assert t is g.seed_tensor("cpu")  # made once per device
    assert t.dtype == torch.int64 and t.tolist() == [5, -1, -2**63]  # the u64 bits
    with pytest.raises(ValueError, match="generator: seed_tensor"):
        fastdiff.Generator(5).seed_tensor("cpu")


def test_single_seed_generator_unchanged():
    """Generator(int) keeps its stream bit for bit (pinned values, tests/test_rng.py's)."""
    expected = [0.67530435, -1.888215, -0.8638191, 0.794005, 0.801999, -0.10890599, -0.12663087, 1.3242321]
    out = fastdiff.randn(8, generator=fastdiff.Generator(123), backend="torch")
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    g = fastdiff.Generator(123)
    assert g.seed == 123 and isinstance(g.seed, int)


def test_statistics_close_seeds(kernel_backend_device):
    """B = 64 consecutive seeds, 4096 each: mean / variance within 5 standard errors, KS against
    N(0, 1), and no correlation between samples (max |r| of all pairs under a 5-sigma bound)."""
    backend, device = kernel_backend_device
    B, per = 64, 4096 if not is_interpreter(backend, device) else 1024
    z = _randn(backend, device, list(range(1000, 1000 + B)), 0, (B, per))[0].double().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.reshape(-1), "norm").pvalue > 1e-4
    r = np.corrcoef(z)
    off = np.abs(r[~np.eye(B, dtype=bool)])
    # pairwise r ~ N(0, 1/per); 2016 pairs: 5 sigma is far in the tail for independent streams
    assert off.max() < 5 / math.sqrt(per), off.max()
    # position j across the B samples (same counter, neighbouring keys): means ~ N(0, 1/B); a key
    # that did not reach the output would make these the per-position values themselves
    assert abs(z.mean(axis=0)).max() < 6 / math.sqrt(B)


@pytest.mark.parametrize("seed,exc,match", [
    ([1, -1], ValueError, r"seed\[1\]: expected 0 <= seed\[1\] < 2\*\*64, got -1"),
    ([2**64], ValueError, r"seed\[0\]: expected 0 <= seed\[0\] < 2\*\*64"),
    ([1, 2.5], TypeError, r"seed\[1\]: expected an int, got float"),
    ([1, True], TypeError, r"seed\[1\]: expected an int, got bool"),
    (2.5, TypeError, r"seed: expected an int"),
    ([], ValueError, r"seed: expected at least one"),
    (torch.tensor([1.0, 2.0]), TypeError, r"seed: expected integer seeds, got dtype torch.float32"),
    (torch.tensor([[1, 2]]), ValueError, r"seed: expected an int or a 1-d sequence"),
    (torch.tensor([3, -4]), ValueError, r"seed\[1\]: expected 0 <= seed\[1\] < 2\*\*64, got -4"),
    ("7", TypeError, r"seed: expected an int, a list of ints"),
])
def test_bad_seeds(seed, exc, match):
    with pytest.raises(exc, match=match):
        fastdiff.Generator(seed)
    with pytest.raises(exc, match=match):
        fastdiff.Generator(0).manual_seed(seed)


def test_wrong_batch_length():
    g = fastdiff.Generator([1, 2, 3])
    x = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"generator: expected 4 seeds \(one per sample of x, batch 4\), got 3"):
        fastdiff.ddpm_step(x, x, 10, fastdiff.DDPMSchedule(), generator=g)
    with pytest.raises(ValueError, match=r"generator: expected 4 seeds \(one per sample of shape, batch 4\), got 3"):
        fastdiff.randn(4, 5, generator=g)
    with pytest.raises(ValueError, match=r"shape: per-sample seeds need a shape \(B, \.\.\.\)"):
        fastdiff.randn(generator=g)
    assert g.offset == 0  # nothing drawn by a refused call


def test_sample_loop_and_fused_refusal():
    """fastdiff.sample with a per-sample generator: the loop runs (the fused MoLRG trajectory
    refuses with the reason), and sample b's trajectory is the same alone and in the batch."""
    from conftest import random_molrg

    U, pi, tau, _ = random_molrg(1, 6, [2, 2], torch.Generator().manual_seed(0))
    m = fastdiff.denoisers.MoLRG([u.float() for u in U], pi=pi.float(), tau=tau.float())
    sched = fastdiff.DDPMSchedule(T=20)
    seeds = [4, 9, 2]
    with pytest.raises(ValueError, match="fused: .*per-sample seeds"):
        fastdiff.sample(m, (3, 6), sched, "ddpm", generator=fastdiff.Generator(seeds), fused=True, progress=False)
    full = fastdiff.sample(m, (3, 6), sched, "ddpm", generator=fastdiff.Generator(seeds), progress=False)
    one = fastdiff.sample(m, (1, 6), sched, "ddpm", generator=fastdiff.Generator([seeds[2]]), progress=False)
    assert torch.equal(full[2], one[0])

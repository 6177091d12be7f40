"""Analytic denoisers (SPEC 2) against their float64 references, every backend with a kernel."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import fastdiff
from fastdiff.denoisers import _cache
from fastdiff.ops import molrg as molrg_op
from fastdiff.denoisers.molrg import molrg_params
from fastdiff.reference import denoisers as R
from conftest import backend_devices, random_molrg


MOLRG_BACKENDS = backend_devices("molrg")


def _bases(n, dims, gen, dtype=torch.float64):
    return [torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0].to(dtype) for d in dims]


def _rel_close(out, ref, tol=1e-5):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    assert err <= tol * (ref.abs().max().item() + 1.0), f"max abs err {err:.3g}"


CASES = [  # (B, n, dims)
    (1, 2, [1]), (5, 3, [1, 2]), (33, 48, [8, 8, 8]), (7, 48, [3, 5, 1, 8]), (70, 100, [4] * 8),
    (300, 257, [16, 3, 7]), (9, 64, [2] * 32), (1, 5, [5, 5]),
]


@pytest.mark.parametrize("backend,device", MOLRG_BACKENDS, ids=[f"{b}-{d}" for b, d in MOLRG_BACKENDS])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_molrg_matches_reference(backend, device, case):
    B, n, dims = CASES[case]
    gen = torch.Generator().manual_seed(case)
    U, pi, tau, x64 = random_molrg(B, n, dims, gen)
    K = len(dims)
    x = x64.float().to(device)
    Uf = [u.float().to(device) for u in U]
    labels = torch.randint(0, K, (B,), generator=gen)
    for per_sample in (False, True):
        alpha = (torch.rand(B, generator=gen, dtype=torch.float64) + 0.3) if per_sample else 0.8
        sigma = (torch.rand(B, generator=gen, dtype=torch.float64) + 0.2) if per_sample else 0.6
        for mode in ("soft", "hard"):
            for output in ("x0", "eps", "score"):
                for delta in (0.0, 0.1):
                    kw = dict(pi=pi, tau=tau, delta=delta, mode=mode, output=output)
                    got, w = fastdiff.molrg_denoise(x, Uf, _dev(alpha, device), _dev(sigma, device), return_weights=True,
                                                    backend=backend, **kw)
                    ref, wr = R.molrg_denoise(x.double().cpu(), [u.double().cpu() for u in Uf], alpha, sigma,
                                              return_weights=True, **kw)
                    _rel_close(got, ref)
                    _rel_close(w, wr)
            kw = dict(pi=pi, tau=tau, mode=mode, labels=labels.to(device), guidance=2.5)
            got = fastdiff.molrg_denoise(x, Uf, _dev(alpha, device), _dev(sigma, device), backend=backend, **kw)
            kw["labels"] = labels
            ref = R.molrg_denoise(x.double().cpu(), [u.double().cpu() for u in Uf], alpha, sigma, **kw)
            _rel_close(got, ref)


def _dev(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("backend,device", [p for p in MOLRG_BACKENDS if p[0] != "triton" or p[1] == "cuda"],
                         ids=lambda v: str(v))
def test_molrg_large_shapes(backend, device):
    """n = 3072 (image-sized) and B = 10^5 on the compiled and GEMM paths."""
    gen = torch.Generator().manual_seed(1)
    for B, n, dims in ((64, 3072, [64] * 10), (100_000, 8, [2, 3])):
        U = _bases(n, dims, gen, torch.float32)
        x = torch.randn(B, n, generator=gen)
        got = fastdiff.molrg_denoise(x.to(device), [u.to(device) for u in U], 0.9, 0.7, backend=backend)
        ref = R.molrg_denoise(x.double(), [u.double() for u in U], 0.9, 0.7)
        _rel_close(got, ref)


def test_seed002_and_seed004_special_cases():
    gen = torch.Generator().manual_seed(3)
    n, d, K = 30, 4, 3
    U = _bases(n, [d] * K, gen)
    x = torch.randn(11, n, generator=gen, dtype=torch.float64)
    # seed 002 eq. (8)/(9): x_t = s x_0 + s sigma' eps, delta = 0, tau = 1
    s, sp = 0.7, 0.4
    g = 1 / (2 * s**2 * sp**2 * (1 + sp**2))
    w = torch.softmax(torch.stack([g * ((x @ u) ** 2).sum(1) for u in U], 1), 1)
    expect = 1 / (s * (1 + sp**2)) * sum(w[:, k:k + 1] * (x @ U[k]) @ U[k].T for k in range(K))
    torch.testing.assert_close(fastdiff.molrg_denoise(x, U, s, s * sp), expect, rtol=1e-12, atol=1e-12)
    # seed 004 eq. 7.4.19: x_t = x + t g (alpha = 1, sigma = t): x0 = 1/(1+t^2) sum_k w_k U_k U_k^T x,
    # w = softmax(||U_k^T x||^2 / (2 t^2 (1 + t^2)));  eq. 7.4.20: CFG toward class y with weight w
    t, wg = 0.5, 3.0
    w = torch.softmax(torch.stack([((x @ u) ** 2).sum(1) / (2 * t**2 * (1 + t**2)) for u in U], 1), 1)
    x0 = 1 / (1 + t**2) * sum(w[:, k:k + 1] * (x @ U[k]) @ U[k].T for k in range(K))
    torch.testing.assert_close(fastdiff.molrg_denoise(x, U, 1.0, t), x0, rtol=1e-12, atol=1e-12)
    y = torch.arange(11) % K
    cond = torch.stack([(x[i] @ U[int(y[i])]) @ U[int(y[i])].T for i in range(11)]) / (1 + t**2)
    torch.testing.assert_close(fastdiff.molrg_denoise(x, U, 1.0, t, labels=y, guidance=wg), (1 - wg) * x0 + wg * cond,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", MOLRG_BACKENDS, ids=[f"{b}-{d}" for b, d in MOLRG_BACKENDS])
def test_molrg_extreme_noise_is_finite(backend, device):
    gen = torch.Generator().manual_seed(4)
    U = [u.float().to(device) for u in _bases(24, [3, 5, 2], gen)]
    x = torch.randn(50, 24, generator=gen).to(device) * 3
    for sigma in (1e-4, 1e4):
        for delta in (0.0, 0.05):
            for output in ("x0", "eps", "score"):
                out, w = fastdiff.molrg_denoise(x, U, 1.0, sigma, delta=delta, output=output, return_weights=True,
                                                backend=backend)
                assert torch.isfinite(out).all() and torch.isfinite(w).all(), (sigma, delta, output)
                torch.testing.assert_close(w.sum(1).cpu(), torch.ones(50), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", MOLRG_BACKENDS, ids=[f"{b}-{d}" for b, d in MOLRG_BACKENDS])
def test_molrg_nan_in_nan_out(backend, device):
    U = [u.float().to(device) for u in _bases(6, [2, 2], torch.Generator().manual_seed(0))]
    x = torch.randn(3, 6).to(device)
    x[1, 2] = float("nan")
    for mode in ("soft", "hard"):
        out = fastdiff.molrg_denoise(x, U, 1.0, 0.5, mode=mode, backend=backend).cpu()
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_molrg_gradients_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    U = [u.requires_grad_() for u in _bases(7, [2, 3], gen)]
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    sig = torch.rand(4, generator=gen, dtype=torch.float64) + 0.3
    for output in ("x0", "eps"):
        f = lambda x, u0, u1: fastdiff.molrg_denoise(x, [u0, u1], 0.9, sig, delta=0.1, output=output)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, *U))


def test_molrg_gradients_float32_match_reference_autograd():
    """The diffusion loss E||x0_hat(alpha x0 + sigma eps) - x0||^2 (seed 002 eq. 6) differentiated
    w.r.t. the bases: float32 fastdiff vs float64 reference autograd, 1e-4 relative."""
    gen = torch.Generator().manual_seed(6)
    model = fastdiff.denoisers.MoLRG(_bases(16, [3, 3], gen))
    x0 = model.sample(256, generator=1)
    eps = torch.randn(256, 16, generator=gen, dtype=torch.float64)
    a, s = 0.8, 0.6
    init = _bases(16, [3, 3], torch.Generator().manual_seed(7))

    def loss_grad(fn, dtype):
        U = [u.to(dtype).clone().requires_grad_() for u in init]
        xt = (a * x0 + s * eps).to(dtype)
        loss = ((fn(xt, U, a, s) - x0.to(dtype)) ** 2).sum(1).mean()
        return torch.autograd.grad(loss, U)

    got = loss_grad(lambda *z: fastdiff.molrg_denoise(*z), torch.float32)
    ref = loss_grad(R.molrg_denoise, torch.float64)
    for g, r in zip(got, ref):
        assert (g.double() - r).abs().max() <= 1e-4 * (r.abs().max() + 1e-3)


def test_gaussian_matches_reference_and_eig_reuse():
    gen = torch.Generator().manual_seed(8)
    n = 12
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    cov = A @ A.T / n
    cov[:, 0] = cov[0, :] = 0.0  # singular (rank-deficient) covariance is fine
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.randn(9, n, generator=gen, dtype=torch.float64)
    sig = torch.rand(9, generator=gen, dtype=torch.float64) + 0.1
    ref = R.gaussian_denoise(x, mean, cov, 0.9, sig)
    torch.testing.assert_close(fastdiff.gaussian_denoise(x, mean, cov, 0.9, sig), ref, rtol=1e-10, atol=1e-10)
    g = fastdiff.denoisers.Gaussian(mean, cov)
    _rel_close(g(x.float(), 0.9, sig), ref)


def test_empirical_matches_reference_all_chunkings():
    gen = torch.Generator().manual_seed(9)
    data = torch.randn(257, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(13, 10, generator=gen, dtype=torch.float64)
    sig = torch.rand(13, generator=gen, dtype=torch.float64) * 2 + 0.05
    ref = R.empirical_denoise(x, data, 0.9, sig)
    for chunk in (1, 7, 64, 256, 257, None):
        torch.testing.assert_close(fastdiff.empirical_denoise(x, data, 0.9, sig, chunk=chunk), ref, rtol=1e-10, atol=1e-10)
    _rel_close(fastdiff.empirical_denoise(x.float(), data.float(), 0.9, sig), ref)
    # tiny sigma: the denoiser returns the nearest training point (memorization), no NaN
    near = fastdiff.empirical_denoise(data[:5] * 0.9 + 1e-3, data, 0.9, 1e-4)
    torch.testing.assert_close(near, data[:5], rtol=1e-6, atol=1e-6)


def test_empirical_memory_is_linear_in_B_plus_N():
    """B = 4096, N = 10^5, n = 48: a (B, N) float32 matrix would be 1.6 GB; the measured peak
    growth (max RSS in a fresh process) must stay within a few times the inputs' size."""
    code = """
import resource, torch, fastdiff
torch.manual_seed(0)
B, N, n = 4096, 100_000, 48
data = torch.randn(N, n); x = torch.randn(B, n)
fastdiff.empirical_denoise(x[:8], data[:1000], 1.0, 1.0)  # warm up allocator and kernels
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fastdiff.empirical_denoise(x, data, 1.0, 0.5)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024, (B + N) * n * 4, bool(torch.isfinite(out).all()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    grew, inputs, finite = r.stdout.split()
    assert finite == "True"
    assert int(grew) <= 4 * int(inputs), f"peak grew by {int(grew) / 2**20:.0f} MiB for {int(inputs) / 2**20:.0f} MiB of inputs"


def test_nearest_neighbors_exact_and_chunked():
    gen = torch.Generator().manual_seed(10)
    data = torch.randn(500, 16, generator=gen)
    x = torch.cat([data[:20] + 1e-4 * torch.randn(20, 16, generator=gen), torch.randn(30, 16, generator=gen)])
    d, i = fastdiff.nearest_neighbors(x, data, k=2, chunk=37)
    dr, ir = R.nearest_neighbors(x.double(), data.double(), 2)
    assert torch.equal(i, ir)
    torch.testing.assert_close(d.double(), dr, rtol=1e-5, atol=1e-6)
    assert (d[:20, 0] < 1e-3).all()  # memorized points: the exact recompute keeps tiny distances accurate


def test_molrg_sample_frequencies_and_covariance():
    gen = torch.Generator().manual_seed(11)
    U = _bases(12, [2, 3, 4], gen)
    pi = [0.2, 0.5, 0.3]
    tau = [1.0, 2.0, 0.5]
    m = fastdiff.denoisers.MoLRG(U, pi=pi, tau=tau)
    N = 60_000
    x, y = m.sample(N, generator=12, return_labels=True)
    counts = torch.bincount(y, minlength=3).numpy()
    assert stats.chisquare(counts, np.array(pi) * N).pvalue > 1e-3
    for k in range(3):
        xk = x[y == k]
        assert ((xk - (xk @ U[k]) @ U[k].T).abs().max() < 1e-10)          # on the subspace
        cov = (xk @ U[k]).T @ (xk @ U[k]) / xk.shape[0]                    # tau_k^2 I within sampling error
        se = tau[k] ** 2 * math.sqrt(2 / xk.shape[0])
        assert (cov - tau[k] ** 2 * torch.eye(U[k].shape[1], dtype=torch.float64)).abs().max() < 6 * se


def test_numpy_in_numpy_out():
    U = _bases(8, [2, 2], torch.Generator().manual_seed(0), torch.float32)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    out = fastdiff.molrg_denoise(x, [u.numpy() for u in U], 1.0, 0.5)
    assert isinstance(out, np.ndarray) and out.shape == (5, 8)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, U: fastdiff.molrg_denoise(x, torch.randn(2, 8), 1.0, 0.5), ValueError, r"bases: expected a \(K, n, d\) tensor"),
    (lambda x, U: fastdiff.molrg_denoise(x, [], 1.0, 0.5), ValueError, "K = 0"),
    (lambda x, U: fastdiff.molrg_denoise(x, [torch.randn(8, 9)], 1.0, 0.5), ValueError, r"d_k <= n"),
    (lambda x, U: fastdiff.molrg_denoise(x, [torch.randn(7, 2)], 1.0, 0.5), ValueError, "bases: expected n = 8"),
    (lambda x, U: fastdiff.molrg_denoise(x, [U[0], torch.randn(7, 2)], 1.0, 0.5), ValueError, r"bases\[1\]: expected 8 rows"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.0), ValueError, "sigma: expected sigma > 0"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, -1.0), ValueError, "sigma"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, torch.ones(3)), ValueError, r"sigma: expected a scalar or a \(5,\)"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=[0.5, 0.6]), ValueError, "pi: mixing weights must sum to 1"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=[-0.5, 1.5]), ValueError, "pi: expected finite non-negative"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=[1.0]), ValueError, "pi: expected 2 mixing weights"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, labels=[0, 1, 2, 0, 1], guidance=1.0), ValueError, r"labels: expected values in \[0, 2\)"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, labels=[0, 1, 1, 0, 1]), ValueError, "guidance: required"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, mode="argmax"), ValueError, "mode"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, output="v"), ValueError, "output"),
    (lambda x, U: fastdiff.molrg_denoise(x, [torch.randn(8, 2), U[1]], 1.0, 0.5, check_orthonormal=True), ValueError, r"bases\[0\]: not orthonormal"),
    (lambda x, U: fastdiff.molrg_denoise(x[0], U, 1.0, 0.5), ValueError, r"x: expected shape \(B, n\)"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, tau=[1.0, -1.0]), ValueError, "tau"),
    (lambda x, U: fastdiff.molrg_denoise(x, U, 1.0, 0.5, delta=-0.1), ValueError, "delta"),
    (lambda x, U: fastdiff.empirical_denoise(x, torch.randn(10, 7), 1.0, 0.5), ValueError, "data: expected n = 8"),
    (lambda x, U: fastdiff.empirical_denoise(x, torch.randn(10, 8), 1.0, 0.0), ValueError, "sigma"),
    (lambda x, U: fastdiff.nearest_neighbors(x, torch.randn(3, 8), k=4), ValueError, r"k: expected an int in \[1, N = 3\]"),
    (lambda x, U: fastdiff.gaussian_denoise(x, torch.zeros(8), -torch.eye(8), 1.0, 0.5), ValueError, "positive semi-definite"),
    (lambda x, U: fastdiff.gaussian_denoise(x, torch.zeros(7), torch.eye(8), 1.0, 0.5), ValueError, "mean: expected 8"),
])
def test_bad_input(call, exc, match):
    U = _bases(8, [2, 2], torch.Generator().manual_seed(0), torch.float32)
    x = torch.randn(5, 8)
    with pytest.raises(exc, match=match):
        call(x, U)


def test_packed_bases_cache_sees_in_place_changes():
    """Repeated calls reuse the packed bases; modifying them in place must not return stale results."""
    gen = torch.Generator().manual_seed(13)
    U = torch.stack(_bases(10, [3, 3], gen, torch.float32))
    x = torch.randn(6, 10, generator=gen)
    pi = [0.1, 0.9]
    first = fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=pi)
    again = fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=pi)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    U.copy_(U.flip(0))  # swap the components in place
    swapped = fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=pi)
    ref = R.molrg_denoise(x.double(), [u.double() for u in U], 1.0, 0.5, pi=pi)
    _rel_close(swapped, ref)
    assert not torch.allclose(swapped, first)


@pytest.mark.parametrize("backend,device", MOLRG_BACKENDS, ids=[f"{b}-{d}" for b, d in MOLRG_BACKENDS])
@pytest.mark.parametrize("opts", [
    dict(), dict(mode="hard"), dict(output="eps", delta=0.1), dict(output="score", tau=[0.5, 2.0, 1.0]),
    dict(labels=[0, 2, 1, 1, 0, 2], guidance=1.7), dict(pi=[0.1, 0.3, 0.6], delta=0.05, output="eps"),
], ids=["soft", "hard", "eps-delta", "score-tau", "cfg", "pi-delta-eps"])
def test_molrg_backward_every_option(backend, device, opts):
    """The hand-derived backward (fused forward of each backend) against float64 autograd of the
    reference, for x and ragged bases; float32 gradients within 1e-4 relative."""
    gen = torch.Generator().manual_seed(14)
    U64 = _bases(9, [2, 3, 1], gen)
    x64 = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    sig = torch.rand(6, generator=gen, dtype=torch.float64) + 0.3
    G = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    kw = dict(opts)
    if "labels" in kw:
        kw["labels"] = torch.tensor(kw["labels"])

    def grads(fn, dtype, dev, **extra):
        U = [u.to(dtype).to(dev).requires_grad_() for u in U64]
        x = x64.to(dtype).to(dev).requires_grad_()
        k2 = dict(kw, **extra)
        if "labels" in k2:
            k2["labels"] = k2["labels"].to(dev)
        out = fn(x, U, 0.9, sig.to(dev), **k2)
        return torch.autograd.grad((out * G.to(dtype).to(dev)).sum(), [x, *U])

    got = grads(fastdiff.molrg_denoise, torch.float32, device, backend=backend)
    ref = grads(R.molrg_denoise, torch.float64, "cpu")
    for a, b in zip(got, ref):
        assert (a.double().cpu() - b).abs().max() <= 1e-4 * (b.abs().max() + 1e-3)


TRITON_DEVICES = [d for b, d in MOLRG_BACKENDS if b == "triton"]


@pytest.mark.skipif(not TRITON_DEVICES, reason="no Triton (neither CUDA nor the interpreter)")
@pytest.mark.parametrize("case", [(1, 2, [1], {}), (37, 70, [3, 5, 1], {}), (40, 129, [16, 7], {"mode": "hard"}),
                                  (17, 33, [2, 2, 2], {"cfg": True}), (5, 9, [1] * 17, {})],
                         ids=["tiny", "ragged", "hard-2tiles", "cfg", "K17"])
def test_molrg_triton_backward_kernel_writes_everything(case):
    """The Triton backward kernel on its own: NaN-poisoned dx / q / dP buffers, row counts that are
    not multiples of the row block, n spanning several column tiles; against the float64
    reference's autograd (float32 gradients within 1e-4 relative, as the other backends)."""
    from fastdiff.kernels.molrg import molrg_backward

    B, n, dims, opts = case
    device = TRITON_DEVICES[0]
    gen = torch.Generator().manual_seed(15)
    U64 = _bases(n, dims, gen)
    x64 = torch.randn(B, n, generator=gen, dtype=torch.float64)
    G64 = torch.randn(B, n, generator=gen, dtype=torch.float64)
    sig = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2
    kw = {"mode": opts.get("mode", "soft")}
    labels = None
    if opts.get("cfg"):
        labels = torch.randint(0, len(dims), (B,), generator=gen)
        kw.update(labels=labels, guidance=1.5)
    ucat, _ = _cache._packed([u.float().to(device) for u in U64], n, False)
    params = molrg_params(0.9, sig.to(device), dims, None, None, 0.0, "x0", kw.get("guidance"), B, device)
    x = x64.float().to(device)
    _, w = fastdiff.molrg_denoise(x, [u.float().to(device) for u in U64], 0.9, sig.to(device),
                                  return_weights=True, backend="triton",
                                  **dict(kw, labels=None if labels is None else labels.to(device)))
    D = sum(dims)
    poison = dict(dx=torch.full((B, n), float("nan"), device=device),
                  q=torch.full((B, D), float("nan"), device=device), dP=torch.full((B, D), float("nan"), device=device))
    dx, dU = molrg_backward(x, G64.float().to(device), ucat, molrg_op.segments(dims, device), len(dims),
                            params.float().contiguous(), None if labels is None else labels.to(device),
                            kw["mode"] == "hard", w.contiguous(), **poison)
    U = [u.clone().requires_grad_() for u in U64]
    xr = x64.clone().requires_grad_()
    out = R.molrg_denoise(xr, U, 0.9, sig, **kw)
    ref = torch.autograd.grad((out * G64).sum(), [xr, *U])
    got = [dx] + list(torch.split(dU, dims, dim=1))
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert (a.double().cpu() - b).abs().max() <= 1e-4 * (b.abs().max() + 1e-3)


# --------------------------------------------------------------------------- the CPU GEMM helper
@pytest.mark.parametrize("shape", [(1, 3, 2), (300, 3072, 7), (257, 129, 640), (4096, 48, 24)], ids=str)
def test_backends_mm_matches_float64_every_layout(shape):
    """``backends.mm`` (oneDNN above ONEDNN_MIN_MACS, torch below) equals the float64 product to
    float32 rounding for row- and column-major ``b``; strided ``a`` and float64 go to torch."""
    from fastdiff import backends

    M, K, N = shape
    gen = torch.Generator().manual_seed(30)
    a = torch.randn(M, K, generator=gen)
    b = torch.randn(K, N, generator=gen)
    ref = a.double() @ b.double()
    bound = 1e-5 * (a.abs().double() @ b.abs().double()).max()  # float32 summation error, K terms
    for bb in (b, b.T.contiguous().T):
        assert (backends.mm(a, bb).double() - ref).abs().max() <= bound
    assert (backends.mm(a.T.contiguous().T, b).double() - ref).abs().max() <= bound
    torch.testing.assert_close(backends.mm(a.double(), b.double()), ref, rtol=1e-12, atol=1e-12)
    ag = a.clone().requires_grad_()
    out = backends.mm(ag, b)
    assert out.requires_grad  # autograd-tracked operands take torch's differentiable path
    out.sum().backward()
    torch.testing.assert_close(ag.grad, b.sum(1).expand(M, K))


def test_molrg_large_gradients_and_empirical_on_the_library_gemm():
    """Sizes past ONEDNN_MIN_MACS: the GEMM form's forward and backward and the empirical
    denoiser's streamed products, float32 against float64 references (1e-5 / 1e-4 relative)."""
    from fastdiff import backends

    gen = torch.Generator().manual_seed(31)
    dims = [48, 40, 40]
    B, n = 300, 400
    assert B * n * sum(dims) >= backends.ONEDNN_MIN_MACS
    U64 = _bases(n, dims, gen)
    x64 = torch.randn(B, n, generator=gen, dtype=torch.float64) * 0.3
    sig = torch.rand(B, generator=gen, dtype=torch.float64) + 0.3
    G = torch.randn(B, n, generator=gen, dtype=torch.float64)
    for kw in (dict(), dict(output="eps", delta=0.1, pi=[0.2, 0.3, 0.5]), dict(output="score", sigma=0.7)):
        kw = dict(kw)
        s = kw.pop("sigma", sig)

        def grads(fn, dtype, **extra):
            U = [u.to(dtype).requires_grad_() for u in U64]
            x = x64.to(dtype).requires_grad_()
            out = fn(x, U, 0.9, s, **kw, **extra)
            return (out, *torch.autograd.grad((out * G.to(dtype)).sum(), [x, *U]))

        got = grads(fastdiff.molrg_denoise, torch.float32, backend="torch")
        ref = grads(R.molrg_denoise, torch.float64)
        _rel_close(got[0], ref[0])
        _rel_close(fastdiff.molrg_denoise(x64.float(), [u.float() for u in U64], 0.9, s, backend="torch", **kw), ref[0])
        for a, b in zip(got[1:], ref[1:]):
            assert (a.double() - b).abs().max() <= 1e-4 * (b.abs().max() + 1e-3)
    data = torch.randn(5000, 100, generator=gen, dtype=torch.float64)
    x = torch.randn(64, 100, generator=gen, dtype=torch.float64)
    _rel_close(fastdiff.empirical_denoise(x.float(), data.float(), 0.9, sig[:64] + 2), R.empirical_denoise(x, data, 0.9, sig[:64] + 2))


@pytest.mark.skipif(not molrg_op.has_cpp_mix(), reason="fastdiff._C without molrg_mix")
@pytest.mark.parametrize("opts", [dict(), dict(hard=True), dict(labels=True), dict(per_sample=True), dict(labels=True, hard=True)],
                         ids=["soft", "hard", "cfg", "per-sample", "cfg-hard"])
@pytest.mark.parametrize("B,dims", [(1, [1]), (130, [3, 5, 1]), (67, [16] * 9)], ids=str)
def test_cpp_mix_matches_torch_ops_and_writes_everything(B, dims, opts, monkeypatch):
    """The C++ per-row mix between the library GEMMs (forward: q and w; backward: dq -> dP and q)
    against the same math as torch ops, float64; NaN-poisoned outputs must be overwritten."""
    from fastdiff import _C

    gen = torch.Generator().manual_seed(32)
    K, D = len(dims), sum(dims)
    n = D + 3
    ucat = torch.cat(_bases(n, dims, gen), 1)
    x = torch.randn(B, n, generator=gen, dtype=torch.float64)
    G = torch.randn(B, n, generator=gen, dtype=torch.float64)
    sig = torch.rand(B, generator=gen, dtype=torch.float64) + 0.3 if opts.get("per_sample") else 0.6
    labels = torch.randint(0, K, (B,), generator=gen) if opts.get("labels") else None
    params = molrg_params(0.9, sig, dims, [1.0 / K] * K, None, 0.1, "eps", 1.5 if labels is not None else None,
                                  B, x.device)
    hard = bool(opts.get("hard"))
    _, w_ref, P = molrg_op.forward_torch(x, ucat, dims, params, labels, hard, True, keep_p=True)
    q_ref = P * molrg_op.segment_ops(dims, x.device)[1](
        (w_ref if labels is None else (1 - params[:, -1:]) * w_ref + params[:, -1:] * torch.nn.functional.one_hot(labels, K))
        * params[:, 2 * K:3 * K])
    dx_ref, dU_ref = molrg_op.backward("torch", x, ucat, params, w_ref, labels, G, dims, hard, P)

    p32 = params.float().contiguous()
    P32 = P.float()
    q = torch.full((B, D), float("nan"))
    w = torch.full((B, K), float("nan"))
    lab = labels.data_ptr() if labels is not None else 0
    _C.molrg_mix(P32.data_ptr(), q.data_ptr(), w.data_ptr(), B, molrg_op.offsets(dims), p32.data_ptr(), p32.shape[0], lab, hard)
    _rel_close(w, w_ref)
    _rel_close(q, q_ref)
    dq = (G @ ucat).float()
    q2 = torch.full((B, D), float("nan"))
    _C.molrg_mix_backward(P32.data_ptr(), dq.data_ptr(), w.data_ptr(), q2.data_ptr(), B, molrg_op.offsets(dims), p32.data_ptr(),
                          p32.shape[0], lab, hard)
    _rel_close(q2, q_ref)
    # dP, through the float32 path end to end: the GEMM form with the C++ mix (float32) vs float64 torch ops
    dx, dU = molrg_op.backward("torch", x.float(), ucat.float(), params.float(), w, labels, G.float(), dims, hard, P32)
    _rel_close(dx, dx_ref, 1e-4)
    _rel_close(dU, dU_ref, 1e-4)
    with pytest.raises(ValueError, match="molrg_mix: offsets must be strictly increasing"):
        _C.molrg_mix(P32.data_ptr(), q.data_ptr(), 0, B, [0, 2, 2], p32.data_ptr(), 1, 0, hard)

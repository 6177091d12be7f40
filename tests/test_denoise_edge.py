"""Denoiser edge cases of issue 13: torch.func transforms of MoLRG (the README's lanczos line),
exact nearest neighbours far from the origin, the packed-bases cache under threads and in-place
writes, torch.inference_mode, low-rank float32 covariances, per-sample guidance, K > 1024."""
import threading
import time

import pytest
import torch

import fastdiff
from fastdiff import dispatch
from fastdiff.denoisers import _cache
from fastdiff.reference import denoisers as R
from fastdiff.reference import linalg as RL
from conftest import assert_close_scaled


def _qr_bases(K, n, d, gen, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(K, n, d, generator=gen, dtype=torch.float64))[0].to(dtype)


# --------------------------------------------------------------------------- item 8
def test_jacobian_rank_lanczos_molrg_readme_line():
    """``jacobian_rank(den, x, alpha, sigma, method="lanczos")`` on a MoLRG (README) failed with
    functorch's setup_context error; it must match the rank of the dense float64 Jacobian."""
    gen = torch.Generator().manual_seed(8)
    K, n, d, B = 4, 24, 3, 6
    bases = _qr_bases(K, n, d, gen)
    den = fastdiff.denoisers.MoLRG(bases)
    # points between subspaces at a moderate noise level: the soft weights mix, ranks differ
    x = torch.randn(B, n, generator=gen) * 0.6 + (bases[0] @ torch.randn(d, B, generator=gen)).T * 2
    for alpha, sigma in ((1.0, 0.3), (1.0, 1.5)):
        rank = fastdiff.jacobian_rank(den, x, alpha, sigma, method="lanczos")
        J = RL.molrg_jacobian(x.double(), list(bases.double().unbind(0)), alpha, sigma)
        want = RL.svdvals_rank(J, 0.99)[1]
        assert torch.equal(rank.cpu(), want.cpu()), (rank, want)
        dense = fastdiff.jacobian_rank(den, x, alpha, sigma, method="dense")
        assert torch.equal(dense.cpu(), want.cpu())


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
def test_molrg_under_torch_func(backend):
    """jvp, vjp and vmap of molrg_denoise agree with the float64 Jacobian (plain-torch route)."""
    if backend == "cpp" and not dispatch.exists("molrg", "cpp"):
        pytest.skip("no C++ MoLRG kernel")
    gen = torch.Generator().manual_seed(9)
    K, n, d, B = 3, 16, 2, 5
    bases = _qr_bases(K, n, d, gen)
    x = torch.randn(B, n, generator=gen)
    v = torch.randn(B, n, generator=gen)
    f = lambda z: fastdiff.molrg_denoise(z, bases, 0.9, 0.5, backend=backend)  # noqa: E731
    J = RL.molrg_jacobian(x.double(), list(bases.double().unbind(0)), 0.9, 0.5)   # (B, n, n)
    out, jv = torch.func.jvp(f, (x,), (v,))
    assert_close_scaled(jv, torch.einsum("bij,bj->bi", J, v.double()), torch.float32)
    _, vjp_fn = torch.func.vjp(f, x)
    assert_close_scaled(vjp_fn(v)[0], torch.einsum("bij,bi->bj", J, v.double()), torch.float32)
    batched = torch.func.vmap(f)(torch.stack([x, v]))
    assert_close_scaled(batched[1], R.molrg_denoise(v.double(), list(bases.double().unbind(0)), 0.9, 0.5), torch.float32)
    # transforms over the bases (functorch wrappers have no storage: never a cache key)
    h = lambda U: fastdiff.molrg_denoise(x, U, 0.9, 0.5, backend=backend)  # noqa: E731
    g = torch.func.grad(lambda U: h(U).sum())(bases)
    U64 = bases.double().requires_grad_()
    R.molrg_denoise(x.double(), list(U64.unbind(0)), 0.9, 0.5).sum().backward()
    assert (g.double() - U64.grad).abs().max().item() <= 1e-4 * (U64.grad.abs().max().item() + 1)
    both = torch.func.vmap(h)(torch.stack([bases, bases.flip(0)]))
    assert_close_scaled(both[1], R.molrg_denoise(x.double(), list(bases.flip(0).double().unbind(0)), 0.9, 0.5),
                        torch.float32)


# --------------------------------------------------------------------------- item 5
def _brute_nearest(x, data, k):
    """float64 differences (torch.cdist expands ||x||^2 - 2 x.y + ||y||^2 too, in float64: at
    |y| ~ 1e6 that is ~1e-2 off at distance 0)."""
    d2 = ((x.double()[:, None, :] - data.double()[None]) ** 2).sum(-1)
    v, i = torch.topk(d2, k, dim=1, largest=False)
    return v.sqrt(), i


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
def test_nearest_neighbors_far_from_origin(offset):
    """Data at |y| ~ offset with spread 1: the float32 ``||y||^2 - 2 x.y`` candidates were wrong
    for every row at 1e4 (the exact re-rank only sees 2k + 2 of them)."""
    gen = torch.Generator().manual_seed(5)
    N, n, B = 2000, 16, 40
    data = (torch.randn(N, n, generator=gen, dtype=torch.float64) + offset).float()
    queries = [(data[:B].double() + 0.3 * torch.randn(B, n, generator=gen, dtype=torch.float64)).float(),
               data[B:2 * B].clone(),                                  # memorized: distance 0
               torch.randn(B, n, generator=gen)]                       # far from every point
    for x in queries:
        for chunk in (None, 300):
            d, i = fastdiff.nearest_neighbors(x, data, 3, chunk=chunk)
            dr, ir = _brute_nearest(x, data, 3)
            assert torch.equal(i, ir), f"{(i != ir).any(1).sum().item()} rows with wrong neighbours"
            assert torch.allclose(d.double(), dr, rtol=1e-6, atol=1e-30)


def test_nearest_neighbors_nan_training_row_far_from_origin():
    """A NaN training row must not poison the centring of the others (nor be anyone's neighbour)."""
    gen = torch.Generator().manual_seed(55)
    data = torch.randn(500, 8, generator=gen) + 1e4
    data[7] = float("nan")
    x = data[10:30] + 0.1 * torch.randn(20, 8, generator=gen)
    d, i = fastdiff.nearest_neighbors(x, data, 2)
    clean = torch.cat([data[:7], torch.full((1, 8), 1e30), data[8:]])
    dr, ir = _brute_nearest(x, clean, 2)
    assert torch.equal(i, ir) and torch.allclose(d.double(), dr, rtol=1e-6)


def test_nearest_neighbors_ties_fall_back_exact():
    """A tie band wider than the candidate set: the rows failing the bound are brute-forced."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(1, 8, generator=gen) + 1e3
    data = torch.cat([base.expand(50, 8), base + 5.0, base - 0.25])    # 50 identical points, then two more
    x = base - 0.3
    d, i = fastdiff.nearest_neighbors(x, data, 2)
    dr, ir = _brute_nearest(x, data, 2)
    assert i[0, 0].item() == 51 and torch.allclose(d.double(), dr, rtol=1e-6)


# --------------------------------------------------------------------------- item 7
class _SlowEvictDict(dict):
    """Widens the window between picking the oldest key and evicting it, as a busy worker
    thread would: an unlocked check-then-pop raises KeyError in the second thread."""

    def pop(self, *args):
        time.sleep(2e-4)
        return super().pop(*args)


def test_packed_bases_cache_thread_safe(monkeypatch):
    """The memorization sweep's worker threads raced on the cache eviction (KeyError)."""
    monkeypatch.setattr(_cache, "_PACK_CACHE", _SlowEvictDict())
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, generator=gen)
    bases = [_qr_bases(2, 8, 2, gen) for _ in range(40)]
    refs = [R.molrg_denoise(x.double(), list(b.double().unbind(0)), 1.0, 0.5) for b in bases]
    errors = []

    def work(t):
        try:
            for r in range(60):
                i = (7 * t + r) % len(bases)
                out = fastdiff.molrg_denoise(x, bases[i], 1.0, 0.5, backend="torch")
                if not torch.allclose(out.double(), refs[i], atol=1e-5):
                    errors.append(f"thread {t}: wrong result for bases {i}")
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"thread {t}: {e!r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(_cache._PACK_CACHE) <= 16


def test_packed_bases_cache_not_stale_after_version_bump():
    """Kernel writes bump _version without a torch op: the cache must see the bump."""
    gen = torch.Generator().manual_seed(17)
    U = _qr_bases(2, 10, 3, gen).contiguous()
    x = torch.randn(4, 10, generator=gen)
    fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=[0.2, 0.8])
    new = U.flip(0).clone()
    U.view(-1).numpy()[:] = new.view(-1).numpy()    # a raw write, as a kernel's out= would do ...
    torch.autograd.graph.increment_version(U)      # ... followed by the version bump
    got = fastdiff.molrg_denoise(x, U, 1.0, 0.5, pi=[0.2, 0.8])
    assert_close_scaled(got, R.molrg_denoise(x.double(), list(new.double().unbind(0)), 1.0, 0.5, pi=[0.2, 0.8]),
                        torch.float32)


def _kernel_backends():
    out = ["torch", "auto"]
    out += [b for b in ("cpp", "triton") if dispatch.exists("molrg", b) and not (b == "triton" and torch.cuda.is_available())]
    return out


@pytest.mark.parametrize("backend", _kernel_backends())
def test_molrg_under_inference_mode(backend):
    """Inference tensors have no version counter: every MoLRG call failed in the cache key."""
    gen = torch.Generator().manual_seed(71)
    x0 = torch.randn(5, 12, generator=gen)
    U0 = _qr_bases(3, 12, 2, gen)
    want = R.molrg_denoise(x0.double(), list(U0.double().unbind(0)), 0.9, 0.4)
    with torch.inference_mode():
        x, U = x0.clone(), U0.clone()                 # inference tensors
        for bases in (U, list(U.unbind(0)), U0):
            got = fastdiff.molrg_denoise(x, bases, 0.9, 0.4, backend=backend)
            assert_close_scaled(got, want, torch.float32)
        U.copy_(U.flip(0))                            # in place, no version counter: not served stale
        assert_close_scaled(fastdiff.molrg_denoise(x, U, 0.9, 0.4, backend=backend),
                            R.molrg_denoise(x0.double(), list(U0.flip(0).double().unbind(0)), 0.9, 0.4), torch.float32)
        r = fastdiff.molrg_jacobian_rank(x, U, 0.9, 0.4)
        assert r.shape == (5,)
    # nothing made under inference mode is served afterwards (it could not be saved for backward)
    xg = x0.clone().requires_grad_()
    fastdiff.molrg_denoise(xg, U0, 0.9, 0.4, backend=backend).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def _low_rank_cov32(gen, N=8, n=32, r=4):
    X = torch.randn(N, r, generator=gen) @ torch.linalg.qr(torch.randn(n, r, generator=gen))[0].T * 3
    return X, torch.cov(X.T, correction=0)          # float32, rank <= r: eigenvalues ~ -1e-7 appear


def test_gaussian_accepts_float32_low_rank_covariance():
    """The memorization sweep's ``linear`` denoiser (Gaussian fitted to N < n float32 samples)
    failed every cell on the PSD check: float32 rounding leaves eigenvalues near -1e-7."""
    gen = torch.Generator().manual_seed(12)
    X, cov = _low_rank_cov32(gen)
    assert torch.linalg.eigvalsh(cov.double()).min() < -1e-10 * torch.linalg.eigvalsh(cov.double()).max()
    g = fastdiff.denoisers.Gaussian(X.mean(0), cov)
    assert (g.eigenvalues >= 0).all()
    x = torch.randn(5, 32, generator=gen)
    lam, V = torch.linalg.eigh(cov.double())
    cov_psd = (V * lam.clamp(min=0)) @ V.T              # the same matrix with its rounding zeros at 0
    want = R.gaussian_denoise(x.double(), X.mean(0).double(), cov_psd, 0.8, 0.5)
    assert_close_scaled(g(x, 0.8, 0.5), want, torch.float32)
    assert_close_scaled(fastdiff.gaussian_denoise(x, X.mean(0), cov, 0.8, 0.5), want, torch.float32)


@pytest.mark.parametrize("make", [lambda n: -torch.eye(n), lambda n: torch.diag(torch.linspace(-0.01, 1.0, n)),
                                  lambda n: torch.diag(torch.tensor([1.0] + [0.0] * (n - 2) + [-1e-4]))],
                         ids=["negdef", "indefinite", "small-negative"])
def test_gaussian_rejects_indefinite_covariance(make):
    cov = make(16)
    with pytest.raises(ValueError, match="cov: expected a positive semi-definite"):
        fastdiff.gaussian_denoise(torch.randn(2, 16), torch.zeros(16), cov, 1.0, 0.5)
    with pytest.raises(ValueError, match="cov: expected a positive semi-definite"):
        fastdiff.denoisers.Gaussian(torch.zeros(16), cov)


# --------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gaussian_rejects_non_finite_mean_and_cov(bad):
    n = 6
    cov, mean = torch.eye(n), torch.zeros(n)
    cov_bad = cov.clone()
    cov_bad[1, 2] = cov_bad[2, 1] = bad
    mean_bad = mean.clone()
    mean_bad[3] = bad
    x = torch.randn(2, n)
    for call in (lambda m, c: fastdiff.gaussian_denoise(x, m, c, 1.0, 0.5),
                 lambda m, c: fastdiff.denoisers.Gaussian(m, c)):
        with pytest.raises(ValueError, match="cov: expected finite"):
            call(mean, cov_bad)
        with pytest.raises(ValueError, match="mean: expected finite"):
            call(mean_bad, cov)
    lam, V = torch.linalg.eigh(cov)
    with pytest.raises(ValueError, match="eig: expected finite"):
        fastdiff.gaussian_denoise(x, mean, alpha=1.0, sigma=0.5, eig=(torch.full_like(lam, bad), V))


# --------------------------------------------------------------------------- item 10
def test_molrg_per_sample_guidance_with_scalar_levels(backend_device):
    """A (B,) guidance with scalar alpha / sigma raised a raw expand error in the params table."""
    backend, device = backend_device
    if backend == "cuda" or backend != "torch" and not dispatch.exists("molrg", backend):
        pytest.skip(f"no MoLRG kernel for backend {backend!r}")
    gen = torch.Generator().manual_seed(10)
    K, n, d, B = 3, 12, 2, 6
    U = _qr_bases(K, n, d, gen)
    x = torch.randn(B, n, generator=gen)
    labels = torch.randint(0, K, (B,), generator=gen)
    gw = torch.rand(B, generator=gen, dtype=torch.float64) * 3 - 0.5
    for alpha, sigma in ((0.9, 0.5), (0.9, torch.rand(B, generator=gen, dtype=torch.float64) + 0.2)):
        for output in ("x0", "eps"):
            got = fastdiff.molrg_denoise(x.to(device), U.to(device), alpha if isinstance(alpha, float) else alpha.to(device),
                                         sigma if isinstance(sigma, float) else sigma.to(device),
                                         labels=labels.to(device), guidance=gw.to(device), output=output, backend=backend)
            want = R.molrg_denoise(x.double(), list(U.double().unbind(0)), alpha, sigma, labels=labels, guidance=gw,
                                   output=output)
            assert_close_scaled(got, want, torch.float32)


@pytest.mark.parametrize("K", [1025, 2000])
def test_molrg_more_than_1024_components(backend_device, K):
    """K > 1024 failed on every float32 CPU path (the C++ kernels' stack buffers), backend="torch"
    included (its C++ mix), and in MoLRG(...) / fastdiff.sample; the kernels are dispatched around."""
    backend, device = backend_device
    if backend == "cuda" or backend != "torch" and not dispatch.exists("molrg", backend):
        pytest.skip(f"no MoLRG kernel for backend {backend!r}")
    gen = torch.Generator().manual_seed(K)
    n, B = 12, 5
    U = _qr_bases(K, n, 1, gen)
    pi = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    pi = pi / pi.sum()
    x = torch.randn(B, n, generator=gen) * 2
    mats = list(U.double().unbind(0))
    for mode in ("soft", "hard"):
        got = fastdiff.molrg_denoise(x.to(device), U.to(device), 0.9, 0.3, pi=pi, mode=mode, backend=backend)
        assert_close_scaled(got, R.molrg_denoise(x.double(), mats, 0.9, 0.3, pi=pi, mode=mode), torch.float32)
    # backward through the same dispatch
    xg = x.to(device).detach().clone().requires_grad_()
    fastdiff.molrg_denoise(xg, U.to(device), 0.9, 0.3, pi=pi, backend=backend).sum().backward()
    x64 = x.double().requires_grad_()
    R.molrg_denoise(x64, mats, 0.9, 0.3, pi=pi).sum().backward()
    assert (xg.grad.double().cpu() - x64.grad).abs().max().item() <= 1e-4 * (x64.grad.abs().max().item() + 1)
    # the model object and a whole trajectory (fused kernel where it fits, else the loop)
    den = fastdiff.denoisers.MoLRG(U.to(device), pi=pi)
    sched = fastdiff.KarrasSchedule(6)
    got = fastdiff.sample(den, (B, n), sched, "heun", generator=fastdiff.Generator(4), backend=backend,
                          device=device, progress=False)
    den64 = fastdiff.denoisers.MoLRG(U.double(), pi=pi)
    want = fastdiff.sample(den64, (B, n), sched, "heun", generator=fastdiff.Generator(4), backend="torch",
                           dtype=torch.float64, progress=False)
    assert torch.isfinite(got).all()
    assert (got.double().cpu() - want).abs().max().item() <= 1e-4 * (want.abs().max().item() + 1)

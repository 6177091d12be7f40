"""The empirical scan (fastdiff/ops/empirical.py) on every backend of its dispatch row, against a
float64 reference written from the contract's formula (a dense (B, N) computation).

Tolerances: float32 compute against float64.  The logits are sums of n products, so each carries
an absolute error of ~n eps |xh| |Yc| g1 (eps = 2^-24); the inputs here keep |S| below ~50, so the
log-sum-exp ``m + log l`` is compared to 1e-4 absolute and the softmax mean ``acc / l`` to 1e-4 of
the data scale (1e-10 in float64).  The candidates are compared by value (the sorted kc largest
scores; tie-robust) and each returned index must carry its returned score.
Every launcher allocates its outputs poisoned (NaN, index -1): a value a kernel skipped fails here.
"""
import math

import pytest
import torch

from conftest import backend_devices, is_interpreter
from fastdiff import dispatch
from fastdiff.ops.empirical import empirical_scan

PAIRS = backend_devices("empirical")
IDS = [f"{b}-{d}" for b, d in PAIRS]


def _reference(xh, data, center, g1, g2, h, lo, hi, kc):
    """float64, dense: (m, l, acc, the kc largest scores sorted descending, V, ymax2)."""
    Y = data.double()
    if data.dtype == torch.uint8:
        Y = lo + (hi - lo) * Y / 255.0
    Yc = Y - center.double()
    H = xh.double() @ Yc.T
    ysq = (Yc * Yc).sum(1)
    S = g1.double()[:, None] * H - g2.double()[:, None] * ysq[None, :]
    V = H - 0.5 * ysq[None, :] - h.double()[:, None] * (Yc @ center.double())[None, :]
    m = S.amax(1)
    P = torch.exp(S - m[:, None])
    l = P.sum(1)
    acc = P @ Yc
    top = torch.topk(V, kc, dim=1).values if kc else V[:, :0]
    return m, l, acc, top, V, ysq.max()


def _inputs(B, N, n, dtype, seed, uint8=False, far=0.0):
    g = torch.Generator().manual_seed(seed)
    if uint8:
        data = torch.randint(0, 256, (N, n), generator=g, dtype=torch.uint8)
        center = (torch.rand(n, generator=g) * 0.2 - 0.1).to(dtype)
    else:
        data = (torch.randn(N, n, generator=g) + far).to(dtype)
        center = data.double().mean(0).to(dtype)
    # |S| stays O(10): g1 |xh| |Yc| ~ g1 n
    xh = (torch.randn(B, n, generator=g) * 0.5).to(dtype)
    g1 = (torch.rand(B, generator=g) * 2.0 / n + 0.1 / n).to(dtype)
    g2 = (g1 * torch.rand(B, generator=g).to(dtype) * 0.5)
    h = (torch.rand(B, generator=g) * 0.5).to(dtype)
    return xh, data, center, g1, g2, h


def _check(out, ref, dtype, kc, soft, want_acc, scale):
    m, l, acc, best_v, best_i, ymax2 = out
    rm, rl, racc, rtop, V, rymax2 = ref
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    if soft:
        torch.testing.assert_close((m.double() + l.double().log()), rm + rl.log(), rtol=0, atol=tol * (1 + rm.abs().max().item()))
        if want_acc:
            torch.testing.assert_close(acc.double() / l.double()[:, None], racc / rl[:, None], rtol=0, atol=tol * scale)
        else:
            assert acc is None
    if kc:
        assert best_v.shape == best_i.shape == (m.shape[0], kc)
        assert best_i.dtype == torch.int64 and bool((best_i >= 0).all()) and bool((best_i < V.shape[1]).all())
        assert len(set(map(tuple, best_i.sort(1).values.tolist()))) >= 1
        assert all(len(set(r)) == kc for r in best_i.tolist()), "a row holds the same candidate twice"
        vtol = tol * (1 + V.abs().max().item())
        torch.testing.assert_close(best_v.double(), V.gather(1, best_i), rtol=0, atol=vtol)
        torch.testing.assert_close(best_v.double().sort(1, descending=True).values, rtop, rtol=0, atol=vtol)
        torch.testing.assert_close(ymax2.double(), rymax2, rtol=tol, atol=0)


def _dtypes(backend):
    impl = next(i for i in dispatch.OPS["empirical"].impls if i.backend == backend)
    return [d for d in (torch.float32, torch.float64) if d in impl.dtypes]


def _fitting_kc(backend, kc):
    """The largest kc <= ``kc`` the backend's row takes (its ``fits``; the Triton kernel's register set)."""
    impl = next(i for i in dispatch.OPS["empirical"].impls if i.backend == backend)
    while kc and not impl.fits(kc=kc)[0]:
        kc -= 1
    return kc


SHAPES = [(1, 1, 1), (3, 5, 7), (17, 33, 9), (2, 37, 130), (5, 300, 3), (8, 129, 64), (33, 70, 20)]


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{N}x{n}" for b, N, n in SHAPES])
def test_scan_matches_the_dense_float64_formula(backend, device, shape):
    B, N, n = shape
    for dtype in _dtypes(backend):
        for seed, (kc, soft, want_acc, chunk) in enumerate([(0, True, True, None), (min(N, 4), True, True, 7),
                                                           (min(N, 1), False, False, None), (N, True, False, 3)]):
            if is_interpreter(backend, device) and N > 100 and seed:
                continue  # the interpreter is slow: the big shapes once
            xh, data, center, g1, g2, h = _inputs(B, N, n, dtype, 100 * seed + B + N + n)
            if _fitting_kc(backend, kc) < kc:  # over the row's limit: the launcher refuses, then its largest kc
                with pytest.raises(ValueError, match="kc"):
                    empirical_scan(backend, *(t.to(device) for t in (xh, data, center, g1, g2, h)), kc=kc)
                kc = _fitting_kc(backend, kc)
            ref = _reference(xh, data, center, g1, g2, h, -1.0, 1.0, kc)
            out = empirical_scan(backend, *(t.to(device) for t in (xh, data, center, g1, g2, h)),
                                 soft=soft, want_acc=want_acc, kc=kc, chunk=chunk)
            out = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in out)
            _check(out, ref, dtype, kc, soft, want_acc, scale=3.0)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
@pytest.mark.parametrize("shape,cols", [((1, 1, 1), [0]), ((3, 300, 25), [12]), ((7, 515, 9), [8, 0, 4]),
                                        ((2, 37, 75), [12, 37, 62]), ((5, 40, 20), list(range(19, -1, -1)))],
                         ids=["1x1x1", "one-centre", "three-unordered", "C3P5", "all-reversed"])
def test_scan_sums_only_the_asked_columns(backend, device, shape, cols):
    """``acc_cols``: acc (B, ncol) is the softmax sum of those columns of Yc, in the order given (the
    patch denoisers' C centre pixels), with m, l unchanged; ragged tiles (N = 300, 515) and uint8 too."""
    B, N, n = shape
    for dtype in _dtypes(backend):
        for uint8 in (False, True):
            if uint8 and is_interpreter(backend, device) and N > 100:
                continue
            xh, data, center, g1, g2, h = _inputs(B, N, n, dtype, B + N + n + uint8, uint8=uint8)
            rm, rl, racc, *_ = _reference(xh, data, center, g1, g2, h, -1.0, 1.0, 0)
            idx = torch.tensor(cols, dtype=torch.long)
            m, l, acc, *_ = (t.cpu() for t in empirical_scan(
                backend, *(t.to(device) for t in (xh, data, center, g1, g2, h)), acc_cols=idx.to(device)))
            assert acc.shape == (B, len(cols))
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(m.double() + l.double().log(), rm + rl.log(), rtol=0,
                                       atol=tol * (1 + rm.abs().max().item()))
            torch.testing.assert_close(acc.double() / l.double()[:, None], (racc / rl[:, None])[:, idx],
                                       rtol=0, atol=tol * 3.0)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_scan_reads_uint8_images_as_floats(backend, device):
    B, N, n = 6, 45, 27
    for dtype in _dtypes(backend):
        xh, data, center, g1, g2, h = _inputs(B, N, n, dtype, 7, uint8=True)
        lo, hi = -1.0, 1.0
        ref = _reference(xh, data, center, g1, g2, h, lo, hi, 5)
        out = empirical_scan(backend, *(t.to(device) for t in (xh, data, center, g1, g2, h)),
                             lo=lo, hi=hi, kc=5, chunk=16)
        _check(tuple(t.cpu() for t in out), ref, dtype, 5, True, True, scale=1.0)
        # another range: [0, 1]
        ref = _reference(xh, data, center, g1, g2, h, 0.0, 1.0, 0)
        out = empirical_scan(backend, *(t.to(device) for t in (xh, data, center, g1, g2, h)), lo=0.0, hi=1.0)
        _check(tuple(t.cpu() if t is not None else None for t in out), ref, dtype, 0, True, True, scale=1.0)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_scan_far_from_the_origin_in_centred_coordinates(backend, device):
    """Data at |y| ~ 1e3 with unit spread: the scan works on y - c, so float32 keeps its accuracy."""
    B, N, n = 4, 60, 16
    xh, data, center, g1, g2, h = _inputs(B, N, n, torch.float32, 3, far=1e3)
    ref = _reference(xh, data, center, g1, g2, h, -1.0, 1.0, 3)
    out = empirical_scan(backend, *(t.to(device) for t in (xh, data, center, g1, g2, h)), kc=3)
    _check(tuple(t.cpu() for t in out), ref, torch.float32, 3, True, True, scale=3.0)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_scan_nan_rows(backend, device):
    """A NaN query row poisons that query only; a NaN training row every query's softmax."""
    B, N, n = 5, 20, 6
    dtype = _dtypes(backend)[0]
    xh, data, center, g1, g2, h = _inputs(B, N, n, dtype, 11)
    xh[2, 1] = math.nan
    m, l, acc, _, _, _ = (t.cpu() if t is not None else None for t in
                          empirical_scan(backend, *(t.to(device) for t in (xh, data, center, g1, g2, h)), kc=2))
    bad = torch.isnan(m) | torch.isnan(l) | torch.isnan(acc).any(1)
    assert bad.tolist() == [False, False, True, False, False]
    data[7, 3] = math.nan
    m, l, acc, _, _, _ = (t.cpu() if t is not None else None for t in
                          empirical_scan(backend, *(t.to(device) for t in (xh, data, center, g1, g2, h))))
    assert bool((torch.isnan(m) | torch.isnan(l) | torch.isnan(acc).any(1)).all())


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_public_posterior_agrees_across_backends(backend, device):
    """empirical_posterior with this backend forced against the float64 torch run (the epilogue is shared)."""
    from fastdiff.denoisers import empirical_posterior

    g = torch.Generator().manual_seed(5)
    x, Y = torch.randn(9, 24, generator=g), torch.randn(150, 24, generator=g)
    ref = empirical_posterior(x.double(), Y.double(), 0.8, 0.7, outputs=("x0", "logp", "neighbors"), k=3, backend="torch")
    got = empirical_posterior(x.to(device), Y.to(device), 0.8, 0.7, outputs=("x0", "logp", "neighbors"), k=3,
                              backend=backend)
    torch.testing.assert_close(got.x0.cpu().double(), ref.x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logp.cpu(), ref.logp, rtol=1e-6, atol=1e-4)
    assert torch.equal(got.indices.cpu(), ref.indices)

"""knn_denoise / knn_proposal / KNNEmpirical (Niedoba et al., ICML 2024; docs/math.md section 2g):
k = N is the exact empirical denoiser; a float64 reference written from the estimator's formulas on
the same candidate rows; the neighbour set against a brute force; the draws' law and the unbiasedness
of the normaliser estimate (seeded, 5-standard-error bounds); the error shrinking as k and m grow;
reproducibility; the FAISS path against the exact one; bad input."""
import math
import sys

import pytest
import torch

import fastdiff
from fastdiff import data as D
from fastdiff.denoisers import KNNEmpirical, empirical_denoise, knn_denoise, knn_proposal
from fastdiff.denoisers import knn as K

try:
    import faiss  # noqa: F401
    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="needs faiss-cpu (pip install 'fastdiff[knn]')")

SHAPES = [(1, 1, 1, 1, 1), (3, 2, 5, 1, 3), (5, 57, 9, 8, 11), (7, 33, 31, 33, 4), (4, 200, 2, 17, 1), (6, 129, 16, 3, 40)]


def _case(seed, B, N, n, dtype=torch.float64, sigma=0.7):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(N, n, generator=g, dtype=torch.float64)
    x = 0.8 * Y[torch.randint(N, (B,), generator=g)] + sigma * torch.randn(B, n, generator=g, dtype=torch.float64)
    return x.to(dtype), Y.to(dtype)


def _per_row(v, B):
    return torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1).expand(B, 1)


def _log_w(x, Y, alpha, sigma):
    """(B, N) float64 log w_i = -||x - alpha y_i||^2 / (2 sigma^2), every row (the brute force)."""
    B = x.shape[0]
    a, s = _per_row(alpha, B), _per_row(sigma, B)
    return -((x.double()[:, None, :] - a[:, :, None] * Y.double()[None]) ** 2).sum(-1) / (2 * s * s)


def _reference_multipliers(x, Y, alpha, sigma, k, m, estimator, idx):
    """log c (B, L) of the candidate rows ``idx``, from the formulas (not from the code under test):
    stratified c = 1 on the k nearest and (N - k) / m on the rest; snis c = 1 / (m q_i) with
    q_i = w_i / Zhat on K, w_(k) / Zhat off it, Zhat = sum_K w_i + (N - k) w_(k)."""
    B, N = x.shape[0], Y.shape[0]
    lw = _log_w(x, Y, alpha, sigma)
    near = torch.topk(lw, k, dim=1).indices                      # the k largest weights = the k nearest to x / alpha
    in_k = torch.zeros(B, N, dtype=torch.bool).scatter_(1, near, True)
    w = lw.exp()
    if estimator == "stratified":
        c = torch.where(in_k.gather(1, idx), torch.tensor(1.0, dtype=torch.float64), (N - k) / m)
        return c.log(), near
    wk = torch.where(in_k, w, math.inf).min(1, keepdim=True).values
    zhat = torch.where(in_k, w, 0.0).sum(1, keepdim=True) + (N - k) * wk
    q = torch.where(in_k, w, wk) / zhat                           # (B, N), sums to 1
    assert torch.allclose(q.sum(1), torch.ones(B, dtype=torch.float64))
    return (1.0 / (m * q.gather(1, idx))).log(), near


def _snis_reference(x, Y, alpha, sigma, idx, logc):
    """x0_hat = sum_l c_l w_l y_l / sum_l c_l w_l, float64."""
    lw = _log_w(x, Y, alpha, sigma).gather(1, idx) + logc
    return torch.einsum("bl,bln->bn", torch.softmax(lw, 1), Y.double()[idx])


# ---------------------------------------------------------------------------------------------- k = N
@pytest.mark.parametrize("B,N,n,k,m", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("output", ["x0", "eps", "score"])
def test_k_equals_N_is_the_empirical_denoiser(B, N, n, k, m, dtype, output):
    """The stratified estimator at k = N sums every row exactly (snis at k = N averages m posterior draws)."""
    x, Y = _case(1, B, N, n, dtype)
    alpha, sigma = torch.linspace(0.5, 1.0, B, dtype=torch.float64), 0.6
    got = knn_denoise(x, Y, alpha, sigma, k=N, m=m, output=output, generator=0)
    want = empirical_denoise(x, Y, alpha, sigma, output=output)
    # float64: both are softmax-weighted sums of the same rows (atol: ||y|| ~ 3, sums of N terms);
    # float32: the exact denoiser's float32 scan against knn's float64 sum, then both rounded to float32
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)


def test_k_equals_N_imageset():
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (23, 1, 3, 4), generator=g, dtype=torch.uint8)
    data = D.ImageSet(images)
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(knn_denoise(x, data, 0.9, 0.4, k=23), empirical_denoise(x, data, 0.9, 0.4),
                               rtol=1e-10, atol=1e-10)
    # and a proper subset reads the same rows the float conversion gives
    Yf = images.reshape(23, 12).double() / 255 * 2 - 1
    torch.testing.assert_close(knn_denoise(x, data, 0.9, 0.4, k=5, m=7, generator=3),
                               knn_denoise(x, Yf, 0.9, 0.4, k=5, m=7, generator=3), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ the float64 reference
@pytest.mark.parametrize("estimator", ["stratified", "snis"])
@pytest.mark.parametrize("B,N,n,k,m", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_float64_reference(B, N, n, k, m, estimator, dtype):
    x, Y = _case(3 + B, B, N, n, dtype, sigma=0.5)
    alpha = torch.linspace(0.6, 0.95, B, dtype=torch.float64)
    sigma = torch.linspace(0.3, 1.5, B, dtype=torch.float64)
    prop = knn_proposal(x, Y, alpha, sigma, k=k, m=m, estimator=estimator, generator=11)
    logc, near = _reference_multipliers(x, Y, alpha, sigma, k, m, estimator, prop.indices)
    # the neighbour set is the brute force's (random data: no ties); nearest first
    assert torch.equal(prop.neighbors.sort(1).values, near.sort(1).values)
    lw_near = _log_w(x, Y, alpha, sigma).gather(1, prop.neighbors)
    assert bool((lw_near[:, 1:] <= lw_near[:, :-1]).all())           # nearest first
    if estimator == "stratified":
        L = k if k == N else k + m
        assert prop.indices.shape == (B, L)
        assert torch.equal(prop.indices[:, :k], prop.neighbors)
        tail = prop.indices[:, k:]
        assert not bool((tail[:, :, None] == prop.neighbors[:, None, :]).any()), "a tail draw fell in K"
        assert bool(((tail >= 0) & (tail < N)).all())
    else:
        assert prop.indices.shape == (B, m)
    torch.testing.assert_close(prop.log_multipliers, logc, rtol=0, atol=1e-9)
    want = _snis_reference(x, Y, alpha, sigma, prop.indices, logc)
    for output in ("x0", "score"):
        got = knn_denoise(x, Y, alpha, sigma, k=k, m=m, estimator=estimator, generator=11, output=output)
        ref = want if output == "x0" else (_per_row(alpha, B) * want - x.double()) / _per_row(sigma, B) ** 2
        # float64: the same float64 sums in another order; float32: one rounding of the float64 result
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, ref.to(dtype), **tol)


@pytest.mark.parametrize("estimator", ["stratified", "snis"])
def test_batch_chunks_agree(monkeypatch, estimator):
    """The gathered rows are processed in batch chunks of <= GATHER_BUDGET values: 1 query per chunk
    (and a ragged last chunk) gives the same result as one chunk."""
    x, Y = _case(18, 7, 60, 5)
    alpha = torch.linspace(0.5, 1.0, 7, dtype=torch.float64)
    one = knn_denoise(x, Y, alpha, 0.7, k=6, m=5, estimator=estimator, generator=1)
    for budget in (1, 2 * 11 * 5 + 3):
        monkeypatch.setattr(K, "GATHER_BUDGET", budget)
        torch.testing.assert_close(knn_denoise(x, Y, alpha, 0.7, k=6, m=5, estimator=estimator, generator=1), one,
                                   rtol=0, atol=0)


def test_far_from_origin_and_tiny_alpha():
    """The search is on x / alpha (the k largest w_i): data at |y| ~ 1e3 and alpha = 0.05 still give
    the brute force's neighbours (nearest_neighbors centres the data)."""
    x, Y = _case(5, 6, 300, 8)
    Y = Y + 1000.0
    x = 0.05 * Y[:6] + 0.1 * torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prop = knn_proposal(x.float(), Y.float(), 0.05, 0.1, k=9, m=5, generator=0)
    near = torch.topk(_log_w(x.float(), Y.float(), 0.05, 0.1), 9, dim=1).indices
    assert torch.equal(prop.neighbors.sort(1).values, near.sort(1).values)


# ------------------------------------------------------------------------------------ statistics
def _repeated(R=4000, N=500, n=6, sigma=1.0, seed=7):
    """R copies of one query: the rows' draws are independent, so one call gives R estimates."""
    x, Y = _case(seed, 1, N, n, sigma=sigma)
    return x.expand(R, n).contiguous(), Y, 0.8, sigma


@pytest.mark.parametrize("estimator,k,m", [("stratified", 8, 16), ("snis", 8, 16), ("snis", 1, 3), ("stratified", 50, 1)])
def test_normaliser_estimate_is_unbiased(estimator, k, m):
    """E[sum_l c_l w_l] = Z = sum_i w_i for both estimators (the multipliers' definition): the mean
    of R = 4000 estimates is within 5 standard errors of Z (CLT; about 6e-7 to fail by chance)."""
    x, Y, alpha, sigma = _repeated()
    prop = knn_proposal(x, Y, alpha, sigma, k=k, m=m, estimator=estimator, generator=123)
    lw = _log_w(x, Y, alpha, sigma)
    z = torch.logsumexp(lw[0], 0)
    zhat = torch.logsumexp(lw.gather(1, prop.indices) + prop.log_multipliers, 1) - z   # log (Zhat / Z)
    r = zhat.exp()
    se = r.std() / math.sqrt(len(r))
    assert abs(r.mean().item() - 1.0) < 5 * se.item() + 1e-12, (r.mean().item(), se.item())


def test_draws_follow_the_proposal():
    """Frequencies of the draws over R m = 64000 draws against the proposal's law, every row within
    5 binomial standard errors: snis against q (from the formula), stratified against uniform on
    the complement of K."""
    x, Y, alpha, sigma = _repeated(R=4000)
    N, k, m = Y.shape[0], 6, 16
    M = x.shape[0] * m
    prop = knn_proposal(x, Y, alpha, sigma, k=k, m=m, estimator="snis", generator=5)
    logc, _ = _reference_multipliers(x[:1], Y, alpha, sigma, k, m, "snis", torch.arange(N)[None])
    q = (1.0 / (m * logc.exp()))[0]                                  # q_i = 1 / (m c_i)
    f = torch.bincount(prop.indices.reshape(-1), minlength=N).double() / M
    assert bool(((f - q).abs() <= 5 * (q * (1 - q) / M).sqrt() + 1.0 / M).all())
    prop = knn_proposal(x, Y, alpha, sigma, k=k, m=m, estimator="stratified", generator=5)
    tail = prop.indices[:, k:].reshape(-1)
    f = torch.bincount(tail, minlength=N).double() / M
    u = torch.full((N,), 1.0 / (N - k), dtype=torch.float64)
    u[prop.neighbors[0]] = 0.0
    assert bool(((f - u).abs() <= 5 * (u * (1 - u) / M).sqrt() + 1.0 / M).all())


def test_error_shrinks_as_k_and_m_grow():
    """Root-mean-square error over R = 2000 seeded estimates against the exact denoiser (the
    posterior spreads over ~N / 10 rows at sigma = 1, n = 6, so the tail matters).  Monte Carlo
    error ~ 1 / sqrt(m): m 4 -> 64 cuts it about 4x, asserted at <= 1/2; more neighbours leave less
    tail; k = N is exact."""
    x, Y, alpha, sigma = _repeated(R=2000)
    exact = empirical_denoise(x[:1], Y, alpha, sigma)
    rmse = lambda est, k, m: (knn_denoise(x, Y, alpha, sigma, k=k, m=m, estimator=est, generator=9)  # noqa: E731
                              - exact).pow(2).sum(1).mean().sqrt().item()
    for est in ("stratified", "snis"):
        assert rmse(est, 8, 64) <= 0.5 * rmse(est, 8, 4), est
        assert rmse(est, 128, 16) <= 0.8 * rmse(est, 4, 16), est
    assert rmse("stratified", 500, 1) < 1e-12
    # the SNIS bias is O(1/m): the mean of the stratified estimates at m = 64 is near x0_hat
    mean = knn_denoise(x, Y, alpha, sigma, k=8, m=64, generator=4).mean(0)
    assert (mean - exact[0]).norm().item() < 0.05 * exact[0].norm().item()


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 4.0])
@pytest.mark.parametrize("k,m", [(1, 1), (5, 0), (12, 7), (40, 100)])
def test_stratified_deterministic_bound(sigma, k, m):
    """||estimate - x0_hat|| <= 2 rho max_ij ||y_i - y_j||, rho = (N - k) w_(k) / (sum_K w + (N - k) w_(k)),
    for every draw (docs/math.md 2g): each tail weight is <= w_(k)."""
    x, Y = _case(17, 40, 90, 5, sigma=sigma)
    N = Y.shape[0]
    lw = _log_w(x, Y, 0.9, sigma)
    top = torch.topk(lw, k, dim=1).values
    lwk = top[:, -1:]
    rho = (math.log(N - k) + lwk - torch.logsumexp(torch.cat([top, math.log(N - k) + lwk], 1), 1, keepdim=True)).exp()
    D = torch.cdist(Y, Y).max()
    err = (knn_denoise(x, Y, 0.9, sigma, k=k, m=m, generator=1) - empirical_denoise(x, Y, 0.9, sigma)).norm(dim=1)
    assert bool((err <= 2 * rho[:, 0] * D + 1e-12).all())
    if sigma == 0.05:
        assert err.max().item() < 1e-12            # the tail is negligible: the exact denoiser to rounding


# ---------------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("estimator", ["stratified", "snis"])
def test_seeded_draws_are_reproducible(estimator):
    x, Y = _case(8, 9, 120, 5)
    f = lambda gen: knn_denoise(x, Y, 0.9, 0.8, k=4, m=6, estimator=estimator, generator=gen)  # noqa: E731
    assert torch.equal(f(42), f(42))
    assert torch.equal(f(42), f(torch.Generator().manual_seed(42)))
    assert not torch.equal(f(42), f(43))
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(f(g), f(g))                        # one generator advances
    torch.manual_seed(0)
    a = f(None)
    torch.manual_seed(0)
    assert torch.equal(a, f(None))                            # None: torch's global generator


def test_denoiser_object_is_reproducible_and_samples():
    x, Y = _case(9, 5, 80, 4)
    d1, d2 = KNNEmpirical(Y, k=4, m=8, seed=3, search="exact"), KNNEmpirical(Y, k=4, m=8, seed=3, search="exact")
    a = [d1(x, 0.9, 0.5) for _ in range(3)]
    b = [d2(x, 0.9, 0.5) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], a[1])                        # each call draws fresh rows
    torch.testing.assert_close(d1(x, 0.9, 0.5, output="score"),
                               (0.9 * d2(x, 0.9, 0.5) - x) / 0.25, rtol=1e-10, atol=1e-10)
    assert "k=4" in repr(d1)
    # in a sampler: with k = N it is the exact empirical denoiser step for step
    sched = fastdiff.DDPMSchedule.linear()
    full = KNNEmpirical(Y, k=80, m=2, seed=0)
    xs = fastdiff.sample(full, x.float(), sched, "ddim", steps=6, disable=True)
    xe = fastdiff.sample(fastdiff.denoisers.Empirical(Y), x.float(), sched, "ddim", steps=6, disable=True)
    torch.testing.assert_close(xs, xe, rtol=1e-4, atol=1e-4)
    # a proper subset: a seeded run is reproducible end to end
    runs = [fastdiff.sample(KNNEmpirical(Y, k=5, m=7, seed=4, estimator="snis"), x.float(), sched, "ddim", steps=6,
                            disable=True) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and bool(torch.isfinite(runs[0]).all())


# --------------------------------------------------------------------------------------------- FAISS
@needs_faiss
@pytest.mark.parametrize("estimator", ["stratified", "snis"])
def test_faiss_flat_equals_exact(estimator):
    x, Y = _case(10, 12, 700, 13, torch.float32)
    kw = dict(k=16, m=9, estimator=estimator, generator=2)
    pe = knn_proposal(x, Y, 0.7, 0.9, search="exact", **kw)
    pf = knn_proposal(x, Y, 0.7, 0.9, search="faiss", **kw)
    assert torch.equal(pe.indices, pf.indices)
    assert torch.equal(knn_denoise(x, Y, 0.7, 0.9, search="faiss", **kw), knn_denoise(x, Y, 0.7, 0.9, **kw))
    den = KNNEmpirical(Y, search="faiss", seed=2, k=16, m=9, estimator=estimator)
    assert torch.equal(den(x, 0.7, 0.9), knn_denoise(x, Y, 0.7, 0.9, **kw))
    assert den._faiss is not None                             # built once, kept


@needs_faiss
def test_faiss_approximate_indexes():
    x, Y = _case(11, 10, 1000, 8, torch.float32)
    near = knn_proposal(x, Y, 0.8, 0.6, k=10, m=4, generator=0).neighbors
    # IVF probing every list is exact
    ivf = knn_proposal(x, Y, 0.8, 0.6, k=10, m=4, generator=0, search="faiss", index="IVF8,Flat",
                       index_params="nprobe=8").neighbors
    assert torch.equal(ivf.sort(1).values, near.sort(1).values)
    hnsw = knn_proposal(x, Y, 0.8, 0.6, k=10, m=4, generator=0, search="faiss", index="HNSW32").neighbors
    recall = (hnsw[:, :, None] == near[:, None, :]).any(2).double().mean().item()
    assert recall >= 0.8, recall
    out = knn_denoise(x, Y, 0.8, 0.6, k=10, m=4, generator=0, search="faiss", index="HNSW32")
    assert bool(torch.isfinite(out).all())


@needs_faiss
def test_auto_search(monkeypatch):
    built = []
    real = K._FaissIndex
    monkeypatch.setattr(K, "_FaissIndex", lambda *a, **kw: built.append(1) or real(*a, **kw))
    x, Y = _case(12, 3, 50, 4, torch.float32)
    knn_denoise(x, Y, 1.0, 0.5, k=3, m=2, search="auto")
    assert not built                                          # a small set: the exact scan
    monkeypatch.setattr(K, "AUTO_FAISS_ROWS", 10)
    knn_denoise(x.double(), Y, 1.0, 0.5, k=3, m=2, search="auto")
    assert not built                                          # float64 queries: the float64-certified search
    knn_denoise(x, Y, 1.0, 0.5, k=3, m=2, search="auto")
    assert built


def test_missing_faiss_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)           # "import faiss" now raises ImportError
    x, Y = _case(13, 2, 30, 3)
    with pytest.raises(ImportError, match=r"fastdiff\[knn\].*faiss-cpu"):
        knn_denoise(x, Y, 1.0, 0.5, k=3, search="faiss")
    with pytest.raises(ImportError, match=r"fastdiff\[knn\]"):
        KNNEmpirical(Y, search="faiss")
    monkeypatch.setattr(K, "AUTO_FAISS_ROWS", 1)
    knn_denoise(x, Y, 1.0, 0.5, k=3, search="auto")           # auto falls back to the exact scan


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,exc,match", [
    (dict(k=0), ValueError, r"k: expected an int \[1, 20\], got 0"),
    (dict(k=21), ValueError, r"k: expected an int \[1, 20\]"),
    (dict(k=True), ValueError, r"k: expected an int"),
    (dict(k=2.5), ValueError, r"k: expected an int"),
    (dict(m=-1), ValueError, r"m: expected an int >= 0"),
    (dict(m=0, estimator="snis"), ValueError, r"m: expected an int >= 1"),
    (dict(m=1.0), ValueError, r"m: expected an int"),
    (dict(estimator="is"), ValueError, r"estimator: expected one of \('stratified', 'snis'\)"),
    (dict(search="ann"), ValueError, r"search: expected one of \('auto', 'exact', 'faiss'\)"),
    (dict(index=""), ValueError, r"index: expected a faiss.index_factory string"),
    (dict(generator="seed"), TypeError, r"generator: expected None, an int seed or a CPU torch.Generator"),
    (dict(generator=1.5), TypeError, r"generator: expected None"),
    (dict(output="v"), ValueError, r"output: expected one of"),
])
def test_bad_arguments(kw, exc, match):
    x, Y = _case(14, 3, 20, 4)
    with pytest.raises(exc, match=match):
        knn_denoise(x, Y, 0.9, 0.5, **kw)


def test_bad_data_and_schedule():
    x, Y = _case(15, 3, 20, 4)
    with pytest.raises(ValueError, match=r"data: expected n = 4 columns"):
        knn_denoise(x, Y[:, :3], 0.9, 0.5, k=2)
    with pytest.raises(ValueError, match=r"sigma: expected sigma > 0"):
        knn_denoise(x, Y, 0.9, 0.0, k=2)
    with pytest.raises(ValueError, match=r"alpha: expected a scalar or a \(3,\) tensor"):
        knn_denoise(x, Y, torch.ones(2), 0.5, k=2)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, n\)"):
        knn_denoise(x[0], Y, 0.9, 0.5, k=2)
    with pytest.raises(ValueError, match=r"k: expected an int \[1, 20\]"):
        KNNEmpirical(Y, k=50)
    with pytest.raises(ValueError, match=r"m: expected an int >= 1"):
        KNNEmpirical(Y, m=0, estimator="snis")
    with pytest.raises(ValueError, match=r"search: expected one of"):
        KNNEmpirical(Y, search="hnsw")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_is_refused_and_devices_agree():
    x, Y = _case(16, 4, 64, 5, torch.float32)
    with pytest.raises(ValueError, match=r"generator: expected a CPU torch.Generator"):
        knn_denoise(x.cuda(), Y.cuda(), 0.9, 0.5, k=3, generator=torch.Generator("cuda"))
    torch.testing.assert_close(knn_denoise(x.cuda(), Y.cuda(), 0.9, 0.5, k=3, m=5, generator=1).cpu(),
                               knn_denoise(x, Y, 0.9, 0.5, k=3, m=5, generator=1), rtol=1e-5, atol=1e-5)

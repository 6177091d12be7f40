"""The Triton batched SVD kernel (kernels/svd.py) against LAPACK float64 (torch.linalg.svdvals).

Without a GPU the kernel runs under the interpreter (conftest.py sets TRITON_INTERPRET=1), so the
shapes here are small (m, n up to 40; one 64 x 64 and the 256 limits once each).  Acceptance 1's
bounds: |S - S_lapack| <= 1e-5 s_1 for float32 inputs and 1e-12 s_1 for float64, per matrix.
Measured (interpreter, float64 compute): ~5e-8 s_1 for float32 (the float32 rounding of S, 2^-24
relative, dominates) and ~1e-15 s_1 for float64 (c N eps of Householder), so each bound has a
margin of 100x or more, yet a wrong kernel (one missed reflector, a wrong Sturm count) is off by
O(s_1).
"""
import pytest
import torch

from conftest import HAS_CUDA

triton = pytest.importorskip("triton")
svd = pytest.importorskip("fastdiff.kernels.svd")

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}   # acceptance 1, in units of s_1
RANK_BAND = 1e-6                                    # the rank may differ only this close to eta^2


def reference_rank(s: torch.Tensor, eta: float) -> torch.Tensor:
    """SPEC 3 on float64 singular values (B, N) descending: min r with C_r > eta^2 C_N, C_r the
    energy of the r largest; N where no r qualifies (eta = 1); 0 for a zero matrix."""
    c = torch.cumsum(s.double() ** 2, dim=1)
    total = c[:, -1:]
    r = ((c <= eta**2 * total).sum(1) + 1).clamp(max=s.shape[1])
    return torch.where(total[:, 0] > 0, r, torch.zeros_like(r))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def matrices(kind, B, m, n, gen):
    """float64 (B, m, n) test matrices of one kind."""
    k = min(m, n)
    if kind == "random":
        return torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    if kind == "lowrank_noise":   # rank max(1, k/4) plus 1e-3 noise: a clear energy knee
        r = max(1, k // 4)
        low = torch.randn(B, m, r, generator=gen, dtype=torch.float64) @ torch.randn(B, r, n, generator=gen, dtype=torch.float64)
        return low + 1e-3 * torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(B, m, k, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(B, n, k, generator=gen, dtype=torch.float64))[0]
    if kind == "cond1e6":         # geometric spectrum from 1 to 1e-6
        s = torch.logspace(0, -6, k, dtype=torch.float64).expand(B, k)
    elif kind == "rank_deficient":  # exactly rank k/2 (zero singular values to rounding)
        s = torch.rand(B, k, generator=gen, dtype=torch.float64) + 0.5
        s[:, (k + 1) // 2:] = 0.0
    else:
        raise ValueError(kind)
    return (U * s[:, None, :]) @ V.transpose(1, 2)


KINDS = ("random", "lowrank_noise", "cond1e6", "rank_deficient")
SHAPES = [(1, 1), (1, 5), (6, 1), (2, 2), (3, 7), (7, 3), (5, 5), (16, 16), (17, 13), (13, 17), (31, 9), (40, 40),
          (33, 40)]


def run_poisoned(A, eta, **kw):
    """Run with NaN-poisoned S and sentinel-poisoned rank, so an unwritten element fails."""
    B, m, n = A.shape
    S = torch.full((B, min(m, n)), float("nan"), dtype=A.dtype, device=A.device)
    rank = torch.full((B,), -12345, dtype=torch.int64, device=A.device)
    S2, rank2 = svd.svdvals_rank(A, eta, out=(S, rank), **kw)
    assert S2 is S and (eta is None or rank2 is rank)
    return S, (rank if eta is not None else None)


def check_against_lapack(A64, S, rank, eta, dtype):
    """Acceptance 1 per matrix, and the rank equal to the reference unless within RANK_BAND."""
    A_in = A64.to(dtype).double()  # the matrix the kernel actually saw
    ref = torch.linalg.svdvals(A_in)
    S = S.double().cpu()
    assert torch.isfinite(S).all(), "unwritten or non-finite singular values"
    assert (S[:, :-1] >= S[:, 1:]).all() and (S >= 0).all(), "not descending / negative"
    err = (S - ref).abs().amax(1)
    s1 = ref[:, 0]
    bound = TOL[dtype] * s1 + 1e-300
    assert (err <= bound).all(), f"max err/s_1 = {(err / s1.clamp_min(1e-300)).max().item():.3g}, tol {TOL[dtype]}"
    if eta is None:
        return
    rank = rank.cpu()
    want = reference_rank(ref, eta)
    differ = (rank != want).nonzero().flatten().tolist()
    for b in differ:  # only where the energy ratio at the boundary is within RANK_BAND of eta^2
        c = torch.cumsum(ref[b] ** 2, 0) / (ref[b] ** 2).sum()
        r = int(min(rank[b], want[b]))
        assert r >= 1 and abs(c[r - 1].item() - eta**2) <= RANK_BAND, (b, int(rank[b]), int(want[b]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_lapack(shape, dtype):
    m, n = shape
    gen = _gen(m * 100 + n)
    # every kind in one launch (2 matrices each): fewer interpreter launches, and batch neighbours
    A64 = torch.cat([matrices(kind, 2, m, n, gen) for kind in KINDS])
    A = A64.to(dtype).to(DEVICE)
    # each threshold is another launch: on a GPU both; under the interpreter (seconds a launch, and
    # this suite's CI budget) one, alternating over the shapes and dtypes so both are covered
    etas = (0.99, 0.5) if HAS_CUDA else ((0.99, 0.5)[(SHAPES.index(shape) + (dtype == torch.float64)) % 2],)
    for eta in etas:
        S, rank = run_poisoned(A, eta)
        check_against_lapack(A64, S, rank, eta, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_64x64_and_limits(dtype):
    """The benchmark's 64 x 64 and the largest supported sizes (256 tall / wide / square) once."""
    gen = _gen(7)
    for m, n in ((64, 64), (256, 5), (3, 256), (256, 256)):
        if (m, n) == (256, 256) and dtype == torch.float32:
            continue  # the float64 run covers the streamed 256 x 256 tile; it takes ~25 s interpreted
        kinds = ("cond1e6",) if (m, n) == (256, 256) else ("random", "cond1e6")
        A64 = torch.cat([matrices(kind, 1, m, n, gen) for kind in kinds])
        S, rank = run_poisoned(A64.to(dtype).to(DEVICE), 0.99)
        check_against_lapack(A64, S, rank, 0.99, dtype)


STREAMED_SHAPES = [(1, 1), (6, 1), (3, 7), (17, 13), (13, 17), (31, 9), (24, 20)]


@pytest.mark.parametrize("shape", STREAMED_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_streamed_kernel_on_small_shapes(shape, monkeypatch):
    """The streamed kernel (tiles over REGISTER_TILE) on small shapes, forced by lowering its limits:
    REGISTER_TILE = 0 streams every tile and 64-element chunks (CHUNK = 64 / N_PAD rows: 2 at 32 x
    32, 4 at 32 x 16) cross the chunk boundaries, a first chunk that starts below row k, a ragged
    last chunk and both column buffers.  Two persistent programs take the batch's 6 matrices in
    turn, one of them after a non-finite and one after a zero matrix (state reset per matrix).
    float32 and float64 alternate over the shapes; float32 compute once."""
    monkeypatch.setattr(svd, "REGISTER_TILE", 0)
    monkeypatch.setattr(svd, "STREAM_CHUNK_ELEMENTS", 64)
    m, n = shape
    i = STREAMED_SHAPES.index(shape)
    dtype = (torch.float32, torch.float64)[i % 2]
    gen = _gen(500 + i)
    # programs take b = 0, 2, 4 and 1, 3, 5: A[3] follows the non-finite A[1], A[4] the zero A[2]
    A64 = torch.cat([matrices(KINDS[0], 2, m, n, gen), torch.zeros(1, m, n, dtype=torch.float64),
                     *[matrices(kind, 1, m, n, gen) for kind in KINDS[1:]]])
    A = A64.to(dtype)
    A[1, m // 2, n // 2] = float("nan")
    S, rank = run_poisoned(A.to(DEVICE), 0.9, programs=2)
    S, rank = S.cpu(), rank.cpu()
    assert torch.isnan(S[1]).all() and rank[1] == -1
    assert (S[2] == 0).all() and rank[2] == 0
    keep = [0, 2, 3, 4, 5]
    check_against_lapack(A64[keep], S[keep], rank[keep], 0.9, dtype)
    if shape == (13, 17):
        S, _ = run_poisoned(A[keep].to(DEVICE), 0.9, compute_f64=False, programs=3)
        check_against_lapack(A64[keep], S, None, None, torch.float32)


def test_streamed_kernel_at_its_own_sizes():
    """A ragged size that pads to 256 x 128 (streamed, 8-row chunks), one persistent program for
    both matrices, float32, wide (the transposed view); test_64x64_and_limits runs 256 x 256."""
    gen = _gen(11)
    A64 = torch.cat([matrices(kind, 1, 70, 129, gen) for kind in ("random", "cond1e6")])
    S, rank = run_poisoned(A64.float().to(DEVICE), 0.99, programs=1)
    check_against_lapack(A64, S, rank, 0.99, torch.float32)


def test_without_eta_returns_no_rank():
    A = matrices("random", 3, 6, 4, _gen(1)).to(DEVICE)
    S, rank = svd.svdvals_rank(A)
    assert rank is None and S.shape == (3, 4)
    check_against_lapack(A.cpu(), S, None, None, torch.float64)


def test_eta_edges_and_knee():
    """eta = 1 gives N (no r qualifies), a tiny eta gives 1; a rank-r matrix plus tiny noise has
    energy rank r at eta = 0.99 when the r singular values are equal."""
    gen = _gen(2)
    A = matrices("random", 3, 9, 7, gen).to(DEVICE)
    assert svd.svdvals_rank(A, 1.0)[1].tolist() == [7, 7, 7]
    assert svd.svdvals_rank(A, 1e-3)[1].tolist() == [1, 1, 1]
    U = torch.linalg.qr(torch.randn(20, 3, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=torch.float64))[0]
    K = (U @ V.T)[None] + 1e-6 * torch.randn(1, 20, 12, generator=gen, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        S, rank = svd.svdvals_rank(K.to(dtype).to(DEVICE), 0.99)
        assert rank.tolist() == [3]
        assert torch.allclose(S[0, :3].double().cpu(), torch.ones(3, dtype=torch.float64), atol=1e-5)


def test_exact_spectra():
    """Known singular values: a permuted, sign-flipped diagonal; an orthogonal matrix (all 1,
    maximally clustered); the zero matrix (S = 0, rank 0)."""
    d = torch.tensor([3.0, 0.25, 2.0, 0.0, 1.0], dtype=torch.float64)
    P = torch.eye(5, dtype=torch.float64)[[2, 0, 4, 1, 3]]
    D = (P @ torch.diag(d * torch.tensor([1, -1, 1, 1, -1.0], dtype=torch.float64)))[None]
    Q = torch.linalg.qr(torch.randn(1, 11, 11, generator=_gen(3), dtype=torch.float64))[0].contiguous()
    for dtype in (torch.float32, torch.float64):
        tol = TOL[dtype]
        S, _ = svd.svdvals_rank(D.to(dtype).to(DEVICE), 0.9)
        assert torch.allclose(S.double().cpu(), torch.tensor([[3.0, 2.0, 1.0, 0.25, 0.0]], dtype=torch.float64),
                              atol=3 * tol, rtol=0)
        S, _ = svd.svdvals_rank(Q.to(dtype).to(DEVICE), 0.9)
        assert (S.double().cpu() - 1).abs().max() <= tol
        S, rank = run_poisoned(torch.zeros(2, 4, 3, dtype=dtype, device=DEVICE), 0.99)
        assert (S == 0).all() and rank.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_extreme_scales(dtype):
    """The power-of-two scaling: huge and tiny matrices keep the relative accuracy (no overflow
    in a sum of squares, no underflow of the pivots)."""
    big, small = (1e300, 1e-300) if dtype == torch.float64 else (1e37, 1e-37)
    base = matrices("cond1e6", 2, 8, 6, _gen(4))
    for scale in (big, small):
        A = (base * scale).to(dtype)
        S, rank = svd.svdvals_rank(A.to(DEVICE), 0.99)
        ref = torch.linalg.svdvals(base.to(dtype).double())  # scale-free reference
        got = S.double().cpu() / scale
        assert ((got - ref).abs().amax(1) <= TOL[dtype] * ref[:, 0]).all()
        assert rank.tolist() == reference_rank(ref, 0.99).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nonfinite_input_gives_nan_and_rank_minus_one(dtype):
    """Documented behaviour: any NaN/+-Inf in A[b] -> S[b] all NaN, rank[b] = -1; the other
    matrices of the batch are computed normally."""
    A64 = matrices("random", 5, 6, 4, _gen(5))
    A = A64.to(dtype)
    A[1, 2, 3] = float("nan")
    A[2, 0, 0] = float("inf")
    A[3, 5, 1] = -float("inf")
    S, rank = run_poisoned(A.to(DEVICE), 0.99)
    S, rank = S.cpu(), rank.cpu()
    assert torch.isnan(S[1:4]).all()
    assert rank[1:4].tolist() == [-1, -1, -1]
    keep = [0, 4]
    check_against_lapack(A64[keep], S[keep], rank[keep], 0.99, dtype)


def test_float32_compute_option_meets_acceptance():
    """compute_f64=False (float32 inputs): measured ~1e-7 s_1 (interpreter), bound 1e-5 s_1."""
    gen = _gen(6)
    A64 = torch.cat([matrices(kind, 1, 24, 19, gen) for kind in KINDS])
    S, rank = run_poisoned(A64.float().to(DEVICE), 0.99, compute_f64=False)
    check_against_lapack(A64, S, None, None, torch.float32)
    ref = reference_rank(torch.linalg.svdvals(A64.float().double()), 0.99)
    assert (rank.cpu() - ref).abs().max() <= 1  # float32 energies: the rank may move by one at the band


@pytest.mark.parametrize("sections,num_warps", [(1, 1), (2, 2), (8, 4)])
def test_tuning_knobs_same_result(sections, num_warps):
    """Plain bisection (1 point a round) and other multisection widths / warp counts converge to
    the same values (within the float64 bound) and the same rank."""
    A = matrices("lowrank_noise", 3, 12, 10, _gen(8)).to(DEVICE)
    S0, r0 = svd.svdvals_rank(A, 0.99)
    S1, r1 = run_poisoned(A, 0.99, sections=sections, num_warps=num_warps)
    assert ((S1 - S0).abs().amax(1) <= 1e-12 * S0[:, 0]).all()
    assert torch.equal(r0, r1)


def test_deterministic():
    A = matrices("random", 4, 9, 9, _gen(9)).float().to(DEVICE)
    a, ra = svd.svdvals_rank(A, 0.99)
    b, rb = svd.svdvals_rank(A, 0.99)
    assert torch.equal(a, b) and torch.equal(ra, rb)


def test_empty_batch():
    S, rank = svd.svdvals_rank(torch.zeros(0, 4, 3, device=DEVICE), 0.99)
    assert S.shape == (0, 3) and rank.shape == (0,)


def test_bad_input_errors():
    A = torch.zeros(2, 3, 3, device=DEVICE)
    with pytest.raises(TypeError, match="A: expected a torch.Tensor"):
        svd.svdvals_rank(A.cpu().numpy())
    with pytest.raises(ValueError, match=r"A: expected a \(B, m, n\)"):
        svd.svdvals_rank(A[0])
    with pytest.raises(TypeError, match="A: expected float32 or float64"):
        svd.svdvals_rank(A.half())
    with pytest.raises(ValueError, match="A: expected a contiguous"):
        svd.svdvals_rank(A.transpose(1, 2))
    with pytest.raises(ValueError, match=r"A: m and n must be in 1\.\.256"):
        svd.svdvals_rank(torch.zeros(1, 257, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"A: m and n must be in 1\.\.256"):
        svd.svdvals_rank(torch.zeros(1, 0, 3, device=DEVICE))
    for eta in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"eta: expected a value in \(0, 1\]"):
            svd.svdvals_rank(A, eta)
    with pytest.raises(ValueError, match="compute_f64=False is for float32"):
        svd.svdvals_rank(A.double(), compute_f64=False)
    with pytest.raises(ValueError, match="sections"):
        svd.svdvals_rank(A, sections=3)
    with pytest.raises(ValueError, match="programs: expected an int >= 1"):
        svd.svdvals_rank(A, programs=0)
    with pytest.raises(ValueError, match="programs: expected an int >= 1"):
        svd.svdvals_rank(A, programs=2.5)
    with pytest.raises(ValueError, match="out: S must be"):
        svd.svdvals_rank(A, 0.9, out=(torch.empty(2, 2, device=DEVICE), torch.empty(2, dtype=torch.int64, device=DEVICE)))
    with pytest.raises(ValueError, match="out: rank must be"):
        svd.svdvals_rank(A, 0.9, out=(torch.empty(2, 3, device=DEVICE), None))


@pytest.mark.skipif(not HAS_CUDA, reason="CPU tensors run only under the interpreter")
def test_rejects_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="A: expected a CUDA tensor"):
        svd.svdvals_rank(torch.zeros(1, 2, 2))


@pytest.mark.skipif(not HAS_CUDA, reason="needs > 8 GiB of GPU memory and a real GPU's speed")
def test_batch_offsets_past_2_pow_31():
    """B * m * n > 2^31: the last matrices (offset past int32) are still right."""
    m = n = 64
    B = (1 << 31) // (m * n) + 8
    A = torch.empty(B, m, n, device="cuda")
    A[:-16].fill_(1.0)
    tail = matrices("random", 16, m, n, _gen(10))
    A[-16:] = tail.float().cuda()
    S, rank = svd.svdvals_rank(A, 0.99)
    check_against_lapack(tail, S[-16:], rank[-16:], 0.99, torch.float32)
    assert torch.allclose(S[0, 0].double().cpu(), torch.tensor(64.0, dtype=torch.float64))


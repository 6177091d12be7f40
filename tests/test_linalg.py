"""Batched SVD, Jacobian ranks and the MoLRG Jacobian (issue 4, SPEC 3) against float64 references.

Accuracy bounds (acceptance 1), against LAPACK float64 on the same (dtype-rounded) matrix:
|s_i - s_i(ref)| <= 1e-5 s_1 for float32 and 1e-12 s_1 for float64.  The kernels compute in
float64 with backward-stable reductions, whose error is ~ c eps s_1 with c growing slowly with
the size (measured <= 4e-14 s_1 at 512); float32 adds one rounding of the output (6e-8 s_i).
Ranks must equal the reference's except for a matrix whose energy ratio lies within 1e-6 of
eta^2 (there the decision is made by rounding in the last bits).
"""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.reference import denoisers as RD
from fastdiff.reference import linalg as R
from conftest import backend_devices, random_molrg

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


BACKENDS = backend_devices("svd")
IDS = [f"{b}-{d}" for b, d in BACKENDS]


def _matrices(kind, B, m, n, gen, dtype=torch.float64):
    """B (m, n) float64 matrices of one kind, rounded to dtype."""
    N = min(m, n)
    if kind == "random":
        A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    else:
        Q1 = torch.linalg.qr(torch.randn(B, m, N, generator=gen, dtype=torch.float64))[0]
        Q2 = torch.linalg.qr(torch.randn(B, n, N, generator=gen, dtype=torch.float64))[0]
        if kind == "cond1e6":
            s = torch.logspace(0, -6, N, dtype=torch.float64)
        elif kind == "rankdef":          # exact zeros in the spectrum (up to rounding of the product)
            s = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
            s[N // 2 + (N % 2):] = 0.0
        else:                            # lowrank + noise
            s = torch.zeros(N, dtype=torch.float64)
            s[:max(1, N // 5)] = 3.0 + torch.rand(max(1, N // 5), generator=gen, dtype=torch.float64)
        A = Q1 @ torch.diag_embed(s.expand(B, N)) @ Q2.transpose(1, 2)
        if kind == "lowrank":
            A = A + 1e-3 * torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    return A.to(dtype)


KINDS = ["random", "lowrank", "cond1e6", "rankdef"]
# m, n from 1 to 512, square and rectangular; the big ones with small batches (slow machine)
SHAPES = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 7), (13, 5), (16, 16), (31, 47), (48, 48), (64, 17), (100, 128),
          (129, 129), (256, 255), (300, 40), (40, 300), (512, 512), (512, 7), (5, 512)]
SMALL_SHAPES = [(1, 1), (1, 5), (6, 1), (3, 3), (7, 4), (4, 9), (16, 16), (33, 20)]


def _shapes(backend, device):
    if backend == "triton" and device == "cpu":
        return SMALL_SHAPES
    if backend == "triton":
        return [s for s in SHAPES if max(s) <= 256]
    if backend == "torch":  # LAPACK against LAPACK: the wrapper, not the numerics, is under test
        return [s for s in SHAPES if max(s) <= 128]
    return SHAPES


def _check_svals(S, A, dtype):
    ref = torch.linalg.svdvals(A.double().cpu())
    S = S.double().cpu()
    assert S.shape == ref.shape
    assert torch.isfinite(S).all(), "unwritten (NaN-poisoned) or non-finite singular values"
    assert (S[:, :-1] >= S[:, 1:]).all(), "not descending"
    err = ((S - ref).abs().amax(1) / ref[:, 0].clamp(min=1e-300)).max().item()
    assert err <= TOL[dtype], f"max |s - s_ref| / s_1 = {err:.3g} > {TOL[dtype]}"


def _check_ranks(rank, S_ref, eta):
    ref = R.energy_rank(S_ref, eta)
    # the ratio of the full sum (r = N) is 1 by definition: only r < N can sit at the threshold
    ratios = R.energy_ratios(S_ref)[:, :-1]
    near = ((ratios - eta * eta).abs() < 1e-6).any(1)
    ok = (rank.cpu() == ref) | near
    assert ok.all(), f"ranks {rank[~ok].tolist()} != reference {ref[~ok].tolist()}"
    if eta < 1.0 and len(ref) >= 3:
        assert (~near).sum() > 0, "every matrix near the threshold: the test checked nothing"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_svdvals_accuracy_and_rank(backend, device, dtype, kind):
    gen = torch.Generator().manual_seed(hash((kind, str(dtype))) % 2**31)
    shapes = _shapes(backend, device)
    interpreted = backend == "triton" and device == "cpu"
    if interpreted:
        # seconds a launch under the interpreter: each kind takes half the small shapes (all of them
        # over the four kinds); tests/test_svd_triton.py runs the kernel on every shape and kind
        shapes = shapes[KINDS.index(kind) % 2::2]
    for m, n in shapes:
        B = 3 if m * n <= 128 * 128 else 1
        A = _matrices(kind, B, m, n, gen, dtype).to(device)
        S = fastdiff.svdvals(A, backend=backend)
        assert S.dtype == dtype and S.device == A.device
        _check_svals(S, A, dtype)
        # each eta is another SVD; under the interpreter one threshold here, every eta in
        # test_rank_many_matrices_every_eta
        for eta in (0.99,) if interpreted else (0.5, 0.99, 1.0):
            S2, rank = fastdiff.svdvals_rank(A, eta, backend=backend)
            assert rank.dtype == torch.int64 and rank.shape == (B,)
            assert torch.equal(S2.cpu(), S.cpu()), "svdvals and svdvals_rank disagree"
            _check_ranks(rank, torch.linalg.svdvals(A.double().cpu()), eta)
            if not interpreted or (m, n) == shapes[-1]:  # the same launch again: once under the interpreter
                assert torch.equal(fastdiff.jacobian_rank(A, eta=eta, backend=backend).cpu(), rank.cpu())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_rank_many_matrices_every_eta(backend, device):
    """A large batch of low-rank-plus-noise matrices whose ranks spread over 1..N."""
    gen = torch.Generator().manual_seed(7)
    small = backend == "triton" and device == "cpu"
    B, m, n = (10, 12, 10) if small else (400, 24, 20)
    A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    # column scales decaying at a random rate per matrix: a spread of ranks
    rate = torch.rand(B, 1, 1, generator=gen, dtype=torch.float64) * 0.5
    A = A * torch.exp(-rate * torch.arange(n, dtype=torch.float64))
    seen = set()
    for dtype in (torch.float32, torch.float64):
        Ad = A.to(dtype)
        S_ref = torch.linalg.svdvals(Ad.double())
        # under the interpreter two thresholds per dtype (four in all), every threshold elsewhere
        etas = ((0.3, 0.99) if dtype == torch.float32 else (0.9, 0.999)) if small else (0.3, 0.9, 0.99, 0.999)
        for eta in etas:
            rank = fastdiff.jacobian_rank(Ad.to(device), eta=eta, backend=backend)
            _check_ranks(rank, S_ref, eta)
            seen |= set(rank.tolist())
    assert len(seen) >= (4 if small else 8), f"the test spans too few ranks: {sorted(seen)}"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_nonfinite_zero_and_scaling(backend, device):
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    A[1, 2, 3] = float("nan")
    A[2, 0, 0] = float("inf")
    A[3, 4, 1] = -float("inf")
    A[4] = 0.0
    for dtype in (torch.float32, torch.float64):
        S, rank = fastdiff.svdvals_rank(A.to(dtype).to(device), backend=backend)
        S, rank = S.cpu(), rank.cpu()
        assert torch.isnan(S[1:4]).all(), "a non-finite matrix must give NaN singular values"
        assert rank[1:4].tolist() == [-1, -1, -1], "documented: rank -1 for non-finite matrices"
        assert (S[4] == 0).all() and rank[4] == 0, "zero matrix: S = 0, rank 0"
        for b in (0, 5):  # the finite matrices around them are unaffected
            _check_svals(S[b:b + 1], A[b:b + 1].to(dtype), dtype)
    # extreme scales: the power-of-two scaling keeps relative accuracy (float64)
    for scale in (1e-300, 1e-150, 1e150, 1e300):
        As = A[:1] * scale
        S = fastdiff.svdvals(As.to(device), backend=backend).cpu()
        ref = torch.linalg.svdvals(A[:1]) * scale
        assert ((S - ref).abs().max() / ref[0, 0]).item() <= 1e-12


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_batch_shapes_halves_and_numpy(backend, device):
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(2, 3, 6, 5, generator=gen)
    S = fastdiff.svdvals(A.to(device), backend=backend)
    assert S.shape == (2, 3, 5)
    _check_svals(S.reshape(6, 5), A.reshape(6, 6, 5), torch.float32)
    r = fastdiff.jacobian_rank(A.to(device), backend=backend)
    assert r.shape == (2, 3)
    one = fastdiff.svdvals(A[0, 0].to(device), backend=backend)  # a single (m, n) matrix
    assert one.shape == (5,)
    h = fastdiff.svdvals(A.to(torch.bfloat16).to(device), backend=backend)
    assert h.dtype == torch.bfloat16
    if device == "cpu":
        s_np = fastdiff.svdvals(A.numpy(), backend=backend)
        assert isinstance(s_np, np.ndarray) and s_np.shape == (2, 3, 5)
        r_np = fastdiff.jacobian_rank(A.numpy(), backend=backend)
        assert isinstance(r_np, np.ndarray) and r_np.dtype == np.int64


def test_backends_agree_exactly_on_rank_and_closely_on_values():
    gen = torch.Generator().manual_seed(5)
    A = _matrices("lowrank", 12, 30, 30, gen)
    outs = {b: fastdiff.svdvals_rank(A.to(d), backend=b) for b, d in BACKENDS if d == "cpu"}
    ref_S, ref_r = outs["torch"]
    for b, (S, r) in outs.items():
        assert (S.cpu() - ref_S).abs().max() <= 1e-12 * ref_S[:, 0].max()
        assert torch.equal(r.cpu(), ref_r), b


def test_bad_input():
    A = torch.randn(3, 4, 4)
    with pytest.raises(ValueError, match="A: expected a batch of matrices"):
        fastdiff.svdvals(torch.randn(5))
    with pytest.raises(ValueError, match="empty batch"):
        fastdiff.svdvals(torch.randn(0, 4, 4))
    with pytest.raises(ValueError, match="m >= 1 and n >= 1"):
        fastdiff.svdvals(torch.randn(3, 0, 4))
    with pytest.raises(TypeError, match="A: expected a real floating-point"):
        fastdiff.svdvals(torch.ones(3, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="A: expected a torch.Tensor"):
        fastdiff.svdvals([[1.0, 2.0]])
    for eta in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eta: expected a value in \(0, 1\]"):
            fastdiff.jacobian_rank(A, eta=eta)
    with pytest.raises(TypeError, match="eta"):
        fastdiff.jacobian_rank(A, eta="0.9")
    with pytest.raises(ValueError, match="backend"):
        fastdiff.svdvals(A, backend="gpu")
    with pytest.raises(ValueError, match="J: expected a batch"):
        fastdiff.jacobian_rank(torch.randn(4))
    with pytest.raises(ValueError, match="method"):
        fastdiff.jacobian_rank(lambda z: z, A[0], method="power")
    with pytest.raises(ValueError, match="x: required"):
        fastdiff.jacobian_rank(lambda z: z)
    with pytest.raises(ValueError, match="k: expected an int"):
        fastdiff.svd(A, k=5)
    with pytest.raises(ValueError, match="finite"):
        fastdiff.svd(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="x: expected shape"):
        fastdiff.jacobian(lambda z: z, torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="chunk"):
        fastdiff.jacobian(lambda z: z, torch.randn(3, 4), chunk=0)
    U = torch.linalg.qr(torch.randn(8, 2))[0]
    with pytest.raises(ValueError, match="bases: expected n = 9"):
        fastdiff.molrg_jacobian_rank(torch.randn(2, 9), [U], 1.0, 0.5)
    with pytest.raises(ValueError, match="eta"):
        fastdiff.molrg_jacobian_rank(torch.randn(2, 8), [U], 1.0, 0.5, eta=2.0)
    with pytest.raises(ValueError, match="sigma"):
        fastdiff.molrg_jacobian(torch.randn(2, 8), [U], 1.0, -0.5)


def test_svd_leading_vectors():
    gen = torch.Generator().manual_seed(6)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for m, n, k in ((20, 12, 3), (7, 30, 7), (16, 16, None)):
            A = _matrices("random", 4, m, n, gen, dtype)
            U, S, Vh = fastdiff.svd(A, k=k)
            kk = k or min(m, n)
            assert U.shape == (4, m, kk) and S.shape == (4, kk) and Vh.shape == (4, kk, n)
            eye = torch.eye(kk, dtype=torch.float64)
            assert (U.double().transpose(1, 2) @ U.double() - eye).abs().max() <= 10 * tol
            assert (Vh.double() @ Vh.double().transpose(1, 2) - eye).abs().max() <= 10 * tol
            s1 = S[:, :1].double()
            assert ((S.double() - torch.linalg.svdvals(A.double())[:, :kk]).abs() / s1).max() <= tol
            # A v_i = s_i u_i: the triplets belong together
            Av = A.double() @ Vh.double().transpose(1, 2)
            assert ((Av - U.double() * S.double()[:, None, :]).abs().max() / s1.max()) <= 10 * tol
    U, S, Vh = fastdiff.svd(np.eye(3) * 2.0, k=1)
    assert isinstance(S, np.ndarray) and S[0] == pytest.approx(2.0)


# =========================================================================== Jacobians
def _bases(n, dims, gen):
    return [torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0] for d in dims]


def test_jacobian_modes_chunks_and_fallback():
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    fn = lambda z, s: torch.tanh(z @ W.T * s) * z.sum(1, keepdim=True)  # noqa: E731  (B, 5) -> (B, 7)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    ref = R.jacobian(fn, x, 0.7)
    for mode in ("rev", "fwd"):
        for chunk in (None, 1, 3):
            J = fastdiff.jacobian(fn, x, 0.7, chunk=chunk, mode=mode)
            assert J.shape == (4, 7, 5)
            assert (J - ref).abs().max() <= 1e-13
    # fastdiff.molrg_denoise runs an autograd.Function (and C++ kernels) that torch.func cannot
    # transform: the plain-autograd fallback gives the same Jacobian
    U = _bases(6, [2, 3], gen)
    xm = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    Jf = fastdiff.jacobian(lambda z: fastdiff.molrg_denoise(z, U, 0.9, 0.4), xm)
    Jr = R.jacobian(lambda z: RD.molrg_denoise(z, U, 0.9, 0.4), xm)
    assert (Jf - Jr).abs().max() <= 1e-12
    J_np = fastdiff.jacobian(lambda z: 2 * z, np.ones((2, 3)))
    assert isinstance(J_np, np.ndarray) and np.allclose(J_np, 2 * np.eye(3))


MOLRG_CASES = [  # (B, n, dims, per_sample, delta)
    (3, 6, [1, 2], False, 0.0), (4, 12, [3, 4, 2], True, 0.1), (2, 48, [6, 6], False, 0.0),
    (5, 9, [4, 4, 4], True, 0.2), (1, 1, [1], False, 0.3),
]


@pytest.mark.parametrize("case", range(len(MOLRG_CASES)))
def test_molrg_jacobian_matches_reference_autograd_and_differences(case):
    B, n, dims, per_sample, delta = MOLRG_CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    U, pi, tau, x = random_molrg(B, n, dims, gen)
    K = len(dims)
    alpha = torch.rand(B, generator=gen, dtype=torch.float64) + 0.3 if per_sample else 0.8
    sigma = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2 if per_sample else 0.6
    labels = torch.randint(0, K, (B,), generator=gen)
    # SPEC 3's formula written plainly (soft, x0)
    J = fastdiff.molrg_jacobian(x, U, alpha, sigma, pi=pi, tau=tau, delta=delta)
    assert J.shape == (B, n, n) and J.dtype == torch.float64
    assert (J - R.molrg_jacobian(x, U, alpha, sigma, pi=pi, tau=tau, delta=delta)).abs().max() <= 1e-12
    assert (J - J.transpose(1, 2)).abs().max() <= 1e-12  # exact posterior mean: symmetric (SPEC 3)
    for mode in ("soft", "hard"):
        for output in ("x0", "eps", "score"):
            for guided in (False, True):
                kw = dict(pi=pi, tau=tau, delta=delta, mode=mode, output=output)
                if guided:
                    kw.update(labels=labels, guidance=1.7)
                J = fastdiff.molrg_jacobian(x, U, alpha, sigma, **kw)
                f = lambda z: RD.molrg_denoise(z, U, alpha, sigma, **kw)  # noqa: E731
                auto = R.jacobian(f, x)
                scale = auto.abs().max().item() + 1.0
                assert (J - auto).abs().max().item() <= 1e-12 * scale, (mode, output, guided)
                if (mode, output, guided) not in (("soft", "x0", False), ("soft", "score", True), ("hard", "eps", True)):
                    continue  # central differences on a few combinations (the reference is slow)
                # central differences: error h^2 |f'''| ~ 1e-10 plus rounding eps |f| / h ~ 1e-11
                h = 1e-5
                fd = torch.stack([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in torch.eye(n, dtype=torch.float64)], 2)
                assert (J - fd).abs().max().item() <= 1e-6 * scale, (mode, output, guided)
    # float32 input: computed in float64, returned in float32
    J32 = fastdiff.molrg_jacobian(x.float(), [u.float() for u in U], alpha, sigma, pi=pi, tau=tau, delta=delta)
    assert J32.dtype == torch.float32


@pytest.mark.parametrize("case", range(len(MOLRG_CASES)))
def test_molrg_jacobian_rank_equals_dense(case):
    B, n, dims, per_sample, delta = MOLRG_CASES[case]
    gen = torch.Generator().manual_seed(200 + case)
    U = _bases(n, dims, gen)
    for sigma in (0.01, 0.3, 3.0, 50.0):
        x = torch.randn(B, n, generator=gen, dtype=torch.float64)
        sig = torch.rand(B, generator=gen, dtype=torch.float64) * sigma + 0.01 if per_sample else sigma
        for mode in ("soft", "hard"):
            for eta in (0.9, 0.99):
                kw = dict(delta=delta, mode=mode)
                r, S = fastdiff.molrg_jacobian_rank(x, U, 1.0, sig, eta=eta, return_svals=True, **kw)
                J = fastdiff.molrg_jacobian(x, U, 1.0, sig, **kw)
                S_ref = torch.linalg.svdvals(J)
                assert (S - S_ref).abs().max() <= 1e-12 * S_ref[:, 0].max()
                _check_ranks(r, S_ref, eta)
                assert torch.equal(r, fastdiff.jacobian_rank(J, eta=eta)) or \
                    ((R.energy_ratios(S_ref)[:, :-1] - eta**2).abs() < 1e-6).any()


def test_molrg_jacobian_rank_overlapping_bases_and_nan():
    gen = torch.Generator().manual_seed(9)
    U0 = _bases(10, [4], gen)[0]
    U = [U0, U0[:, :2], _bases(10, [5], gen)[0], _bases(10, [6], gen)[0]]  # sum d_k = 17 > n, overlaps
    x = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    x[2, 3] = float("nan")
    r = fastdiff.molrg_jacobian_rank(x, U, 1.0, 0.7, delta=0.05)
    J = fastdiff.molrg_jacobian(x, U, 1.0, 0.7, delta=0.05)
    ok = torch.arange(5) != 2
    assert r[2] == -1
    assert torch.equal(r[ok], R.energy_rank(torch.linalg.svdvals(J[ok]), 0.99))
    r_np = fastdiff.molrg_jacobian_rank(x.numpy(), [u.numpy() for u in U], 1.0, 0.7)
    assert isinstance(r_np, np.ndarray)


def test_lanczos_rank_matches_dense():
    gen = torch.Generator().manual_seed(10)
    n = 64
    U = _bases(n, [5, 7, 3], gen)
    x = torch.randn(6, n, generator=gen, dtype=torch.float64) * 2
    x = x[:4]
    for delta, sigma in ((0.0, 0.5), (0.02, 0.5)):
        f = lambda z: RD.molrg_denoise(z, U, 1.0, sigma, delta=delta)  # noqa: E731
        dense = fastdiff.jacobian_rank(f, x)
        closed = fastdiff.molrg_jacobian_rank(x, U, 1.0, sigma, delta=delta)
        assert torch.equal(dense, closed)
        lz = fastdiff.jacobian_rank(f, x, method="lanczos", k=8)
        if delta == 0.0:  # exactly low rank: the Krylov space holds all the energy, no estimate
            assert torch.equal(lz, dense)
        else:             # a_perp I part: the energy outside the Krylov space is estimated
            assert (lz - dense).abs().max() <= 1, (lz, dense)
    lz_f32 = fastdiff.jacobian_rank(lambda z: RD.molrg_denoise(z, [u.float() for u in U], 1.0, 0.5), x.float(),
                                    method="lanczos", probes=4)
    assert torch.equal(lz_f32, fastdiff.molrg_jacobian_rank(x, U, 1.0, 0.5))


def test_fig3b_rank_ratio_along_heun_trajectory():
    """Seed 002 Fig. 3b: MoLRG with n = 48, K = 2, d = 6: rank / n = K d / n at low SNR (the
    posterior is spread over both subspaces) and d / n at high SNR (one subspace wins)."""
    gen = torch.Generator().manual_seed(11)
    n, K, d = 48, 2, 6
    # orthogonal subspaces, as in seed 002's analysis (overlapping ones make P_1 + P_2's
    # spectrum 1 +- cos(principal angles): the low-SNR rank then depends on the angles)
    Q = _bases(n, [K * d], gen)[0]
    model = fastdiff.denoisers.MoLRG(torch.stack(Q.split(d, dim=1)))
    noise = torch.randn(16, n, generator=gen, dtype=torch.float64)
    tr = fastdiff.jacobian_rank_trajectory(model, noise)
    assert tr.sigma.shape == (18,) and tr.ranks.shape == (18, 16)
    assert tr.sigma[0] == pytest.approx(80.0) and tr.snr[-1] == pytest.approx(1 / 0.002)
    assert tr.ratio[0].item() == pytest.approx(K * d / n)   # low SNR
    assert tr.ratio[-1].item() == pytest.approx(d / n)      # high SNR
    assert (tr.ratio[:-1] >= tr.ratio[1:] - 1e-12).all()    # the rank only drops along the way
    # the final samples lie on the subspaces: the sampler really ran
    proj = torch.stack([(tr.x @ u.double()).norm(dim=1) for u in model.bases], 1).max(1).values
    assert (proj / tr.x.norm(dim=1) > 0.999).all()
    # a generic callable (dense autograd Jacobians) agrees with the closed form, step by step
    short = fastdiff.KarrasSchedule(4)
    tr2 = fastdiff.jacobian_rank_trajectory(model, noise[:4], schedule=short)
    tr3 = fastdiff.jacobian_rank_trajectory(lambda z, a, s: model(z, a, s), noise[:4], schedule=short)
    assert torch.equal(tr2.ranks, tr3.ranks)
    tr_np = fastdiff.jacobian_rank_trajectory(model, noise[:2].numpy(), schedule=short)
    assert isinstance(tr_np.ratio, np.ndarray)


def test_trajectory_ranks_honour_the_molrg_mode():
    """A hard-mode MoLRG (one-hot weights, seed 002 eq. 16-17) has J = a_k P_k on the winning
    subspace only: rank d at every level, where the soft posterior's is K d at low SNR.  The
    closed-form ranks along the trajectory must be the hard model's (they equal the dense
    autograd Jacobian of the hard denoiser), not the soft formula's at the same points."""
    gen = torch.Generator().manual_seed(12)
    n, K, d = 24, 2, 4
    bases = torch.stack(_bases(n, [K * d], gen)[0].split(d, dim=1))
    hard, soft = fastdiff.denoisers.MoLRG(bases, mode="hard"), fastdiff.denoisers.MoLRG(bases)
    noise = torch.randn(8, n, generator=gen, dtype=torch.float64)
    short = fastdiff.KarrasSchedule(5)
    th = fastdiff.jacobian_rank_trajectory(hard, noise, schedule=short)
    dense = fastdiff.jacobian_rank_trajectory(lambda z, a, s: hard(z, a, s), noise, schedule=short)
    assert torch.equal(th.ranks, dense.ranks) and torch.equal(th.x, dense.x)
    assert (th.ranks == d).all()
    ts = fastdiff.jacobian_rank_trajectory(soft, noise, schedule=short)
    assert (ts.ranks[0] == K * d).all()   # the soft model at the same start: spread over both subspaces
    # the rank at each visited point is molrg_jacobian_rank in the model's mode
    xs = []
    fastdiff.sampling.run(hard, noise * short.floats("sigmas")[0], fastdiff.sampling.trajectory_table(short, "heun"),
                          callback=lambda info: xs.append((info.x.clone(), info.sigma)), progress=False)
    for (x, s), r in zip(xs, th.ranks):
        assert torch.equal(r, fastdiff.molrg_jacobian_rank(x, bases, 1.0, s, mode="hard"))

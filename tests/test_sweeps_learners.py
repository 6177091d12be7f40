"""The sweeps' learners (fastdiff.sweeps.learners) against one-instance references: PCA by subspace
iteration, K-subspaces (C++ and torch), the adam learner and its retraction (the sgd learner: test_sweeps_alg1.py), the Gaussian learner,
the denoisers of a training set."""
import pytest
import torch

import fastdiff
from fastdiff import dispatch
from fastdiff.ops.ksubspaces import orth
from fastdiff.reference import sweeps as R
from fastdiff.sweeps import learners as LR
from fastdiff.sweeps import subspace as S
from sweeps_helpers import gen, proj


@pytest.mark.parametrize("N,n,d,delta", [(1, 5, 1, 0.1), (3, 7, 5, 0.0), (9, 9, 9, 0.3), (40, 17, 3, 0.2),
                                         (6, 48, 6, 0.0), (25, 31, 12, 1.0), (2, 3, 3, 0.05)])
def test_top_subspace_matches_svd(N, n, d, delta):
    g = gen(N * 100 + d)
    B = 6
    U = torch.linalg.qr(torch.randn(B, n, d, generator=g, dtype=torch.float64)).Q
    X = torch.randn(B, N, d, generator=g, dtype=torch.float64) @ U.mT + delta * torch.randn(B, N, n, generator=g, dtype=torch.float64)
    V0 = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    for max_iter in (60, 1):                        # 1: most instances take the exact-SVD fallback
        V = LR.top_subspace(X, V0, max_iter=max_iter)
        assert torch.allclose(V.mT @ V, torch.eye(d, dtype=torch.float64).expand(B, d, d), atol=1e-10)
        r = min(N, d)
        for b in range(B):
            # the top-r right singular directions of X (all of its span when N < d) lie in span(V),
            # wherever the data determine them (an eigen-gap after the r-th): the subspace iteration
            # stops at residual 1e-10 ||X||_F^2, so by Davis-Kahan the error is < 1e-10 / 1e-3 * rank
            s = torch.linalg.svdvals(X[b])
            nxt = s[r].item() if r < len(s) else 0.0
            if s[r - 1].item() ** 2 - nxt ** 2 < 1e-3 * s[0].item() ** 2:
                continue
            Vr = R.pca(X[b], r)
            assert (Vr - V[b] @ (V[b].T @ Vr)).norm() < 1e-5


CPP = pytest.mark.skipif(not dispatch.exists("ksubspaces", "cpp"), reason="fastdiff._C without ksubspaces")


def _padded(X, counts):
    """Zero the rows of each instance past its count (the sweep's padding)."""
    keep = torch.arange(X.shape[1])[None, :, None] < counts[:, None, None]
    return torch.where(keep, X, 0.0)


@CPP
@pytest.mark.parametrize("N,n,d,delta", [(1, 5, 1, 0.1), (3, 7, 5, 0.0), (9, 9, 9, 0.3), (40, 17, 3, 0.2),
                                         (6, 48, 6, 0.0), (25, 31, 12, 1.0), (2, 3, 3, 0.05), (48, 48, 12, 0.0)])
def test_cpp_top_subspace_matches_torch_and_svd(N, n, d, delta):
    """The C++ subspace iteration (float32) against the torch one and the exact SVD: projectors agree
    to float32 rounding wherever the data determine the subspace (a gap after the d-th value)."""
    g = gen(N * 1000 + n * 10 + d)
    B = 7
    U = torch.linalg.qr(torch.randn(B, n, d, generator=g)).Q
    counts = torch.randint(1, N + 1, (B,), generator=g)
    counts[0] = N
    X = _padded(torch.randn(B, N, d, generator=g) @ U.mT + delta * torch.randn(B, N, n, generator=g), counts)
    V0 = torch.randn(B, n, d, generator=g)
    for max_iter in (60, 1, 0):                      # 0 and 1: the exact-SVD finish takes most or all
        Vc = LR.top_subspace(X, V0, max_iter=max_iter, counts=counts, backend="cpp")
        Vt = LR.top_subspace(X, V0, max_iter=max_iter, backend="torch")
        assert torch.isfinite(Vc).all()              # the wrapper poisons with NaN
        assert torch.allclose(Vc.mT @ Vc, torch.eye(d).expand(B, d, d), atol=2e-5)
        for b in range(B):
            s = torch.linalg.svdvals(X[b].double())
            r = min(int(counts[b]), d)
            nxt = s[r].item() if r < len(s) else 0.0
            if s[r - 1].item() ** 2 - nxt ** 2 < 1e-2 * s[0].item() ** 2:
                continue                             # not determined by the data (no gap)
            Vr = R.pca(X[b].double(), r).float()
            assert (Vr - Vc[b] @ (Vc[b].T @ Vr)).norm() < 2e-3, (b, max_iter)
            assert (proj(Vc[b]) @ Vr - proj(Vt[b]) @ Vr).norm() < 2e-3, (b, max_iter)


@CPP
@pytest.mark.parametrize("n,K,d,Ns,delta,bases", [(30, 3, 3, [60], 0.0, "random"), (48, 2, 6, [9, 20, 48], 0.05, "orthogonal"),
                                                   (17, 3, 5, [3, 9, 40], 0.1, "random"), (48, 2, 12, [24, 48], 0.01, "orthogonal"),
                                                   (8, 2, 1, [1, 2, 5], 0.2, "random"), (24, 4, 3, [7, 40], 0.0, "random")])
def test_cpp_seeding_and_ksubspaces_match_torch(n, K, d, Ns, delta, bases):
    """The C++ K-subspaces (seeding, iteration, exact refit) against the batched torch form from the
    same uniforms / starts, on padded batches of several sample sizes.  Data in general position
    (noise or random bases): no exact ties in |cos| or energies, so both make the same choices."""
    T = 6
    U, X, _ = S.molrg_batch(n, K, d, Ns, delta, bases, list(range(3, 3 + len(Ns))), T)
    counts = torch.tensor([float(N) for N in Ns]).repeat_interleave(T)
    u = torch.rand(X.shape[0], 4, generator=gen(sum(Ns)))
    V0c = LR.seed_bases(X, counts, K, d, u, backend="cpp")
    V0t = LR.seed_bases(X, counts, K, d, u, backend="torch")
    assert torch.isfinite(V0c).all()
    # where some component has fewer than d points, every point ends up fully explained and the next
    # seed is an argmin over values equal up to rounding: the two may pick differently (both valid)
    determined = counts >= K * d
    assert bool(determined.any())
    assert torch.allclose(proj(V0c[determined]), proj(V0t[determined]), atol=1e-3)
    Uc, lc = LR.ksubspaces(X, K, V0t, counts=counts, backend="cpp")
    Ut, lt = LR.ksubspaces(X, K, V0t, backend="torch")
    assert torch.isfinite(Uc).all() and bool((lc >= 0).all()) and bool((lc < K).all())
    assert bool((lc[counts[:, None] <= torch.arange(X.shape[1])] == 0).all())      # padding rows: component 0
    # compare where the clustering is well determined: with about d points per cluster (N ~ K d) a
    # point near two subspaces can go either way on rounding, and a cluster of fewer than d points
    # has no unique top-d subspace
    well = counts >= 2 * K * d
    assert bool(well.any())
    ec, et = S.subspace_errors(Uc, U)[well], S.subspace_errors(Ut, U)[well]
    assert torch.allclose(ec, et, atol=2e-3), (ec - et).abs().max()
    # the fitted bases of the two agree component by component up to the order of the components
    assert bool((S.subspace_errors(Uc, Ut)[well] < 2e-3).all())


@CPP
def test_cpp_ksubspaces_input_errors():
    X = torch.randn(2, 5, 6)
    V0 = torch.linalg.qr(torch.randn(2, 3, 2, 6, 2)).Q
    with pytest.raises(ValueError, match="counts"):
        LR.ksubspaces(X, 2, V0, counts=torch.tensor([5, 6]), backend="cpp")
    with pytest.raises(ValueError, match="counts"):
        LR.seed_bases(X, torch.tensor([0, 5]), 2, 2, torch.rand(2, 3), backend="cpp")
    with pytest.raises(RuntimeError, match="float32 CPU"):
        LR.ksubspaces(X.double(), 2, V0.double(), backend="cpp")
    with pytest.raises(ValueError, match="backend"):
        LR.top_subspace(X, V0[:, 0, 0], backend="triton")


def test_ksubspaces_recovers_well_sampled_mixtures_and_matches_reference():
    n, K, d, N, T = 30, 3, 3, 60, 6
    U, X, _ = S.molrg_batch(n, K, d, [N], 0.0, "random", [4], T)
    counts = torch.full((T,), float(N))
    u = torch.rand(T, 3, generator=gen(0))
    V0 = LR.seed_bases(X, counts, K, d, u)
    Uh, lab = LR.ksubspaces(X, K, V0)
    # exact recovery up to float32 rounding (the sweep computes in float32)
    assert bool((S.subspace_errors(Uh, U) < 1e-3).all())
    for t in range(T):                                  # the per-instance SVD reference from the same starts
        starts = [R.seed_bases(X[t], K, d, int(u[t, r] * N)) for r in range(3)]
        for r in range(3):                              # the batched seeding equals the reference's
            for k in range(K):
                assert torch.allclose(proj(V0[t, r, k]), proj(starts[r][k]), atol=1e-5)
        ref = R.ksubspaces(X[t].double(), K, [[u.double() for u in st] for st in starts])
        assert R.subspace_error(ref, [u.double() for u in U[t]]) < 1e-3


def test_adam_engines_agree():
    """adam: the fused per-instance engine (fastdiff.molrg_denoise forward/backward) and the batched GEMM form."""
    n, K, d, N = 10, 2, 2, 12
    U, X, _ = S.molrg_batch(n, K, d, [N], 0.0, "orthogonal", [9], 2)
    counts = torch.full((2,), float(N))
    init = torch.randn(2, K, n, d, generator=gen(1))
    out = {e: LR.adam_bases(X, counts, K, d, [(9, 0), (9, 1)], steps=40, engine=e, init=init) for e in ("batched", "fused")}
    # same noise, same start; float32 kernels vs torch float32 GEMMs differ by rounding only
    assert (out["batched"] - out["fused"]).abs().max() < 1e-3


def test_adam_noise_window_is_the_cells_own():
    """adam_bases: a cell's noise at step s is its (trials, N, n + 1) window, not the padded batch's."""
    n, K, d = 6, 1, 2
    U, X, _ = S.molrg_batch(n, K, d, [4, 9], 0.0, "orthogonal", [5, 6], 2)
    counts = torch.tensor([4.0, 4.0, 9.0, 9.0])
    init = torch.randn(4, K, n, d, generator=gen(2))
    both = LR.adam_bases(X, counts, K, d, [(5, 0), (5, 1), (6, 0), (6, 1)], steps=5, init=init)
    alone = LR.adam_bases(X[:2, :4], counts[:2], K, d, [(5, 0), (5, 1)], steps=5, init=init[:2])
    assert (both[:2] - alone).abs().max() < 1e-5


def test_retractions_agree_and_cholesky_falls_back():
    """sgd's QR retraction: CholeskyQR2 (the CUDA default) equals Householder with R's diagonal
    positive; a rank-deficient Y (Gram matrix singular) falls back to Householder."""
    U = orth(torch.randn(5, 2, 300, 4, generator=gen(3)))
    Y = U - 0.1 * torch.randn(5, 2, 300, 4, generator=gen(4)).sign()
    H, C = LR._retract(Y, "householder"), LR._retract(Y, "cholesky")
    assert torch.isfinite(C).all() and (H - C).abs().max() < 1e-5
    assert (C.mT @ C - torch.eye(4)).abs().max() < 1e-5
    assert (torch.diagonal(C.mT @ Y, dim1=-2, dim2=-1) > 0).all()          # R = Q^T Y has a positive diagonal
    assert (LR._retract(U, "cholesky") - U).abs().max() < 1e-5               # orthonormal Y maps to itself
    Y[0, 1, :, 3] = Y[0, 1, :, 2]          # two equal columns: Cholesky passes with a tiny pivot; Q is
    Cd = LR._retract(Y, "cholesky")         # a valid retraction still (orthonormal, spans Y)
    assert (Cd.mT @ Cd - torch.eye(4)).abs().max() < 1e-4 and (Cd @ (Cd.mT @ Y) - Y).abs().max() < 1e-5
    Y[0, 1, :, 3] = 0                      # a zero column: Cholesky fails, Householder takes over
    Cf = LR._retract(Y, "cholesky")
    assert torch.isfinite(Cf).all() and (Cf - LR._retract(Y, "householder")).abs().max() == 0
    with pytest.raises(ValueError, match="method: expected"):
        LR._retract(Y, "svd")


def test_adam_with_cholesky_retraction_matches_householder():
    """The whole adam learner with the GPU's retraction, on the CPU: the same bases to rounding."""
    n, K, d, N = 20, 2, 2, 16
    U, X, _ = S.molrg_batch(n, K, d, [N], 0.0, "orthogonal", [4], 3)
    counts = torch.full((3,), float(N))
    init = torch.randn(3, K, n, d, generator=gen(5))
    rows = [(4, t) for t in range(3)]
    house = LR.adam_bases(X, counts, K, d, rows, init=init, retraction="householder")
    chol = LR.adam_bases(X, counts, K, d, rows, init=init, retraction="cholesky")
    # Adam amplifies rounding mid-training (measured: 1e-7 -> 2e-2 by step 40 on one instance), and
    # the cosine-decayed rate brings both back to the same subspaces by step 300
    assert (S.subspace_errors(house, chol) < 1e-3).all()
    assert (S.subspace_errors(house, U) - S.subspace_errors(chol, U)).abs().max() < 1e-3
    assert (S.subspace_errors(house, U) < 0.1).all()
    with pytest.raises(ValueError, match="retraction: expected"):
        LR.adam_bases(X, counts, K, d, rows, init=init, retraction="svd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fit_gaussian_is_the_ml_gaussian(dtype):
    """mu_0 and Sigma_0 (1/N, not 1/(N-1)) per instance, against the float64 torch.mean / torch.cov
    of each instance.  Not to the bit: the batched product and torch.cov's single one may take
    different BLAS kernels (CI's CPU differed from this one's), so the tolerance is the rounding
    of a length-N sum in dtype, 8 N eps relative to the largest entry."""
    X = torch.randn(4, 7, 5, generator=gen(21), dtype=torch.float64).to(dtype)
    mu0, S0 = LR.fit_gaussian(X)
    assert mu0.shape == (4, 5) and S0.shape == (4, 5, 5) and S0.dtype == dtype and mu0.dtype == dtype
    tol = 8 * X.shape[1] * torch.finfo(dtype).eps
    for t in range(4):
        x = X[t].double()
        ref_mu, ref_S = x.mean(0), torch.cov(x.T, correction=0)
        assert (mu0[t].double() - ref_mu).abs().max() <= tol * ref_mu.abs().max()
        assert (S0[t].double() - ref_S).abs().max() <= tol * ref_S.abs().max()
        # 1/N, not torch.cov's default 1/(N-1): the two differ by 7/6 here, far outside tol
        assert (S0[t].double() - torch.cov(x.T)).abs().max() > 100 * tol * ref_S.abs().max()


def test_null_modes_zero_the_null_space_exactly():
    """Sigma_0 from N = 3 points in R^6 has rank 2: four eigenvalues exactly 0, then the ridge."""
    _, S0 = LR.fit_gaussian(torch.randn(2, 3, 6, generator=gen(22), dtype=torch.float64))
    for ridge in (0.0, 1e-3):
        lam, V = LR.null_modes(S0, ridge)
        assert bool(((lam == ridge).sum(-1) == 4).all())
        assert torch.allclose(V @ torch.diag_embed(lam) @ V.mT, S0 + ridge * torch.eye(6), atol=1e-12)


def test_fit_denoisers_of_a_training_set():
    """empirical: the training points; linear: the fitted Gaussian; molrg: bases recovered from
    well-sampled MoLRG data (PCA for K = 1, K-subspaces for K = 2); an unknown kind is refused."""
    x = torch.randn(5, 12, generator=gen(23))
    for K in (1, 2):
        U, X, _ = S.molrg_batch(12, K, 2, [40], 0.0, "orthogonal", [6], 3)
        emp = LR.fit_denoisers("empirical", X, K, 2, 6)
        lin = LR.fit_denoisers("linear", X, K, 2, 6)
        mol = LR.fit_denoisers("molrg", X, K, 2, 6)
        assert len(emp) == len(lin) == len(mol) == 3
        for t in range(3):
            # at a tiny noise level the empirical optimum returns the training point next to x
            assert torch.allclose(emp[t](X[t][:5] + 1e-4 * x, 1.0, 1e-3), X[t][:5], atol=1e-3)
            # linear forms Sigma_0 in float64 and projects it onto the PSD cone before rounding to
            # float32, so it agrees with the float32 torch.cov formulation to float32 rounding
            ref = fastdiff.denoisers.Gaussian(X[t].mean(0), torch.cov(X[t].T, correction=0))
            torch.testing.assert_close(lin[t](x, 0.8, 0.6), ref(x, 0.8, 0.6), rtol=1e-5, atol=1e-6)
            assert S.subspace_errors(torch.stack(mol[t].bases)[None], U[t:t + 1]).item() < 1e-3
    with pytest.raises(ValueError, match="denoiser: expected one of"):
        LR.fit_denoisers("svm", X, 2, 2, 6)


def test_learner_input_shapes_are_refused_clearly():
    X = torch.randn(2, 5, 6)
    V0 = torch.linalg.qr(torch.randn(2, 3, 2, 6, 2)).Q
    with pytest.raises(ValueError, match=r"X: expected shape \(B, N, n\)"):
        LR.top_subspace(X[0], V0[0, 0])
    with pytest.raises(ValueError, match=r"starts: expected shape \(B, n, d\)"):
        LR.top_subspace(X, V0[:, 0, 0, :5])
    with pytest.raises(ValueError, match="starts: expected K = 3"):
        LR.ksubspaces(X, 3, V0)
    with pytest.raises(ValueError, match=r"counts: expected shape \(2,\)"):
        LR.ksubspaces(X, 2, V0, counts=torch.tensor([5]))
    with pytest.raises(ValueError, match="max_iter"):
        LR.ksubspaces(X, 2, V0, max_iter=-1)
    with pytest.raises(ValueError, match="seed_bases: expected"):
        LR.seed_bases(X, torch.tensor([5, 5]), 2, 7, torch.rand(2, 3))

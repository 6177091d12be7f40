"""Phase-diagram sweeps (issue 6): the store, grids, the batched learners against one-instance
references, the experiments' acceptance criteria, resume after kill -9, Ray vs local."""
import csv
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from scipy import stats

from fastdiff import dispatch, sweeps
from fastdiff.reference import sweeps as R
from fastdiff.sweeps import linear as L
from fastdiff.sweeps import memorization as M
from fastdiff.sweeps import subspace as S
from fastdiff.sweeps.runner import EXPERIMENTS, cell_seed, plan
from fastdiff.sweeps.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _table(store_path, experiment):
    """Stored rows without run metadata (time, versions): what must agree between runs."""
    exp, params, metrics = Store.read_experiment(store_path)
    assert exp == experiment
    with Store(store_path, exp, params, metrics) as st:
        return [{k: v for k, v in r.items() if k not in ("seconds", "finished_at", "versions")} for r in st.rows()]


# =========================================================================== store
PARAMS = [("a", "INTEGER"), ("A", "REAL")]          # names that differ only in case (n and N) must work
METRICS = [("m", "REAL")]


def _row(a, t, m=1.0):
    cell = {"a": a, "A": 0.5}
    return {"cell": sweeps.store.cell_key(cell), "trial": t, **cell, "m": m, "seed": 7, "backend": "torch",
            "versions": "v", "seconds": 0.1, "finished_at": "now"}


def test_store_roundtrip_skip_and_export(tmp_path, monkeypatch):
    p = str(tmp_path / "s.sqlite")
    with Store(p, "exp", PARAMS, METRICS) as st:
        assert st.write([_row(1, 0), _row(1, 1, 2.0)]) == 2
        assert st.write([_row(1, 1, 99.0), _row(2, 0)]) == 1            # (cell, trial) already stored: skipped
    with Store(p, "exp", PARAMS, METRICS) as st:
        rows = st.rows()
        assert [(r["a"], r["A"], r["trial"], r["m"]) for r in rows] == [(1, 0.5, 0, 1.0), (1, 0.5, 1, 2.0), (2, 0.5, 0, 1.0)]
        assert len(st.finished()) == 3
        st.export_csv(str(tmp_path / "s.csv"))
        with open(tmp_path / "s.csv", newline="") as f:
            header, *body = list(csv.reader(f))
        assert header[:6] == ["cell", "trial", "a", "A", "m", "seed"] and header == st.columns
        assert [(int(r[2]), float(r[3]), int(r[1]), float(r[4])) for r in body] == [(1, 0.5, 0, 1.0), (1, 0.5, 1, 2.0), (2, 0.5, 0, 1.0)]
        monkeypatch.setattr(sweeps.store, "_pyarrow", lambda: None)   # the csv-module fallback writes the same table
        assert st.export(str(tmp_path / "t")) == [str(tmp_path / "t.rows.csv")]
        with open(tmp_path / "t.rows.csv", newline="") as f:
            assert [r[:4] + [float(r[4])] for r in list(csv.reader(f))[1:]] == [r[:4] + [float(r[4])] for r in body]
        monkeypatch.undo()
        pq = pytest.importorskip("pyarrow.parquet")
        st.export_parquet(str(tmp_path / "s.parquet"))
        t = pq.read_table(str(tmp_path / "s.parquet"))
        assert t.num_rows == 3 and t.column("m").to_pylist() == [1.0, 2.0, 1.0]


def test_store_aggregate_matches_statistics(tmp_path):
    """Store.aggregate (two passes in SQLite) against the statistics module: per-cell mean and standard
    error over the finite values (NaN is stored as NULL and skipped), many chunks of rows (the
    multi-row INSERT), a cell whose metric is never finite, a cell with one finite value."""
    import statistics

    g = _gen(11)
    metrics = [("m", "REAL"), ("ok", "INTEGER")]
    values = {}
    rows = []
    for a in range(40):
        trials = 1 + a % 7
        for t in range(trials):
            m = float("nan") if (a == 3 or (a % 5 == 1 and t % 2)) else 1e4 + torch.randn(1, generator=g).item()
            cell = {"a": a, "A": 0.5}
            rows.append({"cell": sweeps.store.cell_key(cell), "trial": t, **cell, "m": m, "ok": t % 2, "seed": 7,
                         "backend": "cpp", "versions": "v", "seconds": 0.1, "finished_at": "now"})
            values.setdefault(a, []).append((m, t % 2))
    with Store(str(tmp_path / "s.sqlite"), "exp", PARAMS, metrics) as st:
        st._max_variables = 200                       # several INSERT chunks per write
        assert st.write(rows) == len(rows)
        agg = st.aggregate()
    assert [r["a"] for r in agg] == sorted(values)     # numerically (issue 13: not as the cell's text)
    for r in agg:
        ms = [m for m, _ in values[r["a"]] if not math.isnan(m)]
        oks = [o for _, o in values[r["a"]]]
        assert r["trials"] == len(values[r["a"]]) and r["A"] == 0.5
        for name, vals in (("m", ms), ("ok", oks)):
            mean, se = r[f"{name}_mean"], r[f"{name}_se"]
            if not vals:
                assert math.isnan(mean) and math.isnan(se)
                continue
            assert mean == pytest.approx(statistics.fmean(vals), rel=1e-12)
            if len(vals) < 2:
                assert math.isnan(se)
            else:   # the deviations pass keeps the digits a sum-of-squares formula would lose at mean 1e4
                assert se == pytest.approx(statistics.stdev(vals) / math.sqrt(len(vals)), rel=1e-9)


def test_store_refuses_other_schema_and_stays_intact(tmp_path):
    p = str(tmp_path / "s.sqlite")
    with Store(p, "exp", PARAMS, METRICS) as st:
        st.write([_row(1, 0)])
    with pytest.raises(ValueError, match="holds results of experiment 'exp'"):
        Store(p, "other", PARAMS, METRICS)
    with pytest.raises(ValueError, match="other columns"):
        Store(p, "exp", PARAMS, [("m2", "REAL")])
    with Store(p, "exp", PARAMS, METRICS) as st:
        assert len(st) == 1
    q = str(tmp_path / "foreign.sqlite")
    db = sqlite3.connect(q)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="not a fastdiff sweep store"):
        Store(q, "exp", PARAMS, METRICS)


def test_store_write_is_all_or_nothing(tmp_path):
    with Store(str(tmp_path / "s.sqlite"), "exp", PARAMS, METRICS) as st:
        bad = _row(2, 0)
        del bad["m"]
        with pytest.raises(ValueError, match="missing column"):
            st.write([_row(1, 0), bad])
        with pytest.raises(sqlite3.Error):
            st.write([_row(1, 0), {**_row(3, 0), "m": object()}])     # unsupported value: rolled back
        assert len(st) == 0


# =========================================================================== grids and bad input
@pytest.mark.parametrize("text,typ,expected", [
    ("1:12", int, list(range(1, 13))), ("2:48:2", int, list(range(2, 49, 2))), ("1,2", int, [1, 2]),
    ("1:4,8", int, [1, 2, 3, 4, 8]), ("5", int, [5]), ("0:0.3:0.1", float, [0.0, 0.1, 0.2, 0.3]),
    ("pca,sgd", str, ["pca", "sgd"]), ("3:3", int, [3]), ([1, 2, 2], int, [1, 2]),
])
def test_parse_values(text, typ, expected):
    assert sweeps.parse_values("x", text, typ) == expected


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("5:1", "inverted range"), ("1:2:0", "step must be positive"), ("1::2", "start:stop"),
    ("a", "expected int"), ("1.5", "expected int"), ("1,,2", "empty value"), ("1:2:3:4", "start:stop"),
])
def test_parse_values_errors(text, match):
    with pytest.raises(ValueError, match=match):
        sweeps.parse_values("d", text, int)


@pytest.mark.parametrize("grid,match", [
    ({"d": "60"}, "d <= n"), ({"K": 5, "d": 12}, "K d <= n"), ({"N": "0:4"}, "N >= 1"),
    ({"learner": "svm"}, "expected values in"), ({"K": 2, "learner": "pca"}, "'pca' fits one subspace"),
    ({"bogus": 1}, "not a parameter"), ({"delta": "-1"}, "delta >= 0"), ({"n": "0"}, "n >= 1"),
])
def test_bad_grids_raise_before_touching_the_store(tmp_path, grid, match):
    p = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match=match):
        sweeps.run_sweep("subspace-recovery", grid, store=str(p), progress=False)
    assert not p.exists()


def test_unknown_experiment_and_options(tmp_path):
    with pytest.raises(ValueError, match="experiment: expected one of"):
        sweeps.run_sweep("jacobian-ranks", {}, store=str(tmp_path / "s.sqlite"))
    for kw, match in (({"trials": 0}, "trials"), ({"seed": -1}, "seed"), ({"executor": "dask"}, "executor"),
                      ({"threads": 0}, "threads")):
        with pytest.raises(ValueError, match=match):
            sweeps.run_sweep("subspace-recovery", {}, store=str(tmp_path / "s.sqlite"), **kw)
    assert not (tmp_path / "s.sqlite").exists()


def test_mixed_grid_skips_cells_that_do_not_apply():
    cells, skipped = sweeps.build_grid(EXPERIMENTS["subspace-recovery"], {"K": "1,2", "d": 2, "N": 4})
    assert {(c["K"], c["learner"]) for c in cells} == {(1, "pca"), (1, "ksubspaces"), (2, "ksubspaces")}
    assert len(skipped) == 1 and "pca" in skipped[0]


def test_plan_is_deterministic_and_groups_by_shape():
    exp = EXPERIMENTS["subspace-recovery"]
    cells, _ = sweeps.build_grid(exp, {})
    batches = plan(exp, cells, 20)
    assert sorted(i for b in batches for i in b) == list(range(len(cells)))
    for b in batches:
        assert len({exp.batch_key(cells[i]) for i in b}) == 1
    assert batches == plan(exp, cells, 20)
    assert cell_seed("subspace-recovery", 0, cells[0]) != cell_seed("subspace-recovery", 1, cells[0])


# =========================================================================== subspace recovery: pieces
def _proj(U):
    return U @ U.mT


@pytest.mark.parametrize("N,n,d,delta", [(1, 5, 1, 0.1), (3, 7, 5, 0.0), (9, 9, 9, 0.3), (40, 17, 3, 0.2),
                                         (6, 48, 6, 0.0), (25, 31, 12, 1.0), (2, 3, 3, 0.05)])
def test_top_subspace_matches_svd(N, n, d, delta):
    g = _gen(N * 100 + d)
    B = 6
    U = torch.linalg.qr(torch.randn(B, n, d, generator=g, dtype=torch.float64)).Q
    X = torch.randn(B, N, d, generator=g, dtype=torch.float64) @ U.mT + delta * torch.randn(B, N, n, generator=g, dtype=torch.float64)
    V0 = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    for max_iter in (60, 1):                        # 1: most instances take the exact-SVD fallback
        V = S.top_subspace(X, V0, max_iter=max_iter)
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
    g = _gen(N * 1000 + n * 10 + d)
    B = 7
    U = torch.linalg.qr(torch.randn(B, n, d, generator=g)).Q
    counts = torch.randint(1, N + 1, (B,), generator=g)
    counts[0] = N
    X = _padded(torch.randn(B, N, d, generator=g) @ U.mT + delta * torch.randn(B, N, n, generator=g), counts)
    V0 = torch.randn(B, n, d, generator=g)
    for max_iter in (60, 1, 0):                      # 0 and 1: the exact-SVD finish takes most or all
        Vc = S.top_subspace(X, V0, max_iter=max_iter, counts=counts, backend="cpp")
        Vt = S.top_subspace(X, V0, max_iter=max_iter, backend="torch")
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
            assert (_proj(Vc[b]) @ Vr - _proj(Vt[b]) @ Vr).norm() < 2e-3, (b, max_iter)


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
    u = torch.rand(X.shape[0], 4, generator=_gen(sum(Ns)))
    V0c = S.seed_bases(X, counts, K, d, u, backend="cpp")
    V0t = S.seed_bases(X, counts, K, d, u, backend="torch")
    assert torch.isfinite(V0c).all()
    # where some component has fewer than d points, every point ends up fully explained and the next
    # seed is an argmin over values equal up to rounding: the two may pick differently (both valid)
    determined = counts >= K * d
    assert bool(determined.any())
    assert torch.allclose(_proj(V0c[determined]), _proj(V0t[determined]), atol=1e-3)
    Uc, lc = S.ksubspaces(X, K, V0t, counts=counts, backend="cpp")
    Ut, lt = S.ksubspaces(X, K, V0t, backend="torch")
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
        S.ksubspaces(X, 2, V0, counts=torch.tensor([5, 6]), backend="cpp")
    with pytest.raises(ValueError, match="counts"):
        S.seed_bases(X, torch.tensor([0, 5]), 2, 2, torch.rand(2, 3), backend="cpp")
    with pytest.raises(RuntimeError, match="float32 CPU"):
        S.ksubspaces(X.double(), 2, V0.double(), backend="cpp")
    with pytest.raises(ValueError, match="backend"):
        S.top_subspace(X, V0[:, 0, 0], backend="triton")


def test_subspace_errors_match_brute_force():
    g = _gen(3)
    for K, d, n in ((1, 3, 8), (2, 2, 9), (3, 4, 20), (4, 1, 6), (5, 2, 13), (6, 1, 7)):
        B = 7
        U = torch.linalg.qr(torch.randn(B, K, n, d, generator=g, dtype=torch.float64)).Q
        noisy = U + 0.3 * torch.rand(B, 1, 1, 1, generator=g, dtype=torch.float64) * torch.randn(B, K, n, d, generator=g, dtype=torch.float64)
        perm = torch.stack([torch.randperm(K, generator=g) for _ in range(B)])
        Uh = torch.linalg.qr(noisy[torch.arange(B)[:, None], perm]).Q
        got = S.subspace_errors(Uh, U)
        for b in range(B):
            ref = R.subspace_error(list(Uh[b]), list(U[b]))
            assert abs(got[b].item() - ref) < 1e-10, (K, b)
        if K <= 4:  # the scipy bisection agrees with the vectorized permutation search
            overlap = (Uh.reshape(B, K, 1, n, d).mT @ U.reshape(B, 1, K, n, d)).square().sum((-1, -2))
            cost = (1 - overlap / d).clamp(min=0).sqrt()
            assert torch.allclose(S.bottleneck_assignment(cost), got, atol=1e-12)


def test_molrg_batch_structure_and_reproducibility():
    n, K, d = 20, 3, 4
    U, X, lab = S.molrg_batch(n, K, d, [5, 9], 0.0, "orthogonal", [11, 12], 4)
    assert U.shape == (8, K, n, d) and X.shape == (8, 9, n) and lab.shape == (8, 9)
    Uc = U.permute(0, 2, 1, 3).reshape(8, n, K * d)
    eye = torch.eye(K * d).expand(8, -1, -1)
    assert torch.allclose(Uc.mT @ Uc, eye, atol=1e-5)             # float32 QR
    assert bool((lab[:4, 5:] == -1).all()) and bool((X[:4, 5:] == 0).all())        # padding
    for b in range(8):                                   # every point lies in its component's subspace
        for i in range(5 if b < 4 else 9):
            P = _proj(U[b, lab[b, i]])
            assert torch.allclose(P @ X[b, i], X[b, i], atol=1e-5)
    # the same cell alone, or with fewer trials, gives the same instances (counter-based stream)
    U1, X1, lab1 = S.molrg_batch(n, K, d, [9], 0.0, "orthogonal", [12], 2)
    assert torch.equal(X1, X[4:6]) and torch.equal(U1, U[4:6]) and torch.equal(lab1, lab[4:6])
    Ur, _, _ = S.molrg_batch(n, K, d, [3], 0.0, "random", [5], 3)
    assert torch.allclose(Ur.mT @ Ur, torch.eye(d).expand(3, K, d, d), atol=1e-5)
    assert (Ur[:, 0].mT @ Ur[:, 1]).abs().max() > 1e-3   # random bases overlap


def test_molrg_labels_are_uniform():
    _, _, lab = S.molrg_batch(8, 3, 2, [4000], 0.0, "orthogonal", [1], 1)
    counts = torch.bincount(lab[0], minlength=3).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_ksubspaces_recovers_well_sampled_mixtures_and_matches_reference():
    n, K, d, N, T = 30, 3, 3, 60, 6
    U, X, _ = S.molrg_batch(n, K, d, [N], 0.0, "random", [4], T)
    counts = torch.full((T,), float(N))
    u = torch.rand(T, 3, generator=_gen(0))
    V0 = S.seed_bases(X, counts, K, d, u)
    Uh, lab = S.ksubspaces(X, K, V0)
    # exact recovery up to float32 rounding (the sweep computes in float32)
    assert bool((S.subspace_errors(Uh, U) < 1e-3).all())
    for t in range(T):                                  # the per-instance SVD reference from the same starts
        starts = [R.seed_bases(X[t], K, d, int(u[t, r] * N)) for r in range(3)]
        for r in range(3):                              # the batched seeding equals the reference's
            for k in range(K):
                assert torch.allclose(_proj(V0[t, r, k]), _proj(starts[r][k]), atol=1e-5)
        ref = R.ksubspaces(X[t].double(), K, [[u.double() for u in st] for st in starts])
        assert R.subspace_error(ref, [u.double() for u in U[t]]) < 1e-3


# =========================================================================== subspace recovery: acceptance 1
def _rates(store):
    rate = {}
    for r in store.rows():
        rate.setdefault((r["K"], r["learner"], r["d"], r["N"]), []).append(r["success"])
    return {k: sum(v) / len(v) for k, v in rate.items()}


def test_acceptance_pca_phase_transition_is_sharp(tmp_path):
    """K = 1, n = 48, delta = 0, PCA: success exactly when N >= d, over the whole Fig. 4 grid."""
    with sweeps.run_sweep("subspace-recovery", {"K": 1, "learner": "pca"}, store=str(tmp_path / "s.sqlite"),
                          progress=False) as st:
        rows = st.rows()
    assert len(rows) == 12 * 24 * 20
    for r in rows:
        assert r["success"] == int(r["N"] >= r["d"]), r
        if r["N"] >= r["d"]:
            assert r["error"] < 1e-2     # exact up to float32 rounding amplified by cond(X) near N = d


def test_acceptance_ksubspaces_boundary_near_n_k_equal_d(tmp_path):
    with sweeps.run_sweep("subspace-recovery", {"K": 2, "learner": "ksubspaces", "d": "2,4,6", "N": "2:36:2"},
                          store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rate = _rates(st)
    for d in (2, 4, 6):
        row = {N: rate[(2, "ksubspaces", d, N)] for N in range(2, 37, 2)}
        for N, v in row.items():
            if N < 2 * d:
                assert v == 0, (d, N)        # some component has N_k < d points
            if N >= 5 * d:
                assert v >= 0.9, (d, N, v)
        first = min(N for N, v in row.items() if v >= 0.5)
        assert 2 * d <= first <= 3 * d, (d, row)   # N_k = N / 2 ~ d (binomial split of the labels)


def test_acceptance_sgd_agrees_with_pca_on_a_small_grid(tmp_path):
    grid = {"n": 16, "K": 1, "d": "1:3", "N": "1:8", "learner": "pca,sgd"}
    with sweeps.run_sweep("subspace-recovery", grid, trials=6, store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rate = _rates(st)
    for d in (1, 2, 3):
        for N in range(1, 9):
            pca, sgd = rate[(1, "pca", d, N)], rate[(1, "sgd", d, N)]
            if N < d:
                assert pca == sgd == 0
            elif N >= d + 2:                 # at N = d, d + 1 the data's smallest singular value is tiny and
                assert pca == 1 and sgd == 1, (d, N, sgd)   # SGD needs more steps than the default 300
            else:
                assert pca == 1 and sgd >= 0.5, (d, N, sgd)


def test_sgd_engines_agree():
    """The fused per-instance engine (fastdiff.molrg_denoise forward/backward) and the batched GEMM form."""
    n, K, d, N = 10, 2, 2, 12
    U, X, _ = S.molrg_batch(n, K, d, [N], 0.0, "orthogonal", [9], 2)
    counts = torch.full((2,), float(N))
    init = torch.randn(2, K, n, d, generator=_gen(1))
    out = {e: S.sgd_bases(X, counts, K, d, [(9, 0), (9, 1)], steps=40, engine=e, init=init) for e in ("batched", "fused")}
    # same noise, same start; float32 kernels vs torch float32 GEMMs differ by rounding only
    assert (out["batched"] - out["fused"]).abs().max() < 1e-3


# =========================================================================== linear diffusion: acceptance 2
def test_acceptance_linear_covariance_error(tmp_path):
    with sweeps.run_sweep("linear-diffusion", {"N": "48,96,200"}, trials=200, store=str(tmp_path / "s.sqlite"),
                          progress=False) as st:
        rows = st.rows()
    d_eff = rows[0]["d_eff"]
    assert abs(d_eff - (sum(v ** -1 for v in range(1, 33)) ** 2 / sum(v ** -2 for v in range(1, 33)))) < 1e-9
    for N in (48, 96, 200):
        assert N >= 4 * d_eff
        err = [r["cov_error"] for r in rows if r["N"] == N]
        mean = sum(err) / len(err)
        assert abs(mean / ((d_eff + 1) / N) - 1) < 0.10, (N, mean)


def test_acceptance_linear_kl_exact_vs_fused_sampling(tmp_path):
    with sweeps.run_sweep("linear-diffusion", {"n": 6, "N": "8,40", "mc_samples": 6000, "T": 1000}, trials=2,
                          store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rows = st.rows()
    for r in rows:
        assert abs(r["kl"] - r["kl_mc"]) < 5 * r["kl_mc_se"], r


def test_linear_test_loss_matches_monte_carlo():
    n, N = 4, 10
    _, mu0, S0 = L.fit_instances(n, 1.0, N, 3, 1)
    lam, V = torch.linalg.eigh(S0)
    sched = L._schedule(50)
    exact = L.linear_test_loss(lam, V, mu0, L.spectrum(n, 1.0), sched)[0].item()
    g = _gen(0)
    M = 200_000
    t = torch.randint(0, 50, (M,), generator=g)
    a, s = sched.alpha[t][:, None], sched.sigma[t][:, None]
    x0 = torch.randn(M, n, generator=g, dtype=torch.float64) * L.spectrum(n, 1.0).sqrt()
    eps = torch.randn(M, n, generator=g, dtype=torch.float64)
    xt = a * x0 + s * eps
    gain = a * lam / (a * a * lam + s * s)                        # per mode, per sample
    x0h = mu0 + ((xt - a * mu0) @ V[0] * gain) @ V[0].T
    loss = ((eps - (xt - a * x0h) / s) ** 2).sum(1)
    assert abs(loss.mean().item() - exact) < 5 * loss.std().item() / math.sqrt(M)


def test_linear_kl_vanishes_with_many_samples():
    _, mu0, S0 = L.fit_instances(5, 1.0, 200_000, 1, 1)
    lam, V = torch.linalg.eigh(S0)
    mean, var = L.sampled_gaussian(lam, (V.mT @ mu0[..., None])[..., 0], L._schedule(1000))
    assert L.gaussian_kl(mean, var, V, L.spectrum(5, 1.0)).item() < 0.01


# =========================================================================== memorization: acceptance 3
def test_memorized_fraction():
    data = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[0.1, 0.0], [5.0, 0.1], [0.0, 9.0], [4.0, 4.0]])
    assert M.memorized_fraction(x, data) == 0.5


def test_acceptance_memorization(tmp_path):
    grid = {"n": 32, "d": 4, "N": "2,4,8,16", "denoiser": "empirical,molrg", "samples": 128}
    with sweeps.run_sweep("memorization", grid, trials=2, store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rows = st.rows()
    for r in rows:
        if r["denoiser"] == "empirical" and r["N"] <= 4:
            assert r["memorized"] > 0.95, r
        if r["denoiser"] == "molrg" and r["N"] > 4:
            assert r["memorized"] < 0.1, r


def test_jacobian_rank_sweep_reproduces_fig3b_and_levels_are_independent_of_the_grid(tmp_path):
    """Seed 002 Fig. 3b: rank / n = K d / n at the lowest SNR, d / n at the highest; a level's rows
    are the same whether it is swept alone or with every other level (shared trajectories)."""
    with sweeps.run_sweep("jacobian-rank", {}, trials=3, store=str(tmp_path / "all.sqlite"), progress=False) as st:
        rows = st.rows()
    by_level = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    assert sorted(by_level) == list(range(18))
    assert all(r["ratio"] == pytest.approx(2 * 6 / 48) for r in by_level[0])
    assert all(r["ratio"] == pytest.approx(6 / 48) for r in by_level[17])
    snr = [by_level[lv][0]["snr"] for lv in range(18)]
    assert snr == sorted(snr)
    with sweeps.run_sweep("jacobian-rank", {"level": "9,17"}, trials=3, store=str(tmp_path / "two.sqlite"),
                          progress=False) as st:
        alone = {(r["level"], r["trial"]): r["ratio"] for r in st.rows()}
    assert alone == {(r["level"], r["trial"]): r["ratio"] for r in rows if r["level"] in (9, 17)}
    with pytest.raises(ValueError, match="--level"):
        sweeps.run_sweep("jacobian-rank", {"level": 18}, store=str(tmp_path / "bad.sqlite"), progress=False)


# =========================================================================== CLI, resume, Ray
def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_cli_sweep_exports_and_plots(tmp_path):
    r = _cli("sweep", "subspace-recovery", "--K", "1,2", "--d", "1:3", "--N", "2:8:2", "--trials", "3",
             "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("subspace-recovery.sqlite", "subspace-recovery.rows.csv", "subspace-recovery.csv"):
        assert (tmp_path / f).exists(), f
    table = (tmp_path / "subspace-recovery.csv").read_text().splitlines()
    assert table[0].startswith("n,K,d,N,") and "success_mean" in table[0] and len(table) == 1 + 3 * 3 * 4
    pytest.importorskip("matplotlib")
    assert (tmp_path / "subspace-recovery.png").stat().st_size > 5000
    r = _cli("plot", str(tmp_path / "subspace-recovery.sqlite"), "--out", str(tmp_path / "p"))
    assert r.returncode == 0 and (tmp_path / "p" / "subspace-recovery.png").exists()


@pytest.mark.parametrize("args,match", [
    (["--d", "5:1"], "inverted range"), (["--d", "60"], "d <= n"), (["--K", "2", "--learner", "pca"], "fits one subspace"),
    (["--N", "0"], "N >= 1"), (["--learner", "svm"], "expected values in"), (["--K", "3", "--d", "20"], "K d <= n"),
])
def test_cli_bad_input(tmp_path, capsys, args, match):
    from fastdiff import cli

    assert cli.main(["sweep", "subspace-recovery", *args, "--out", str(tmp_path), "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "subspace-recovery.sqlite").exists()


def test_cli_unknown_experiment_and_foreign_store(tmp_path):
    r = _cli("sweep", "no-such-experiment")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    store = str(tmp_path / "s.sqlite")
    r = _cli("sweep", "subspace-recovery", "--K", "1", "--d", "1", "--N", "2", "--trials", "1", "--store", store,
             "--out", str(tmp_path), "--no-progress", "--no-plot")
    assert r.returncode == 0, r.stderr[-2000:]
    before = _table(store, "subspace-recovery")
    r = _cli("sweep", "linear-diffusion", "--N", "4", "--trials", "1", "--store", store, "--out", str(tmp_path),
             "--no-progress", "--no-plot")
    assert r.returncode == 2 and "holds results of experiment 'subspace-recovery'" in r.stderr
    assert _table(store, "subspace-recovery") == before


def test_acceptance_kill_and_resume_gives_the_uninterrupted_table(tmp_path):
    """kill -9 in the middle of a sweep, run the same command again: same table as one uninterrupted run."""
    grid = ["--K", "2", "--learner", "ksubspaces", "--d", "1:12", "--N", "2:48:2", "--trials", "30"]
    store = str(tmp_path / "killed.sqlite")
    cmd = [sys.executable, "-m", "fastdiff", "sweep", "subspace-recovery", *grid, "--store", store,
           "--out", str(tmp_path), "--no-progress", "--no-plot"]
    total = 12 * 24 * 30
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(store):
            try:
                with sqlite3.connect(store, timeout=1) as db:
                    killed_at = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.Error:
                killed_at = 0
            if killed_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert 0 < killed_at < total
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _table(store, "subspace-recovery")
    fresh = str(tmp_path / "fresh.sqlite")
    sweeps.run_sweep("subspace-recovery", {"K": 2, "learner": "ksubspaces"}, trials=30, store=fresh, progress=False).close()
    uninterrupted = _table(fresh, "subspace-recovery")
    assert len(resumed) == total and len({(r["cell"], r["trial"]) for r in resumed}) == total
    assert resumed == uninterrupted


def test_acceptance_ray_executor_matches_local(tmp_path):
    ray = pytest.importorskip("ray")
    grid = {"K": "1,2", "learner": "ksubspaces", "d": "1:4", "N": "2:12:2"}
    local = str(tmp_path / "local.sqlite")
    sweeps.run_sweep("subspace-recovery", grid, trials=5, store=local, progress=False).close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = str(tmp_path / "ray.sqlite")
        sweeps.run_sweep("subspace-recovery", grid, trials=5, store=remote, executor="ray", progress=False).close()
    finally:
        ray.shutdown()
    a, b = _table(local, "subspace-recovery"), _table(remote, "subspace-recovery")
    assert len(a) == len(b) == 2 * 4 * 6 * 5
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "error"} == {k: v for k, v in y.items() if k != "error"}
        # one Ray worker thread vs this process: the same arithmetic; allow the last bits of BLAS
        assert abs(x["error"] - y["error"]) <= 1e-9 * max(1.0, abs(x["error"]))


# =========================================================================== devices and batching
def _batched_differently(monkeypatch, experiment, factor):
    """Register ``experiment`` with its batch budget scaled by ``factor`` (the GPU path scales it)."""
    import dataclasses

    exp = EXPERIMENTS[experiment]
    monkeypatch.setitem(EXPERIMENTS, experiment, dataclasses.replace(exp, max_cost=exp.max_cost * factor))


def _well_posed(row):
    """Subspace recovery with more points than K d: below that the K-subspaces seeding breaks ties
    between equally explained points (all of them lie in the span), which rounding decides."""
    return row.get("learner") != "ksubspaces" or row["N"] > row["K"] * row["d"]


def _close_tables(a, b, metrics, rtol, atol):
    """Equal tables: every parameter and non-float metric exactly (success included), the float
    ``metrics`` to ``atol + rtol |y|`` on well-posed rows."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in metrics + ("backend",)} == \
               {k: v for k, v in y.items() if k not in metrics + ("backend",)}
        for m in metrics:
            assert not _well_posed(y) or abs(x[m] - y[m]) <= atol + rtol * abs(y[m]), (m, x, y)


@pytest.mark.parametrize("learner", ["pca", "ksubspaces", "sgd"])
def test_subspace_rows_do_not_depend_on_the_batching(tmp_path, monkeypatch, learner):
    """A cell's rows are the same whichever cells share its batch (a GPU run batches 16x more):
    each cell reads its own Philox windows, sized by its own N rather than the batch's padding."""
    grid = {"n": 12, "K": 2 if learner == "ksubspaces" else 1, "d": "1,3", "N": "2,5,9", "learner": learner,
            "sgd_steps": 30}
    one = str(tmp_path / "one.sqlite")
    _batched_differently(monkeypatch, "subspace-recovery", 1e-6)     # one cell per batch
    sweeps.run_sweep("subspace-recovery", grid, trials=3, store=one, progress=False, workers=1).close()
    _batched_differently(monkeypatch, "subspace-recovery", 1e9)      # every cell of a key in one batch
    many = str(tmp_path / "many.sqlite")
    sweeps.run_sweep("subspace-recovery", grid, trials=3, store=many, progress=False, workers=1).close()
    # the same arithmetic on differently padded batches: the cpp kernels skip padding, the batched
    # torch GEMMs (sgd) may sum in another order; 300 -> 30 Adam steps keep that rounding ~1e-6
    _close_tables(_table(one, "subspace-recovery"), _table(many, "subspace-recovery"), ("error",), 1e-4, 1e-6)


def test_sgd_noise_window_is_the_cells_own():
    """sgd_bases: a cell's noise at step s is its (trials, N, n + 1) window, not the padded batch's."""
    n, K, d = 6, 1, 2
    U, X, _ = S.molrg_batch(n, K, d, [4, 9], 0.0, "orthogonal", [5, 6], 2)
    counts = torch.tensor([4.0, 4.0, 9.0, 9.0])
    init = torch.randn(4, K, n, d, generator=_gen(2))
    both = S.sgd_bases(X, counts, K, d, [(5, 0), (5, 1), (6, 0), (6, 1)], steps=5, init=init)
    alone = S.sgd_bases(X[:2, :4], counts[:2], K, d, [(5, 0), (5, 1)], steps=5, init=init[:2])
    assert (both[:2] - alone).abs().max() < 1e-5


def test_run_sweep_device_errors(tmp_path):
    store = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="device: expected a torch device"):
        sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 1, "N": 2}, trials=1, store=str(store), device="gpu0")
    with pytest.raises(ValueError, match="device: expected 'cpu' or a CUDA device"):
        sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 1, "N": 2}, trials=1, store=str(store), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 1, "N": 2}, trials=1, store=str(store), device="cuda")
    assert not store.exists()          # refused before the store is touched
    r = _cli("sweep", "subspace-recovery", "--K", "1", "--d", "1", "--N", "2", "--trials", "1", "--device", "gpu0",
             "--store", str(store), "--out", str(tmp_path), "--no-progress", "--no-plot")
    assert r.returncode == 2 and "device: expected a torch device" in r.stderr


def test_run_sweep_on_cpu_device_records_the_backend(tmp_path):
    store = str(tmp_path / "s.sqlite")
    with sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 2, "N": 4, "learner": "pca,sgd", "sgd_steps": 5},
                          trials=2, store=store, progress=False, device="cpu") as st:
        backends = {r["learner"]: r["backend"] for r in st.rows()}
    from fastdiff import backends as B
    assert backends == {"pca": "cpp" if B.has_kernel("cpp", "ksubspaces", "") else "torch", "sgd": "torch"}


CUDA_GRIDS = [   # (experiment, grid, trials, metrics, rtol, atol)
    ("subspace-recovery", {"n": 24, "K": 1, "d": "1,4", "N": "2,6,12", "learner": "pca"}, 4, ("error",), 1e-3, 1e-5),
    ("subspace-recovery", {"n": 24, "K": 2, "d": "1,4", "N": "4,12,24", "learner": "ksubspaces"}, 4, ("error",),
     1e-3, 1e-5),
    # 300 Adam steps amplify rounding: the errors agree to the SGD noise floor (~0.01), success exactly
    ("subspace-recovery", {"n": 24, "K": 1, "d": "1,4", "N": "6,12", "learner": "sgd"}, 4, ("error",), 0.0, 5e-3),
    ("jacobian-rank", {"n": 16, "K": 2, "d": 3, "level": "0,9,17", "samples": 8}, 2, ("ratio",), 0.0, 0.07),
    ("memorization", {"n": 16, "d": 2, "N": "2,32", "samples": 64, "T": 200}, 2, ("memorized", "generalization"),
     0.0, 0.05),
    ("linear-diffusion", {"n": 8, "N": "8,64", "T": 200, "mc_samples": 512}, 2, ("kl_mc", "kl_mc_se"), 1e-3, 1e-4),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("experiment,grid,trials,metrics,rtol,atol", CUDA_GRIDS)
def test_sweep_on_cuda_matches_cpu(tmp_path, experiment, grid, trials, metrics, rtol, atol):
    """device='cuda': the same instances (drawn on the CPU), the same Philox noise (Triton draws the
    CPU's stream), so the table equals the CPU's up to float rounding."""
    cpu, gpu = str(tmp_path / "cpu.sqlite"), str(tmp_path / "gpu.sqlite")
    sweeps.run_sweep(experiment, grid, trials=trials, store=cpu, progress=False).close()
    sweeps.run_sweep(experiment, grid, trials=trials, store=gpu, progress=False, device="cuda").close()
    a, b = _table(gpu, experiment), _table(cpu, experiment)
    assert all(r["backend"].endswith("on cuda") for r in a)
    _close_tables(a, b, metrics, rtol, atol)


def test_retractions_agree_and_cholesky_falls_back():
    """sgd's QR retraction: CholeskyQR2 (the CUDA default) equals Householder with R's diagonal
    positive; a rank-deficient Y (Gram matrix singular) falls back to Householder."""
    U = S._orth(torch.randn(5, 2, 300, 4, generator=_gen(3)))
    Y = U - 0.1 * torch.randn(5, 2, 300, 4, generator=_gen(4)).sign()
    H, C = S._retract(Y, "householder"), S._retract(Y, "cholesky")
    assert torch.isfinite(C).all() and (H - C).abs().max() < 1e-5
    assert (C.mT @ C - torch.eye(4)).abs().max() < 1e-5
    assert (torch.diagonal(C.mT @ Y, dim1=-2, dim2=-1) > 0).all()          # R = Q^T Y has a positive diagonal
    assert (S._retract(U, "cholesky") - U).abs().max() < 1e-5               # orthonormal Y maps to itself
    Y[0, 1, :, 3] = Y[0, 1, :, 2]          # two equal columns: Cholesky passes with a tiny pivot; Q is
    Cd = S._retract(Y, "cholesky")         # a valid retraction still (orthonormal, spans Y)
    assert (Cd.mT @ Cd - torch.eye(4)).abs().max() < 1e-4 and (Cd @ (Cd.mT @ Y) - Y).abs().max() < 1e-5
    Y[0, 1, :, 3] = 0                      # a zero column: Cholesky fails, Householder takes over
    Cf = S._retract(Y, "cholesky")
    assert torch.isfinite(Cf).all() and (Cf - S._retract(Y, "householder")).abs().max() == 0
    with pytest.raises(ValueError, match="method: expected"):
        S._retract(Y, "svd")


def test_sgd_with_cholesky_retraction_matches_householder():
    """The whole sgd learner with the GPU's retraction, on the CPU: the same bases to rounding."""
    n, K, d, N = 20, 2, 2, 16
    U, X, _ = S.molrg_batch(n, K, d, [N], 0.0, "orthogonal", [4], 3)
    counts = torch.full((3,), float(N))
    init = torch.randn(3, K, n, d, generator=_gen(5))
    rows = [(4, t) for t in range(3)]
    house = S.sgd_bases(X, counts, K, d, rows, init=init, retraction="householder")
    chol = S.sgd_bases(X, counts, K, d, rows, init=init, retraction="cholesky")
    # Adam amplifies rounding mid-training (measured: 1e-7 -> 2e-2 by step 40 on one instance), and
    # the cosine-decayed rate brings both back to the same subspaces by step 300
    assert (S.subspace_errors(house, chol) < 1e-3).all()
    assert (S.subspace_errors(house, U) - S.subspace_errors(chol, U)).abs().max() < 1e-3
    assert (S.subspace_errors(house, U) < 0.1).all()
    with pytest.raises(ValueError, match="retraction: expected"):
        S.sgd_bases(X, counts, K, d, rows, init=init, retraction="svd")

"""The memorization-images experiment: a few small cells end to end (the global empirical denoiser
copies, the patch machines, the fitted Gaussian, the tied Gaussian mixture and the learned MoLRG do
not), the collapse-time column, its plot (error bars: the bootstrap interval of the table) and
table, the bootstrap interval's coverage, reproducibility, and bad parameters."""
import csv

import pytest
import torch

from fastdiff import sweeps
from fastdiff.sweeps import plots
from fastdiff.sweeps.collapse import collapse_time
from fastdiff.sweeps.memorization_images import _S_COLLAPSE, _S_SUBSET, _dataset, bootstrap_interval
from fastdiff.sweeps.streams import normals

pytest.importorskip("sklearn")


def test_small_sweep_end_to_end(tmp_path):
    grid = {"N": [12], "denoiser": ["empirical", "local", "equivariant", "gaussian"], "samples": [12], "steps": [5]}
    store = sweeps.run_sweep("memorization-images", grid, trials=2, store=str(tmp_path / "m.sqlite"), progress=False)
    out = sweeps.plot_store(str(tmp_path / "m.sqlite"), str(tmp_path))
    rows = {r["denoiser"]: r for r in csv.DictReader(open(out["table"]))}
    assert float(rows["empirical"]["memorized_mean"]) == 1.0 and float(rows["empirical"]["nearest_rms_mean"]) < 1e-3
    for kind in ("local", "equivariant", "gaussian"):
        assert float(rows[kind]["memorized_mean"]) < 0.2, kind
        assert float(rows[kind]["nearest_rms_mean"]) > 0.1, kind
        assert float(rows[kind]["memorized_lo_mean"]) <= float(rows[kind]["memorized_mean"]) <= float(rows[kind]["memorized_hi_mean"])
    assert (tmp_path / "memorization-images.png").stat().st_size > 10_000
    # the same sweep again: the same rows (every random number from the cell's Philox windows)
    again = sweeps.run_sweep("memorization-images", grid, trials=2, store=str(tmp_path / "n.sqlite"), progress=False)
    a = sorted((r["denoiser"], r["trial"], r["memorized"], r["nearest_rms"]) for r in store.rows())
    b = sorted((r["denoiser"], r["trial"], r["memorized"], r["nearest_rms"]) for r in again.rows())
    assert a == b


@pytest.mark.parametrize("N", [12, 50])
def test_equivariant_samples_are_new_mosaics_where_the_empirical_ones_copy(tmp_path, N):
    """Issue 17's statement (Kamb & Ganguli): on digits, at the sweep's defaults (P = 3, 64 samples,
    12 Heun steps), the equivariant local machine's samples are new (fraction memorized below 0.05)
    while the global empirical denoiser of the same training set copies (all memorized)."""
    grid = {"N": [N], "denoiser": ["empirical", "equivariant"]}
    store = sweeps.run_sweep("memorization-images", grid, trials=1, store=str(tmp_path / "e.sqlite"), progress=False)
    frac = {r["denoiser"]: r["memorized"] for r in store.rows()}
    assert frac["empirical"] >= 0.95, frac
    assert frac["equivariant"] < 0.05, frac


def test_bootstrap_interval_covers_the_mean():
    g = torch.Generator().manual_seed(0)
    hits = 0
    for rep in range(200):
        flags = torch.rand(150, generator=g) < 0.3
        lo, hi = bootstrap_interval(flags, reps=500, seed=rep)
        assert lo <= float(flags.double().mean()) <= hi
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / 200 <= 0.99   # nominal 95%; the percentile bootstrap undercovers slightly at M = 150


@pytest.mark.parametrize("grid,match", [
    ({"N": [1]}, "N: expected at least 2 training images"),
    ({"N": [2000]}, "the digits data set has 1797 images"),
    ({"patch": [4]}, "patch: expected an odd int"),
    ({"denoiser": ["knn"]}, "denoiser"),
    ({"components": [0]}, "components: expected a positive int"),
    ({"rank": [65]}, "rank: expected at most the image size"),
    ({"collapse_samples": [1]}, "collapse_samples: expected 0"),
])
def test_bad_parameters(tmp_path, grid, match):
    with pytest.raises(ValueError, match=match):
        sweeps.run_sweep("memorization-images", grid, store=str(tmp_path / "x.sqlite"), progress=False)


@pytest.fixture(scope="module")
def learned_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("learned") / "m.sqlite")
    grid = {"N": [10, 100], "denoiser": ["empirical", "gmm", "molrg"], "samples": [32], "steps": [6],
            "collapse_samples": [256]}
    return path, sweeps.run_sweep("memorization-images", grid, trials=2, store=path, progress=False)


def test_gmm_and_molrg_do_not_copy(learned_store):
    _, store = learned_store
    rows = store.rows()
    assert len(rows) == 12
    for r in rows:
        assert 0.0 <= r["memorized_lo"] <= r["memorized"] <= r["memorized_hi"] <= 1.0, r
    by = {(r["denoiser"], r["N"], r["trial"]): r for r in rows}
    for t in range(2):
        assert by["empirical", 10, t]["memorized"] == 1.0 and by["empirical", 100, t]["memorized"] == 1.0
        # measured 0 of 32 for both at N = 100 (and for molrg at N = 10); the tied mixture at N = 10 has
        # classes of one image, which it reproduces up to the pooled spread (measured 2 and 7 of 32)
        for kind in ("gmm", "molrg"):
            assert by[kind, 100, t]["memorized"] <= 0.1, (kind, t)
            assert by[kind, 100, t]["nearest_rms"] > 0.2, (kind, t)
        assert by["molrg", 10, t]["memorized"] <= 0.1


def test_collapse_time_column_is_the_training_sets(learned_store):
    _, store = learned_store
    full = _dataset("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the sweep runs its cells: small GEMMs, a shared machine
    try:
        for r in (r for r in store.rows() if r["denoiser"] == "gmm"):
            # the trial's subset, from the cell's own window, and its collapse time recomputed
            idx = normals(r["seed"], _S_SUBSET, len(full), step=r["trial"]).argsort()[:r["N"]]
            want = collapse_time(full[idx], samples=256, seed=r["seed"] ^ (_S_COLLAPSE << 56) ^ r["trial"])
            assert r["collapse_time"] == want
    finally:
        torch.set_num_threads(threads)
    by = {(r["denoiser"], r["N"], r["trial"]): r["collapse_time"] for r in store.rows()}
    for kind in ("empirical", "gmm", "molrg"):
        for t in range(2):
            assert by[kind, 10, t] > by[kind, 100, t]       # more training images: a later collapse (measured 0.55 vs 0.41)


def test_no_collapse_time_by_default(tmp_path):
    store = sweeps.run_sweep("memorization-images", {"N": [5], "denoiser": ["gaussian"], "samples": [4], "steps": [3]},
                             store=str(tmp_path / "d.sqlite"), progress=False)
    assert all(r["collapse_time"] is None for r in store.rows())     # NaN: stored as NULL, "not computed"


def test_plot_error_bars_are_the_tables_bootstrap_interval(learned_store, tmp_path):
    path, _ = learned_store
    out = sweeps.plot_store(path, str(tmp_path))
    assert (tmp_path / "memorization-images.png").stat().st_size > 10_000
    table = {(r["denoiser"], int(r["N"])): r for r in csv.DictReader(open(out["table"]))}
    _, agg, pnames = plots._aggregate(path)
    fig = plots._memorization_images(plots._figure_class(), agg, pnames, str(tmp_path / "again.png"))
    bars = [c for c in fig.axes[0].containers if c.get_label().startswith("denoiser=")]
    assert sorted(c.get_label() for c in bars) == ["denoiser=empirical", "denoiser=gmm", "denoiser=molrg"]
    seen = 0
    for c in bars:
        kind = c.get_label().split("=", 1)[1]
        line, _, (vertical,) = c.lines
        for (x, y), seg in zip(line.get_xydata(), vertical.get_segments()):
            row = table[kind, int(x)]
            assert y == pytest.approx(float(row["memorized_mean"]), abs=1e-12)
            assert seg[0][1] == pytest.approx(float(row["memorized_lo_mean"]), abs=1e-12)
            assert seg[1][1] == pytest.approx(float(row["memorized_hi_mean"]), abs=1e-12)
            seen += 1
    assert seen == 6
    assert len(fig.axes) == 3 and "collapse time" in fig.axes[2].get_title()

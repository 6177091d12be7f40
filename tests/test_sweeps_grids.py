"""Grids: parsing value lists, bad grids refused before the store is touched, cells that do not
apply, the batching plan; size checks (issue 13 item 11): absurd grids are refused up front, with
their size."""
import time

import pytest

from fastdiff import sweeps
from fastdiff.sweeps import runner
from fastdiff.sweeps.runner import EXPERIMENTS, cell_seed, plan


def test_huge_range_is_refused_before_it_is_built(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"--N: '1:2000000000' has 2000000000 values, more than .* 1000000"):
        sweeps.parse_values("N", "1:2000000000", int)
    with pytest.raises(ValueError, match="2000000000 values"):
        sweeps.parse_values("N", range(1, 2_000_000_001), int)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match="1:2000000000"):
        sweeps.run_sweep("linear-diffusion", {"N": "1:2000000000"}, store=str(tmp_path / "s.sqlite"), progress=False)
    assert not (tmp_path / "s.sqlite").exists()


def test_product_of_lists_is_capped_with_its_size(tmp_path):
    with pytest.raises(ValueError, match=r"the grid has 4000000 cells \(2000 x 1 x 2000"):
        sweeps.run_sweep("linear-diffusion", {"n": "1:2000", "N": "1:2000"}, store=str(tmp_path / "s.sqlite"),
                         progress=False)
    assert not (tmp_path / "s.sqlite").exists()


def test_dedupe_is_linear_and_keeps_order():
    text = ",".join(str(v) for v in range(50_000)) + ",5,3"
    t0 = time.perf_counter()
    vals = sweeps.parse_values("N", text, int)
    assert time.perf_counter() - t0 < 2.0        # O(n^2) membership on a list took minutes
    assert vals == list(range(50_000))
    assert sweeps.parse_values("N", "8,2,8,4:6,2", int) == [8, 2, 4, 5, 6]


def test_float_spelling_of_an_integer_is_refused_clearly():
    with pytest.raises(ValueError, match=r"--n: expected int values written as integers \(e.g. 100000000\), got '1e8'"):
        sweeps.parse_values("n", "1e8", int)


def test_cell_memory_is_capped_with_its_size(tmp_path):
    with pytest.raises(ValueError, match=r"needs about [0-9.]+ GiB for its 20 trials .* cap of 16 GiB"):
        sweeps.run_sweep("linear-diffusion", {"n": 100_000_000, "N": 4}, store=str(tmp_path / "s.sqlite"),
                         progress=False)
    assert not (tmp_path / "s.sqlite").exists()
    for name, exp in sweeps.EXPERIMENTS.items():   # every default grid fits easily
        cells, _ = sweeps.build_grid(exp, {})
        assert max(20 * exp.instance_bytes(c) for c in cells) < runner.MAX_CELL_BYTES / 16, name


def test_exported_tables_sort_numbers_as_numbers(tmp_path):
    """d = 1, 2, 10, 11, not the cell text's 1, 10, 11, 2 (rows CSV, Parquet and the plotted table)."""
    import csv
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fastdiff", "sweep", "linear-diffusion", "--n", "4",
                        "--N", "11,2,10,100,1", "--T", "10", "--trials", "2", "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "linear-diffusion.rows.csv") as f:
        rows = [(int(x["N"]), int(x["trial"])) for x in csv.DictReader(f)]
    assert rows == [(N, t) for N in (1, 2, 10, 11, 100) for t in (0, 1)]
    if (tmp_path / "linear-diffusion.csv").exists():
        with open(tmp_path / "linear-diffusion.csv") as f:
            assert [int(x["N"]) for x in csv.DictReader(f)] == [1, 2, 10, 11, 100]
    with sweeps.Store(str(tmp_path / "linear-diffusion.sqlite"), "linear-diffusion",
                      *sweeps.Store.read_experiment(str(tmp_path / "linear-diffusion.sqlite"))[1:]) as st:
        assert [r["N"] for r in st.aggregate()] == [1, 2, 10, 11, 100]


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

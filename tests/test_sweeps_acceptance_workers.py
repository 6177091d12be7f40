"""Acceptance (issue 13): small memorization and linear-diffusion sweeps, repeated with 2 workers,
finish with no error and no impossible value in their tables."""
import csv
import math
import os
import subprocess
import sys

import pytest

from fastdiff import sweeps

REPEATS = 3


def _nan(v):
    return v is None or math.isnan(v)    # SQLite stores NaN as NULL


def _finite(row, names):
    for n in names:
        assert isinstance(row[n], float) and math.isfinite(row[n]), (n, row)


def _rows_of_repeated_runs(tmp_path, experiment, grid, trials):
    """The rows of REPEATS runs of the same sweep with 2 workers, each into a fresh store."""
    for rep in range(REPEATS):
        with sweeps.run_sweep(experiment, grid, trials=trials, store=str(tmp_path / f"{experiment}-{rep}.sqlite"),
                              progress=False, workers=2) as st:
            yield st.rows()


def test_linear_diffusion_with_two_workers_repeatedly(tmp_path):
    grid = {"n": 8, "N": "2,4,8,9,16,64,256", "ridge": "0,1e-3", "T": 200, "mc_samples": "0,200"}
    tables = []
    for rows in _rows_of_repeated_runs(tmp_path, "linear-diffusion", grid, 3):
        assert len(rows) == 7 * 2 * 2 * 3
        for r in rows:
            assert not _nan(r["kl"]) and r["kl"] >= 0, r
            # Sigma_0 has rank N - 1: singular without a ridge for N <= n, +inf exactly there
            assert math.isinf(r["kl"]) == (r["ridge"] == 0 and r["N"] <= r["n"]) == (r["singular"] == 1.0), r
            _finite(r, ("test_loss", "train_loss", "cov_error", "d_eff", "expected_cov_error"))
            assert r["test_loss"] >= 0 and r["cov_error"] >= 0
            if r["mc_samples"]:
                assert r["kl_mc_meaningful"] in (0.0, 1.0)
                assert _nan(r["kl_mc"]) or r["kl_mc"] >= 0, r
                assert (r["kl_mc_meaningful"] == 1.0) == (not _nan(r["kl_mc"]) and math.isfinite(r["kl_mc"])), r
            else:
                assert _nan(r["kl_mc"]) and _nan(r["kl_mc_meaningful"])
        tables.append([{k: v for k, v in r.items() if k not in ("seconds", "finished_at")} for r in rows])
    for t in tables[1:]:      # and the same table every time, whatever the threads' order
        assert repr(t) == repr(tables[0])


def test_memorization_with_two_workers_repeatedly(tmp_path):
    grid = {"n": 8, "K": "1,2", "d": 2, "N": "2,4,8,16", "samples": 32, "T": 60}
    for rows in _rows_of_repeated_runs(tmp_path, "memorization", grid, 2):
        assert len(rows) == 2 * 4 * 3 * 2
        for r in rows:
            _finite(r, ("memorized", "generalization", "N_over_d", "off_support"))
            # generalized: neither memorized nor off the support, so at most the unmemorized share
            assert 0 <= r["memorized"] <= 1 and 0 <= r["generalization"] <= 1 - r["memorized"] + 1e-12, r
            assert 0 <= r["off_support"] <= 1 and (_nan(r["w2"]) == (r["K"] > 1)), r


def test_cli_linear_diffusion_two_workers_csv_has_no_impossible_value(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastdiff", "sweep", "linear-diffusion", "--n", "8", "--N", "4,8,64",
                        "--T", "100", "--mc-samples", "100", "--trials", "2", "--workers", "2",
                        "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "linear-diffusion.rows.csv") as f:
        for row in csv.DictReader(f):
            for k in ("kl", "test_loss", "cov_error"):
                assert float(row[k]) >= 0, row           # NaN fails this too
            assert row["kl_mc"] == "" or float(row["kl_mc"]) >= 0, row
    # the aggregate table beside the plot: blank where a value is undefined, never a "nan" cell
    with open(tmp_path / "linear-diffusion.csv") as f:
        agg = list(csv.DictReader(f))
    assert agg
    for row in agg:
        assert "nan" not in {v.lower() for v in row.values()}, row
        assert float(row["kl_mean"]) >= 0 and float(row["test_loss_mean"]) >= 0, row
        assert row["kl_mc_meaningful_mean"] == "" or 0 <= float(row["kl_mc_meaningful_mean"]) <= 1, row

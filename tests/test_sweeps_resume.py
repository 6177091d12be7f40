"""Resuming a sweep (issue 13 items 2, 14): kill -9 and resume gives the uninterrupted table, the
store refuses a run whose rows would differ, and a resumed run says what it recomputed."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from fastdiff import sweeps
from sweeps_helpers import ROOT, stored_table

GRID = {"N": "64,128", "n": 6, "T": 50}


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_rerun_with_another_seed_is_refused(tmp_path):
    p = str(tmp_path / "s.sqlite")
    with sweeps.run_sweep("linear-diffusion", GRID, trials=2, seed=0, store=p, progress=False) as st:
        before = st.rows()
    with pytest.raises(ValueError, match=r"s\.sqlite.*seed=0 \(this run: 1\)"):
        sweeps.run_sweep("linear-diffusion", GRID, trials=2, seed=1, store=p, progress=False)
    # the same seed: resumes
    with sweeps.run_sweep("linear-diffusion", GRID, trials=2, seed=0, store=p, progress=False) as st:
        assert st.rows() == before


def test_legacy_store_without_settings_is_checked_by_its_seeds(tmp_path):
    p = str(tmp_path / "s.sqlite")
    sweeps.run_sweep("linear-diffusion", GRID, trials=2, seed=0, store=p, progress=False).close()
    db = sqlite3.connect(p)
    db.execute("DELETE FROM meta WHERE key = 'settings'")   # as written before the settings record
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="another sweep seed"):
        sweeps.run_sweep("linear-diffusion", GRID, trials=2, seed=3, store=p, progress=False)


def test_cli_rerun_with_another_seed_is_one_error_line(tmp_path):
    args = ["sweep", "linear-diffusion", "--n", "6", "--N", "64", "--T", "50", "--trials", "2", "--out", str(tmp_path),
            "--no-plot", "--no-progress"]
    assert _cli(*args).returncode == 0
    r = _cli(*args, "--seed", "7")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "error:" in r.stderr and "seed=0 (this run: 7)" in r.stderr, r.stderr
    assert str(tmp_path / "linear-diffusion.sqlite") in r.stderr


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
    resumed = stored_table(store, "subspace-recovery")
    fresh = str(tmp_path / "fresh.sqlite")
    sweeps.run_sweep("subspace-recovery", {"K": 2, "learner": "ksubspaces"}, trials=30, store=fresh, progress=False).close()
    uninterrupted = stored_table(fresh, "subspace-recovery")
    assert len(resumed) == total and len({(r["cell"], r["trial"]) for r in resumed}) == total
    assert resumed == uninterrupted

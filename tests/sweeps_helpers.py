"""Helpers shared by the sweep tests (tests/test_sweeps_*.py)."""
import os
import subprocess
import sys

import torch

from fastdiff.sweeps.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def proj(U):
    """The orthogonal projector U U^T of orthonormal bases U (..., n, d)."""
    return U @ U.mT


def stored_table(store_path, experiment):
    """Stored rows without run metadata (time, versions): what must agree between runs."""
    exp, params, metrics = Store.read_experiment(store_path)
    assert exp == experiment
    with Store(store_path, exp, params, metrics) as st:
        return [{k: v for k, v in r.items() if k not in ("seconds", "finished_at", "versions")} for r in st.rows()]


def run_cli(*args, **kw):
    """``python -m fastdiff ARGS`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, cwd=ROOT, **kw)

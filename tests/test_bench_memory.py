"""bench/memory.py's measurement (issue 17, acceptance 5): a worker's growth is its own.

The workers are started from a process that has imported torch (hundreds of MB resident); Linux
carries ``ru_maxrss`` over fork and exec, so a peak read from it reported the parent's size as the
worker's (about 60 MiB of growth no call made).  A call that allocates nothing must measure ~0, and
one that holds a known temporary must measure about that temporary."""
import os
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  (this process: a parent far larger than the worker's baseline)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
memory = pytest.importorskip("memory")
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")

SIZE = [(256, 5000, 192)]          # inputs: 3.9 MiB


def test_a_call_that_allocates_nothing_grows_nothing(monkeypatch):
    monkeypatch.setitem(memory.CASES, "nothing", "None")
    r = memory.measure("nothing", SIZE[0], "torch")
    assert r["growth"] < 4 * 2**20, r


def test_a_held_temporary_is_measured(monkeypatch):
    # a 64 MiB temporary, written (resident), freed at the end of the call
    monkeypatch.setitem(memory.CASES, "temporary", "torch.ones(16 * 2**20).sum()")
    r = memory.measure("temporary", SIZE[0], "torch")
    assert 60 * 2**20 < r["growth"] < 80 * 2**20, r

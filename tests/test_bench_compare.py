"""bench/compare.py's quiet-machine check: CPU time outside the run's own process tree (/proc),
so the report's "not quiet" warning is about other processes, not the benchmark's own threads.
Asserted on the tree's own jiffies (robust to whatever else the machine runs meanwhile)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
compare = pytest.importorskip("compare")

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"
HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")


def test_own_children_count_in_the_tree():
    before = compare.cpu_jiffies()
    child = subprocess.Popen([sys.executable, "-c", BUSY])  # 1.5 s of CPU, however long that takes
    time.sleep(0.5)
    mid = compare.cpu_jiffies()
    child.wait()
    after = compare.cpu_jiffies()
    assert mid[1] > before[1]                       # counted while it runs
    assert after[1] - before[1] >= 1.2 * HZ, (before, after)   # and after it is reaped (cutime)


def test_a_process_outside_the_tree_does_not():
    # double fork: the shell exits at once, the busy loop is reparented away from this process
    before = compare.cpu_jiffies()
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{BUSY}' >/dev/null 2>&1 &"], check=True)
    time.sleep(1.0)
    after = compare.cpu_jiffies()
    assert after[0] - before[0] >= 0.5 * HZ          # the machine saw it
    assert after[1] - before[1] <= 0.3 * HZ, (before, after)   # the tree did not (the shell: ~0)


def test_other_load_is_a_rate_in_cores():
    load = compare.OtherLoad()
    time.sleep(0.3)
    v = load.sample()
    assert v is not None and 0.0 <= v <= (os.cpu_count() or 1) + 0.5


def test_split_blocks():
    assert compare.split_blocks(10, 4) == [3, 3, 2, 2]
    assert compare.split_blocks(2, 4) == [1, 1]


def test_rename_matches_a_renamed_row():
    from types import SimpleNamespace as NS
    before = NS(table={("sgd n=3072 one cell", "fastdiff"): 2.0, ("sgd retraction", "eager"): 1.0},
                samples={"sgd n=3072 one cell | fastdiff": [2.0]})
    after = NS(table={("adam n=3072 one cell", "fastdiff"): 1.0, ("sgd retraction", "eager"): 1.0},
               samples={"sgd n=3072 one cell | fastdiff": [1.0]})
    inter = compare.apply_renames(before, after, [("sgd n=3072", "adam n=3072")], {"sgd n=3072 one cell | fastdiff": True})
    assert set(before.table) == set(after.table)   # the untouched "sgd retraction" row keeps its name
    assert after.samples == {"adam n=3072 one cell | fastdiff": [1.0]} and inter == {"adam n=3072 one cell | fastdiff": True}
    with pytest.raises(SystemExit, match="--rename: OLD must not be empty"):
        compare.apply_renames(before, after, [("", "x")], {})

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


def test_planned_rounds_reach_the_minimum_time_within_the_cap():
    assert compare.planned_rounds(5, 0.007, 1.0, 20) == 100       # 7 ms x 5 would be 35 ms: capped at 20x
    assert compare.planned_rounds(20, 0.004, 1.0, 20) == 250      # 1 s / 4 ms
    assert compare.planned_rounds(3, 2.0, 1.0, 20) == 3           # already over the minimum
    assert compare.planned_rounds(5, 0.001, 0.0, 20) == 5         # --min-time 0: the file's rounds
    assert compare.planned_rounds(5, float("nan"), 1.0, 20) == 5  # no estimate: the file's rounds


class _FakeSide:
    """A worker that answers ``time`` with ``n`` calls of a fixed duration, in order."""

    def __init__(self, seconds):
        self.seconds, self.samples, self.sent, self.blocks = seconds, {}, [], []

    def send(self, **msg):
        self.sent.append(msg)

    def recv(self):
        n = self.sent[-1]["n"]
        self.blocks.append(n)
        return {"seconds": [self.seconds] * n}


def test_time_row_extends_a_short_row_on_both_sides_alike_and_keeps_alternating():
    a, b = _FakeSide(0.01), _FakeSide(0.02)
    events = {a: {"row": "r | fastdiff", "warmup": 0}, b: {"row": "r | fastdiff", "warmup": 0}}
    assert compare.time_row([a, b], events, rounds=8, blocks=4, min_time_s=1.0, most=20) == {}
    # per call: the slower side's fastest, 20 ms, so 50 rounds a side; the first block keeps the file's split
    assert len(a.samples["r | fastdiff"]) == len(b.samples["r | fastdiff"]) == 50
    assert a.blocks == b.blocks and a.blocks[0] == 2 and len(a.blocks) == 4
    assert a.sent[-1] == {"cmd": "finish"} and b.sent[-1] == {"cmd": "finish"}
    c = _FakeSide(0.01)
    compare.time_row([c], {c: {"row": "s | eager", "warmup": 0}}, rounds=8, blocks=4, min_time_s=0.0)
    assert c.blocks == [2, 2, 2, 2]                               # --min-time 0: the file's rounds


def test_bench_files_pairs_the_common_files_and_names_the_rest(tmp_path):
    from types import SimpleNamespace as NS
    revs = []
    for side, names in (("before", ["test_bench_a.py", "test_bench_b.py"]), ("after", ["test_bench_b.py", "test_bench_a.py", "test_bench_c.py"])):
        (tmp_path / side / "bench").mkdir(parents=True)
        for name in names + ["conftest.py"]:
            (tmp_path / side / "bench" / name).write_text("")
        revs.append(NS(path=tmp_path / side))
    files, one_sided = compare.bench_files(revs, NS(one_process=False))
    assert files == [["bench/test_bench_a.py"], ["bench/test_bench_b.py"]] and one_sided == ["test_bench_c.py"]
    assert compare.bench_files(revs, NS(one_process=True)) == ([["bench"]], [])

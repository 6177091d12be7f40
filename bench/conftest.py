"""pytest-benchmark glue: every benchmark also records its median into the shared table, and the
session ends by printing the table and writing it to bench/results/<device>.md."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

DEVICE = os.environ.get("FASTDIFF_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture
def record(benchmark):
    """``record(group, impl, fn, bytes_moved=..., flops=..., rounds=20, warmup=3)``: time ``fn`` with
    pytest-benchmark (warm-up rounds, then the median of ``rounds``) and add the row to the table."""

    def run(group, impl, fn, bytes_moved=0, flops=0, rounds=20, warmup=3):
        benchmark.group = group
        benchmark.name = impl
        if DEVICE.startswith("cuda"):
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: each row ran once as a smoke test, untimed
            return
        # FASTDIFF_BENCH_STAT=min: the fastest round instead of the median, for a machine shared with other
        # jobs, where preemption inflates the median of a sub-millisecond op by orders of magnitude
        stat = os.environ.get("FASTDIFF_BENCH_STAT", "median")
        harness.TABLE.add(harness.Row(group, impl, getattr(benchmark.stats.stats, stat), bytes_moved, flops))

    return run


def pytest_sessionfinish(session, exitstatus):
    if not harness.TABLE.rows:
        return
    command = os.environ.get("FASTDIFF_BENCH_COMMAND", "python -m pytest bench/ --benchmark-enable")
    text = harness.TABLE.markdown(DEVICE, command)
    tag = "cpu" if DEVICE == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    if "1" in (os.environ.get("FASTDIFF_BENCH_SVD_SMOKE"), os.environ.get("FASTDIFF_BENCH_EMPIRICAL_SMOKE")):
        # interpreter smoke run: not a timing table
        tag = "cpu-smoke"
    tag = os.environ.get("FASTDIFF_BENCH_OUT", tag)  # a partial run's own table, not the device's full one
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", f"{tag}.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print("\n" + text + f"\n(written to {path})")

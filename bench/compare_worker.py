"""pytest plugin that makes one revision's ``bench/`` a timing server for ``bench/compare.py``.

bench/compare.py starts one pytest process per revision with ``-p compare_worker -p no:benchmark``
and that revision's checkout first on ``PYTHONPATH``.  This plugin stands in for pytest-benchmark's
``benchmark`` fixture (``pedantic``, ``__call__``, ``group``, ``name``, ``stats.stats.median``: all
that the bench files and their ``record`` fixture use), so each revision's bench files run as they
are; but the timed rounds of a row run only when compare.py asks for them, a block at a time, so
the two revisions' processes take turns on the same row and drift of the machine falls on both.
A row's warm-up rounds (the bench file's ``warmup``: compilation, first-touch page faults) run
before the first block, untimed, in both processes at once.

Protocol: one JSON object a line, on two pipes whose fds are in ``FASTDIFF_COMPARE_FDS="r,w"``.

- worker  ``{"event": "hello", "items": [node ids], "fastdiff": path, "C": path, "threads": n, ...}``
- compare ``{"cmd": "run", "node": id, "next": id or null}``: run that test (``next``: the item this
  process runs after it, so module fixtures are torn down only when the module's items are done)
- worker  ``{"event": "ready", "row": "group | name", "rounds": R, "warmup": W}`` (warm-up done)
- compare ``{"cmd": "time", "n": k, "rewarm": bool}`` -> worker ``{"event": "samples", "seconds": [...]}``
  (``"error"`` set when a call raised; the test then fails); ``{"cmd": "finish"}``: leave the row
- worker  ``{"event": "done", "node": id, "outcome": ..., "message": ..., "rows": [[group, impl, s]]}``
  (the rows the test added to the bench harness's table)
- compare ``{"cmd": "quit"}``
"""
import json
import os
import statistics
import sys
import time
import types

import pytest


class _Channel:
    def __init__(self, spec):
        r, w = (int(fd) for fd in spec.split(","))
        self._r = os.fdopen(r, "r")
        self._w = os.fdopen(w, "w")

    def send(self, **msg):
        self._w.write(json.dumps(msg) + "\n")
        self._w.flush()

    def recv(self):
        line = self._r.readline()
        if not line:  # compare.py went away: stop, do not hang
            os._exit(3)
        return json.loads(line)


CHANNEL = None


def pytest_configure(config):
    global CHANNEL
    CHANNEL = _Channel(os.environ["FASTDIFF_COMPARE_FDS"])
    import torch

    torch.set_num_threads(int(os.environ["FASTDIFF_COMPARE_THREADS"]))


class _Stats:
    def __init__(self, seconds):
        self.data = seconds
        self.median = statistics.median(seconds)
        self.min, self.max, self.rounds = min(seconds), max(seconds), len(seconds)
        self.mean = statistics.fmean(seconds)


class ComparedBenchmark:
    """The ``benchmark`` fixture of this run: times a callable when compare.py says so."""

    def __init__(self):
        self.group = None
        self.name = None
        self.stats = None
        self.extra_info = {}

    def __call__(self, target, *args, **kwargs):
        return self.pedantic(target, args, kwargs, rounds=20, warmup_rounds=3)

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        kwargs = kwargs or {}

        def call():
            if setup is not None:
                setup()
            return target(*args, **kwargs)

        result = None
        for _ in range(warmup_rounds):
            result = call()
        CHANNEL.send(event="ready", row=f"{self.group} | {self.name}", rounds=rounds, warmup=warmup_rounds)
        samples = []
        while True:
            cmd = CHANNEL.recv()
            if cmd["cmd"] == "finish":
                break
            block = []
            try:
                if cmd.get("rewarm"):
                    call()
                for _ in range(cmd["n"]):
                    t = time.perf_counter()
                    for _ in range(iterations):
                        result = call()
                    block.append((time.perf_counter() - t) / iterations)
            except BaseException as e:
                CHANNEL.send(event="samples", seconds=block, error=f"{type(e).__name__}: {e}")
                raise
            samples += block
            CHANNEL.send(event="samples", seconds=block)
        self.stats = types.SimpleNamespace(stats=_Stats(samples or [float("nan")]))
        return result


@pytest.fixture
def benchmark():
    return ComparedBenchmark()


_reports = []


def pytest_runtest_logreport(report):
    _reports.append(report)


def _outcome(reports):
    for r in reports:
        if r.failed:
            text = str(r.longrepr).strip().splitlines()
            return "failed", f"{r.when}: {text[-1] if text else ''}"
    for r in reports:
        if r.skipped:
            reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            return "skipped", reason
    return "passed", ""


def _table():
    harness = sys.modules.get("harness")  # bench/harness.py, imported by this revision's conftest
    return harness.TABLE.rows if harness is not None else []


def pytest_runtestloop(session):
    import fastdiff
    import torch

    try:
        import fastdiff._C as C
        c_path = C.__file__
    except ImportError as e:
        c_path = f"not importable: {e}"
    items = {item.nodeid: item for item in session.items}
    CHANNEL.send(event="hello", items=list(items), fastdiff=fastdiff.__file__, C=c_path,
                 plugin=__file__, threads=torch.get_num_threads(), torch=torch.__version__,
                 python=sys.version.split()[0], collect_errors=session.testsfailed)
    while True:
        cmd = CHANNEL.recv()
        if cmd["cmd"] == "quit":
            break
        item, table = items[cmd["node"]], _table()
        first = len(table)
        del _reports[:]
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=items.get(cmd.get("next")))
        outcome, message = _outcome(_reports)
        table = _table()
        rows = [[r.group, r.impl, r.seconds] for r in table[first:]]
        CHANNEL.send(event="done", node=item.nodeid, outcome=outcome, message=message, rows=rows)
    del _table()[:]  # conftest's session finish would otherwise write this process's table
    return True

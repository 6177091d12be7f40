"""A local Ray instance started by ``--executor ray`` ends with its driver, also when the driver
is killed with SIGTERM (issue 13 item 14).

With Ray 2.60 the processes a driver starts already share its fate on SIGTERM (this test passes
without fastdiff's handler too); the handler makes it hold for any Ray version, and the test
guards it.  SIGKILL cannot be handled in-process (Ray's dashboard/runtime-env agents survive it)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("ray")


def _ray_pids(tag, driver=None):
    """Processes started under the Ray temp dir ``tag`` (its GCS, raylet, dashboard and workers, whose
    command lines Ray renames to ``ray::...``): found by the environment they inherited."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (os.getpid(), driver):
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().split(b") ")[-1][:1] == b"Z":   # a zombie is dead already
                    continue
        except OSError:
            continue
        if f"RAY_TMPDIR={tag}".encode() in env.split(b"\0"):
            pids.append(int(pid))
    return pids


def _cmdlines(pids):
    out = []
    for q in pids:
        try:
            with open(f"/proc/{q}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace")[:100])
        except OSError:
            pass
    return out


def test_sigterm_to_a_ray_driver_shuts_its_ray_down(tmp_path):
    tag = tempfile.mkdtemp(prefix="fdray", dir="/tmp")   # short: Ray's unix socket paths must fit 107 bytes
    env = dict(os.environ, RAY_TMPDIR=tag, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "fastdiff", "sweep", "linear-diffusion", "--executor", "ray", "--n", "8",
           "--N", "8:400", "--T", "1000", "--mc-samples", "2000", "--trials", "4", "--out", str(tmp_path),
           "--no-progress", "--no-plot"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None:
            if sum("ray::" in c for c in _cmdlines(_ray_pids(tag, p.pid))) >= 1:   # a worker runs a task
                break
            time.sleep(0.5)
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
        assert _ray_pids(tag, p.pid), "ray did not start within 180 s"
        time.sleep(3)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _ray_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ray_pids(tag)
        assert not left, f"ray processes of the killed driver still alive: {_cmdlines(left)}"
    finally:
        if p.poll() is None:
            p.kill()
        for q in _ray_pids(tag):     # only this test's own session's processes
            try:
                os.kill(q, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tag, ignore_errors=True)

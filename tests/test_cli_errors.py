"""The command line on bad paths and bad input (issue 13 items 12, 13): one ``error:`` line on
stderr, exit code 2, no traceback, no stray or half-written file; help text; resumed runs."""
import errno
import os
import random
import subprocess
import sys

import pytest

from fastdiff import cli, sweeps
from fastdiff.sweeps import runner

SMALL = ["sweep", "linear-diffusion", "--n", "4", "--N", "8", "--T", "10", "--trials", "1", "--no-progress"]


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, env=env, cwd=cwd)


def _one_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: " in lines[0], r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _one_error_inproc(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: " in lines[0], err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_out_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    _one_error(_cli(*SMALL, "--out", str(f)), str(f), "not a directory")
    _one_error(_cli(*SMALL, "--out", str(f / "sub")), "Not a directory")
    _one_error(_cli("demo", "--out", str(f), "--n", "2", "--T", "5", "--samples", "16"), "not a directory")
    _one_error(_cli("plot", str(f), "--out", str(tmp_path)), "not a fastdiff sweep store")
    assert f.read_text() == "x"


def test_store_on_an_unwritable_path(tmp_path):
    _one_error(_cli(*SMALL, "--out", str(tmp_path), "--store", "/proc/no/such/dir/s.sqlite"), "/proc/no/such/dir")
    _one_error(_cli(*SMALL, "--out", str(tmp_path), "--store", str(tmp_path)), "is a directory")


_BYTES = random.Random(0).randbytes


@pytest.mark.parametrize("content", [_BYTES(5000), b"SQLite format 3\x00" + _BYTES(300), b"x"],
                         ids=["random-bytes", "truncated-sqlite", "one-byte"])
def test_corrupt_store(tmp_path, content):
    p = tmp_path / "bad.sqlite"
    p.write_bytes(content)
    _one_error(_cli(*SMALL, "--out", str(tmp_path), "--store", str(p)), f"{p} is not a fastdiff sweep store (")
    _one_error(_cli("plot", str(p), "--out", str(tmp_path)), f"{p} is not a fastdiff sweep store (")
    assert p.read_bytes() == content


def test_paths_with_hash_question_mark_percent(tmp_path):
    d = tmp_path / "a#b?c%20d"
    r = _cli(*SMALL, "--out", str(d))
    assert r.returncode == 0, r.stderr[-3000:]
    before = sorted(os.listdir(tmp_path))
    r = _cli("plot", str(d / "linear-diffusion.sqlite"), "--out", str(tmp_path / "p"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "p" / "linear-diffusion.csv").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["p"])     # no stray file 'a' made by a URI fragment


def test_disk_full_while_writing_the_store_names_the_cause(tmp_path, monkeypatch, capsys):
    class TinyDisk(sweeps.Store):   # SQLite's own "database or disk is full" (SQLITE_FULL) past the page cap
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count = {pages + 1}")

    monkeypatch.setattr(runner, "Store", TinyDisk)
    rc = cli.main(["sweep", "linear-diffusion", "--n", "4", "--N", "8:400", "--T", "10", "--trials", "5",
                   "--no-progress", "--no-plot", "--out", str(tmp_path)])
    _one_error_inproc(capsys, rc, "disk full", "linear-diffusion.sqlite")
    err_text = capsys.readouterr().err
    assert "cannot rollback" not in err_text


def test_disk_full_while_exporting_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    real = open

    def full_open(path, mode="r", *a, **k):
        f = real(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".tmp"):
            f.write("partial,row\n")
            f.flush()
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return f

    monkeypatch.setattr(sweeps.store, "_pyarrow", lambda: None)
    monkeypatch.setattr("builtins.open", full_open)
    rc = cli.main([*SMALL, "--no-plot", "--out", str(tmp_path)])
    monkeypatch.undo()
    _one_error_inproc(capsys, rc, "No space left on device")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".csv") or f.endswith(".tmp")], os.listdir(tmp_path)


@pytest.mark.parametrize("args,needle", [(["--n", "0"], "--n: expected an int >= 1"),
                                         (["--T", "0"], "--T: expected an int >= 1"),
                                         (["--samples", "1"], "--samples: expected an int >= 2")])
def test_demo_bad_sizes(tmp_path, args, needle):
    out = tmp_path / "d"
    _one_error(_cli("demo", "--out", str(out), *args), needle)
    assert not out.exists() or not os.listdir(out)          # no half-written CSV


def test_sweep_help_shows_one_default_and_kebab_flags():
    r = _cli("sweep", "subspace-recovery", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "(default: None)" not in text and "default: False" not in text
    assert "--max-iter" in text and "--max_iter" not in text and "--sgd-sigma-max" in text
    assert "default: 48)" in text and "(default: 20)" in text        # a parameter's and an option's, once each
    for flag in ("--trials", "--executor", "--no-plot"):
        assert flag in text
    r = _cli("sweep", "linear-diffusion", "--help")
    assert "--mc-samples" in r.stdout and "--mc_samples" not in r.stdout


def test_plot_and_demo_options_have_help():
    for cmd, flags in (("plot", ("--out",)), ("demo", ("--out", "--n", "--samples", "--T", "--seed", "--backend"))):
        r = _cli(cmd, "--help")
        assert r.returncode == 0
        lines = r.stdout.splitlines()
        for flag in flags:
            line = next(line for line in lines if line.strip().startswith(flag + " "))
            assert len(line.split()) > 2, (cmd, flag, line)          # the flag, its metavar, then help text


def test_underscore_flags_still_work(tmp_path):
    p, _ = cli._parser()
    a = p.parse_args(["sweep", "subspace-recovery", "--max_iter", "3"])
    b = p.parse_args(["sweep", "subspace-recovery", "--max-iter", "3"])
    assert a.max_iter == b.max_iter == "3"
    a = p.parse_args(["sweep", "linear-diffusion", "--mc_samples", "5"])
    assert a.mc_samples == "5"


def test_unknown_sweep_flag_prints_the_subcommand_usage():
    r = _cli("sweep", "linear-diffusion", "--bogus", "1")
    assert r.returncode == 2
    assert "usage: fastdiff sweep linear-diffusion" in r.stderr and "unrecognized arguments: --bogus 1" in r.stderr
    r = _cli("plot", "x.sqlite", "--bogus")
    assert r.returncode == 2 and "usage: fastdiff plot" in r.stderr


def test_resumed_run_says_nothing_was_recomputed(tmp_path):
    args = [*SMALL[:5], "8,16", *SMALL[6:], "--out", str(tmp_path), "--no-plot"]
    r = _cli(*args)
    assert r.returncode == 0 and "resumed:" not in r.stdout
    r = _cli(*args)
    assert r.returncode == 0 and "resumed: 0 of 2 cells recomputed (all in store)" in r.stdout, r.stdout
    r = _cli(*[a if a != "8,16" else "8,16,32" for a in args])
    # the new cell shares its batch with the stored two: the batch is rerun whole (stored rows are kept)
    assert "resumed: 3 of 3 cells recomputed (2 were in store)" in r.stdout, r.stdout

"""Every code block of the README runs as written (issue 13): Python blocks in a fresh interpreter,
each line of a bash block as a shell command, both in an empty folder.

The README's blocks are self-contained: where a user would bring a model, a pipeline or data, the
block itself defines a small stand-in and says so in a comment.  The two `make` commands are not run
here: `make test` is this suite (what .ci/run runs), and `make demo` is `make install` followed by the
commands of the Makefile's demo recipe, which this test runs itself.
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import readme_blocks  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = readme_blocks.blocks()
PY_BLOCKS = [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"]
SH_COMMANDS = [c for lang, code in BLOCKS if lang == "bash" for c in readme_blocks.commands(code)]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the `fastdiff` console script of this interpreter's environment, first on the PATH
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def test_readme_has_the_two_commands_and_runnable_blocks():
    assert SH_COMMANDS[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ".ci/run must run the README's test command"
    assert len(PY_BLOCKS) >= 5
    for lang, _ in BLOCKS:
        assert lang in ("python", "bash"), f"README block of language {lang!r}: tests run python and bash only"


@pytest.mark.parametrize("index", PY_BLOCKS)
def test_python_block_runs(index, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_blocks.py"), "run", str(index)],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README block {index} failed:\n{BLOCKS[index][1]}\n{r.stderr[-4000:]}"


def _demo_recipe():
    """The commands of the Makefile's ``demo`` recipe after its ``install`` prerequisite."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, "Makefile has no demo recipe"
    return [line.strip().replace("$(PY)", shlex.quote(sys.executable)) for line in m.group(1).splitlines()]


SH_BLOCKS = [i for i, (lang, _) in enumerate(BLOCKS) if lang == "bash"]


@pytest.mark.parametrize("index", SH_BLOCKS)
def test_shell_block_runs(index, tmp_path):
    """A bash block's commands in order, in one folder (a later line may read what an earlier one
    wrote); ``make demo`` as its recipe's commands, ``make test`` not at all (it is this suite)."""
    for command in readme_blocks.commands(BLOCKS[index][1]):
        if command == "make test":
            continue
        for cmd in (_demo_recipe() if command == "make demo" else [command]):
            r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"`{cmd}` failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def test_readme_cites_only_what_the_repository_holds():
    """The README once cited documents outside the repository (../shared/SPEC.md, the seeds): every
    file it links or names in backticks as a path exists in the checkout, and the papers it calls
    seed 001 to 004 are named in docs/math.md."""
    text = (ROOT / "README.md").read_text()
    assert "../shared" not in text and "SPEC" not in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    paths = re.findall(r"`((?:fastdiff|kernels|csrc|tests|bench|docs|\.ci)/[\w./-]*)`", text)
    missing = [p for p in links + paths if not p.startswith("http") and not (ROOT / p.rstrip("/")).exists()]
    assert not missing, f"README names paths that do not exist: {missing}"
    math_md = (ROOT / "docs" / "math.md").read_text()
    for seed in re.findall(r"seed 00\d", text):
        assert f"| {seed} |" in math_md, f"{seed} is cited in the README but not defined in docs/math.md"

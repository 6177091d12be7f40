"""Run diffusers' own scheduler test modules with fastdiff's adapter classes substituted.

diffusers' repository is public and not part of fastdiff: pass a clone (a work tree, or a bare git
directory with ``--rev``), and this script copies its ``tests/schedulers/`` (with the two helper
modules they import) into a scratch folder, writes a ``conftest.py`` there that replaces each adapted
class in ``diffusers`` (and ``diffusers.schedulers``) by fastdiff's subclass before the test modules
import it, runs pytest on the adapted classes' modules, and writes a table of the outcomes::

    python bench/diffusers_scheduler_tests.py --repo /path/to/diffusers [--rev v0.40.0] \\
        [--out bench/results/diffusers-scheduler-tests.md] [--baseline]

``--baseline`` runs the same modules without the substitution, so a failure of diffusers' own
classes (a test written for a newer or older diffusers than the installed one) is told apart from
a failure of fastdiff's.  Nothing of diffusers is written into this repository.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

# diffusers class -> fastdiff module holding the subclass of the same name
ADAPTED = {
    "DDPMScheduler": "fastdiff.adapters.diffusers",
    "DDIMScheduler": "fastdiff.adapters.diffusers",
    "EulerDiscreteScheduler": "fastdiff.adapters.diffusers",
    "DPMSolverMultistepScheduler": "fastdiff.adapters.diffusers_solvers",
    "UniPCMultistepScheduler": "fastdiff.adapters.diffusers_solvers",
    "FlowMatchEulerDiscreteScheduler": "fastdiff.adapters.diffusers_solvers",
    "DEISMultistepScheduler": "fastdiff.adapters.diffusers_deis",
    "LCMScheduler": "fastdiff.adapters.diffusers_consistency",
    "TCDScheduler": "fastdiff.adapters.diffusers_consistency",
    "EulerAncestralDiscreteScheduler": "fastdiff.adapters.diffusers_k",
    "HeunDiscreteScheduler": "fastdiff.adapters.diffusers_k",
    "LMSDiscreteScheduler": "fastdiff.adapters.diffusers_k",
}
MODULES = ["test_scheduler_ddpm.py", "test_scheduler_ddim.py", "test_scheduler_euler.py",
           "test_scheduler_dpm_multi.py", "test_scheduler_unipc.py", "test_scheduler_deis.py",
           "test_scheduler_lcm.py", "test_scheduler_tcd.py", "test_scheduler_euler_ancestral.py",
           "test_scheduler_heun.py", "test_scheduler_lms.py"]
HELPERS = ["tests/__init__.py", "tests/testing_utils.py", "tests/others/__init__.py", "tests/others/test_utils.py",
           "tests/schedulers/__init__.py", "tests/schedulers/test_schedulers.py"]

CONFTEST = '''
import importlib
import diffusers
import diffusers.schedulers

SUBSTITUTED = {}
for name, module in %r.items():
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, getattr(diffusers, name)) and cls is not getattr(diffusers, name), name
    setattr(diffusers, name, cls)
    setattr(diffusers.schedulers, name, cls)
    SUBSTITUTED[name] = cls


def pytest_report_header(config):
    return "fastdiff substituted: " + ", ".join(sorted(SUBSTITUTED))
'''


def _copy(repo: pathlib.Path, rev: str, rel: str, dest: pathlib.Path) -> bool:
    out = dest / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    if (repo / rel).is_file() and rev is None:
        shutil.copyfile(repo / rel, out)
        return True
    r = subprocess.run(["git", "--git-dir", str(repo if (repo / "HEAD").exists() else repo / ".git"), "show",
                        f"{rev or 'HEAD'}:{rel}"], capture_output=True)
    if r.returncode != 0:
        return False
    out.write_bytes(r.stdout)
    return True


def _run(scratch: pathlib.Path, modules, substitute: bool):
    (scratch / "conftest.py").write_text(CONFTEST % (ADAPTED,) if substitute else "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore",
                        "-o", "addopts=", *[f"tests/schedulers/{m}" for m in modules]],
                       cwd=scratch, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(scratch)))
    text = r.stdout + r.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", text.splitlines()[-1]
                                                   if text.strip() else "")}
    return counts, failed, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, type=pathlib.Path, help="a diffusers clone (work tree or bare git dir)")
    ap.add_argument("--rev", default=None, help="git revision to read the tests from (default: the work tree, or HEAD)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="write the table here (markdown)")
    ap.add_argument("--baseline", action="store_true", help="also run diffusers' own classes")
    ap.add_argument("--modules", default=",".join(MODULES), help="comma-separated test modules")
    args = ap.parse_args(argv)
    modules = [m for m in args.modules.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = pathlib.Path(tmp)
        for rel in HELPERS + [f"tests/schedulers/{m}" for m in modules]:
            if not _copy(args.repo, args.rev, rel, scratch):
                print(f"not in the repository: {rel}", file=sys.stderr)
        present = [m for m in modules if (scratch / "tests" / "schedulers" / m).exists()]
        rows = []
        runs = [("fastdiff", True)] + ([("diffusers", False)] if args.baseline else [])
        results = {}
        for label, sub in runs:
            for m in present:
                counts, failed, text = _run(scratch, [m], sub)
                results[(label, m)] = (counts, failed)
                print(f"{label:9s} {m:36s} {counts}", flush=True)
                for f in failed:
                    print(f"          {f}")
        import diffusers
        lines = [f"# diffusers' scheduler tests with fastdiff's classes substituted",
                 "", f"diffusers installed: {diffusers.__version__}; tests from {args.repo.name} at {args.rev or 'HEAD'}.",
                 f"Command: `python bench/diffusers_scheduler_tests.py --repo <diffusers> {'--rev ' + args.rev if args.rev else ''}"
                 f"{' --baseline' if args.baseline else ''}`", "",
                 "| module | classes | passed | failed | failed with diffusers' own classes too |", "| --- | --- | --- | --- | --- |"]
        for m in present:
            counts, failed = results[("fastdiff", m)]
            base = results.get(("diffusers", m))
            both = [f for f in failed if base and f in base[1]]
            lines.append(f"| {m} | fastdiff | {counts.get('passed', 0)} | {counts.get('failed', 0) + counts.get('error', 0) + counts.get('errors', 0)} "
                         f"| {len(both) if base else 'n/a'} |")
        lines += ["", "Failures (fastdiff's classes):", ""]
        for m in present:
            for f in results[("fastdiff", m)][1]:
                base = results.get(("diffusers", m))
                lines.append(f"- `{f}`" + (" (fails with diffusers' classes too)" if base and f in base[1] else ""))
        table = "\n".join(lines) + "\n"
        print(table)
        if args.out:
            args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

# this checkout's fastdiff, ahead of any installed one (the tests run from the scratch folder)
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
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
           "test_scheduler_heun.py", "test_scheduler_lms.py",
           "test_schedulers.py"]  # the shared module's own tests switch configs between adapted classes
NO_MODULE = ["FlowMatchEulerDiscreteScheduler"]
# the reason for each failure that stays (read from the tests, checked against the float64 run)
REASONS = {
    "tests/schedulers/test_scheduler_ddpm.py::DDPMSchedulerTest::test_full_loop_with_noise":
        "an expected value that bakes in diffusers' float32 rounding.  The loop's step at t = 1 forms "
        "beta_1 = 1 - abar_1/abar_0 in float32, 1.19925e-4 where the float64 value of the same float32 table "
        "is 1.19937e-4 (relative error 1.0e-4: the ratio 0.99988 is rounded to 6e-8 before the cancellation); "
        "beta_1 scales the x0 coefficient of the posterior mean and the noise, so the test's sum of |x| "
        "(768 elements) moves by 0.021 against its 0.01 tolerance.  fastdiff computes the coefficients in "
        "float64 from the same table (387.96765); diffusers' own step in float64 gives 387.96761.",
    "tests/schedulers/test_schedulers.py::SchedulerBaseTests::test_default_arguments_not_in_config":
        "loads a pipeline from the Hugging Face Hub, which this machine cannot reach (diffusers' classes fail "
        "alike); its assertions, on the PNDM config that pipeline carries, pass with fastdiff's classes in "
        "tests/test_adapters_diffusers_configs.py::test_from_config_switch_keeps_each_class_defaults_offline.",
    "tests/schedulers/test_schedulers.py::SchedulerBaseTests::test_default_solver_type_after_switch":
        "loads a pipeline from the Hub (no network here; diffusers' classes fail alike); checked offline by the "
        "same fastdiff test.",
}
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
    import fastdiff
    return f"fastdiff from {fastdiff.__file__} substituted: " + ", ".join(sorted(SUBSTITUTED))
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


# --float64: diffusers' own classes with their step arithmetic in float64 on the same float32-valued tables
# fastdiff reads (every float32 tensor attribute upcast after __init__ / set_timesteps), float64 samples
# (torch's default dtype) and the very noise numbers of the float32 run (drawn in float32, then upcast): the
# value an expected-value test would see without diffusers' float32 rounding.  A fastdiff failure whose
# value this run reproduces is an expected value that bakes in that rounding, not a fastdiff error.
CONFTEST64 = '''
import functools
import importlib

import torch
import diffusers
from diffusers.utils import torch_utils

torch.set_default_dtype(torch.float64)
_randn = torch_utils.randn_tensor


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None, **kw):
    return _randn(shape, generator=generator, device=device, dtype=torch.float32, layout=layout,
                  **kw).to(dtype if dtype is not None and dtype.is_floating_point else torch.float64)


def _to64(self):
    for k, v in list(vars(self).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            setattr(self, k, v.double())


def _wrap(f):
    @functools.wraps(f)
    def g(self, *a, **k):
        out = f(self, *a, **k)
        _to64(self)
        return out
    return g


for name in %r:
    cls = getattr(diffusers, name)
    mod = importlib.import_module(cls.__module__)
    if hasattr(mod, "randn_tensor"):
        mod.randn_tensor = randn_tensor
    for meth in ("__init__", "set_timesteps"):
        setattr(cls, meth, _wrap(getattr(cls, meth)))
'''


def _run(scratch: pathlib.Path, targets, mode: str):
    """Run pytest on ``targets`` (modules or test ids) with ``mode`` "fastdiff" (substituted), "diffusers"
    (the originals) or "float64" (the originals in float64, CONFTEST64)."""
    conftest = {"fastdiff": CONFTEST % (ADAPTED,), "diffusers": "", "float64": CONFTEST64 % (sorted(ADAPTED),)}[mode]
    (scratch / "conftest.py").write_text(conftest)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore",
                        "--tb=short", "-o", "addopts=", *[t if "::" in t else f"tests/schedulers/{t}" for t in targets]],
                       cwd=scratch, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(scratch), ROOT])))
    text = r.stdout + r.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    # the first "E " line of each failure's traceback section ("____ Class.test ____"), keyed by its test id
    why = {}
    for head, body in re.findall(r"^_{3,} (?:ERROR at \S+ of )?(\S+) _{3,}$(.*?)(?=^_{3,} |^=+ short test summary)",
                                 text, re.M | re.S):
        msg = next((ln[1:].strip() for ln in body.splitlines() if ln.startswith("E ")), "")
        for f in failed:
            if f.endswith("::" + head.replace(".", "::")):
                why[f] = msg
    last = text.strip().splitlines()[-1] if text.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last)}
    return counts, failed, why, text


def _bad(counts) -> int:
    return counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, type=pathlib.Path, help="a diffusers clone (work tree or bare git dir)")
    ap.add_argument("--rev", default=None, help="git revision to read the tests from (default: the work tree, or HEAD)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="write the table here (markdown)")
    ap.add_argument("--baseline", action="store_true",
                    help="also run diffusers' own classes, and fastdiff's failures with them in float64")
    ap.add_argument("--modules", default=",".join(MODULES), help="comma-separated test modules")
    args = ap.parse_args(argv)
    modules = [m for m in args.modules.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = pathlib.Path(tmp)
        for rel in HELPERS + [f"tests/schedulers/{m}" for m in modules]:
            if not _copy(args.repo, args.rev, rel, scratch):
                print(f"not in the repository: {rel}", file=sys.stderr)
        present = [m for m in modules if (scratch / "tests" / "schedulers" / m).exists()]
        results = {}
        for mode in ["fastdiff"] + (["diffusers"] if args.baseline else []):
            for m in present:
                counts, failed, why, _ = _run(scratch, [m], mode)
                results[(mode, m)] = (counts, failed, why)
                print(f"{mode:9s} {m:36s} {counts}", flush=True)
                if not counts:  # pytest did not get to its summary line: show why
                    print(_[-2000:], file=sys.stderr)
                for f in failed:
                    print(f"          {f}: {why.get(f, '')}")
        fd_failed = [f for m in present for f in results[("fastdiff", m)][1]]
        f64 = {}
        if args.baseline and fd_failed:  # each fastdiff failure once more: the originals in float64
            _, failed64, why64, _ = _run(scratch, fd_failed, "float64")
            f64 = {f: ("fails: " + why64.get(f, "")) if f in failed64 else "passes" for f in fd_failed}
            for f, v in f64.items():
                print(f"float64   {f}: {v}")
        import diffusers
        lines = ["# diffusers' scheduler tests with fastdiff's classes substituted", "",
                 f"diffusers installed: {diffusers.__version__}; tests from {args.repo.name} at {args.rev or 'HEAD'}.",
                 f"Command: `python bench/diffusers_scheduler_tests.py --repo <diffusers> {'--rev ' + args.rev if args.rev else ''}"
                 f"{' --baseline' if args.baseline else ''}`", "",
                 "| module | diffusers' classes passed | failed | fastdiff's classes passed | failed | skipped |",
                 "| --- | --- | --- | --- | --- | --- |"]
        tot = [0, 0, 0, 0]
        for m in present:
            c, _, _ = results[("fastdiff", m)]
            b = results.get(("diffusers", m), ({},))[0]
            row = [b.get("passed", 0), _bad(b), c.get("passed", 0), _bad(c)]
            tot = [a + r for a, r in zip(tot, row)]
            cells = [str(v) for v in row] if args.baseline else ["n/a", "n/a"] + [str(v) for v in row[2:]]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {c.get('skipped', 0)} |")
        lines.append("| **all** | " + " | ".join(str(v) if args.baseline or k >= 2 else "n/a" for k, v in enumerate(tot))
                     + " | |")
        lines += ["", "Failures with fastdiff's classes (and the same test with diffusers' classes, and with diffusers' "
                  "classes in float64: their step arithmetic in float64 on the same float32-valued tables, the same "
                  "noise numbers):", ""]
        for m in present:
            _, failed, why = results[("fastdiff", m)]
            for f in failed:
                base = results.get(("diffusers", m))
                lines.append(f"- `{f}`: {why.get(f, '')}")
                if base:
                    lines.append(f"  - diffusers' classes: {'fail: ' + base[2].get(f, '') if f in base[1] else 'pass'}")
                if f in f64:
                    lines.append(f"  - diffusers' classes in float64: {f64[f]}")
                if f in REASONS:
                    lines.append(f"  - why: {REASONS[f]}")
        if not fd_failed:
            lines.append("- none")
        lines += ["", "Adapted classes with no module of their own in diffusers' tests/schedulers/ (at this revision): "
                  + ", ".join(NO_MODULE) + " -- covered by fastdiff's own comparisons against the installed original "
                  "(tests/test_adapters_dpmsolver.py: test_flowmatch_matches_diffusers, test_flowmatch_per_token_timesteps)."]
        table = "\n".join(lines) + "\n"
        print(table)
        if args.out:
            args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

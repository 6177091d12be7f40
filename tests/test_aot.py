"""Ahead-of-time compiles of every GPU kernel for sm_80 and sm_90, on a machine without a GPU.

The interpreter tests run the Triton kernels' Python semantics only; these catch what breaks in
the real compiler (types, layouts, unsupported ops) and in nvcc for the CUDA sources.

Triton decides at import whether its own library functions (tl.philox, ...) are interpreted, and
conftest.py turns the interpreter on where there is no GPU, so the Triton compiles run in worker
processes started without TRITON_INTERPRET: this file run as a script, one process per compute
capability, side by side.  Each (variant, cc) is still its own test id.

What each compile costs an SM (registers, spills, shared memory, warps/SM) is checked against the
committed table and the per-variant budgets of bench/triton_budgets.json (tests/triton_resources.py).
"""
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_resources as tr  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CCS = tr.CCS
SMEM_LIMIT = tr.SMEM_LIMIT
CU_FILES = sorted(glob.glob(str(REPO / "csrc" / "cuda" / "*.cu")))


def _kernels_package():
    """fastdiff.kernels of this checkout (kernels/): the installed package when it is this
    checkout's (an editable install of it, or CI's), else loaded from kernels/ itself, so a
    worktree beside another checkout's editable install still compiles its own sources."""
    try:
        import fastdiff.kernels as kernels

        if Path(kernels.__file__).resolve().parent == (REPO / "kernels").resolve():
            return kernels
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "fastdiff.kernels" or m.startswith("fastdiff.kernels.")]:
        del sys.modules[name]  # another checkout's copy: its submodules would answer relative imports
    spec = importlib.util.spec_from_file_location(
        "fastdiff.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")])
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["fastdiff.kernels"] = kernels
    spec.loader.exec_module(kernels)
    return kernels


def _ptxas_resources(ptxas, ptx, cc, tmp):
    """Registers, spills and stack of one kernel from ``ptxas -v`` (what the driver reports as
    n_regs / n_spills on a GPU), for the same PTX Triton compiled."""
    src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
    with open(src, "w") as f:
        f.write(ptx)
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", out], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas -v failed: {r.stderr[-2000:]}")
    text = r.stdout + r.stderr

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"regs": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame")}


def _ptxas_for(cc):
    """The assembler Triton itself uses for ``cc`` (the newest bundled one that takes its PTX:
    ptxas-blackwell for sm_90+ in triton 3.9); older Triton without ``get_ptxas``: its ptxas knob."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except ImportError:
        from triton import knobs

        return knobs.nvidia.ptxas.path


def _compile_all(cc, shard=0, shards=1):
    """Worker: compile AOT variants ``shard::shards`` for one cc; {name: {cubin, regs, spills,
    smem, ...} or error text}.  On a GPU of this cc, ``driver``: (n_regs, n_spills) as loaded."""
    import tempfile

    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    ptxas = _ptxas_for(cc)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        here = _device_cc()
        for v in _kernels_package().AOT_KERNELS[shard::shards]:
            # mark what the JIT sees as multiples of 16 (aligned pointers, n), so this compiles the
            # code a GPU run gets: vectorized loads and stores
            attrs = {(v.fn.arg_names.index(a),): BaseBackend.parse_attr("D") for a in v.divisible_by_16}
            try:
                src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
                k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": v.num_warps})
                results[v.name] = {"cubin": len(k.asm["cubin"]), "smem": int(k.metadata.shared),
                                   "num_warps": v.num_warps, **_ptxas_resources(ptxas, k.asm["ptx"], cc, tmp)}
                if here == cc:  # the module as this GPU's driver loads it
                    try:
                        k._init_handles()
                        results[v.name]["driver"] = (int(k.n_regs), int(k.n_spills))
                    except Exception as e:  # reported, not fatal: the ptxas numbers stand
                        results[v.name]["driver"] = (f"{type(e).__name__}", "")
            except Exception as e:  # reported by that variant's test
                results[v.name] = f"{type(e).__name__}: {e}"
    return results


def _device_cc():
    """Compute capability (e.g. 90) of the GPU here, or None (no torch / no GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 10 * major + minor
    except Exception:
        pass
    return None


# ------------------------------------------------------------------------------------- Triton
AOT_NAMES = [v.name for v in _kernels_package().AOT_KERNELS]


def _is_default(variant) -> bool:
    """Whether ``backend="auto"`` runs this variant on a GPU: the dispatch table
    (``fastdiff.dispatch.choose``, i.e. the triton row's ``fits`` and ``prefer``) picks "triton"
    for the call that launches it (``variant.op / dtype / sizes``); ``op=None`` is a tuning option.
    Decided as where Triton runs: TRITON_INTERPRET=1 is what makes ``fastdiff.backends`` report it
    without a GPU (conftest.py sets it for the tests; ``--table`` runs without it)."""
    if variant.op is None:
        return False
    import torch

    from fastdiff import dispatch

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        assert dispatch.exists(variant.op, "triton"), f"{variant.name}: no Triton {variant.op} kernel here"
        return dispatch.choose(variant.op, "auto", torch.device("cuda"), variant.dtype, **variant.sizes) == "triton"
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


DEFAULTS = {v.name: _is_default(v) for v in _kernels_package().AOT_KERNELS}


def _compile_everywhere(jobs=1):
    """{cc: worker result}, ``jobs`` workers for every cc side by side, without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {(cc, i): subprocess.Popen([sys.executable, __file__, str(cc), str(i), str(jobs)], cwd=REPO, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cc in CCS for i in range(jobs)}
    out = {cc: {} for cc in CCS}
    for (cc, _), p in procs.items():
        try:  # ~2.5 min of CPU per cc; more on a shared machine
            stdout, stderr = p.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise
        assert p.returncode == 0, f"AOT worker for sm_{cc} failed:\n{stderr[-4000:]}"
        out[cc].update(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.fixture(scope="module")
def triton_cubins():
    pytest.importorskip("triton")
    return _compile_everywhere()


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("name", AOT_NAMES)
def test_triton_aot(triton_cubins, name, cc):
    res = triton_cubins[cc].get(name, "not compiled")
    assert isinstance(res, dict) and res["cubin"] > 0, res


# ---------------------------------------------------------------- Triton resources, per variant
# Shared memory a block may use, opt-in maximum (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): 163 KB on sm_80 (A100), 227 KB on sm_90 (H100/H200).
RESOURCE_TABLE = REPO / "bench" / "results" / "triton-resources.md"
NUM_WARPS = {v.name: v.num_warps for v in _kernels_package().AOT_KERNELS}
BUDGETS, TARGETS, OPEN = tr.load_budgets()


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("name", AOT_NAMES)
def test_triton_shared_memory_fits(triton_cubins, name, cc):
    res = triton_cubins[cc].get(name)
    assert isinstance(res, dict), res
    assert res["smem"] <= SMEM_LIMIT[cc], f"{name} needs {res['smem']} B of shared memory, sm_{cc} has {SMEM_LIMIT[cc]}"


def _spilled(res) -> int:
    """Bytes per thread of register spill traffic (stores + loads); a stack frame alone (a local
    array, e.g. libdevice's sin/cos argument reduction) is not a spill."""
    return res["spill_stores"] + res["spill_loads"]


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("name", AOT_NAMES)
def test_triton_default_variants_do_not_spill(triton_cubins, name, cc):
    """A variant that backend="auto" runs (DEFAULTS, from the dispatch table) keeps every value in
    registers; a spilling one is fixed or its triton row's ``prefer`` refuses its sizes."""
    res = triton_cubins[cc].get(name)
    assert isinstance(res, dict), res
    if DEFAULTS[name]:
        assert _spilled(res) == 0, (f"{name} is a default (auto picks triton for its sizes) and spills "
                                    f"{res['spill_stores']} B stores / {res['spill_loads']} B loads per thread at sm_{cc}")


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("name", AOT_NAMES)
def test_triton_within_budget(triton_cubins, name, cc):
    """What the compiler gives now is within the variant's committed budget
    (bench/triton_budgets.json): registers, spill bytes and shared memory, so a kernel change that
    costs occupancy or adds local-memory traffic fails here, on the CPU."""
    res = triton_cubins[cc].get(name)
    assert isinstance(res, dict), res
    over = tr.over_budget(res, BUDGETS[name])
    assert not over, (f"{name} at sm_{cc} is over its budget in bench/triton_budgets.json: {over} "
                      f"(warps/SM {tr.occupancy(res['regs'], res['smem'], NUM_WARPS[name], cc)})")


def test_budgets_cover_every_variant():
    assert sorted(BUDGETS) == sorted(AOT_NAMES), (
        f"bench/triton_budgets.json and AOT_KERNELS differ: missing {sorted(set(AOT_NAMES) - set(BUDGETS))}, "
        f"extra {sorted(set(BUDGETS) - set(AOT_NAMES))}")


def test_budgets_meet_the_targets():
    """Every budget is within the acceptance targets that apply to its variant (the file's
    ``targets``, from issue 19) unless the variant is listed in ``open`` with the reason; and an
    ``open`` entry really misses a target (fixed ones leave the list)."""
    missing = {n: tr.misses_target(BUDGETS[n], t) for n in AOT_NAMES
               for t in tr.targets_for(n, DEFAULTS[n], TARGETS) if tr.misses_target(BUDGETS[n], t)}
    unexplained = {n: m for n, m in missing.items() if n not in OPEN}
    assert not unexplained, f"budgets looser than their targets, not listed as open: {unexplained}"
    stale = sorted(set(OPEN) - set(missing))
    assert not stale, f"listed as open in bench/triton_budgets.json but within every target: {stale}"


def test_occupancy_formula():
    """Hand-worked cases of the occupancy rules (tests/triton_resources.py docstring)."""
    # 64 regs x 256 threads: 2048 regs a warp, 32 warps by the register file = 4 blocks, 50%
    assert tr.occupancy(64, 0, 8, 90) == 32
    # 65 regs round to 72 a thread (2304 a warp): 28 warps by registers -> 3 blocks of 8
    assert tr.occupancy(65, 0, 8, 90) == 24
    # 255 regs (256 allocated): 8 warps -> one 256-thread block, 12.5%
    assert tr.occupancy(255, 0, 8, 80) == 8
    # 32 regs, 1024-thread blocks: 64 warps by registers, 2 blocks by the 64 warp slots
    assert tr.occupancy(32, 0, 32, 90) == 64
    # shared memory: 100 KB + 1 KB reserved -> one block on sm_80 (164 KB), two on sm_90 (228 KB)
    assert tr.occupancy(32, 100 * 1024, 4, 80) == 4
    assert tr.occupancy(32, 100 * 1024, 4, 90) == 8
    # over the per-block limit: cannot launch
    assert tr.occupancy(32, 164 * 1024, 4, 80) == 0
    # 32 blocks at most: 1-warp blocks of few registers
    assert tr.occupancy(16, 0, 1, 90) == 32


_TABLE_HEADER = """# Triton kernels: registers, spills, shared memory and occupancy per variant

What `ptxas -v` reports for the PTX of every `fastdiff.kernels.AOT_KERNELS` variant (the code a
GPU run compiles), made without a GPU by `python tests/test_aot.py --table`; triton {version}.
`tests/test_aot.py` recompiles every variant in CI and fails when this table is stale (same triton
version), a variant's shared memory exceeds the architecture's limit, a default spills, or a
variant is over its budget (`bench/triton_budgets.json`: registers, spill bytes, shared memory;
`python tests/test_aot.py --tighten` lowers the budgets to what is measured, never raises them).
Spills are bytes per thread (local memory traffic); `regs` is per thread (255 is the ceiling);
`stack` without spills is a local array (libdevice's sin/cos argument reduction, in the Philox
variants). `warps/SM`: resident warps of 64 from the register file (64K), the shared memory
(164 / 228 KB an SM, 1 KB reserved a block) and the block size (tests/triton_resources.py).
`default`: `backend="auto"` runs this variant on a GPU (`fastdiff.dispatch.choose` picks triton
for the sizes that launch it); a "no" is a tuning option or sizes whose triton row's `prefer`
refuses them (its reason, printed by `fastdiff info` as the limit, cites the spill measured here).
"""


def _resource_table(results, triton_version, names=None) -> str:
    names = names or AOT_NAMES
    return tr.render_table(results, names, DEFAULTS, NUM_WARPS, BUDGETS, _TABLE_HEADER.format(version=triton_version))


def test_resource_table_defaults_are_the_dispatch_tables_and_do_not_spill():
    """The table's `default` column is what the dispatch table decides now, and no default row of
    the committed table spills at sm_80 or sm_90 (no compile: the table is checked current above)."""
    assert RESOURCE_TABLE.exists(), f"{RESOURCE_TABLE} missing: run python tests/test_aot.py --table"
    _, rows, defaults, _ = tr.parse_table(RESOURCE_TABLE.read_text())
    assert sorted(rows) == sorted(AOT_NAMES), "the table's variants differ from AOT_KERNELS: regenerate it"
    wrong = {n: defaults[n] for n in AOT_NAMES if defaults[n] != ("yes" if DEFAULTS[n] else "no")}
    assert not wrong, f"default column differs from fastdiff.dispatch (regenerate the table): {wrong}"
    spilling = {(n, cc): (rows[n][cc]["spill_stores"], rows[n][cc]["spill_loads"])
                for n in AOT_NAMES for cc in CCS if DEFAULTS[n] and _spilled(rows[n][cc])}
    assert not spilling, f"default variants that spill (stores, loads B/thread): {spilling}"


def test_resource_table_within_budgets_and_occupancy():
    """No compile: every row of the committed table is within its budget, and its warps/SM column
    is what the occupancy rules give for its registers, shared memory and warps."""
    _, rows, _, warps = tr.parse_table(RESOURCE_TABLE.read_text())
    over = {(n, cc): tr.over_budget(rows[n][cc], BUDGETS[n]) for n in AOT_NAMES for cc in CCS
            if tr.over_budget(rows[n][cc], BUDGETS[n])}
    assert not over, f"committed table rows over their budgets: {over}"
    assert warps == NUM_WARPS, "warps column differs from AOT_KERNELS: regenerate the table"
    occ = {(n, cc): rows[n][cc]["warps/SM"] for n in AOT_NAMES for cc in CCS
           if rows[n][cc]["warps/SM"] != tr.occupancy(rows[n][cc]["regs"], rows[n][cc]["smem"], warps[n], cc)}
    assert not occ, f"warps/SM column inconsistent with the occupancy rules: {occ}"


def test_triton_resource_table_is_current(triton_cubins):
    """bench/results/triton-resources.md lists every variant; with the triton it was made with, its
    numbers are what the compiler gives now (regenerate: python tests/test_aot.py --table)."""
    import triton

    assert RESOURCE_TABLE.exists(), f"{RESOURCE_TABLE} missing: run python tests/test_aot.py --table"
    version, rows, _, _ = tr.parse_table(RESOURCE_TABLE.read_text())
    assert sorted(rows) == sorted(AOT_NAMES), "the table's variants differ from AOT_KERNELS: regenerate it"
    if version != triton.__version__:
        pytest.skip(f"table made with triton {version}, this is {triton.__version__}: numbers not compared")
    stale = [(name, cc) for name in AOT_NAMES for cc in CCS
             if any(rows[name][cc][c] != triton_cubins[cc][name][c] for c in tr.COLUMNS)]
    assert not stale, f"stale rows (regenerate with python tests/test_aot.py --table): {stale[:8]}"


def test_roofline_table_is_current():
    """bench/results/roofline.md is what bench/roofline.py writes (regenerate: python bench/roofline.py)."""
    spec = importlib.util.spec_from_file_location("roofline", REPO / "bench" / "roofline.py")
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    assert roofline.OUT.read_text() == roofline.table(), "stale: run python bench/roofline.py"
    # by hand: ddpm_step reads x and eps and writes out, 3 x 4 B x 2^22 = 50.33 MB, at 4.8 TB/s 10.5 us
    row = next(r for r in roofline.table().splitlines() if "ddpm_step (noise) n=2^22" in r)
    assert "| 50.33 |" in row and "| 10.5 us |" in row and "memory" in row, row


# --------------------------------------------------------------------------------------- CUDA
def _nvcc():
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found, and CI is set: the CUDA sources must compile in CI")
        pytest.skip("nvcc not found (with CI set this fails)")
    return nvcc


def _entry_points(src):
    """extern "C" kernels, written out or instantiated through a FASTDIFF_* macro."""
    names = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(', src)
    names += re.findall(r"^FASTDIFF_\w+\((\w+),", src, re.M)
    macro_params = {p.strip() for ps in re.findall(r"#define \w+\(([^)]*)\)", src) for p in ps.split(",")}
    return [n for n in names if n not in macro_params]


def test_cuda_sources_found():
    assert CU_FILES, "no csrc/cuda/*.cu"


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: Path(p).name)
def test_nvcc(cu, cc, tmp_path):
    nvcc = _nvcc()
    cubin = tmp_path / f"{Path(cu).stem}.sm{cc}.cubin"
    proc = subprocess.run([nvcc, "-std=c++17", f"-arch=sm_{cc}", "-cubin", "-o", str(cubin), cu],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert cubin.stat().st_size > 0
    # the entry points are in the binary under their plain (unmangled) names, which NVRTC callers use
    entries = _entry_points(Path(cu).read_text())
    assert entries, 'no extern "C" kernels found in the source'
    binary = cubin.read_bytes()
    for entry in entries:
        assert entry.encode() + b"\0" in binary, f"{entry} missing from the cubin"


def _tighten(results):
    """bench/triton_budgets.json with every budget lowered to what ``results`` measured."""
    data = json.loads(tr.BUDGETS.read_text())
    for name in AOT_NAMES:
        data["variants"][name] = tr.tightened(data["variants"][name], [results[cc][name] for cc in CCS])
    tr.BUDGETS.write_text(json.dumps(data, indent=1) + "\n")


def _report(results, path):
    """The table (as --table writes it) plus, where a GPU is here, what its driver says it loaded."""
    import triton

    text = _resource_table(results, triton.__version__)
    over = [(n, cc, tr.over_budget(results[cc][n], BUDGETS[n])) for n in AOT_NAMES for cc in CCS
            if tr.over_budget(results[cc][n], BUDGETS[n])]
    text += "\nOver budget: " + (", ".join(f"{n} sm_{cc} {o}" for n, cc, o in over) if over else "none") + "\n"
    driver = {(n, cc): r["driver"] for cc in CCS for n, r in results[cc].items() if r.get("driver")}
    if driver:
        text += ("\nLoaded by this GPU's driver (`n_regs` / `n_spills` of the compiled kernel):\n\n"
                 "| variant | cc | n_regs | n_spills |\n|---|---:|---:|---:|\n"
                 + "".join(f"| {n} | {cc} | {d[0]} | {d[1]} |\n" for (n, cc), d in driver.items()))
    Path(path).write_text(text)
    cc = _device_cc() if _device_cc() in CCS else 90  # compact, for a 10-minute log: this GPU's cc
    print(f"Triton {triton.__version__} resources at sm_{cc} (full table: {path})\n"
          "variant | regs | spill st/ld B | smem B | warps/SM | driver n_regs/n_spills | budget")
    for n in AOT_NAMES:
        r = results[cc][n]
        over = tr.over_budget(r, BUDGETS[n])
        print(f"{n} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem']} | "
              f"{tr.occupancy(r['regs'], r['smem'], NUM_WARPS[n], cc)} | {'/'.join(map(str, r.get('driver') or ('-',)))} | "
              f"{'OVER ' + ', '.join(over) if over else 'ok'}")


if __name__ == "__main__":
    # python tests/test_aot.py --table     rewrite the committed table
    # python tests/test_aot.py --tighten   lower bench/triton_budgets.json to what is measured
    # python tests/test_aot.py --report P  compile, write the table to P and print it (bench/gpu.sh)
    # python tests/test_aot.py CC [I N]    AOT worker for one cc (variants I, I+N, ...) -> one JSON line
    if sys.argv[1:2] in (["--table"], ["--tighten"], ["--report"]):
        import triton

        results = _compile_everywhere(jobs=int(os.environ.get("FASTDIFF_AOT_JOBS", "1")))
        bad = {(n, cc): r for cc in CCS for n, r in results[cc].items() if not isinstance(r, dict)}
        if bad:
            sys.exit(f"variants that do not compile: {bad}")
        if sys.argv[1] == "--table":
            RESOURCE_TABLE.write_text(_resource_table(results, triton.__version__))
            print(f"wrote {RESOURCE_TABLE}")
        elif sys.argv[1] == "--tighten":  # the budgets, then the table that shows them
            _tighten(results)
            BUDGETS.update(tr.load_budgets()[0])
            RESOURCE_TABLE.write_text(_resource_table(results, triton.__version__))
            print(f"wrote {tr.BUDGETS} and {RESOURCE_TABLE}")
        else:
            _report(results, sys.argv[2])
    else:
        cc, shard = int(sys.argv[1]), tuple(int(a) for a in sys.argv[2:4]) or (0, 1)
        print(json.dumps(_compile_all(cc, *shard)))

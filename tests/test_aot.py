"""Ahead-of-time compiles of every GPU kernel for sm_80 and sm_90, on a machine without a GPU.

The interpreter tests run the Triton kernels' Python semantics only; these catch what breaks in
the real compiler (types, layouts, unsupported ops) and in nvcc for the CUDA sources.

Triton decides at import whether its own library functions (tl.philox, ...) are interpreted, and
conftest.py turns the interpreter on where there is no GPU, so the Triton compiles run in worker
processes started without TRITON_INTERPRET: this file run as a script, one process per compute
capability, side by side.  Each (variant, cc) is still its own test id.
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

REPO = Path(__file__).resolve().parent.parent
CCS = (80, 90)
CU_FILES = sorted(glob.glob(str(REPO / "csrc" / "cuda" / "*.cu")))


def _kernels_package():
    """fastdiff.kernels; in a source checkout without `pip install -e .`, loaded from kernels/."""
    try:
        import fastdiff.kernels as kernels
    except ImportError:
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


def _compile_all(cc):
    """Worker: compile every AOT variant for one cc; {name: {cubin, regs, spills, smem, ...} or error text}."""
    import tempfile

    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    ptxas = get_ptxas(cc).path
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in _kernels_package().AOT_KERNELS:
            # mark what the JIT sees as multiples of 16 (aligned pointers, n), so this compiles the
            # code a GPU run gets: vectorized loads and stores
            attrs = {(v.fn.arg_names.index(a),): BaseBackend.parse_attr("D") for a in v.divisible_by_16}
            try:
                src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
                k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": v.num_warps})
                results[v.name] = {"cubin": len(k.asm["cubin"]), "smem": int(k.metadata.shared),
                                   "num_warps": v.num_warps, **_ptxas_resources(ptxas, k.asm["ptx"], cc, tmp)}
            except Exception as e:  # reported by that variant's test
                results[v.name] = f"{type(e).__name__}: {e}"
    return results


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


def _compile_everywhere():
    """{cc: worker result}, the workers of every cc side by side, without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cc: subprocess.Popen([sys.executable, __file__, str(cc)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for cc in CCS}
    out = {}
    for cc, p in procs.items():
        try:  # ~10 min of CPU per cc; more on a shared machine
            stdout, stderr = p.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise
        assert p.returncode == 0, f"AOT worker for sm_{cc} failed:\n{stderr[-4000:]}"
        out[cc] = json.loads(stdout.strip().splitlines()[-1])
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
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
RESOURCE_TABLE = REPO / "bench" / "results" / "triton-resources.md"
_RESOURCE_COLUMNS = ("regs", "spill_stores", "spill_loads", "stack", "smem")


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


def _resource_table(results, triton_version) -> str:
    lines = ["# Triton kernels: registers, spills and shared memory per variant", "",
             f"What `ptxas -v` reports for the PTX of every `fastdiff.kernels.AOT_KERNELS` variant (the code a",
             f"GPU run compiles), made without a GPU by `python tests/test_aot.py --table`; triton {triton_version}.",
             "`tests/test_aot.py` recompiles every variant in CI and fails when this table is stale (same triton",
             "version), a variant's shared memory exceeds the architecture's limit, or a default spills. Spills",
             "are bytes per thread (local memory traffic); `regs` is per thread (255 is the ceiling); `stack`",
             "without spills is a local array (libdevice's sin/cos argument reduction, in the Philox variants).",
             "`default`: `backend=\"auto\"` runs this variant on a GPU (`fastdiff.dispatch.choose` picks triton",
             "for the sizes that launch it); a \"no\" is a tuning option or sizes whose triton row's `prefer`",
             "refuses them (its reason, printed by `fastdiff info` as the limit, cites the spill measured here).", "",
             "| variant | default | warps | " + " | ".join(f"sm_{cc} {c}" for cc in CCS for c in _RESOURCE_COLUMNS) + " |",
             "|---|---|---:|" + "---:|" * (len(CCS) * len(_RESOURCE_COLUMNS))]
    for name in AOT_NAMES:
        row = [results[cc][name] for cc in CCS]
        lines.append(f"| {name} | {'yes' if DEFAULTS[name] else 'no'} | {row[0]['num_warps']} | "
                     + " | ".join(str(r[c]) for r in row for c in _RESOURCE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _parse_resource_table(text):
    """(triton version, {variant: {cc: {column: int}}}, {variant: default?})."""
    version = re.search(r"triton ([\w.+-]+)\.", text)
    rows, defaults = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 + len(CCS) * len(_RESOURCE_COLUMNS) and cells[2].isdigit():
            vals = [int(c) for c in cells[3:]]
            rows[cells[0]] = {cc: dict(zip(_RESOURCE_COLUMNS, vals[i * len(_RESOURCE_COLUMNS):(i + 1) * len(_RESOURCE_COLUMNS)]))
                              for i, cc in enumerate(CCS)}
            defaults[cells[0]] = cells[1]
    return (version.group(1) if version else None), rows, defaults


def test_resource_table_defaults_are_the_dispatch_tables_and_do_not_spill():
    """The table's `default` column is what the dispatch table decides now, and no default row of
    the committed table spills at sm_80 or sm_90 (no compile: the table is checked current above)."""
    assert RESOURCE_TABLE.exists(), f"{RESOURCE_TABLE} missing: run python tests/test_aot.py --table"
    _, rows, defaults = _parse_resource_table(RESOURCE_TABLE.read_text())
    assert sorted(rows) == sorted(AOT_NAMES), "the table's variants differ from AOT_KERNELS: regenerate it"
    wrong = {n: defaults[n] for n in AOT_NAMES if defaults[n] != ("yes" if DEFAULTS[n] else "no")}
    assert not wrong, f"default column differs from fastdiff.dispatch (regenerate the table): {wrong}"
    spilling = {(n, cc): (rows[n][cc]["spill_stores"], rows[n][cc]["spill_loads"])
                for n in AOT_NAMES for cc in CCS if DEFAULTS[n] and _spilled(rows[n][cc])}
    assert not spilling, f"default variants that spill (stores, loads B/thread): {spilling}"


def test_triton_resource_table_is_current(triton_cubins):
    """bench/results/triton-resources.md lists every variant; with the triton it was made with, its
    numbers are what the compiler gives now (regenerate: python tests/test_aot.py --table)."""
    import triton

    assert RESOURCE_TABLE.exists(), f"{RESOURCE_TABLE} missing: run python tests/test_aot.py --table"
    version, rows, _ = _parse_resource_table(RESOURCE_TABLE.read_text())
    assert sorted(rows) == sorted(AOT_NAMES), "the table's variants differ from AOT_KERNELS: regenerate it"
    if version != triton.__version__:
        pytest.skip(f"table made with triton {version}, this is {triton.__version__}: numbers not compared")
    stale = [(name, cc) for name in AOT_NAMES for cc in CCS
             if any(rows[name][cc][c] != triton_cubins[cc][name][c] for c in _RESOURCE_COLUMNS)]
    assert not stale, f"stale rows (regenerate with python tests/test_aot.py --table): {stale[:8]}"


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


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:  # python tests/test_aot.py --table: rewrite the committed table
        import triton

        results = _compile_everywhere()
        bad = {(n, cc): r for cc in CCS for n, r in results[cc].items() if not isinstance(r, dict)}
        if bad:
            sys.exit(f"variants that do not compile: {bad}")
        RESOURCE_TABLE.write_text(_resource_table(results, triton.__version__))
        print(f"wrote {RESOURCE_TABLE}")
    else:  # AOT worker: python tests/test_aot.py CC  ->  one JSON line
        print(json.dumps(_compile_all(int(sys.argv[1]))))

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


def _compile_all(cc):
    """Worker: compile every AOT variant for one cc; {name: cubin size or error text}."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for v in _kernels_package().AOT_KERNELS:
        # mark what the JIT sees as multiples of 16 (aligned pointers, n), so this compiles the
        # code a GPU run gets: vectorized loads and stores
        attrs = {(v.fn.arg_names.index(a),): BaseBackend.parse_attr("D") for a in v.divisible_by_16}
        try:
            src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": v.num_warps})
            results[v.name] = len(k.asm["cubin"])
        except Exception as e:  # reported by that variant's test
            results[v.name] = f"{type(e).__name__}: {e}"
    return results


# ------------------------------------------------------------------------------------- Triton
AOT_NAMES = [v.name for v in _kernels_package().AOT_KERNELS]


@pytest.fixture(scope="module")
def triton_cubins():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cc: subprocess.Popen([sys.executable, __file__, str(cc)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for cc in CCS}
    out = {}
    for cc, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"AOT worker for sm_{cc} failed:\n{stderr[-4000:]}"
        out[cc] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("name", AOT_NAMES)
def test_triton_aot(triton_cubins, name, cc):
    res = triton_cubins[cc].get(name, "not compiled")
    assert isinstance(res, int) and res > 0, res


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


if __name__ == "__main__":  # AOT worker: python tests/test_aot.py CC  ->  one JSON line
    print(json.dumps(_compile_all(int(sys.argv[1]))))

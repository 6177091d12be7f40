"""What a non-editable install ships.  An editable install hides a package that setup.py leaves
out (the source tree is on the path), so these tests read setup.py's own configuration; .ci/run
also builds the wheel, installs it into a fresh virtual environment and runs the CLI and a README
block from it (.ci/wheel-check)."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_READ_SETUP = """
import json
from distutils.core import run_setup
d = run_setup("setup.py", stop_after="init")
print(json.dumps({"packages": d.packages, "package_dir": d.package_dir or {},
                  "package_data": d.package_data or {}}))
"""


@pytest.fixture(scope="module")
def setup_config():
    r = subprocess.run([sys.executable, "-c", _READ_SETUP], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_package_in_the_tree_is_shipped(setup_config):
    """Every folder of fastdiff/ with an __init__.py is a package of the wheel (fastdiff.sweeps was
    once missing: `pip install .` gave a `fastdiff` command that died with ModuleNotFoundError)."""
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastdiff").rglob("__init__.py")
            if "__pycache__" not in p.parts and not p.parent.is_symlink()}
    assert "fastdiff.sweeps" in tree
    missing = sorted(tree - set(setup_config["packages"]))
    assert not missing, f"setup.py does not ship {missing}"


def test_triton_kernels_and_cuda_sources_are_mapped(setup_config):
    packages, package_dir = set(setup_config["packages"]), setup_config["package_dir"]
    assert {"fastdiff.kernels", "fastdiff._csrc"} <= packages
    assert package_dir["fastdiff.kernels"] == "kernels" and package_dir["fastdiff._csrc"] == "csrc"
    shipped = setup_config["package_data"]["fastdiff._csrc"]
    # every header and CUDA source is data of fastdiff._csrc (NVRTC compiles them at run time)
    needed = {p.relative_to(ROOT / "csrc").as_posix() for p in [*(ROOT / "csrc").glob("*.h"),
                                                                *(ROOT / "csrc" / "cuda").iterdir()]}
    covered = {p.relative_to(ROOT / "csrc").as_posix() for pattern in shipped for p in (ROOT / "csrc").glob(pattern)}
    assert any(n.endswith(".cu") for n in needed)
    assert needed <= covered, f"not shipped: {sorted(needed - covered)}"

"""The C++ kernels (fused step, discrete flip, MoLRG forward and backward, batched SVD, MoLRG trajectory, K-subspaces, empirical scan) pick a SIMD path at run time (avx2 where the CPU has AVX2+FMA+F16C, else the
portable sse2/generic loops).  The suite runs the selected path; this runs the kernel tests again
in a subprocess forced onto the portable path (FASTDIFF_CPU_SIMD=sse2), so both are tested."""
import os
import subprocess
import sys

import pytest

from fastdiff import backends


@pytest.mark.skipif(not backends.available()["cpp"][0], reason="fastdiff._C not built")
def test_portable_path_passes_the_kernel_tests():
    here = os.path.dirname(__file__)
    env = dict(os.environ, FASTDIFF_CPU_SIMD="sse2")
    code = "from fastdiff import _C; print(_C.simd())"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "sse2"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpp",
         os.path.join(here, "test_fused_kernel.py"), os.path.join(here, "test_rng.py"),
         os.path.join(here, "test_denoise.py"), os.path.join(here, "test_linalg.py"),
         os.path.join(here, "test_sampling.py"), os.path.join(here, "test_sweeps_learners.py"),
         os.path.join(here, "test_discrete.py"),
         os.path.join(here, "test_empirical_scan.py"), os.path.join(here, "test_empirical_scan_cpp.py")],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(here),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.skipif(not backends.available()["cpp"][0], reason="fastdiff._C not built")
def test_avx2_path_passes_the_scan_tests_where_the_suite_ran_avx512():
    """On an AVX-512 machine the suite runs the empirical scan's AVX-512 tiles; FASTDIFF_CPU_SIMD=avx2
    runs its tests again on the AVX2 ones (on an AVX2-only machine the suite ran those already)."""
    from fastdiff import _C
    if _C.simd() != "avx512":
        pytest.skip(f"this CPU's path is {_C.simd()}: the suite's own run covers it")
    here = os.path.dirname(__file__)
    env = dict(os.environ, FASTDIFF_CPU_SIMD="avx2")
    code = "from fastdiff import _C; print(_C.simd())"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "avx2"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpp or scan_backends or equivariant",
         os.path.join(here, "test_empirical_scan.py"), os.path.join(here, "test_empirical_scan_cpp.py"),
         os.path.join(here, "test_patch_denoisers.py")],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(here),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]

"""The C++ kernels (fused step, discrete flip, MoLRG forward and backward, batched SVD, MoLRG trajectory, K-subspaces,
empirical scan) pick a SIMD path at run time: avx2 where the CPU has AVX2+FMA+F16C (and, for the empirical scan and the Philox streams,
avx512 where it also has AVX-512F), else the portable sse2/generic loops.  The suite runs the selected path; these
run the kernel tests again in a subprocess forced onto the other paths (FASTDIFF_CPU_SIMD=sse2, =avx2), so each is
tested."""
import os
import subprocess
import sys

import pytest

from fastdiff import backends

HERE = os.path.dirname(__file__)
pytestmark = pytest.mark.skipif(not backends.available()["cpp"][0], reason="fastdiff._C not built")


def _run_forced(simd: str, files, k: str) -> None:
    """The tests ``-k k`` of ``files`` in a subprocess with FASTDIFF_CPU_SIMD=simd (checked to take effect)."""
    env = dict(os.environ, FASTDIFF_CPU_SIMD=simd)
    code = "from fastdiff import _C; print(_C.simd())"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == simd
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", k,
                        *(os.path.join(HERE, f) for f in files)],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_portable_path_passes_the_kernel_tests():
    _run_forced("sse2", ["test_fused_kernel.py", "test_rng.py", "test_denoise.py", "test_linalg.py", "test_sampling.py",
                         "test_sweeps_learners.py", "test_discrete.py", "test_empirical_scan.py",
                         "test_empirical_scan_cpp.py"], "cpp")


def test_avx2_path_passes_the_scan_and_stream_tests_where_the_suite_ran_avx512():
    """On an AVX-512 machine the suite runs the empirical scan's AVX-512 tiles and the AVX-512 Philox
    (fused step, discrete flip, MoLRG trajectory); FASTDIFF_CPU_SIMD=avx2 runs their tests again on
    the AVX2 code (on an AVX2-only machine the suite ran those already)."""
    from fastdiff import _C
    if _C.simd() != "avx512":
        pytest.skip(f"this CPU's path is {_C.simd()}: the suite's own run covers it")
    _run_forced("avx2", ["test_empirical_scan.py", "test_empirical_scan_cpp.py", "test_patch_denoisers.py",
                         "test_fused_kernel.py", "test_rng.py", "test_rng_per_sample.py", "test_discrete.py"],
                "cpp or scan_backends or equivariant")

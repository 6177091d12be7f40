"""Builds csrc/*.cpp into ``fastdiff._C`` (C++17, OpenMP, pybind11; no link against torch).

The Triton kernels in ``kernels/`` install as ``fastdiff.kernels``; the CUDA sources in
``csrc/cuda`` ship as package data of ``fastdiff._csrc`` and are compiled at run time with
NVRTC (through CuPy), so the wheel itself needs no CUDA toolkit.
"""
import glob
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


def _openmp_flags():
    if sys.platform == "darwin":  # Apple clang: libomp from Homebrew, if at all
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


omp_compile, omp_link = _openmp_flags()
extra = ["-O3", "-fno-math-errno"]  # -fno-math-errno lets sqrtf inline; no -ffast-math: NaN must propagate
if os.environ.get("FASTDIFF_NATIVE") == "1":
    extra.append("-march=native")

ext = Pybind11Extension(
    "fastdiff._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=extra + omp_compile,
    extra_link_args=omp_link,
)

# Every package under fastdiff/ is found, not listed by hand: a hand-written list once left out
# fastdiff.sweeps, and a non-editable install had no `fastdiff sweep` (tests/test_packaging.py
# builds the wheel and runs the CLI from it).  kernels/ and csrc/ sit outside fastdiff/ and are mapped in.
setup(
    packages=[*find_packages(include=["fastdiff", "fastdiff.*"]), "fastdiff.kernels", "fastdiff._csrc"],
    package_dir={"fastdiff.kernels": "kernels", "fastdiff._csrc": "csrc"},
    package_data={"fastdiff._csrc": ["*.h", "cuda/*.cu", "cuda/*.cuh"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)

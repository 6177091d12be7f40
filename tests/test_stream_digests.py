"""The C++ backend's random streams, pinned bit for bit on every SIMD path this CPU has.

tests/stream_digests.py hashes randn, the fused Langevin step (float32 / float16 / bfloat16, one key
and per-sample keys), the discrete flip and two fused MoLRG trajectories.  Each path must give the
digests it gave before the AVX-512 Philox landed (recorded from that build, 2026-12-05):

- "avx2" and "avx512" share their Box-Muller loop (philox.h, box_muller_words) and so their
  streams: GCC contracts some of its products into FMAs on both (its C++ default), which the
  baseline ISA has not;
- "sse2" (the portable loops) differs from them in last bits of some normals, and of the steps'
  multiply-adds, as it always did.  All paths stay within 5e-6 of fastdiff/reference/rng.py
  (tests/test_rng.py).

A path this CPU lacks is skipped; FASTDIFF_CPU_SIMD picks each path in a subprocess.
"""
import json
import os
import subprocess
import sys

import pytest

from fastdiff import backends

HERE = os.path.dirname(__file__)
pytestmark = pytest.mark.skipif(not backends.available()["cpp"][0], reason="fastdiff._C not built")

WIDE = {
    "binary_flip (7, 10001)": "2f11f7b34fc2827c",
    "langevin torch.bfloat16 one key": "8a9239354bac71b5",
    "langevin torch.bfloat16 per sample": "9682a7bb077287b5",
    "langevin torch.float16 one key": "209c732546443871",
    "langevin torch.float16 per sample": "def270e5136bd91b",
    "langevin torch.float32 one key": "2d130c6cb86c226c",
    "langevin torch.float32 per sample": "074cf11bad6d504f",
    "molrg trajectory ddim": "c160409c59c0b2eb",
    "molrg trajectory ddpm": "b855d2fc20d75550",
    "randn seed=0 offset=0 n=1": "19bcc19115f2ca01",
    "randn seed=123 offset=4 n=1023": "2b780730b8a4a7ad",
    "randn seed=18446744073709551615 offset=12 n=1048581": "dcd70f6fdd08960c",
    "randn seed=7 offset=17179868984 n=100003": "263f24a9e19099da",
    "randn seed=9223372036854775813 offset=17179869192 n=4099": "aefa0a5811ddcbd5"
}

PORTABLE = {
    "binary_flip (7, 10001)": "2f11f7b34fc2827c",
    "langevin torch.bfloat16 one key": "8a9239354bac71b5",
    "langevin torch.bfloat16 per sample": "9682a7bb077287b5",
    "langevin torch.float16 one key": "209c732546443871",
    "langevin torch.float16 per sample": "dfda05dd50fb399f",
    "langevin torch.float32 one key": "20707eef2b267a0c",
    "langevin torch.float32 per sample": "f3430f61312ec8e7",
    "molrg trajectory ddim": "b56b05f7c1570b05",
    "molrg trajectory ddpm": "d678e44ed61c7b40",
    "randn seed=0 offset=0 n=1": "19bcc19115f2ca01",
    "randn seed=123 offset=4 n=1023": "cb422abff75fa4a0",
    "randn seed=18446744073709551615 offset=12 n=1048581": "4e43a2407d936055",
    "randn seed=7 offset=17179868984 n=100003": "70c466ee25167db2",
    "randn seed=9223372036854775813 offset=17179869192 n=4099": "a999eff65666e3c9"
}


def _digests(simd):
    env = {k: v for k, v in os.environ.items() if k != "FASTDIFF_CPU_SIMD"}
    if simd:
        env["FASTDIFF_CPU_SIMD"] = simd
    code = "from fastdiff import _C; print(_C.simd())"
    path = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()
    r = subprocess.run([sys.executable, os.path.join(HERE, "stream_digests.py")], env=env, capture_output=True,
                       text=True, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stderr[-3000:]
    return path, json.loads(r.stdout)


@pytest.mark.parametrize("simd", ["sse2", "avx2", None], ids=["sse2", "avx2", "selected"])
def test_streams_are_the_pinned_ones_bit_for_bit(simd):
    path, got = _digests(simd)
    if simd and path != simd:
        pytest.skip(f"this CPU has no {simd} path (it runs {path})")
    want = PORTABLE if path in ("sse2", "neon", "generic") else WIDE
    if path in ("neon", "generic"):
        pytest.skip(f"no pinned digests for the {path} path")
    assert got == want, {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}

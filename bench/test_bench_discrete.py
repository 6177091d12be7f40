"""The fused discrete Langevin step (one-stage proposal, docs/math.md 7c) against the eager torch step.

Size: 2^22 float32 elements (64 x 65536): ``y`` in {-1, 1}, a score tensor, ``eta = 2``.  fastdiff:
:func:`fastdiff.discrete.discrete_langevin_step` (one pass: read y and s, Philox uniforms in the
kernel, write y').  Eager: what a user writes in torch (``fastdiff.reference.discrete.one_stage_step_eager``:
``where(rand_like(y) < sigmoid(s + 2 y / eta), 1, -1)``); ``compile``: torch.compile of it.  Bytes
counted: y and s read once, y' written once (4 bytes each).
"""
import os

import pytest
import torch

import fastdiff
from fastdiff.discrete import discrete_langevin_step
from fastdiff.reference.discrete import one_stage_step_eager

N = int(os.environ.get("FASTDIFF_BENCH_N", 1 << 22))
SHAPE = (64, N // 64)
ETA = 2.0
_compiled = {}


@pytest.fixture(scope="module")
def tensors(device):
    gen = torch.Generator().manual_seed(0)
    y = torch.where(torch.rand(SHAPE, generator=gen) < 0.5, 1.0, -1.0)
    s = torch.randn(SHAPE, generator=gen)
    return y.to(device), s.to(device)


@pytest.mark.parametrize("impl", ["fastdiff", "fastdiff out=", "eager", "compile"])
def test_discrete_langevin_step(record, device, tensors, impl):
    y, s = tensors
    g = fastdiff.Generator(0)
    group = f"discrete_langevin_step (one-stage flip) n=2^{N.bit_length() - 1} float32"
    nbytes = 4 * N * 3
    if impl == "fastdiff":
        record(group, impl, lambda: discrete_langevin_step(y, s, ETA, generator=g), nbytes)
    elif impl == "fastdiff out=":
        out = torch.empty_like(y)
        record(group, impl, lambda: discrete_langevin_step(y, s, ETA, generator=g, out=out), nbytes)
    elif impl == "eager":
        record(group, impl, lambda: one_stage_step_eager(y, s, ETA), nbytes)
    else:
        fn = _compiled.setdefault("step", torch.compile(one_stage_step_eager))
        record(group, impl, lambda: fn(y, s, ETA), nbytes)

"""The public kernel-calling boundary: ``out=`` validation (writeable, overlap), autograd through
the compiled backends, version counters, NumPy round trips, and the dtype/meta/shape checks on
the inputs of every public function (issue 13, items 3, 4, 12, 14)."""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import backends

S = fastdiff.DDPMSchedule()


# --------------------------------------------------------------------------- item 14
def test_fused_step_is_private():
    # the unchecked primitive (raw pointers, no length checks) is not public API
    assert "fused_step" not in backends.__all__
    assert not hasattr(backends, "fused_step")
    assert "fused_step" not in fastdiff.__all__

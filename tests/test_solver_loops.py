"""Every sampler loop runs without a host sync and traces whole under torch.compile(fullgraph=True).

On the CPU a host-device transfer has no cost to count, so the loop is instrumented instead: every
tensor-to-Python conversion (``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``,
``__index__``, ``numpy``) raises while :func:`fastdiff.sampling.run` applies the table's steps.  On a
CUDA device each of these would be a device-to-host copy and a synchronization, so a loop that passes
here launches its steps back to back (and can be captured in a CUDA graph).
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import fastdiff
from fastdiff.sampling import METHODS, run, trajectory_table
from fastdiff.solvers import FLOW_METHODS

LAM = torch.tensor([1.5, 0.4, 0.05, 1.0])


def _den(x, alpha, sigma):  # the exact denoiser of N(0, diag(LAM)): tensor ops only
    return (alpha * LAM / (alpha * alpha * LAM + sigma * sigma)) * x


def _table(method, path="ve", steps=6):
    if method in ("ddpm", "ddim"):
        sched = fastdiff.DDPMSchedule(T=steps)
        return trajectory_table(sched, method, eta=0.5 if method == "ddim" else None)
    if method in ("langevin", "walk_jump"):
        return trajectory_table(0.5, method, steps=steps)
    if method in ("sms", "jms"):  # walk-jump's rows (the measurements live in the denoiser wrapper)
        return trajectory_table(0.5, method, steps=steps, measurements=2)
    if method == "stochastic_localization":
        return trajectory_table(2.0, method, steps=steps)
    levels = torch.linspace(1.0, 0.0, steps + 1).tolist() if path == "flow" else \
        fastdiff.KarrasSchedule(steps, sigma_min=0.01, sigma_max=20.0).sigmas
    kw = {"churn": 2.0} if method in ("euler", "heun", "dpm_2") and path == "ve" else {}
    return trajectory_table(levels, method, path=path, **kw)


CASES = [(m, "ve") for m in METHODS] + [(m, "flow") for m in FLOW_METHODS]
IDS = [f"{m}-{p}" for m, p in CASES]
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@pytest.mark.parametrize("method,path", CASES, ids=IDS)
def test_loop_has_no_host_sync(method, path):
    table = _table(method, path)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    want = run(_den, x, table, generator=fastdiff.Generator(1), progress=False)
    hits = []

    def forbid(name):
        def call(self, *a, **k):
            hits.append(name)
            raise AssertionError(f"Tensor.{name} inside the sampler loop: a host sync on a GPU")
        return call
    with mock.patch.multiple(torch.Tensor, **{n: forbid(n) for n in SYNCS}):
        got = run(_den, x, table, generator=fastdiff.Generator(1), progress=False)
    assert not hits
    assert torch.equal(got, want)  # the instrumentation changed nothing


@pytest.mark.parametrize("method,path", CASES, ids=IDS)
def test_loop_compiles_fullgraph(method, path):
    """The whole loop (a fixed table) in one graph: the steps are a torch.library op with a fake
    implementation and every coefficient a Python float, so dynamo has nothing to break on."""
    table = _table(method, path, steps=3)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    def loop(x):
        return run(_den, x, table, generator=fastdiff.Generator(2), progress=False)
    eager = loop(x)
    torch._dynamo.reset()
    got = torch.compile(loop, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)

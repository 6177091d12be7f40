"""The memorization-images experiment: a few small cells end to end (the global empirical denoiser
copies, the patch machines and the fitted Gaussian do not), its plot and table, the bootstrap
interval's coverage, reproducibility, and bad parameters."""
import csv

import pytest
import torch

from fastdiff import sweeps
from fastdiff.sweeps.memorization_images import bootstrap_interval

pytest.importorskip("sklearn")


def test_small_sweep_end_to_end(tmp_path):
    grid = {"N": [12], "denoiser": ["empirical", "local", "equivariant", "gaussian"], "samples": [12], "steps": [5]}
    store = sweeps.run_sweep("memorization-images", grid, trials=2, store=str(tmp_path / "m.sqlite"), progress=False)
    out = sweeps.plot_store(str(tmp_path / "m.sqlite"), str(tmp_path))
    rows = {r["denoiser"]: r for r in csv.DictReader(open(out["table"]))}
    assert float(rows["empirical"]["memorized_mean"]) == 1.0 and float(rows["empirical"]["nearest_rms_mean"]) < 1e-3
    for kind in ("local", "equivariant", "gaussian"):
        assert float(rows[kind]["memorized_mean"]) < 0.2, kind
        assert float(rows[kind]["nearest_rms_mean"]) > 0.1, kind
        assert float(rows[kind]["memorized_lo_mean"]) <= float(rows[kind]["memorized_mean"]) <= float(rows[kind]["memorized_hi_mean"])
    assert (tmp_path / "memorization-images.png").stat().st_size > 10_000
    # the same sweep again: the same rows (every random number from the cell's Philox windows)
    again = sweeps.run_sweep("memorization-images", grid, trials=2, store=str(tmp_path / "n.sqlite"), progress=False)
    a = sorted((r["denoiser"], r["trial"], r["memorized"], r["nearest_rms"]) for r in store.rows())
    b = sorted((r["denoiser"], r["trial"], r["memorized"], r["nearest_rms"]) for r in again.rows())
    assert a == b


def test_bootstrap_interval_covers_the_mean():
    g = torch.Generator().manual_seed(0)
    hits = 0
    for rep in range(200):
        flags = torch.rand(150, generator=g) < 0.3
        lo, hi = bootstrap_interval(flags, reps=500, seed=rep)
        assert lo <= float(flags.double().mean()) <= hi
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / 200 <= 0.99   # nominal 95%; the percentile bootstrap undercovers slightly at M = 150


@pytest.mark.parametrize("grid,match", [
    ({"N": [1]}, "N: expected at least 2 training images"),
    ({"N": [2000]}, "the digits data set has 1797 images"),
    ({"patch": [4]}, "patch: expected an odd int"),
    ({"denoiser": ["molrg"]}, "denoiser"),
])
def test_bad_parameters(tmp_path, grid, match):
    with pytest.raises(ValueError, match=match):
        sweeps.run_sweep("memorization-images", grid, store=str(tmp_path / "x.sqlite"), progress=False)

"""Grid size checks (issue 13 item 11): absurd grids are refused up front, with their size."""
import time

import pytest

from fastdiff import sweeps
from fastdiff.sweeps import runner


def test_huge_range_is_refused_before_it_is_built(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"--N: '1:2000000000' has 2000000000 values, more than .* 1000000"):
        sweeps.parse_values("N", "1:2000000000", int)
    with pytest.raises(ValueError, match="2000000000 values"):
        sweeps.parse_values("N", range(1, 2_000_000_001), int)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match="1:2000000000"):
        sweeps.run_sweep("linear-diffusion", {"N": "1:2000000000"}, store=str(tmp_path / "s.sqlite"), progress=False)
    assert not (tmp_path / "s.sqlite").exists()


def test_product_of_lists_is_capped_with_its_size(tmp_path):
    with pytest.raises(ValueError, match=r"the grid has 4000000 cells \(2000 x 1 x 2000"):
        sweeps.run_sweep("linear-diffusion", {"n": "1:2000", "N": "1:2000"}, store=str(tmp_path / "s.sqlite"),
                         progress=False)
    assert not (tmp_path / "s.sqlite").exists()


def test_dedupe_is_linear_and_keeps_order():
    text = ",".join(str(v) for v in range(50_000)) + ",5,3"
    t0 = time.perf_counter()
    vals = sweeps.parse_values("N", text, int)
    assert time.perf_counter() - t0 < 2.0        # O(n^2) membership on a list took minutes
    assert vals == list(range(50_000))
    assert sweeps.parse_values("N", "8,2,8,4:6,2", int) == [8, 2, 4, 5, 6]


def test_float_spelling_of_an_integer_is_refused_clearly():
    with pytest.raises(ValueError, match=r"--n: expected int values written as integers \(e.g. 100000000\), got '1e8'"):
        sweeps.parse_values("n", "1e8", int)


def test_cell_memory_is_capped_with_its_size(tmp_path):
    with pytest.raises(ValueError, match=r"needs about [0-9.]+ GiB for its 20 trials .* cap of 16 GiB"):
        sweeps.run_sweep("linear-diffusion", {"n": 100_000_000, "N": 4}, store=str(tmp_path / "s.sqlite"),
                         progress=False)
    assert not (tmp_path / "s.sqlite").exists()
    for name, exp in sweeps.EXPERIMENTS.items():   # every default grid fits easily
        cells, _ = sweeps.build_grid(exp, {})
        assert max(20 * exp.instance_bytes(c) for c in cells) < runner.MAX_CELL_BYTES / 16, name

"""The jacobian-rank experiment (seed 002 Fig. 3b)."""
import pytest

from fastdiff import sweeps


def test_jacobian_rank_sweep_reproduces_fig3b_and_levels_are_independent_of_the_grid(tmp_path):
    """Seed 002 Fig. 3b: rank / n = K d / n at the lowest SNR, d / n at the highest; a level's rows
    are the same whether it is swept alone or with every other level (shared trajectories)."""
    with sweeps.run_sweep("jacobian-rank", {}, trials=3, store=str(tmp_path / "all.sqlite"), progress=False) as st:
        rows = st.rows()
    by_level = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    assert sorted(by_level) == list(range(18))
    assert all(r["ratio"] == pytest.approx(2 * 6 / 48) for r in by_level[0])
    assert all(r["ratio"] == pytest.approx(6 / 48) for r in by_level[17])
    snr = [by_level[lv][0]["snr"] for lv in range(18)]
    assert snr == sorted(snr)
    with sweeps.run_sweep("jacobian-rank", {"level": "9,17"}, trials=3, store=str(tmp_path / "two.sqlite"),
                          progress=False) as st:
        alone = {(r["level"], r["trial"]): r["ratio"] for r in st.rows()}
    assert alone == {(r["level"], r["trial"]): r["ratio"] for r in rows if r["level"] in (9, 17)}
    with pytest.raises(ValueError, match="--level"):
        sweeps.run_sweep("jacobian-rank", {"level": 18}, store=str(tmp_path / "bad.sqlite"), progress=False)

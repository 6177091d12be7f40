"""The memorization experiment: the memorized fraction, and its acceptance criterion."""
import torch

from fastdiff import sweeps
from fastdiff.sweeps import memorization as M


def test_memorized_fraction():
    data = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[0.1, 0.0], [5.0, 0.1], [0.0, 9.0], [4.0, 4.0]])
    assert M.memorized_fraction(x, data) == 0.5


def test_acceptance_memorization(tmp_path):
    grid = {"n": 32, "d": 4, "N": "2,4,8,16", "denoiser": "empirical,molrg", "samples": 128}
    with sweeps.run_sweep("memorization", grid, trials=2, store=str(tmp_path / "s.sqlite"), progress=False) as st:
        rows = st.rows()
    for r in rows:
        if r["denoiser"] == "empirical" and r["N"] <= 4:
            assert r["memorized"] > 0.95, r
        if r["denoiser"] == "molrg" and r["N"] > 4:
            assert r["memorized"] < 0.1, r

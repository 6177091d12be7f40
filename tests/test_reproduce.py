"""fastdiff reproduce: every figure runs from its defaults and the statement its caption makes
holds on the numbers it computes; the CLI lists, runs and refuses unknown names."""
import subprocess
import sys

import pytest

from fastdiff.reproduce import FIGURES, reproduce


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_reproduces_its_statement(tmp_path, name):
    r = reproduce(name, str(tmp_path), progress=False)
    assert r["holds"], r["message"]
    caption = open(r["caption"]).read()
    assert FIGURES[name].statement in caption and "Statement holds: True" in caption
    for key in ("plot", "table"):
        assert (tmp_path / name / r[key].split("/")[-1]).stat().st_size > 0


def test_checks_can_fail():
    """The checks read the numbers: a table where the transition is off the diagonal fails."""
    rows = [{"N": N, "d": d, "success_mean": float(N >= d + 4)} for d in (2, 6) for N in range(2, 20, 2)]
    assert not FIGURES["subspace-fig4-pca"].check(rows)[0]
    rows = [{"n": 48, "K": 2, "d": 6, "snr_mean": s, "ratio_mean": r} for s, r in ((0.01, 0.25), (500.0, 0.25))]
    assert not FIGURES["subspace-fig3b"].check(rows)[0]
    rows = [{"n": 8, "N": N, "kl_mean": v} for N, v in ((4, 3.0), (16, 1.0))]
    assert not FIGURES["linear-diffusion-kl"].check(rows)[0]


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastdiff", "reproduce", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and all(name in out.stdout for name in FIGURES)
    bad = subprocess.run([sys.executable, "-m", "fastdiff", "reproduce", "fig99"], capture_output=True, text=True)
    assert bad.returncode == 2 and "figure: expected one of" in bad.stderr
    run = subprocess.run([sys.executable, "-m", "fastdiff", "reproduce", "subspace-fig3b", "--out", str(tmp_path),
                          "--trials", "2", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0 and "subspace-fig3b: holds" in run.stdout, run.stdout + run.stderr

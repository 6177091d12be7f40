"""``fastdiff sweep`` and ``fastdiff plot`` on the command line: exports, plots, bad input, a store of
another experiment."""
import pytest

from sweeps_helpers import run_cli, stored_table


def test_cli_sweep_exports_and_plots(tmp_path):
    r = run_cli("sweep", "subspace-recovery", "--K", "1,2", "--d", "1:3", "--N", "2:8:2", "--trials", "3",
             "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("subspace-recovery.sqlite", "subspace-recovery.rows.csv", "subspace-recovery.csv"):
        assert (tmp_path / f).exists(), f
    table = (tmp_path / "subspace-recovery.csv").read_text().splitlines()
    assert table[0].startswith("n,K,d,N,") and "success_mean" in table[0] and len(table) == 1 + 3 * 3 * 4
    pytest.importorskip("matplotlib")
    assert (tmp_path / "subspace-recovery.png").stat().st_size > 5000
    r = run_cli("plot", str(tmp_path / "subspace-recovery.sqlite"), "--out", str(tmp_path / "p"))
    assert r.returncode == 0 and (tmp_path / "p" / "subspace-recovery.png").exists()


@pytest.mark.parametrize("args,match", [
    (["--d", "5:1"], "inverted range"), (["--d", "60"], "d <= n"), (["--K", "2", "--learner", "pca"], "fits one subspace"),
    (["--N", "0"], "N >= 1"), (["--learner", "svm"], "expected values in"), (["--K", "3", "--d", "20"], "K d <= n"),
])
def test_cli_bad_input(tmp_path, capsys, args, match):
    from fastdiff import cli

    assert cli.main(["sweep", "subspace-recovery", *args, "--out", str(tmp_path), "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "subspace-recovery.sqlite").exists()


def test_cli_unknown_experiment_and_foreign_store(tmp_path):
    r = run_cli("sweep", "no-such-experiment")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    store = str(tmp_path / "s.sqlite")
    r = run_cli("sweep", "subspace-recovery", "--K", "1", "--d", "1", "--N", "2", "--trials", "1", "--store", store,
             "--out", str(tmp_path), "--no-progress", "--no-plot")
    assert r.returncode == 0, r.stderr[-2000:]
    before = stored_table(store, "subspace-recovery")
    r = run_cli("sweep", "linear-diffusion", "--N", "4", "--trials", "1", "--store", store, "--out", str(tmp_path),
             "--no-progress", "--no-plot")
    assert r.returncode == 2 and "holds results of experiment 'subspace-recovery'" in r.stderr
    assert stored_table(store, "subspace-recovery") == before


def test_cli_no_plot_still_writes_the_per_cell_table(tmp_path, capsys):
    """issue 16: --no-plot skipped the per-cell table <experiment>.csv along with the plot."""
    import csv

    from fastdiff import cli

    rc = cli.main(["sweep", "linear-diffusion", "--n", "4", "--N", "3,8", "--T", "10", "--trials", "2",
                   "--out", str(tmp_path), "--no-progress", "--no-plot"])
    assert rc == 0
    assert not (tmp_path / "linear-diffusion.png").exists()
    with open(tmp_path / "linear-diffusion.csv") as f:
        agg = list(csv.DictReader(f))
    assert [int(r["N"]) for r in agg] == [3, 8] and all(r["trials"] == "2" for r in agg)
    assert [float(r["singular_mean"]) for r in agg] == [1.0, 0.0]
    assert f"table: {tmp_path / 'linear-diffusion.csv'}" in capsys.readouterr().out

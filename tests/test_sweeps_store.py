"""The sweep store (fastdiff.sweeps.store): round trip, skip of stored rows, export, aggregates,
refusal of another schema, all-or-nothing writes."""
import csv
import math
import sqlite3

import pytest
import torch

from fastdiff import sweeps
from fastdiff.sweeps.store import Store
from sweeps_helpers import gen


PARAMS = [("a", "INTEGER"), ("A", "REAL")]          # names that differ only in case (n and N) must work


METRICS = [("m", "REAL")]


def _row(a, t, m=1.0):
    cell = {"a": a, "A": 0.5}
    return {"cell": sweeps.store.cell_key(cell), "trial": t, **cell, "m": m, "seed": 7, "backend": "torch",
            "versions": "v", "seconds": 0.1, "finished_at": "now"}


def test_store_roundtrip_skip_and_export(tmp_path, monkeypatch):
    p = str(tmp_path / "s.sqlite")
    with Store(p, "exp", PARAMS, METRICS) as st:
        assert st.write([_row(1, 0), _row(1, 1, 2.0)]) == 2
        assert st.write([_row(1, 1, 99.0), _row(2, 0)]) == 1            # (cell, trial) already stored: skipped
    with Store(p, "exp", PARAMS, METRICS) as st:
        rows = st.rows()
        assert [(r["a"], r["A"], r["trial"], r["m"]) for r in rows] == [(1, 0.5, 0, 1.0), (1, 0.5, 1, 2.0), (2, 0.5, 0, 1.0)]
        assert len(st.finished()) == 3
        st.export_csv(str(tmp_path / "s.csv"))
        with open(tmp_path / "s.csv", newline="") as f:
            header, *body = list(csv.reader(f))
        assert header[:6] == ["cell", "trial", "a", "A", "m", "seed"] and header == st.columns
        assert [(int(r[2]), float(r[3]), int(r[1]), float(r[4])) for r in body] == [(1, 0.5, 0, 1.0), (1, 0.5, 1, 2.0), (2, 0.5, 0, 1.0)]
        monkeypatch.setattr(sweeps.store, "_pyarrow", lambda: None)   # the csv-module fallback writes the same table
        assert st.export(str(tmp_path / "t")) == [str(tmp_path / "t.rows.csv")]
        with open(tmp_path / "t.rows.csv", newline="") as f:
            assert [r[:4] + [float(r[4])] for r in list(csv.reader(f))[1:]] == [r[:4] + [float(r[4])] for r in body]
        monkeypatch.undo()
        pq = pytest.importorskip("pyarrow.parquet")
        st.export_parquet(str(tmp_path / "s.parquet"))
        t = pq.read_table(str(tmp_path / "s.parquet"))
        assert t.num_rows == 3 and t.column("m").to_pylist() == [1.0, 2.0, 1.0]



@pytest.mark.parametrize("arrow", [True, False])
def test_store_export_order_is_rows_order(tmp_path, monkeypatch, arrow):
    """export sorts in pyarrow (the store read in storage order) and the csv fallback in SQLite: both
    give exactly :meth:`Store.rows`' order, numbers as numbers (1, 2, 10, not the cells' text order),
    text as text, ties by cell then trial, whatever order the rows were written in; an empty store
    exports its header."""
    if arrow:
        pytest.importorskip("pyarrow")
    else:
        monkeypatch.setattr(sweeps.store, "_pyarrow", lambda: None)
    params = [("d", "INTEGER"), ("lr", "REAL"), ("name", "TEXT")]
    g = gen(5)
    rows = []
    for d in (1, 2, 10, 11, 100):
        for lr in (-0.5, 0.25, 3.0):
            for name in ("b", "a", "Z", "é"):
                cell = {"d": d, "lr": lr, "name": name}
                for t in (2, 0, 1):
                    rows.append({"cell": sweeps.store.cell_key(cell), "trial": t, **cell, "m": float(len(rows)),
                                 "seed": 7, "backend": "cpp", "versions": "v", "seconds": 0.1, "finished_at": "now"})
    perm = torch.randperm(len(rows), generator=g).tolist()
    with Store(str(tmp_path / "e.sqlite"), "exp", params, METRICS) as st:
        assert st.export(str(tmp_path / "empty"))[0].endswith(".rows.csv")
        with open(tmp_path / "empty.rows.csv", newline="") as f:
            assert [r for r in csv.reader(f) if r] == [st.columns]
        for i in range(0, len(perm), 17):
            st.write([rows[j] for j in perm[i:i + 17]])
        want = [(r["d"], r["lr"], r["name"], r["trial"], r["m"]) for r in st.rows()]
        assert want[:3] == [(1, -0.5, "Z", 0, want[0][4]), (1, -0.5, "Z", 1, want[1][4]), (1, -0.5, "Z", 2, want[2][4])]
        assert [w[0] for w in want[::36]] == [1, 2, 10, 11, 100]
        paths = st.export(str(tmp_path / "e"))
    assert len(paths) == (2 if arrow else 1)
    with open(tmp_path / "e.rows.csv", newline="", encoding="utf-8") as f:
        header, *body = list(csv.reader(f))
    i = [header.index(c) for c in ("d", "lr", "name", "trial", "m")]
    assert [(int(r[i[0]]), float(r[i[1]]), r[i[2]], int(r[i[3]]), float(r[i[4]])) for r in body] == want
    if arrow:
        import pyarrow.parquet as pq

        t = pq.read_table(str(tmp_path / "e.rows.parquet"))
        assert list(zip(*(t.column(c).to_pylist() for c in ("d", "lr", "name", "trial", "m")))) == want

def test_store_aggregate_matches_statistics(tmp_path):
    """Store.aggregate (two passes in SQLite) against the statistics module: per-cell mean and standard
    error over the finite values (NaN is stored as NULL and skipped), many chunks of rows (the
    multi-row INSERT), a cell whose metric is never finite, a cell with one finite value."""
    import statistics

    g = gen(11)
    metrics = [("m", "REAL"), ("ok", "INTEGER")]
    values = {}
    rows = []
    for a in range(40):
        trials = 1 + a % 7
        for t in range(trials):
            m = float("nan") if (a == 3 or (a % 5 == 1 and t % 2)) else 1e4 + torch.randn(1, generator=g).item()
            cell = {"a": a, "A": 0.5}
            rows.append({"cell": sweeps.store.cell_key(cell), "trial": t, **cell, "m": m, "ok": t % 2, "seed": 7,
                         "backend": "cpp", "versions": "v", "seconds": 0.1, "finished_at": "now"})
            values.setdefault(a, []).append((m, t % 2))
    with Store(str(tmp_path / "s.sqlite"), "exp", PARAMS, metrics) as st:
        st._max_variables = 200                       # several INSERT chunks per write
        assert st.write(rows) == len(rows)
        agg = st.aggregate()
    assert [r["a"] for r in agg] == sorted(values)     # numerically (issue 13: not as the cell's text)
    for r in agg:
        ms = [m for m, _ in values[r["a"]] if not math.isnan(m)]
        oks = [o for _, o in values[r["a"]]]
        assert r["trials"] == len(values[r["a"]]) and r["A"] == 0.5
        for name, vals in (("m", ms), ("ok", oks)):
            mean, se = r[f"{name}_mean"], r[f"{name}_se"]
            if not vals:
                assert math.isnan(mean) and math.isnan(se)
                continue
            assert mean == pytest.approx(statistics.fmean(vals), rel=1e-12)
            if len(vals) < 2:
                assert math.isnan(se)
            else:   # the deviations pass keeps the digits a sum-of-squares formula would lose at mean 1e4
                assert se == pytest.approx(statistics.stdev(vals) / math.sqrt(len(vals)), rel=1e-9)


def test_store_refuses_other_schema_and_stays_intact(tmp_path):
    p = str(tmp_path / "s.sqlite")
    with Store(p, "exp", PARAMS, METRICS) as st:
        st.write([_row(1, 0)])
    with pytest.raises(ValueError, match="holds results of experiment 'exp'"):
        Store(p, "other", PARAMS, METRICS)
    with pytest.raises(ValueError, match="other columns"):
        Store(p, "exp", PARAMS, [("m2", "REAL")])
    with Store(p, "exp", PARAMS, METRICS) as st:
        assert len(st) == 1
    q = str(tmp_path / "foreign.sqlite")
    db = sqlite3.connect(q)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="not a fastdiff sweep store"):
        Store(q, "exp", PARAMS, METRICS)


def test_store_write_is_all_or_nothing(tmp_path):
    with Store(str(tmp_path / "s.sqlite"), "exp", PARAMS, METRICS) as st:
        bad = _row(2, 0)
        del bad["m"]
        with pytest.raises(ValueError, match="missing column"):
            st.write([_row(1, 0), bad])
        with pytest.raises(sqlite3.Error):
            st.write([_row(1, 0), {**_row(3, 0), "m": object()}])     # unsupported value: rolled back
        assert len(st) == 0

"""The results store of a sweep: one embedded SQLite file (standard library), one row per
(experiment, parameters, trial).

Schema (``SCHEMA_VERSION``)::

    meta(key TEXT PRIMARY KEY, value TEXT)     -- experiment, schema_version, columns (JSON)
    results(cell TEXT, trial INTEGER,          -- cell = the parameters as canonical JSON
            <one column per parameter>, <one column per metric>,
            seed INTEGER, backend TEXT, versions TEXT, seconds REAL, finished_at TEXT,
            PRIMARY KEY (cell, trial))

Every write is one transaction (a whole batch of cells), so a process killed at any moment leaves
either all rows of a batch or none of them (SQLite rolls an interrupted transaction back the next
time the file is opened); a re-run skips the (cell, trial) pairs already stored.  A store remembers
which experiment and columns it was created for and refuses to be reused by another.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import operator
import os
import pathlib
import sqlite3
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = ["Store", "SCHEMA_VERSION", "cell_key", "atomic_write"]

SCHEMA_VERSION = 1
SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT", bool: "INTEGER"}
RUN_COLUMNS = (("seed", "INTEGER"), ("backend", "TEXT"), ("versions", "TEXT"), ("seconds", "REAL"),
               ("finished_at", "TEXT"))


def cell_key(params: Dict[str, object]) -> str:
    """The canonical text of one cell's parameters (sorted keys): the store's cell identifier."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


class Store:
    """Open (or create) the store at ``path`` for ``experiment``.

    ``params`` and ``metrics`` are ``[(name, sql_type)]`` in column order.  An existing file written
    for another experiment or other columns raises ``ValueError`` and is left untouched.
    """

    def __init__(self, path: str, experiment: str, params: Sequence[Tuple[str, str]],
                 metrics: Sequence[Tuple[str, str]]):
        self.path = str(path)
        self.experiment = experiment
        self.params = [tuple(c) for c in params]
        self.metrics = [tuple(c) for c in metrics]
        names = [c[0] for c in self.params + self.metrics] + [c[0] for c in RUN_COLUMNS]
        if len(set(names)) != len(names) or {"cell", "trial"} & set(names):
            raise ValueError(f"columns: names must be unique and not 'cell'/'trial', got {names}")
        self.columns = ["cell", "trial"] + names
        # SQLite column names are case-insensitive (n and N would clash): later clashes get a suffix
        self._sql, seen = {}, set()
        for c in self.columns:
            q = c
            while q.lower() in seen:
                q += "_"
            seen.add(q.lower())
            self._sql[c] = q
        self.cells_total = self.cells_computed = self.cells_in_store = 0   # set by run_sweep
        parent = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path):
            raise ValueError(f"store: {self.path} is a directory, expected an .sqlite file")
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise ValueError(f"store: cannot create the directory of {self.path} "
                             f"({e.filename}: {e.strerror})") from None
        if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:   # SQLite would take a short non-database file as an empty one
                if f.read(16) != b"SQLite format 3\x00":
                    raise ValueError(_not_a_store(self.path, "not an SQLite file"))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch
        try:
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as e:
            raise ValueError(f"store: cannot open {self.path} ({e})") from None
        # bound parameters per statement (999 before SQLite 3.32, 32766 since; getlimit: Python >= 3.11)
        self._max_variables = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) \
            if hasattr(self._db, "getlimit") else 999
        try:
            # WAL: a commit is one append, no fsync per batch with synchronous=NORMAL; a killed
            # process still loses at most the uncommitted batch (an OS crash could lose the last commits)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._open_or_create()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(_not_a_store(self.path, e)) from None
        except sqlite3.Error as e:   # unwritable directory or file, full disk, locked
            self._db.close()
            raise ValueError(f"store: cannot open {self.path} ({_cause(e)})") from None
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------ schema
    def _signature(self) -> str:
        return json.dumps({"params": self.params, "metrics": self.metrics}, separators=(",", ":"))

    def _open_or_create(self) -> None:
        db = self._db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if meta.get("experiment") != self.experiment:
                raise ValueError(f"store: {self.path} holds results of experiment {meta.get('experiment')!r}, "
                                 f"not {self.experiment!r}; use another --store path")
            if meta.get("schema_version") != str(SCHEMA_VERSION):
                raise ValueError(f"store: {self.path} has schema version {meta.get('schema_version')}, this fastdiff "
                                 f"writes version {SCHEMA_VERSION}; use another --store path")
            if meta.get("columns") != self._signature():
                raise ValueError(f"store: {self.path} was written with other columns for {self.experiment!r} "
                                 f"({meta.get('columns')}); use another --store path")
            return
        if tables:
            raise ValueError(_not_a_store(self.path, f"an SQLite file with tables {sorted(tables)}"))
        cols = ", ".join(f'"{self._sql[n]}" {t}' for n, t in self.params + self.metrics + list(RUN_COLUMNS))
        db.execute("BEGIN")
        try:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("experiment", self.experiment), ("schema_version", str(SCHEMA_VERSION)),
                ("columns", self._signature())])
            db.execute(f"CREATE TABLE results (cell TEXT NOT NULL, trial INTEGER NOT NULL, {cols}, "
                       "PRIMARY KEY (cell, trial))")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    @staticmethod
    def read_experiment(path: str) -> Tuple[str, List[Tuple[str, str]], List[Tuple[str, str]]]:
        """``(experiment, params, metrics)`` recorded in an existing store (for ``fastdiff plot``)."""
        if not os.path.exists(path):
            raise ValueError(f"store: {path} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"store: {path} is a directory, expected an .sqlite file")
        # a URI (for mode=ro) percent-encoded by pathlib: '#', '?' and '%' in a path are characters of
        # the name, not a fragment, a query or an escape (unquoted they opened, and created, another file)
        try:
            db = sqlite3.connect(pathlib.Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise ValueError(f"store: cannot open {path} ({e})") from None
        try:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            cols = json.loads(meta["columns"])
            experiment = meta["experiment"]
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError) as e:
            raise ValueError(_not_a_store(path, e)) from None
        finally:
            db.close()
        return experiment, [tuple(c) for c in cols["params"]], [tuple(c) for c in cols["metrics"]]

    # ------------------------------------------------------------------ run settings
    def check_settings(self, settings: Dict[str, object], cell_seeds: Dict[str, int]) -> None:
        """Refuse to resume a sweep whose rows would differ from the stored ones.

        The resume key is (cell, trial); everything else that determines a row (the sweep seed, the
        device type, the experiment's version) is ``settings``, recorded in ``meta`` by the first run
        and compared on every later one: a mismatch raises ``ValueError`` naming the store and what
        differs (mixing them would return, or silently blend, another sweep's table).  A store from
        before this record is checked through its rows' ``seed`` column against ``cell_seeds``
        (``{cell: seed}`` of this run)."""
        want = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        row = self._db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        if row is not None:
            have = json.loads(row[0])
            diff = [f"{k}={have.get(k)!r} (this run: {settings.get(k)!r})" for k in sorted(set(have) | set(settings))
                    if have.get(k) != settings.get(k)]
            if diff:
                raise ValueError(f"store: {self.path} holds a sweep run with other settings: {', '.join(diff)}; "
                                 "its rows would not be this run's. Use another --store path, or the stored settings")
            return
        for cell, seed in self._db.execute("SELECT cell, MIN(seed) FROM results GROUP BY cell"):
            if cell in cell_seeds and cell_seeds[cell] != seed:
                raise ValueError(f"store: {self.path} holds rows of another sweep seed (cell {cell} has cell seed "
                                 f"{seed}, this run derives {cell_seeds[cell]}); use another --store path or "
                                 "the stored --seed")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (want,))
            self._db.execute("COMMIT")
        except BaseException:
            _rollback(self._db)
            raise

    # ------------------------------------------------------------------ rows
    def finished(self, cells: Optional[Iterable[str]] = None) -> Set[Tuple[str, int]]:
        """The stored ``(cell, trial)`` pairs (of ``cells`` if given)."""
        rows = self._db.execute("SELECT cell, trial FROM results").fetchall()
        keep = None if cells is None else set(cells)
        return {(c, t) for c, t in rows if keep is None or c in keep}

    def write(self, rows: Sequence[Dict[str, object]]) -> int:
        """Insert ``rows`` (dicts with every column) in one transaction, skipping stored (cell, trial)
        pairs; returns the number inserted.  Nothing is written if any row is malformed."""
        if not rows:
            return 0
        try:
            values = list(map(operator.itemgetter(*self.columns), rows))
        except KeyError as e:
            raise ValueError(f"rows: missing column {e}") from None
        # many rows per INSERT: the sqlite3 module releases the GIL around every statement it steps,
        # and one step per row ping-pongs the GIL with the threads computing the next batches
        # (the store's write then waits on them: a few rows per statement amortise the hand-over)
        per = max(1, min(512, self._max_variables // len(self.columns)))
        quoted = ", ".join(f'"{self._sql[c]}"' for c in self.columns)
        row = "(" + ", ".join("?" for _ in self.columns) + ")"
        before = self._db.total_changes
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for i in range(0, len(values), per):
                chunk = values[i:i + per]
                self._db.execute(f"INSERT OR IGNORE INTO results ({quoted}) VALUES " + ", ".join([row] * len(chunk)),
                                 [v for r in chunk for v in r])
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:   # disk full, I/O error, read-only: the cause, in one line
            _rollback(self._db)
            raise RuntimeError(f"store: writing {self.path} failed ({_cause(e)}); nothing of this batch was "
                               "written") from e
        except BaseException:
            _rollback(self._db)
            raise
        return self._db.total_changes - before

    def _order(self, prefix: str = "") -> str:
        """ORDER BY the parameter columns in their order, as numbers where they are numbers (the cell's
        JSON text sorted d = 1, 10, 11, 2), then the cell text (ties of equal values)."""
        return ", ".join([f'{prefix}"{self._sql[c]}"' for c, _ in self.params] + [f"{prefix}cell"])

    def rows(self) -> List[Dict[str, object]]:
        """Every stored row as a dict, ordered by the parameters (numerically) then trial."""
        return [dict(zip(self.columns, r)) for r in self._fetch()]

    def table(self) -> Dict[str, List[object]]:
        """Every stored row, column-wise ``{column: values}``, ordered by the parameters then trial."""
        rows = self._fetch()
        return {c: list(v) for c, v in zip(self.columns, zip(*rows))} if rows else {c: [] for c in self.columns}

    def _fetch(self) -> List[Tuple]:
        quoted = ", ".join(f'"{self._sql[c]}"' for c in self.columns)
        return self._db.execute(f"SELECT {quoted} FROM results ORDER BY {self._order()}, trial").fetchall()

    def aggregate(self) -> List[Dict[str, object]]:
        """One dict per cell (ordered by the parameters, numerically): its parameters, ``trials`` (rows stored) and per metric
        ``<m>_mean`` and ``<m>_se`` (standard error, sqrt(sample variance / count)) over the trials
        where the metric is finite (SQLite stores NaN as NULL); NaN where there are none (mean) or
        fewer than two (se).  One query, two passes in SQLite: the means, then the squared deviations
        from them (no cancellation of sum(x^2) - n mean^2)."""
        q = self._sql
        params = [c for c, _ in self.params]
        metrics = [m for m, _ in self.metrics]
        # pass 1 (g), one row per cell: the parameters (bare columns: the same in every row of a cell),
        # the row count, each metric's mean and finite count.  Pass 2 (s): the squared deviations.
        # Taking the parameters in pass 1 rather than as MIN() over the join of pass 2 takes a third to a
        # half of the time on the default sweep (the join then carries only the metrics).
        first = ", ".join([f'"{q[c]}" AS "p_{j}"' for j, c in enumerate(params)] + ["COUNT(*) AS rows_"] +
                          [f'AVG("{q[m]}") AS "mean_{i}", COUNT("{q[m]}") AS "n_{i}"' for i, m in enumerate(metrics)])
        squares = ", ".join(f'SUM((r."{q[m]}" - g."mean_{i}") * (r."{q[m]}" - g."mean_{i}")) AS "ss_{i}"'
                            for i, m in enumerate(metrics))
        outer = ", ".join([f'g."p_{j}"' for j in range(len(params))] + ["g.rows_"] +
                          [f'g."mean_{i}", s."ss_{i}", g."n_{i}"' for i in range(len(metrics))])
        order = ", ".join([f'g."p_{j}"' for j in range(len(params))] + ["g.cell"])
        sql = (f"WITH g AS (SELECT cell, {first} FROM results GROUP BY cell), "
               f"s AS (SELECT r.cell AS cell{', ' + squares if squares else ''} FROM results r "
               f"JOIN g ON r.cell = g.cell GROUP BY r.cell) "
               f"SELECT {outer} FROM g JOIN s ON g.cell = s.cell ORDER BY {order}")
        nan = float("nan")
        out = []
        for rec in self._db.execute(sql):
            row = dict(zip(params, rec))
            row["trials"] = rec[len(params)]
            for i, m in enumerate(metrics):
                mean, ss, cnt = rec[len(params) + 1 + 3 * i: len(params) + 4 + 3 * i]
                row[f"{m}_mean"] = nan if mean is None else mean
                # ss is NULL where a trial is +-inf (inf - inf): the mean is then inf and the se undefined
                row[f"{m}_se"] = math.sqrt(ss / (cnt - 1) / cnt) if cnt > 1 and ss is not None else nan
            out.append(row)
        return out

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ export
    def export(self, stem: str) -> List[str]:
        """``<stem>.rows.csv`` and, where pyarrow is installed, ``<stem>.rows.parquet``, from one read of
        the table (pyarrow writes both; without it the csv module writes the CSV).  Returns the paths."""
        if _pyarrow() is None:
            return [self.export_csv(stem + ".rows.csv")]
        table = self._arrow_table()
        return [self.export_csv(stem + ".rows.csv", table), self.export_parquet(stem + ".rows.parquet", table)]

    def export_csv(self, path: str, table=None) -> str:
        """The rows as CSV, in :meth:`rows` order; ``table``: a ``{column: values}`` dict (:meth:`table`)
        or a pyarrow table (one read shared by several exports)."""
        pa = _pyarrow()
        if pa is not None:
            import pyarrow.csv

            with atomic_write(path) as tmp:
                pyarrow.csv.write_csv(self._arrow_table(table), tmp)
            return path
        table = self.table() if table is None else table
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows(zip(*(table[c] for c in self.columns)))
        return path

    def export_parquet(self, path: str, table=None) -> str:
        """Parquet through pyarrow (``pip install pyarrow``, the ``sweeps`` extra); ``table`` as in
        :meth:`export_csv`."""
        if _pyarrow() is None:
            raise RuntimeError("export_parquet: needs pyarrow (pip install 'fastdiff[sweeps]' or pip install pyarrow)")
        import pyarrow.parquet as pq

        with atomic_write(path) as tmp:
            pq.write_table(self._arrow_table(table), tmp)
        return path

    def _arrow_table(self, table=None):
        """The rows as a pyarrow table in :meth:`rows` order.  From the store: read in storage order
        and sorted by pyarrow (SQLite's ORDER BY over the parameter columns, which no index serves,
        took a third of the export's time); the same order, since the parameters are never NULL and
        both compare numbers as numbers and text as UTF-8 bytes."""
        pa = _pyarrow()
        if isinstance(table, pa.Table):
            return table
        arrow = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}
        types = {"cell": "TEXT", "trial": "INTEGER", **dict(self.params + self.metrics), **dict(RUN_COLUMNS)}
        if table is not None:
            return pa.table({c: pa.array(table[c], type=arrow[types[c]]) for c in self.columns})
        quoted = ", ".join(f'"{self._sql[c]}"' for c in self.columns)
        rows = self._db.execute(f"SELECT {quoted} FROM results").fetchall()
        cols = list(zip(*rows)) if rows else [()] * len(self.columns)
        out = pa.table({c: pa.array(v, type=arrow[types[c]]) for c, v in zip(self.columns, cols)})
        keys = [c for c, _ in self.params] + ["cell", "trial"]
        return out.sort_by([(c, "ascending") for c in keys])


def _not_a_store(path, why) -> str:
    why = f"missing {why}" if isinstance(why, KeyError) else why
    return f"store: {path} is not a fastdiff sweep store ({why})"


def _cause(e: sqlite3.Error) -> str:
    """SQLite's message, with the disk-full and read-only cases said plainly."""
    code = getattr(e, "sqlite_errorname", "")
    if code == "SQLITE_FULL" or "disk is full" in str(e):
        return f"disk full: {e}"
    if code.startswith("SQLITE_READONLY") or code.startswith("SQLITE_CANTOPEN"):
        return f"not writable: {e}"
    return str(e)


def _rollback(db) -> None:
    """Roll back if a transaction is open: SQLite has already rolled back after some errors (a full
    disk), and a failing ROLLBACK ("cannot rollback - no transaction is active") would hide the cause."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class atomic_write:
    """``with atomic_write(path) as tmp:`` write the file at ``tmp`` (same directory); on success it
    replaces ``path`` in one rename, on an exception it is removed: a reader never sees a
    half-written table, and a failed run leaves no stray file."""

    def __init__(self, path: str):
        self.path = str(path)
        d, base = os.path.split(os.path.abspath(self.path))
        self.tmp = os.path.join(d, f".{base}.{os.getpid()}.tmp")

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            with contextlib.suppress(OSError):
                os.remove(self.tmp)


def _pyarrow():
    try:
        import pyarrow
    except ImportError:
        return None
    return pyarrow

"""Reading mart tables into pandas DataFrames with real dtypes, fast.

Column types come from the declared schema, not from what the driver guesses, so an empty frame
has the same dtypes as a full one: timestamps are ``datetime64[us, UTC]``, booleans ``boolean``,
numbers ``float64``/``Int64``, text ``object`` with ``None`` for missing. JSON columns stay JSON
text unless ``parse_json=True``.

Two reading paths:

- **SQLite**: Python's own ``sqlite3`` module, on a connection from the store's pool, with the
  columns typed straight from the fetched tuples. Never a second SQLite library (such as the one
  ``adbc-driver-sqlite`` links statically) in a process that writes the same database: POSIX
  locks belong to the process, so the other copy's locking and closing silently drops this
  copy's locks, and on opening a WAL database it finds no other user of the ``-shm`` wal-index and
  truncates it under the writers' feet. Measured here with a writer thread and ADBC readers: the
  readers saw "no such table" within seconds, and a test run got "database disk image is
  malformed" (https://sqlite.org/howtocorrupt.html, sections 2.2 and 2.2.1).
- **PostgreSQL**: the Arrow-native ADBC driver (``adbc-driver-postgresql``), several times faster
  than ``pandas.read_sql`` over SQLAlchemy for a million rows (see ``bench/mart_bench.py``).
"""

from __future__ import annotations

import gc
import json
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import sqlalchemy as sa

from tidyllm.errors import ConfigurationError, StorageError
from tidyllm.mart.schema import TABLES

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.mart.store import Store

__all__ = ["read_frame", "read_sql"]


def _sqlite_fetch(store: "Store", sql: str, *, by_column: bool = True) -> tuple[list[str], list[Sequence[Any]]]:
    """Column names and the value tuples of ``sql`` (one per column, or per row with ``by_column=False``),
    through the pool's own ``sqlite3`` connections."""
    import sqlite3

    try:
        raw = store.engine.raw_connection()
    except sa.exc.DBAPIError as exc:
        raise StorageError(f"reading from {store.safe_url} failed: {exc.orig}") from exc
    # a million rows are millions of new tuples and strings: cyclic garbage collection passes
    # over them, triggered every few hundred allocations, cost more than the fetch itself
    collecting = gc.isenabled()
    gc.disable()
    try:
        cursor = raw.cursor()
        try:
            cursor.execute(sql)
            names = [d[0] for d in cursor.description or ()]
            rows = cursor.fetchall()
        finally:
            cursor.close()
        if by_column:
            rows = list(zip(*rows)) if rows else [() for _ in names]
    except sqlite3.Error as exc:
        raise StorageError(f"reading from {store.safe_url} failed: {exc}") from exc
    finally:
        if collecting:
            gc.enable()
        raw.close()  # back to the pool
    return names, rows


def _adbc_read(store: "Store", sql: str) -> "pd.DataFrame":
    """``sql`` on PostgreSQL through ADBC, as a DataFrame with the driver's dtypes."""
    import adbc_driver_postgresql.dbapi as adbc

    uri = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with adbc.connect(uri) as conn, conn.cursor() as cur:
            cur.execute(sql)
            table = cur.fetch_arrow_table()
    except Exception as exc:  # ADBC raises its own DB-API error tree; translate once, here
        raise StorageError(f"reading from {store.safe_url} failed: {exc}") from exc
    return table.to_pandas()


def read_sql(store: "Store", sql: str) -> "pd.DataFrame":
    """Run one SQL query and return its result as a DataFrame (dtypes as pandas infers them)."""
    import pandas as pd

    if store.dialect != "sqlite":
        return _adbc_read(store, sql)
    names, rows = _sqlite_fetch(store, sql, by_column=False)
    return pd.DataFrame.from_records(rows, columns=names)


def read_frame(store: "Store", table: str, *, columns: Iterable[str] | None = None, where: Any = None,
               order_by: str | None = None, limit: int | None = None, parse_json: bool = False,
               **filters: Any) -> "pd.DataFrame":
    """Read ``table`` (optionally filtered by column equality ``filters``) into a typed DataFrame."""
    import pandas as pd

    if table not in TABLES:
        raise ConfigurationError(f"unknown mart table {table!r}; tables: {', '.join(sorted(TABLES))}")
    tbl = TABLES[table]
    cols = list(columns) if columns else [c.name for c in tbl.columns]
    for name in [*cols, *filters]:
        if name not in tbl.c:
            raise ConfigurationError(f"table {table!r} has no column {name!r}; columns: {', '.join(tbl.c.keys())}")
    query = sa.select(*[tbl.c[c] for c in cols])
    for key, value in filters.items():
        query = query.where(tbl.c[key].in_(list(value)) if isinstance(value, (list, tuple, set)) else tbl.c[key] == value)
    if where is not None:
        query = query.where(where)
    if order_by:
        desc = order_by.startswith("-")
        col = tbl.c[order_by.lstrip("-")]
        query = query.order_by(col.desc() if desc else col)
    elif table == "audit_log" and "seq" in cols:  # the audit trail reads in chain order
        query = query.order_by(tbl.c.seq)
    if limit is not None:
        query = query.limit(int(limit))
    sql = str(query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
    if store.dialect == "sqlite":
        _, values = _sqlite_fetch(store, sql)
        n = len(values[0]) if values else 0
        out = {name: _typed_values(values[i], tbl.c[name].type, parse_json) for i, name in enumerate(cols)}
    else:
        raw = _adbc_read(store, sql)
        n = len(raw)
        out = {name: _typed(raw[name] if name in raw else pd.Series([None] * n), tbl.c[name].type, parse_json)
               for name in cols}
    return pd.DataFrame(out, index=pd.RangeIndex(n))


def _typed_values(values: Sequence[Any], coltype: Any, parse_json: bool) -> "pd.Series":
    """A column of Python values (as ``sqlite3`` returns them) as a Series of the schema's dtype."""
    import numpy as np
    import pandas as pd

    if isinstance(coltype, sa.DateTime):
        # SQLAlchemy stores SQLite timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text, in UTC
        return pd.Series(pd.to_datetime(np.array(values, dtype=object), utc=True, format="ISO8601"),
                         dtype="datetime64[us, UTC]")
    if isinstance(coltype, sa.Boolean):
        return pd.Series(pd.array(values, dtype="boolean"))
    if isinstance(coltype, sa.Float):
        try:
            return pd.Series(np.array(values, dtype="float64"))  # None becomes NaN
        except (TypeError, ValueError):  # a text value in a numeric column: coerce, as for PostgreSQL
            return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype("float64")
    if isinstance(coltype, (sa.Integer, sa.BigInteger)):
        try:
            return pd.Series(pd.arrays.IntegerArray(np.array(values, dtype="int64"), np.zeros(len(values), bool)))
        except (TypeError, ValueError, OverflowError):  # NULLs (or stray text): the slower masked path
            return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype("Int64")
    text = pd.Series(np.array(values, dtype=object), dtype=object)
    if isinstance(coltype, sa.JSON) and parse_json:
        return text.map(lambda v: json.loads(v) if isinstance(v, str) else None).astype(object)
    return text


def _typed(values: "pd.Series", coltype: Any, parse_json: bool) -> "pd.Series":
    """A column as the ADBC driver typed it, as a Series of the schema's dtype."""
    import pandas as pd

    if isinstance(coltype, sa.DateTime):
        if pd.api.types.is_datetime64_any_dtype(values):
            s = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
            return s.astype("datetime64[us, UTC]")
        return pd.to_datetime(values, utc=True, format="ISO8601").astype("datetime64[us, UTC]")
    if isinstance(coltype, sa.Boolean):
        return values.astype("boolean")
    if isinstance(coltype, sa.Float):
        return pd.to_numeric(values, errors="coerce").astype("float64")
    if isinstance(coltype, (sa.Integer, sa.BigInteger)):
        return pd.to_numeric(values, errors="coerce").astype("Int64")
    if isinstance(coltype, sa.JSON):
        if parse_json:
            return values.map(lambda v: json.loads(v) if isinstance(v, str) else None).astype(object)
        return _text(values)
    return _text(values)


def _text(values: "pd.Series") -> "pd.Series":
    """Text as ``object`` with ``None`` for missing (not NaN: an all-NULL column arrives as floats)."""
    out = values.astype(object)
    return out.where(out.notna(), None)

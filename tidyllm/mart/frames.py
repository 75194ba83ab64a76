"""Reading mart tables into pandas DataFrames with real dtypes, fast.

Column types come from the declared schema, not from what the driver guesses, so an empty frame
has the same dtypes as a full one: timestamps are ``datetime64[us, UTC]``, booleans ``boolean``,
numbers ``float64``/``Int64``, text ``object`` with ``None`` for missing. JSON columns stay JSON
text unless ``parse_json=True``.

Two reading paths:

- **SQLite**: Python's own ``sqlite3`` module, on a connection from the store's pool. Unordered
  reads go column by column: SQLite joins each column of a block of rows into one string and numpy
  parses it (see ``_sqlite_columnar``), two to three times faster than row by row for a million rows;
  ordered reads, and anything that cannot be represented exactly that way, go row by row, with the
  columns typed straight from the fetched tuples. The frame is the same either way. Never a
  second SQLite library (such as the one ``adbc-driver-sqlite`` links statically) in a process
  that writes the same database: POSIX locks belong to the process, so the other copy's locking
  and closing silently drops this copy's locks, and on opening a WAL database it finds no other
  user of the ``-shm`` wal-index and truncates it under the writers' feet. Measured here with a
  writer thread and ADBC readers: the readers saw "no such table" within seconds, and a test run
  got "database disk image is malformed" (https://sqlite.org/howtocorrupt.html, sections 2.2 and
  2.2.1).
- **PostgreSQL**: the Arrow-native ADBC driver (``adbc-driver-postgresql``), several times faster
  than ``pandas.read_sql`` over SQLAlchemy for a million rows (see ``bench/mart_bench.py``).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import queue
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import sqlalchemy as sa

from tidyllm.errors import ConfigurationError, StorageError
from tidyllm.mart.schema import TABLES

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.mart.store import Store

__all__ = ["read_frame", "read_sql"]


#: what a read-only SQLite statement may do (sqlite3's authorizer action codes): read and compute, nothing else
_READ_ACTIONS = {20, 21, 31, 33}  # SQLITE_READ, SQLITE_SELECT, SQLITE_FUNCTION, SQLITE_RECURSIVE


def _read_only_authorizer(action: int, *args: Any) -> int:
    import sqlite3

    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def _sqlite_fetch(store: "Store", sql: str, *, by_column: bool = True,
                  read_only: bool = False) -> tuple[list[str], list[Sequence[Any]]]:
    """Column names and the value tuples of ``sql`` (one per column, or per row with ``by_column=False``),
    through the pool's own ``sqlite3`` connections. ``read_only`` lets the statement only read
    (``query_only`` plus an authorizer denying every write, ATTACH and PRAGMA)."""
    import sqlite3

    try:
        raw = store.engine.raw_connection()
    except sa.exc.DBAPIError as exc:
        raise StorageError(f"reading from {store.safe_url} failed: {exc.orig}") from exc
    # a million rows are millions of new tuples and strings: cyclic garbage collection passes
    # over them, triggered every few hundred allocations, cost more than the fetch itself
    collecting = gc.isenabled()
    gc.disable()
    driver = raw.driver_connection
    try:
        cursor = raw.cursor()
        try:
            if read_only:
                cursor.execute("PRAGMA query_only=ON")
                driver.set_authorizer(_read_only_authorizer)
            try:
                cursor.execute(sql)
                names = [d[0] for d in cursor.description or ()]
                rows = cursor.fetchall()
            finally:
                if read_only:
                    driver.set_authorizer(None)
                    if not store.read_only:
                        cursor.execute("PRAGMA query_only=OFF")
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


def _adbc_read(store: "Store", sql: str, *, read_only: bool = False) -> "pd.DataFrame":
    """``sql`` on PostgreSQL through ADBC, as a DataFrame with the driver's dtypes (in a read-only
    transaction with ``read_only``, or when the store was opened read-only)."""
    import adbc_driver_postgresql.dbapi as adbc

    uri = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with adbc.connect(uri) as conn, conn.cursor() as cur:
            if read_only or store.read_only:
                # one statement per execute (ADBC prepares it), so the query cannot end this transaction first
                cur.execute("SET TRANSACTION READ ONLY")
            cur.execute(sql)
            table = cur.fetch_arrow_table()
            if read_only or store.read_only:
                conn.rollback()
    except Exception as exc:  # ADBC raises its own DB-API error tree; translate once, here
        raise StorageError(f"reading from {store.safe_url} failed: {exc}") from exc
    return table.to_pandas()


def read_sql(store: "Store", sql: str) -> "pd.DataFrame":
    """Run one read-only SQL query and return its result as a DataFrame (dtypes as pandas infers them);
    a statement that would write raises :class:`~tidyllm.errors.StorageError`."""
    import pandas as pd

    if store.dialect != "sqlite":
        return _adbc_read(store, sql, read_only=True)
    names, rows = _sqlite_fetch(store, sql, by_column=False, read_only=True)
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
    conditions = [tbl.c[key].in_(list(value)) if isinstance(value, (list, tuple, set)) else tbl.c[key] == value
                  for key, value in filters.items()]
    if where is not None:
        conditions.append(where)
    query = sa.select(*[tbl.c[c] for c in cols]).where(*conditions)
    ordered = bool(order_by) or (table == "audit_log" and "seq" in cols)
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
        # unordered reads go column-wise (see _sqlite_columnar); ordered ones, and anything the column-wise
        # read does not take, row-wise
        columnar = None if ordered else _sqlite_columnar(store, tbl, cols, conditions, limit, parse_json)
        if columnar is not None:
            n, out = columnar
        else:
            _, values = _sqlite_fetch(store, sql)
            n = len(values[0]) if values else 0
            out = {name: _typed_values(values[i], tbl.c[name].type, parse_json) for i, name in enumerate(cols)}
    else:
        raw = _adbc_read(store, sql)
        n = len(raw)
        out = {name: _typed(raw[name] if name in raw else pd.Series([None] * n), tbl.c[name].type, parse_json)
               for name in cols}
    # copy=False: each column keeps its own block instead of being copied into one per dtype
    return pd.DataFrame(out, index=pd.RangeIndex(n), copy=False)


# --- SQLite, column by column ----------------------------------------------------------------------
#
# Row by row, Python's sqlite3 module costs about as much per value as SQLite does per row (the 3.11
# module even releases and re-takes the GIL around every value), so a million rows of six columns take
# seconds. Column by column, SQLite joins each column of a block of rows into one string (group_concat,
# computed in one step, without the GIL) and Python splits it (text) or parses it in bulk with numpy
# (integers, booleans, timestamps): one Python value per column and block instead of one per cell.
# Float columns come from a row query over the same rows, matched by rowid (SQLite prints REALs to 15
# significant digits, so text would not round-trip). A whole-table read goes in rowid ranges, all in
# one transaction (one snapshot), one block ahead on a worker thread.
#
# What the column-wise read cannot represent exactly is read row by row instead (the same frame,
# slower): ordered reads, a text value containing the separator, integers or booleans that are not,
# a result too large for one SQLite string, any mismatch between the two queries.

#: joins the values of a column: JSON text never contains it raw; a value that does makes more pieces
#: than rows, and the read goes row by row
_SEP = "\x1f"
#: rows per block of a whole-table read
_CHUNK_ROWS = 32768
#: read the next block on a worker thread while this one is parsed (pointless on one CPU)
_READ_AHEAD = (os.cpu_count() or 1) > 1
_EPOCH = "1970-01-01 00:00:00.000000"  # stands in for NULL timestamps (masked afterwards)
_NAT = -(2 ** 63)  # NaT as int64
# SQLAlchemy's SQLite timestamp text 'YYYY-MM-DD HH:MM:SS.ffffff' followed by the separator: 27 bytes
_TS_PUNCT_AT = [4, 7, 10, 13, 16, 19, 26]
_TS_PUNCT = [ord(c) for c in "-- ::.\x1f"]
_TS_DIGITS_AT = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22, 23, 24, 25]

_Block = tuple[tuple[Any, ...], "list[tuple[Any, ...]] | None"]


class _RowWise(Exception):
    """The column-wise read cannot represent this result exactly: read it row by row."""


def _kind(coltype: Any) -> str:
    if isinstance(coltype, sa.DateTime):
        return "datetime"
    if isinstance(coltype, sa.Boolean):
        return "bool"
    if isinstance(coltype, sa.Float):
        return "float"
    if isinstance(coltype, (sa.Integer, sa.BigInteger)):
        return "int"
    if isinstance(coltype, (sa.String, sa.JSON)):
        return "text"
    return "other"  # not read column-wise


def _sqlite_columnar(store: "Store", tbl: sa.Table, cols: list[str], conditions: list[Any], limit: int | None,
                     parse_json: bool) -> "tuple[int, dict[str, pd.Series]] | None":
    """The columns of an unordered read, column by column; None when it must be read row by row."""
    import sqlite3

    kinds = [_kind(tbl.c[c].type) for c in cols]
    if "other" in kinds:
        return None
    nullable = [bool(tbl.c[c].nullable) for c in cols]
    floats = [i for i, kind in enumerate(kinds) if kind == "float"]
    aggregates = []
    for i, (kind, null) in enumerate(zip(kinds, nullable)):
        if kind == "float":
            continue
        if kind in ("int", "bool"):
            aggregates.append(f"group_concat(ifnull(c{i}, 0), ',')" if null else f"group_concat(c{i}, ',')")
        else:
            fill = _EPOCH if kind == "datetime" else ""
            aggregates.append(f"group_concat(ifnull(c{i}, '{fill}'), '{_SEP}')" if null
                              else f"group_concat(c{i}, '{_SEP}')")
        if null:
            aggregates.append(f"group_concat(c{i} IS NULL, '')")  # the NULL mask, one '0'/'1' per row
    if floats:
        aggregates.append("group_concat(_rid, ',')")  # to match the float query's rows
    whole = not conditions and limit is None
    if whole:
        listed = ", ".join(["rowid AS _rid", *(f'"{c}" AS c{i}' for i, c in enumerate(cols))])
        inner = f'SELECT {listed} FROM "{tbl.name}" WHERE rowid BETWEEN ? AND ?'
    else:
        query = (sa.select(sa.literal_column("rowid").label("_rid"),
                           *[tbl.c[c].label(f"c{i}") for i, c in enumerate(cols)]).where(*conditions))
        if limit is not None:
            query = query.limit(int(limit))
        inner = str(query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
    aggregate_sql = f"SELECT count(*), {', '.join(aggregates)} FROM ({inner})"
    float_sql = f"SELECT _rid, {', '.join(f'c{i}' for i in floats)} FROM ({inner})" if floats else None

    try:
        raw = store.engine.raw_connection()
    except sa.exc.DBAPIError:
        return None  # the row-wise read reports it
    columns = _Columns(kinds, nullable)
    # millions of new strings in lists: collection passes over them would cost more than the read
    collecting = gc.isenabled()
    gc.disable()
    try:
        conn = raw.driver_connection
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")  # one snapshot for all the blocks
        try:
            if whole:
                _read_blocks(conn, tbl.name, aggregate_sql, float_sql, columns.add)
            else:
                row = conn.execute(aggregate_sql).fetchone()
                columns.add((row, conn.execute(float_sql).fetchall() if float_sql and row[0] else None))
        finally:
            if own and conn.in_transaction:
                conn.execute("ROLLBACK")  # read only: nothing to keep
        raw.close()  # back to the pool
        raw = None
        return columns.n, columns.series(tbl, cols, parse_json)
    except (sqlite3.Error, _RowWise):
        return None
    finally:
        if collecting:
            gc.enable()
        if raw is not None:
            raw.close()


def _read_blocks(conn: Any, table: str, aggregate_sql: str, float_sql: str | None,
                 consume: Callable[[_Block], None]) -> None:
    """``consume(block)`` for each block of ``table``.

    A table of more than a few blocks is read one block ahead on a worker thread: SQLite computes a
    block's aggregates without holding the GIL, so it runs while this thread splits the previous block.
    """
    start, last = conn.execute(f'SELECT (SELECT min(rowid) FROM "{table}"), '
                               f'(SELECT max(rowid) FROM "{table}")').fetchone()
    if start is None:
        return
    if last - start < 2 * _CHUNK_ROWS or not _READ_AHEAD:
        for block in _blocks(conn, table, aggregate_sql, float_sql, start, last):
            consume(block)
        return
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            for block in _blocks(conn, table, aggregate_sql, float_sql, start, last):
                if stop.is_set():
                    return
                ready.put(("block", block))
            ready.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            ready.put(("error", exc))

    worker = threading.Thread(target=produce, name="tidyllm-frame-read", daemon=True)
    worker.start()
    try:
        while True:
            tag, item = ready.get()
            if tag == "end":
                return
            if tag == "error":
                raise item
            consume(item)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting to hand over a block
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


def _blocks(conn: Any, table: str, aggregate_sql: str, float_sql: str | None, start: int,
            last: int) -> Iterator[_Block]:
    """The aggregate row (and float rows) of each rowid range of about ``_CHUNK_ROWS`` rows of ``table``."""
    width = _CHUNK_ROWS
    while start <= last:
        end = min(start + width - 1, last)
        row = conn.execute(aggregate_sql, (start, end)).fetchone()
        n = row[0]
        if n:
            yield row, (conn.execute(float_sql, (start, end)).fetchall() if float_sql else None)
            width = max(_CHUNK_ROWS, width * _CHUNK_ROWS // n)  # sparse rowids (deleted rows): wider ranges
        start = end + 1
        if not n and start <= last:  # an empty range: jump to the next row
            start = conn.execute(f'SELECT min(rowid) FROM "{table}" WHERE rowid >= ?', (start,)).fetchone()[0]
            if start is None:
                return


def _integers(text: Any, n: int) -> "np.ndarray":
    """``n`` comma-joined integers as int64."""
    if not isinstance(text, str):
        raise _RowWise
    with warnings.catch_warnings():  # numpy < 2 warns about a partial parse (caught by the length check)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            values = np.fromstring(text, dtype=np.int64, sep=",")
        except ValueError:  # numpy >= 2: text that is not integers
            raise _RowWise from None
    if len(values) != n:
        raise _RowWise
    return values


class _Columns:
    """Column values accumulated block by block."""

    def __init__(self, kinds: list[str], nullable: list[bool]) -> None:
        self.kinds = kinds
        self.nullable = nullable
        self.floats = [j for j, kind in enumerate(kinds) if kind == "float"]
        self.parts: list[list[Any]] = [[] for _ in kinds]
        self.masks: list[list[Any]] = [[] for _ in kinds]
        self.n = 0

    def add(self, block: _Block) -> None:
        row, float_rows = block
        n = row[0]
        if not n:
            return
        k = 1
        for j, kind in enumerate(self.kinds):
            if kind == "float":
                continue
            text = row[k]
            k += 1
            mask = None
            if self.nullable[j]:
                flags = row[k]
                k += 1
                if not isinstance(flags, str) or len(flags) != n:
                    raise _RowWise
                mask = np.frombuffer(flags.encode("ascii"), dtype=np.uint8) == ord("1")
            if kind == "text":
                if not isinstance(text, str):
                    raise _RowWise
                pieces: list[Any] = text.split(_SEP)
                if len(pieces) != n:
                    raise _RowWise
                if mask is not None:
                    for i in np.flatnonzero(mask).tolist():
                        pieces[i] = None
                self.parts[j].append(pieces)
            elif kind == "datetime":
                if not isinstance(text, str):
                    raise _RowWise
                micros = _timestamps(text, n)
                if mask is not None:
                    micros[mask] = _NAT
                self.parts[j].append(micros)
            else:
                values = _integers(text, n)
                if kind == "bool" and not ((values == 0) | (values == 1)).all():
                    raise _RowWise
                self.parts[j].append(values)
                self.masks[j].append(mask if mask is not None else np.zeros(n, dtype=bool))
        if self.floats:
            self._add_floats(_integers(row[k], n), float_rows)
        self.n += n

    def _add_floats(self, rowids: "np.ndarray", float_rows: "list[tuple[Any, ...]] | None") -> None:
        """The float columns' values from the row query, in the aggregates' row order."""
        if float_rows is None or len(float_rows) != len(rowids):
            raise _RowWise
        values = list(zip(*float_rows))
        got = np.array(values[0], dtype=np.int64)
        if not np.array_equal(got, rowids):
            order = np.argsort(got)
            at = np.minimum(np.searchsorted(got, rowids, sorter=order), len(got) - 1)
            where = order[at]
            if not np.array_equal(got[where], rowids):
                raise _RowWise
            values = [values[0], *(np.array(column, dtype=object)[where].tolist() for column in values[1:])]
        for j, column in zip(self.floats, values[1:]):
            self.parts[j].append(column)

    def series(self, tbl: sa.Table, cols: list[str], parse_json: bool) -> "dict[str, pd.Series]":
        import pandas as pd

        out = {}
        for j, name in enumerate(cols):
            kind, parts = self.kinds[j], self.parts[j]
            if kind == "float":
                out[name] = _typed_values(list(itertools.chain.from_iterable(parts)), tbl.c[name].type, parse_json)
            elif kind == "text":
                values = np.fromiter(itertools.chain.from_iterable(parts), dtype=object, count=self.n)
                text = pd.Series(values, dtype=object, copy=False)
                if parse_json and isinstance(tbl.c[name].type, sa.JSON):
                    text = text.map(lambda v: json.loads(v) if isinstance(v, str) else None).astype(object)
                out[name] = text
            elif kind == "datetime":
                micros = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
                out[name] = pd.Series(micros.view("datetime64[us]"), dtype="datetime64[us, UTC]", copy=False)
            else:
                values = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
                mask = np.concatenate(self.masks[j]) if parts else np.empty(0, dtype=bool)
                array = (pd.arrays.BooleanArray(values.astype(bool), mask) if kind == "bool"
                         else pd.arrays.IntegerArray(values, mask))
                out[name] = pd.Series(array, copy=False)
        return out


def _timestamps(text: str, n: int) -> "np.ndarray":
    """``n`` joined timestamps as int64 microseconds since the epoch (UTC)."""
    if len(text) == 27 * n - 1 and text.isascii():
        micros = _fixed_timestamps(np.frombuffer((text + _SEP).encode("ascii"), dtype=np.uint8).reshape(n, 27))
        if micros is not None:
            return micros
    import pandas as pd

    pieces = text.split(_SEP)  # another spelling (older rows, other writers): pandas parses it, as row by row
    if len(pieces) != n:
        raise _RowWise
    parsed = pd.to_datetime(np.array(pieces, dtype=object), utc=True, format="ISO8601")
    return np.array(parsed.as_unit("us").asi8, dtype=np.int64)


def _fixed_timestamps(chars: "np.ndarray") -> "np.ndarray | None":
    """Rows of 'YYYY-MM-DD HH:MM:SS.ffffff' + separator as microseconds, or None if any row is not one."""
    if not (chars[:, _TS_PUNCT_AT] == np.array(_TS_PUNCT, dtype=np.uint8)).all():
        return None
    digits = chars[:, _TS_DIGITS_AT] - np.uint8(48)  # anything but '0'..'9' wraps above 9
    if (digits > 9).any():
        return None

    def number(first: int, end: int) -> "np.ndarray":
        out = digits[:, first].astype(np.int32)
        for k in range(first + 1, end):
            out *= 10
            out += digits[:, k]
        return out

    year, month, day = number(0, 4), number(4, 6), number(6, 8)
    hour, minute, second, micro = number(8, 10), number(10, 12), number(12, 14), number(14, 20)
    if ((month < 1) | (month > 12) | (day < 1) | (hour > 23) | (minute > 59) | (second > 59)).any():
        return None
    first = (year - 1970).astype("datetime64[Y]").astype("datetime64[M]") + (month - 1).astype("timedelta64[M]")
    dates = first.astype("datetime64[D]") + (day - 1).astype("timedelta64[D]")
    if not (dates.astype("datetime64[M]") == first).all():  # no 31 April
        return None
    seconds = dates.astype(np.int64) * 86400 + (hour * 3600 + minute * 60 + second)
    return seconds * 1_000_000 + micro


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

"""Prepared statements for the hot paths: compiled once, executed straight on the DBAPI cursor.

Building and compiling a SQLAlchemy Core statement costs 50–150 µs per execution; the governed
call path runs about ten statements per call, so that alone would be a millisecond. Here each
statement is still *written* as SQLAlchemy Core (one schema, both dialects, SQLAlchemy's own
type conversions), but compiled once per database and kept: executing it is the driver's
``cursor.execute`` plus SQLAlchemy's bind processors for the values (so a timestamp or a JSON value
is stored exactly as the rest of tidyllm stores it).

:meth:`Store.tx` opens a transaction on a raw pooled connection and yields a :class:`Tx`;
:meth:`Tx.of` wraps a SQLAlchemy ``Connection`` already inside a transaction, so the same
statements can join a transaction opened elsewhere.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Prepared", "Tx", "json_value"]


class Prepared:
    """One statement compiled for one dialect, with the bind processors of its parameters."""

    __slots__ = ("sql", "names", "procs", "positional", "defaults", "params")

    def __init__(self, stmt: Any, dialect: Any, column_keys: Sequence[str] | None = None) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self.sql: str = compiled.string
        self.positional: bool = bool(compiled.positional)
        self.names: list[str] = list(compiled.positiontup) if self.positional else list(compiled.binds)
        #: values of bound literals (``scope == "org"``) and None for named parameters
        self.defaults: dict[str, Any] = {k: v for k, v in compiled.params.items() if type(v) in (str, int, float, bool)}
        procs: dict[str, Callable[[Any], Any]] = {}
        for name in set(self.names):
            bind = compiled.binds[name]
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                procs[name] = proc
        self.procs = procs
        #: ``params(values)``: the driver's parameters for ``values`` (a missing value is NULL)
        self.params: Callable[[Mapping[str, Any]], Any] = self._compile_params()

    def _compile_params(self) -> Callable[[Mapping[str, Any]], Any]:
        """A function building the driver's parameters, generated once per statement.

        A generic loop over the names (merge the defaults, look up each processor) costs more than
        the statement on SQLite; the generated function is one expression per parameter."""
        env: dict[str, Any] = {}
        parts = []
        for i, name in enumerate(dict.fromkeys(self.names) if not self.positional else self.names):
            env[f"n{i}"] = name
            value = f"get(n{i}, d{i})" if name in self.defaults else f"get(n{i})"
            if name in self.defaults:
                env[f"d{i}"] = self.defaults[name]
            if name in self.procs:
                env[f"p{i}"] = self.procs[name]
                value = f"p{i}({value})"
            parts.append(value if self.positional else f"n{i}: {value}")
        body = f"({', '.join(parts)},)" if self.positional else f"{{{', '.join(parts)}}}"
        if self.positional and not parts:
            body = "()"
        source = f"def params(values):\n    get = values.get\n    return {body}\n"
        exec(compile(source, f"<tidyllm prepared params {len(parts)}>", "exec"), env)  # noqa: S102 - generated from names above
        return env["params"]


class Tx:
    """A transaction's DBAPI cursor and the store's prepared statements."""

    __slots__ = ("cursor", "store", "dialect")

    def __init__(self, cursor: Any, store: Any) -> None:
        self.cursor = cursor
        self.store = store
        self.dialect: str = store.dialect

    @classmethod
    def of(cls, conn: Any, store: Any) -> "Tx":
        """The :class:`Tx` of a SQLAlchemy connection inside a transaction (or a Tx, unchanged)."""
        if isinstance(conn, Tx):
            return conn
        return cls(conn.connection.driver_connection.cursor(), store)

    def run(self, key: str, build: Callable[[], Any], /, **values: Any) -> Any:
        """Execute the statement ``key`` (built by ``build()`` the first time); returns the cursor."""
        prepared = self.store.prepared(key, build)
        self.cursor.execute(prepared.sql, prepared.params(values))
        return self.cursor

    def one(self, key: str, build: Callable[[], Any], /, **values: Any) -> tuple | None:
        """The first row of a query, or None."""
        return self.run(key, build, **values).fetchone()

    def all(self, key: str, build: Callable[[], Any], /, **values: Any) -> list[tuple]:
        """Every row of a query."""
        return self.run(key, build, **values).fetchall()


def json_value(value: Any) -> Any:
    """A JSON column as read from the driver: SQLite returns text, psycopg the parsed value."""
    if isinstance(value, (str, bytes)):
        return json.loads(value)
    return value

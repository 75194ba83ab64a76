"""Opening a mart database: engines, SQLite pragmas, transactions, schema version and migrations.

SQLAlchemy is used for writes and migrations; bulk reads go through Arrow (see ``frames``).
One transaction helper (:meth:`Store.begin`) translates driver errors into
:class:`~tidyllm.errors.StorageError` once, where they enter.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from tidyllm.errors import ConfigurationError, SchemaVersionError, StorageError
from tidyllm.mart.schema import metadata

if TYPE_CHECKING:
    from tidyllm.mart.fastsql import Prepared, Tx

__all__ = ["Store", "HEAD_REVISION", "utcnow", "as_utc", "dumps"]

#: the newest migration this code knows; a database stamped with anything else is older or newer
HEAD_REVISION = "0008"
_REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: "dt.datetime | str | None") -> "dt.datetime | None":
    """A stored timestamp as an aware UTC datetime: SQLite gives naive datetimes or SQLAlchemy's text
    form (both UTC), PostgreSQL aware ones."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


#: one encoder for every JSON column (``json.dumps`` with options builds a new one per call)
_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"), sort_keys=False)


def dumps(value: Any) -> str:
    """JSON-encode ``value`` the way the mart stores JSON columns (unknown types become strings)."""
    return _ENCODER.encode(value)


class Store:
    """A database connection pool plus the schema-version check. Thread-safe; one per process and URL."""

    def __init__(self, url: str, *, upgrade: bool = True, echo: bool = False, read_only: bool = False) -> None:
        self.url = url
        #: opened read-only: SQLite ``mode=ro`` (the file must exist), PostgreSQL read-only transactions;
        #: a database that is not a tidyllm mart is an error and nothing is created or migrated
        self.read_only = read_only
        self._created_dirs: list[Path] = []
        self.engine = self._make_engine(url, echo)
        self.dialect = self.engine.dialect.name
        # SQLite has one writer at a time; threads of this process queue on this lock instead of
        # SQLite's busy handler, which sleeps in steps of milliseconds (other processes still use it)
        self._write_lock: Any = threading.RLock() if self.dialect == "sqlite" else contextlib.nullcontext()
        self._prepared: dict[str, Any] = {}
        # SQLite: every write transaction of tx() runs on one connection of this process, kept open and
        # used under the write lock. A pool checkout and its reset cost more than the statements, and
        # a connection whose database another connection wrote must drop its page cache: with one
        # connection for the admitting and the settling threads, the cache stays warm.
        self._hot: tuple[int, Any] | None = None  # (pid, connection)
        self._hot_busy = False
        try:
            self._ensure_schema(upgrade)
        except BaseException:
            self.engine.dispose()
            self._remove_created_dirs()
            raise

    # --- engine -------------------------------------------------------------------------------

    def _make_engine(self, url: str, echo: bool) -> Engine:
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigurationError(
                f"database_url {url!r} is not a database URL; use e.g. 'sqlite:///path/tidyllm.db' or "
                "'postgresql+psycopg://user:pass@host:5432/db'") from exc
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ConfigurationError(f"database_url uses {backend!r}; tidyllm supports sqlite and postgresql")
        kwargs: dict[str, Any] = {"echo": echo, "json_serializer": dumps, "future": True}
        if backend == "sqlite":
            if parsed.database in (None, "", ":memory:"):
                raise ConfigurationError(
                    "an in-memory SQLite mart cannot be shared between connections; give a file path "
                    "(e.g. 'sqlite:///tidyllm.db')")
            if self.read_only:
                path = Path(parsed.database).expanduser()
                if not path.is_file():
                    raise StorageError(f"no mart at {path}: nothing was created; pass --database-url (or set "
                                       "TIDYLLM_DATABASE_URL) naming an existing mart")
                from urllib.parse import quote

                parsed = parsed.set(database=f"file:{quote(str(path.resolve()))}?mode=ro", query={"uri": "true"})
            else:
                self._prepare_sqlite_path(Path(parsed.database))
            kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        else:
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            if self.read_only:
                kwargs["connect_args"] = {"options": "-c default_transaction_read_only=on"}
            # no pre-ping: it costs a round trip per checkout on the hot path; recycle idle connections instead
            kwargs.update(pool_size=10, max_overflow=20, pool_recycle=1800)
        try:
            engine = sa.create_engine(parsed, **kwargs)
        except (sa.exc.NoSuchModuleError, ModuleNotFoundError) as exc:
            raise ConfigurationError(
                f"the database driver for {parsed.drivername!r} is not installed; for PostgreSQL install "
                "tidyllm[postgres]") from exc
        if backend == "sqlite":
            _configure_sqlite(engine, read_only=self.read_only)
        return engine

    def _prepare_sqlite_path(self, path: Path) -> None:
        parent = path.expanduser().resolve().parent
        missing = []
        probe = parent
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder {parent} for the mart: {exc.strerror}; "
                               "choose another database_url or fix the permissions") from exc
        self._created_dirs = sorted(missing, key=lambda p: len(p.parts))
        if not os.access(parent, os.W_OK):
            raise StorageError(f"the folder {parent} is not writable; choose another database_url "
                               "(TIDYLLM_DATABASE_URL) or fix the permissions")

    def _remove_created_dirs(self) -> None:
        for folder in self._created_dirs:
            shutil.rmtree(folder, ignore_errors=True)
            break  # the outermost created folder holds the rest

    # --- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def begin(self, *, write: bool = False) -> Iterator[Connection]:
        """A transaction. ``write=True`` takes SQLite's write lock up front (``BEGIN IMMEDIATE``), so a
        read-then-write sequence cannot deadlock or be overtaken by another writer."""
        if write and self.read_only:
            raise StorageError(f"the mart at {self.safe_url} was opened read-only")
        try:
            with self._write_lock if write else contextlib.nullcontext(), self.engine.connect() as conn:
                if write and self.dialect == "sqlite":
                    conn = conn.execution_options(sqlite_immediate=True)
                with conn.begin():
                    yield conn
        except sa.exc.DBAPIError as exc:
            raise StorageError(f"database error on {self.safe_url}: {exc.orig}") from exc

    @contextlib.contextmanager
    def _raw(self) -> Iterator[Any]:
        """A pooled DBAPI connection, returned to the pool afterwards; driver errors become StorageError."""
        try:
            raw = self.engine.raw_connection()
        except sa.exc.DBAPIError as exc:
            raise StorageError(f"database error on {self.safe_url}: {exc.orig}") from exc
        try:
            yield raw
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise StorageError(f"database error on {self.safe_url}: {exc}") from exc
        finally:
            raw.close()

    @contextlib.contextmanager
    def tx(self, *, write: bool = True) -> Iterator["Tx"]:
        """A transaction on a DBAPI connection, for prepared statements (:mod:`tidyllm.mart.fastsql`).

        The hot paths (admitting and settling governed calls) use it: no SQL is built per call,
        and on PostgreSQL psycopg prepares each statement on the server after a few executions.
        ``write=True`` takes SQLite's write lock up front, as :meth:`begin` does, and runs on the
        process's own SQLite connection (see ``_hot_connection``); anything else uses the pool."""
        from tidyllm.mart.fastsql import Tx

        if write and self.read_only:
            raise StorageError(f"the mart at {self.safe_url} was opened read-only")
        if self.dialect == "sqlite" and write:
            with self._write_lock:
                if self._hot_busy:
                    # only this thread can be inside the write lock: a second writer would wait for itself
                    raise StorageError("a SQLite write transaction is already open in this thread; "
                                       "do the work inside it instead of opening another")
                conn = self._hot_connection()
                self._hot_busy = True
                try:
                    cursor = conn.cursor()
                    cursor.execute("BEGIN IMMEDIATE")
                    try:
                        yield Tx(cursor, self)
                        cursor.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            with contextlib.suppress(sqlite3.Error):
                                conn.rollback()
                        raise
                except sqlite3.Error as exc:
                    raise StorageError(f"database error on {self.safe_url}: {exc}") from exc
                finally:
                    self._hot_busy = False
            return
        with self._write_lock if write else contextlib.nullcontext(), self._raw() as raw:
            cursor = raw.driver_connection.cursor()
            if self.dialect == "sqlite":
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(cursor, self)
            except BaseException:
                raw.rollback()
                raise
            raw.commit()

    def _hot_connection(self) -> Any:
        """This process's SQLite connection for tx() (made on first use, and again after a fork or
        dispose()); the caller holds the write lock."""
        if self._hot is not None and self._hot[0] == os.getpid():
            return self._hot[1]
        conn = sqlite3.connect(self.engine.url.database, timeout=60, check_same_thread=False,
                               isolation_level=None)
        _sqlite_pragmas(conn)
        self._hot = (os.getpid(), conn)
        return conn

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Any]:
        """A DBAPI cursor whose every statement commits on its own (PostgreSQL only): for the single
        statements that do a whole transaction's work in one round trip."""
        if self.dialect != "postgresql":
            raise StorageError("autocommit statements are used on PostgreSQL only")
        with self._raw() as raw:
            conn = raw.driver_connection
            conn.autocommit = True
            try:
                with conn.cursor() as cursor:
                    yield cursor
            finally:
                conn.autocommit = False

    def prepared(self, key: str, build: Any) -> "Prepared":
        """The statement ``key`` compiled for this database (``build()`` makes it the first time)."""
        stmt = self._prepared.get(key)
        if stmt is None:
            from tidyllm.mart.fastsql import Prepared

            built = build()
            stmt, keys = built if isinstance(built, tuple) else (built, None)
            stmt = self._prepared[key] = Prepared(stmt, self.engine.dialect, keys)
        return stmt

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def lock_for_update(self, conn: Connection) -> None:
        """Serialise writers across processes for the rest of ``conn``'s transaction (PostgreSQL advisory lock).

        SQLite needs nothing: ``begin(write=True)`` already holds the database write lock."""
        if self.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7412390001)"))

    # --- schema -------------------------------------------------------------------------------

    def current_revision(self, conn: Connection | None = None) -> str | None:
        """The migration the database is at, or None for a database tidyllm has not touched."""
        def read(c: Connection) -> str | None:
            if not sa.inspect(c).has_table("alembic_version"):
                return None
            return c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

        if conn is not None:
            return read(conn)
        with self.engine.connect() as c:
            return read(c)

    def _ensure_schema(self, upgrade: bool) -> None:
        try:
            revision = self.current_revision()
        except sa.exc.DBAPIError as exc:
            raise StorageError(f"cannot open the mart at {self.safe_url}: {exc.orig}") from exc
        if revision == HEAD_REVISION:
            return
        if self.read_only and revision is None:
            raise StorageError(f"the database at {self.safe_url} is not a tidyllm mart (it has no tidyllm schema "
                               "version); nothing was changed: point --database-url at a mart")
        if self.read_only or revision is not None:
            # (a fresh database is checked again under the migration lock: another process may be creating it)
            self._check_revision(revision)
        if self.read_only:
            raise SchemaVersionError(
                f"the mart at {self.safe_url} is at schema {revision}, this tidyllm needs {HEAD_REVISION}; "
                "run `tidyllm db upgrade` (read commands never migrate)")
        if revision is not None and not upgrade:
            raise SchemaVersionError(
                f"the mart at {self.safe_url} is at schema {revision}, this tidyllm needs {HEAD_REVISION}; "
                "run `tidyllm db upgrade`")
        self.upgrade()

    def _check_revision(self, revision: str | None) -> None:
        if revision is None:
            with self.engine.connect() as conn:
                foreign = set(sa.inspect(conn).get_table_names()) & set(metadata.tables)
            if foreign:
                raise StorageError(
                    f"the database at {self.safe_url} has tables named like tidyllm's ({', '.join(sorted(foreign))}) "
                    "but no tidyllm schema version: it is not a tidyllm mart; point database_url elsewhere")
        elif revision not in _REVISIONS:
            raise SchemaVersionError(
                f"the mart at {self.safe_url} is at schema {revision!r}, newer than this tidyllm knows "
                f"({HEAD_REVISION}); upgrade tidyllm (pip install -U tidyllm)")

    def upgrade(self) -> str:
        """Bring the schema to the newest revision (idempotent, safe with concurrent openers). Returns it."""
        from alembic import command
        from alembic.config import Config

        with self.begin(write=True) as conn:
            self.lock_for_update(conn)
            revision = self.current_revision(conn)
            self._check_revision(revision)
            if revision != HEAD_REVISION:
                cfg = Config()
                cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        return HEAD_REVISION

    def dispose(self) -> None:
        """Close every pooled connection (and the process's own SQLite connection)."""
        with self._write_lock:
            hot, self._hot = self._hot, None
            if hot is not None and hot[0] == os.getpid():
                with contextlib.suppress(Exception):
                    hot[1].close()
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, read_only: bool = False) -> None:
    cur = dbapi_conn.cursor()
    if read_only:
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA query_only=ON")
        cur.close()
        return
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _configure_sqlite(engine: Engine, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (the documented recipe),
        # so BEGIN IMMEDIATE can take the write lock up front.
        dbapi_conn.isolation_level = None
        _sqlite_pragmas(dbapi_conn, read_only)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

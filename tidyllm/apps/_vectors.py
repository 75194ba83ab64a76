"""The vector store behind :class:`tidyllm.apps.Index`: sqlite-vec on SQLite, pgvector on PostgreSQL.

One interface, two dialects. The chunk rows (``rag_indexes``, ``rag_chunks``, declared in
``tidyllm/mart/schema.py``) and the vectors are written in one transaction on one connection, so an
``add()`` that fails leaves nothing half-written. The vectors live in a table per index
(``rag_vec_<hash>``), created on first use with the embedding's dimensions:

- PostgreSQL: in the mart's database, ``vector(N)`` of `pgvector <https://github.com/pgvector/pgvector>`_
  with an HNSW index (``vector_cosine_ops``); the store runs ``CREATE EXTENSION IF NOT EXISTS vector`` (the
  extension must be installed on the server: Debian/Ubuntu ``postgresql-NN-pgvector``).
- SQLite: a ``vec0`` virtual table of `sqlite-vec <https://github.com/asg017/sqlite-vec>`_ (``float[N]``,
  cosine distance), keyed by ``rag_chunks.id``, in a file of its own beside the mart: ``mart.db`` ->
  ``mart.vectors.db`` (with the same ``rag_indexes`` / ``rag_chunks`` tables). Loading the extension needs a
  ``sqlite3`` module that allows it: Python's own when it was built with loadable extensions, else
  ``pysqlite3`` (``pysqlite3-binary``, in the ``apps`` extra on Linux). That can be a second copy of the
  SQLite library in the process, and two copies must never open the same file: POSIX locks are per process,
  so neither copy would see the other's locks (https://www.sqlite.org/howtocorrupt.html, section 2.2). The
  mart's file stays with SQLAlchemy's ``sqlite3``; the vector file only ever with this store's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from abc import ABC, abstractmethod
from typing import Any, Iterable, Sequence

from tidyllm.errors import ConfigurationError, StorageError

__all__ = ["VectorStore", "open_store", "vector_table_name", "vectors_path"]

_CHUNK_COLUMNS = ("index_name", "document", "chunk_key", "location", "section", "page", "text", "text_hash",
                  "tokens", "call_id", "execution_id", "embedded_at")


def vector_table_name(index: str) -> str:
    """The vector table of ``index`` (a hash: index names may hold any character)."""
    return "rag_vec_" + hashlib.sha256(index.encode()).hexdigest()[:16]


def _sqlite_module() -> Any:
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import pysqlite3  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigurationError("this Python's sqlite3 cannot load extensions, which sqlite-vec needs: install "
                                 "pysqlite3-binary (pip install 'tidyllm[apps]') or use a Python built with "
                                 "--enable-loadable-sqlite-extensions") from None
    return pysqlite3


class VectorStore(ABC):
    """Chunk rows and their vectors for every index in one database. Use :func:`open_store`."""

    backend = ""
    placeholder = "?"

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    # --- dialect hooks -----------------------------------------------------------------------------

    def _now(self) -> Any:
        return dt.datetime.now(dt.timezone.utc)

    @abstractmethod
    def create_vectors(self, table: str, dimensions: int) -> None:
        """Create the index's vector table for ``dimensions``-long vectors, unless it exists."""

    @abstractmethod
    def _insert_vectors(self, table: str, rows: Sequence[tuple[int, Sequence[float]]]) -> None:
        """Insert (chunk id, vector) rows."""

    @abstractmethod
    def search(self, index: str, table: str, vector: Sequence[float], k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine distance) of the ``k`` nearest chunks."""

    @abstractmethod
    def _insert_chunk(self, cur: Any, row: dict[str, Any]) -> int:
        """Insert one ``rag_chunks`` row; returns its id."""

    # --- shared SQL ----------------------------------------------------------------------------------

    @abstractmethod
    def _tx(self) -> Any:
        """A context manager: one transaction, committed on success, rolled back on error."""

    def _sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)

    def ensure_index(self, name: str, model: str) -> dict[str, Any]:
        """The index's row, created on first use; a different embedding model than recorded is an error."""
        cur = self.conn.cursor()
        cur.execute(self._sql("SELECT embedding_model, dimensions, vector_table FROM rag_indexes WHERE name = ?"),
                    (name,))
        row = cur.fetchone()
        if row is None:
            now = self._now()
            with self._tx():
                self.conn.cursor().execute(
                    self._sql("INSERT INTO rag_indexes (name, embedding_model, dimensions, backend, vector_table, "
                              "created_at, updated_at) VALUES (?, ?, NULL, ?, ?, ?, ?)"),
                    (name, model, self.backend, vector_table_name(name), now, now))
            return {"embedding_model": model, "dimensions": None, "vector_table": vector_table_name(name)}
        if row[0] != model:
            raise ConfigurationError(f"index {name!r} was built with embedding model {row[0]!r}, not {model!r}: "
                                     f"use Index({name!r}, model={row[0]!r}) or a new index name")
        return {"embedding_model": row[0], "dimensions": row[1], "vector_table": row[2]}

    def existing(self, index: str, document: str) -> dict[str, tuple[int, str]]:
        """chunk_key -> (id, text_hash) of the document's chunks in the index."""
        cur = self.conn.cursor()
        cur.execute(self._sql("SELECT chunk_key, id, text_hash FROM rag_chunks WHERE index_name = ? AND document = ?"),
                    (index, document))
        return {key: (int(cid), digest) for key, cid, digest in cur.fetchall()}

    def documents(self, index: str) -> list[str]:
        """Names of the documents in the index."""
        cur = self.conn.cursor()
        cur.execute(self._sql("SELECT DISTINCT document FROM rag_chunks WHERE index_name = ? ORDER BY document"),
                    (index,))
        return [r[0] for r in cur.fetchall()]

    def write(self, index: str, table: str, dimensions: int, rows: Iterable[tuple[dict[str, Any], Sequence[float]]],
              delete_ids: Sequence[int]) -> None:
        """In one transaction: delete ``delete_ids`` (replaced or gone chunks) and insert ``rows`` with vectors."""
        self.create_vectors(table, dimensions)
        with self._tx():
            cur = self.conn.cursor()
            self._set_dimensions(cur, index, dimensions)
            self._delete(cur, table, delete_ids)
            vectors = []
            for row, vector in rows:
                if len(vector) != dimensions:
                    raise ConfigurationError(f"index {index!r} holds {dimensions}-dimensional vectors; the embedding "
                                             f"model returned {len(vector)}: rebuild the index under a new name")
                vectors.append((self._insert_chunk(cur, {**row, "index_name": index}), vector))
            self._insert_vectors(table, vectors)
            cur.execute(self._sql("UPDATE rag_indexes SET updated_at = ? WHERE name = ?"), (self._now(), index))

    def _set_dimensions(self, cur: Any, index: str, dimensions: int) -> None:
        cur.execute(self._sql("SELECT dimensions FROM rag_indexes WHERE name = ?"), (index,))
        current = cur.fetchone()[0]
        if current is None:
            cur.execute(self._sql("UPDATE rag_indexes SET dimensions = ? WHERE name = ?"), (dimensions, index))
        elif int(current) != dimensions:
            raise ConfigurationError(f"index {index!r} holds {current}-dimensional vectors; the embedding model "
                                     f"returned {dimensions}: rebuild the index under a new name")

    def _delete(self, cur: Any, table: str, ids: Sequence[int]) -> None:
        for cid in ids:
            cur.execute(self._sql(f'DELETE FROM "{table}" WHERE chunk_id = ?'), (cid,))
            cur.execute(self._sql("DELETE FROM rag_chunks WHERE id = ?"), (cid,))

    def chunks(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """The rows of the chunk ``ids``."""
        if not ids:
            return {}
        cur = self.conn.cursor()
        marks = ", ".join([self.placeholder] * len(ids))
        cur.execute(f"SELECT id, document, location, section, page, text, call_id FROM rag_chunks WHERE id IN ({marks})",
                    tuple(ids))
        names = ("id", "document", "location", "section", "page", "text", "call_id")
        return {int(r[0]): dict(zip(names, r)) for r in cur.fetchall()}

    def rows(self, index: str) -> list[dict[str, Any]]:
        """Every ``rag_chunks`` row of the index, in id order."""
        cur = self.conn.cursor()
        cur.execute(self._sql("SELECT * FROM rag_chunks WHERE index_name = ? ORDER BY id"), (index,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def drop(self, index: str, table: str) -> None:
        """Delete the index, its chunks and its vector table."""
        self.conn.cursor().execute(f'DROP TABLE IF EXISTS "{table}"')
        with self._tx():
            cur = self.conn.cursor()
            cur.execute(self._sql("DELETE FROM rag_chunks WHERE index_name = ?"), (index,))
            cur.execute(self._sql("DELETE FROM rag_indexes WHERE name = ?"), (index,))

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class SqliteVectors(VectorStore):
    """sqlite-vec ``vec0`` tables next to the mart's tables in its SQLite file."""

    backend = "sqlite-vec"

    def _tx(self) -> Any:
        return self.conn  # sqlite3: `with conn:` commits, or rolls back on error

    def _now(self) -> Any:
        # the text form SQLAlchemy's DateTime uses on SQLite, so the mart's frames read it back
        return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")

    def create_vectors(self, table: str, dimensions: int) -> None:
        self.conn.execute(f'CREATE VIRTUAL TABLE IF NOT EXISTS "{table}" USING vec0(chunk_id integer primary key, '
                          f"embedding float[{int(dimensions)}] distance_metric=cosine)")

    def _insert_vectors(self, table: str, rows: Sequence[tuple[int, Sequence[float]]]) -> None:
        from sqlite_vec import serialize_float32

        self.conn.executemany(f'INSERT INTO "{table}" (chunk_id, embedding) VALUES (?, ?)',
                              [(cid, serialize_float32(list(v))) for cid, v in rows])

    def _insert_chunk(self, cur: Any, row: dict[str, Any]) -> int:
        cur.execute(f"INSERT INTO rag_chunks ({', '.join(_CHUNK_COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(_CHUNK_COLUMNS))})", tuple(row[c] for c in _CHUNK_COLUMNS))
        return int(cur.lastrowid)

    def search(self, index: str, table: str, vector: Sequence[float], k: int) -> list[tuple[int, float]]:
        from sqlite_vec import serialize_float32

        cur = self.conn.cursor()
        cur.execute(f'SELECT chunk_id, distance FROM "{table}" WHERE embedding MATCH ? AND k = ? ORDER BY distance',
                    (serialize_float32(list(vector)), int(k)))
        return [(int(c), float(d)) for c, d in cur.fetchall()]


class PgVectors(VectorStore):
    """pgvector ``vector(N)`` tables with an HNSW cosine index in the mart's PostgreSQL database."""

    backend = "pgvector"
    placeholder = "%s"

    def _tx(self) -> Any:
        return self.conn.transaction()

    def create_vectors(self, table: str, dimensions: int) -> None:
        cur = self.conn.cursor()
        cur.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (chunk_id bigint PRIMARY KEY REFERENCES rag_chunks(id) '
                    f"ON DELETE CASCADE, embedding vector({int(dimensions)}) NOT NULL)")
        cur.execute(f'CREATE INDEX IF NOT EXISTS "{table}_hnsw" ON "{table}" USING hnsw (embedding vector_cosine_ops)')

    @staticmethod
    def _literal(vector: Sequence[float]) -> str:
        return "[" + ",".join(repr(float(x)) for x in vector) + "]"

    def _insert_vectors(self, table: str, rows: Sequence[tuple[int, Sequence[float]]]) -> None:
        self.conn.cursor().executemany(f'INSERT INTO "{table}" (chunk_id, embedding) VALUES (%s, %s::vector)',
                                       [(cid, self._literal(v)) for cid, v in rows])

    def _insert_chunk(self, cur: Any, row: dict[str, Any]) -> int:
        cur.execute(f"INSERT INTO rag_chunks ({', '.join(_CHUNK_COLUMNS)}) VALUES "
                    f"({', '.join(['%s'] * len(_CHUNK_COLUMNS))}) RETURNING id", tuple(row[c] for c in _CHUNK_COLUMNS))
        return int(cur.fetchone()[0])

    def search(self, index: str, table: str, vector: Sequence[float], k: int) -> list[tuple[int, float]]:
        cur = self.conn.cursor()
        cur.execute(f'SELECT chunk_id, embedding <=> %s::vector AS distance FROM "{table}" ORDER BY distance LIMIT %s',
                    (self._literal(vector), int(k)))
        return [(int(c), float(d)) for c, d in cur.fetchall()]


def vectors_path(database: str) -> str:
    """The SQLite vector file beside the mart file ``database`` (``mart.db`` -> ``mart.vectors.db``)."""
    from pathlib import Path

    path = Path(database)
    if path.name.endswith(".vectors.db"):
        return str(path)
    return str(path.with_name(path.stem + ".vectors.db"))


def _sqlite_schema(conn: Any) -> None:
    """The mart's ``rag_indexes`` / ``rag_chunks`` tables, declared in schema.py, in the vector file."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateTable

    from tidyllm.mart.schema import rag_chunks, rag_indexes

    with conn:
        for table in (rag_indexes, rag_chunks):
            conn.execute(str(CreateTable(table, if_not_exists=True).compile(dialect=sqlite.dialect())))


def open_store(url: str) -> VectorStore:
    """The vector store for the mart at SQLAlchemy ``url`` (PostgreSQL: its schema must be current)."""
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigurationError("a RAG index needs a SQLite file (database_url sqlite:///path.db), not memory")
        module = _sqlite_module()
        path = vectors_path(parsed.database)
        try:
            conn = module.connect(path, timeout=30.0, isolation_level="DEFERRED")
            conn.enable_load_extension(True)
            import sqlite_vec

            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
            _sqlite_schema(conn)
        except module.Error as exc:
            raise StorageError(f"cannot open the vector store {path}: {exc}") from None
        return SqliteVectors(conn)
    if backend == "postgresql":
        import psycopg

        dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            conn = psycopg.connect(dsn, autocommit=True)  # reads stand alone; writes open a transaction
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as exc:
            safe = parsed.render_as_string(hide_password=True)
            hint = (" — install pgvector on the server (Debian/Ubuntu: apt-get install postgresql-NN-pgvector)"
                    if "vector" in str(exc) else "")
            raise StorageError(f"cannot open the vector store in {safe}: {str(exc).strip()}{hint}") from None
        return PgVectors(conn)
    raise ConfigurationError(f"RAG indexes need SQLite or PostgreSQL, not {backend!r}")

"""The tamper-evident audit trail: one append-only, hash-chained row per governed call and per
administrative change (``decision`` ``admin`` / ``admin_refused``, see :mod:`tidyllm.governance.admin`).

Each row's ``digest`` is SHA-256 over the previous row's digest and the row's canonical content
(its columns as sorted-key JSON, timestamps in UTC ISO form). The single ``audit_head`` row
records the newest digest and the row count, so deleting the newest rows is detected too; its
row lock serialises appends on PostgreSQL (SQLite's write lock does it there). A database writer can
recompute the chain; signed checkpoints kept outside the database (:mod:`tidyllm.governance.checkpoints`)
are what detect that.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tidyllm.errors import ConfigurationError
from tidyllm.mart.fastsql import Tx
from tidyllm.mart.schema import audit_head, audit_log
from tidyllm.mart.store import dumps
from tidyllm.redact import redact

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.mart import TidyMart

__all__ = ["AuditTrail", "VerifyResult", "GENESIS", "content_digest"]

GENESIS = "0" * 64
_CHAINED = [c.name for c in audit_log.columns if c.name not in ("seq", "digest")]
_JSON_COLUMNS = ("content", "tools", "extra")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`AuditTrail.verify`."""

    ok: bool
    rows: int
    #: seq of the first row that does not verify (None when ok)
    first_broken_seq: int | None = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"audit chain verified: {self.rows} rows intact"
        return f"audit chain BROKEN at row seq={self.first_broken_seq}: {self.reason} ({self.rows} rows read)"


def _canon_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, str) and value[:1] in "[{":
        try:  # JSON columns come back as text from some drivers: canonicalise the parsed value
            return json.loads(value)
        except ValueError:
            return value
    return value


def canonical_content(row: Mapping[str, Any]) -> str:
    """A row's canonical content: its chained columns as sorted-key JSON, timestamps in UTC ISO form."""
    return json.dumps({k: _canon_value(row.get(k)) for k in _CHAINED if k != "prev_digest"},
                      sort_keys=True, separators=(",", ":"), default=str)


def content_digest(prev_digest: str, row: Mapping[str, Any]) -> str:
    """The digest a row with content ``row`` must have after ``prev_digest``: SHA-256 of the previous
    digest, a newline and the canonical content, in UTF-8 (PostgreSQL computes the same in
    :meth:`AuditTrail.append_sql`)."""
    return hashlib.sha256((prev_digest + "\n" + canonical_content(row)).encode("utf-8")).hexdigest()


def hash_content(messages: Any) -> str:
    """SHA-256 of a request's messages (what ``audit.capture: hash`` stores)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class AuditTrail:
    """Append to, verify and export the audit trail."""

    def __init__(self, mart: "TidyMart", *, capture: str = "hash") -> None:
        if capture not in ("none", "hash", "full"):
            raise ConfigurationError(f"audit.capture must be none, hash or full; got {capture!r}")
        self._mart = mart
        self._store = mart.store
        self.capture = capture

    def content_fields(self, messages: Any, tools: Any = None) -> dict[str, Any]:
        """The content columns for a request under the capture policy."""
        out: dict[str, Any] = {"content_hash": None, "content": None}
        if messages is not None and self.capture in ("hash", "full"):
            out["content_hash"] = hash_content(messages)
        if self.capture == "full":
            out["content"] = messages
        names = _tool_names(tools)
        out["tools"] = names or None
        return out

    @staticmethod
    def row_data(row: Mapping[str, Any]) -> dict[str, Any]:
        """The chained columns of a new row (an id given, the error redacted)."""
        data = {k: row.get(k) for k in _CHAINED if k not in ("prev_digest",)}
        data["id"] = data.get("id") or str(uuid.uuid4())
        data["error"] = redact(data.get("error"))
        return data

    def append_sql(self, row: Mapping[str, Any], when: str = "true") -> tuple[str, dict[str, Any]]:
        """PostgreSQL: a CTE named ``aud`` that appends ``row`` (if the SQL condition ``when`` holds) after
        the digest of a CTE named ``head`` (the chain head, locked ``FOR UPDATE`` by the caller's
        statement), and one named ``adv`` that advances the head; with its parameters (prefixed ``a_``).
        The server computes the digest from the same bytes :func:`content_digest` hashes."""
        data = self.row_data(row)
        params = {f"a_{k}": v for k, v in data.items()}
        for k in _JSON_COLUMNS:
            params[f"a_{k}"] = None if data.get(k) is None else dumps(data[k])
        params["a_canonical"] = canonical_content(data).encode("utf-8")
        cols = [c for c in _CHAINED if c != "prev_digest"]
        values = ", ".join(f"%(a_{c})s::json" if c in _JSON_COLUMNS else f"%(a_{c})s" for c in cols)
        sql = f"""aud AS (
    INSERT INTO audit_log ({", ".join(cols)}, prev_digest, digest)
    SELECT {values}, head.digest,
           encode(sha256(convert_to(head.digest || E'\\n', 'UTF8') || %(a_canonical)s::bytea), 'hex')
    FROM head WHERE {when}
    RETURNING seq, digest
), adv AS (
    UPDATE audit_head h SET seq = aud.seq, digest = aud.digest, rows = h.rows + 1 FROM aud WHERE h.id = 1
)"""
        return sql, params

    def append(self, conn: Any, row: Mapping[str, Any]) -> dict[str, Any]:
        """Append one row in the caller's write transaction (a :class:`~tidyllm.mart.fastsql.Tx` or a
        SQLAlchemy connection); returns it with seq and digest."""
        tx = Tx.of(conn, self._store)
        data = self.row_data(row)
        head = tx.one("audit_head.lock", _q_lock_head)
        if head is None:
            tx.run("audit_head.create", lambda: _q_create_head(self._store.dialect))
            head = tx.one("audit_head.lock", _q_lock_head)
        prev = head[0]
        digest = content_digest(prev, data)
        if tx.dialect == "postgresql":
            seq = tx.one("audit_log.insert", _q_insert_returning, prev_digest=prev, digest=digest, **data)[0]
        else:
            seq = tx.run("audit_log.insert", _q_insert, prev_digest=prev, digest=digest, **data).lastrowid
        tx.run("audit_head.advance", _q_advance_head, new_seq=seq, new_digest=digest)
        return {**data, "seq": seq, "prev_digest": prev, "digest": digest}

    def _rows(self, conn: Connection) -> Iterator[Mapping[str, Any]]:
        result = conn.execution_options(yield_per=2000).execute(sa.select(audit_log).order_by(audit_log.c.seq))
        for row in result.mappings():
            yield row

    def verify(self) -> VerifyResult:
        """Re-compute the chain; report the first row that was edited, deleted, inserted or reordered."""
        n = 0
        with self._store.begin() as conn:
            head = conn.execute(sa.select(audit_head)).mappings().first()
            prev = GENESIS
            for row in self._rows(conn):
                n += 1
                if row["prev_digest"] != prev:
                    return VerifyResult(False, n, row["seq"],
                                        "its link does not match the previous row (a row before it was deleted, "
                                        "inserted or reordered)")
                if content_digest(prev, row) != row["digest"]:
                    return VerifyResult(False, n, row["seq"], "its content was changed after it was written")
                prev = row["digest"]
            expected_rows = head["rows"] if head else 0
            if head is not None and (head["digest"] != prev or expected_rows != n):
                return VerifyResult(False, n, (head["seq"] if head else None),
                                    f"the chain head records {expected_rows} rows ending in {head['digest'][:12]}…, "
                                    f"but {n} rows end in {prev[:12]}… (newest rows deleted or the head edited)")
        return VerifyResult(True, n)

    def frame(self, *, limit: int | None = None, **filters: Any) -> "pd.DataFrame":
        """Audit rows, oldest first (``limit`` keeps the newest ``limit`` rows)."""
        if limit is not None:
            df = self._mart.frame("audit_log", order_by="-seq", limit=limit, **filters)
            return df.iloc[::-1].reset_index(drop=True)
        return self._mart.frame("audit_log", **filters)

    def export(self, fmt: str = "csv", *, since: Any = None, until: Any = None, **filters: Any) -> str:
        """The audit rows as CSV or JSON Lines text, filtered by column equality and a time range."""
        if fmt not in ("csv", "jsonl"):
            raise ConfigurationError(f"export format must be csv or jsonl, got {fmt!r}")
        import pandas as pd

        df = self._mart.frame("audit_log", parse_json=True, **filters)
        if since is not None:
            df = df[df["recorded_at"] >= pd.Timestamp(since, tz="UTC")]
        if until is not None:
            df = df[df["recorded_at"] < pd.Timestamp(until, tz="UTC")]
        records = df.to_dict("records")
        for r in records:
            for k, v in list(r.items()):
                if isinstance(v, pd.Timestamp):
                    r[k] = v.isoformat()
                elif v is pd.NA or (isinstance(v, float) and v != v):
                    r[k] = None
        if fmt == "jsonl":
            return "".join(json.dumps(r, default=str, sort_keys=True) + "\n" for r in records)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(df.columns))
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
        return buf.getvalue()

    def show(self, call_id: str) -> dict[str, Any] | None:
        """The audit row of one call (the newest when a call has several attempts)."""
        with self._store.begin() as conn:
            row = conn.execute(sa.select(audit_log).where(audit_log.c.call_id == call_id)
                               .order_by(audit_log.c.seq.desc())).mappings().first()
        return dict(row) if row else None


def _tool_names(tools: Any) -> list[str]:
    names = []
    for tool in tools or []:
        if isinstance(tool, Mapping):
            fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
            name = fn.get("name")
            if isinstance(name, str):
                names.append(name)
    return names


# --- prepared statements (see tidyllm.mart.fastsql) ---------------------------------------------

_INSERTED = [c.name for c in audit_log.columns if c.name != "seq"]


def _q_lock_head() -> Any:
    return sa.select(audit_head.c.digest).where(audit_head.c.id == 1).with_for_update()


def _q_create_head(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(audit_head).values(id=1, seq=0, digest=GENESIS, rows=0).on_conflict_do_nothing()


def _q_insert() -> Any:
    return audit_log.insert(), _INSERTED


def _q_insert_returning() -> Any:
    return audit_log.insert().returning(audit_log.c.seq), _INSERTED


def _q_advance_head() -> Any:
    h = audit_head.c
    return audit_head.update().where(h.id == 1).values(
        seq=sa.bindparam("new_seq", type_=h.seq.type), digest=sa.bindparam("new_digest", type_=h.digest.type),
        rows=h.rows + 1)

"""Proxy API keys bound to identities: create, list, revoke, rotate, and check one on each request.

A key is ``sk-tidy-`` and 43 random URL-safe characters (256 bits). The mart keeps only its SHA-256
digest (``proxy_keys.key_hash``) and its first characters (``prefix``, to recognise it in a
listing); the key itself is returned once, by :meth:`KeyStore.create` / :meth:`KeyStore.rotate`. A
fast digest is enough here: a random 256-bit key cannot be guessed from its digest, unlike a
password, so there is nothing for a slow hash to protect.

Every change (created, revoked, rotated) and every refused key leaves one audit row
(``decision`` "admin" or "refused", ``rule`` ``proxy_key:<what>``), never with the key in it.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.governance.audit import AuditTrail
    from tidyllm.mart import TidyMart

__all__ = ["KeyStore", "Identity", "KeyRefused", "parse_ttl", "KEY_PREFIX", "hash_key"]

#: every tidyllm proxy key starts with this (secret scanners and the log redactor can spot one)
KEY_PREFIX = "sk-tidy-"
#: characters of a key kept in the mart to recognise it (the prefix and 6 random characters: 36 bits)
_SHOWN = len(KEY_PREFIX) + 6
_TTL = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_TTL_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def hash_key(key: str) -> str:
    """The SHA-256 hex digest a key is stored and looked up by."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_ttl(text: str | None) -> dt.timedelta | None:
    """``"90d"``, ``"12h"``, ``"2w"``, ``"30m"``, ``"45s"`` as a duration; None/"never" for no expiry."""
    if text is None or str(text).strip().lower() in ("", "never", "none"):
        return None
    match = _TTL.match(str(text))
    if not match or int(match.group(1)) == 0:
        raise ConfigurationError(f"--ttl {text!r} is not a duration; use a number and a unit like 90d, 12h, 2w, "
                                 "30m, or 'never'")
    return dt.timedelta(seconds=int(match.group(1)) * _TTL_SECONDS[match.group(2)])


@dataclass(frozen=True)
class Identity:
    """Who a proxy key speaks for: what tidyllm governs the key's calls as."""

    key_id: str
    department: str
    #: None for an application key: the request's OpenAI ``user`` field (or metadata user_id) names the user
    user_id: str | None = None
    #: glob patterns of the routes and groups the key may call; empty: any the authorisation policy allows
    routes: tuple[str, ...] = ()

    def allows(self, model: str) -> bool:
        """Whether the key may call route or group ``model``."""
        return not self.routes or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.routes)


class KeyRefused(Exception):
    """A key the proxy does not accept: unknown, revoked or expired (``reason``); the message is for the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeyStore:
    """The proxy's keys in the mart, with a short in-process cache for the per-request check.

    ``cache_seconds`` is how long an accepted key is trusted without reading the mart again: a
    revocation made by another process takes effect within that time (0: read on every request)."""

    def __init__(self, mart: "TidyMart", audit: "AuditTrail", *, cache_seconds: float = 5.0) -> None:
        self._mart = mart
        self._audit = audit
        self.cache_seconds = float(cache_seconds)
        self._cache: dict[str, tuple[float, Identity]] = {}
        self._lock = threading.Lock()

    # --- administration -------------------------------------------------------------------------

    def create(self, *, department: str, user_id: str | None = None, ttl: str | dt.timedelta | None = None,
               routes: Sequence[str] = (), note: str | None = None, actor: str | None = None) -> tuple[dict[str, Any], str]:
        """Create a key for ``department`` (and ``user_id``); returns its row and the key, shown this once."""
        return self._create(department=department, user_id=user_id, ttl=ttl, routes=routes, note=note, actor=actor)

    def _create(self, *, department: str, user_id: str | None, ttl: str | dt.timedelta | None,
                routes: Sequence[str], note: str | None, actor: str | None, conn: Any = None,
                rotated_from: str | None = None) -> tuple[dict[str, Any], str]:
        from tidyllm.mart.schema import proxy_keys
        from tidyllm.mart.store import utcnow

        department = _name("department", department)
        user_id = _name("user", user_id) if user_id is not None else None
        patterns = tuple(_name("route pattern", r) for r in routes)
        life = parse_ttl(ttl) if not isinstance(ttl, dt.timedelta) else ttl
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        row = {"id": str(uuid.uuid4()), "key_hash": hash_key(key), "prefix": key[:_SHOWN], "user_id": user_id,
               "department": department, "routes": list(patterns) or None, "note": note, "created_at": now,
               "expires_at": now + life if life is not None else None, "revoked_at": None, "replaced_by": None}

        def write(c: Any) -> None:
            c.execute(proxy_keys.insert().values(**row))
            self._audit_admin(c, "rotated" if rotated_from else "created", row, actor,
                              {"rotated_from": rotated_from} if rotated_from else {})

        if conn is not None:
            write(conn)
        else:
            with self._mart.store.begin(write=True) as c:
                write(c)
        return _public(row), key

    def list(self, *, include_revoked: bool = False) -> "pd.DataFrame":
        """The keys (never the key itself): id, prefix, user, department, routes, dates, state."""
        import pandas as pd
        import sqlalchemy as sa

        from tidyllm.mart.schema import proxy_keys
        from tidyllm.mart.store import as_utc, utcnow

        query = sa.select(proxy_keys).order_by(proxy_keys.c.created_at)
        if not include_revoked:
            query = query.where(proxy_keys.c.revoked_at.is_(None))
        with self._mart.store.begin() as conn:
            rows = [_public(dict(r)) for r in conn.execute(query).mappings()]
        now = utcnow()
        for r in rows:
            expires = as_utc(r["expires_at"])
            r["state"] = "revoked" if r["revoked_at"] else "expired" if expires and expires <= now else "live"
        columns = ["id", "prefix", "user_id", "department", "routes", "state", "created_at", "expires_at",
                   "revoked_at", "replaced_by", "note"]
        return pd.DataFrame(rows, columns=columns)

    def revoke(self, key_id: str, *, actor: str | None = None) -> dict[str, Any]:
        """Revoke key ``key_id`` (an id or a unique prefix of one); returns its row. Idempotent."""
        import sqlalchemy as sa

        from tidyllm.mart.schema import proxy_keys
        from tidyllm.mart.store import utcnow

        with self._mart.store.begin(write=True) as conn:
            row = self._find(conn, key_id)
            if row["revoked_at"] is None:
                row["revoked_at"] = utcnow()
                conn.execute(sa.update(proxy_keys).where(proxy_keys.c.id == row["id"])
                             .values(revoked_at=row["revoked_at"]))
                self._audit_admin(conn, "revoked", row, actor, {})
        self._forget(row["key_hash"])
        return _public(row)

    def rotate(self, key_id: str, *, ttl: str | dt.timedelta | None = None,
               actor: str | None = None) -> tuple[dict[str, Any], str]:
        """Replace live key ``key_id`` by a new key with the same identity (and routes); the old one stops
        working at once. ``ttl`` sets the new key's lifetime (default: the old key's). Returns the new
        key's row and the key, shown this once."""
        import sqlalchemy as sa

        from tidyllm.mart.schema import proxy_keys
        from tidyllm.mart.store import as_utc, utcnow

        with self._mart.store.begin(write=True) as conn:
            old = self._find(conn, key_id)
            if old["revoked_at"] is not None:
                raise ConfigurationError(f"key {old['id']} is revoked; create a new one with `tidyllm keys create`")
            if ttl is None and old["expires_at"] is not None:
                life = as_utc(old["expires_at"]) - as_utc(old["created_at"])
            else:
                life = ttl
            new, key = self._create(department=old["department"], user_id=old["user_id"], ttl=life,
                                    routes=old["routes"] or (), note=old["note"], actor=actor, conn=conn,
                                    rotated_from=old["id"])
            conn.execute(sa.update(proxy_keys).where(proxy_keys.c.id == old["id"])
                         .values(revoked_at=utcnow(), replaced_by=new["id"]))
        self._forget(old["key_hash"])
        return new, key

    def _find(self, conn: Any, key_id: str) -> dict[str, Any]:
        import sqlalchemy as sa

        from tidyllm.mart.schema import proxy_keys

        key_id = str(key_id).strip()
        if key_id.startswith(KEY_PREFIX):
            raise ConfigurationError("pass the key's id (from `tidyllm keys list`), not the key itself")
        if len(key_id) < 4:
            raise ConfigurationError(f"key id {key_id!r} is too short; give at least 4 characters of an id from "
                                     "`tidyllm keys list`")
        rows = conn.execute(sa.select(proxy_keys).where(proxy_keys.c.id.startswith(key_id, autoescape=True))
                            .limit(2)).mappings().all()
        if not rows:
            raise ConfigurationError(f"no key with id {key_id!r}; see `tidyllm keys list --all`")
        if len(rows) > 1:
            raise ConfigurationError(f"{key_id!r} matches several keys; give more of the id")
        return dict(rows[0])

    def _audit_admin(self, conn: Any, what: str, row: dict[str, Any], actor: str | None,
                     extra: dict[str, Any]) -> None:
        from tidyllm.mart.store import utcnow

        self._audit.append(conn, {
            "recorded_at": utcnow(), "user_id": row["user_id"], "department": row["department"],
            "audit_reason": f"proxy key {what}" + (f" by {actor}" if actor else ""), "decision": "admin",
            "rule": f"proxy_key:{what}", "status": "success",
            "extra": {"key_id": row["id"], "prefix": row["prefix"], "routes": row["routes"],
                      "expires_at": row["expires_at"].isoformat() if row.get("expires_at") else None, **extra}})

    # --- the per-request check ------------------------------------------------------------------

    def check(self, key: str | None, *, client: str | None = None, route: str | None = None) -> Identity:
        """The identity of ``key``; raises :class:`KeyRefused` (after auditing it) for a key that is missing,
        unknown, revoked or expired. ``client`` (an address) and ``route`` (the API path) go in the audit row."""
        key = (key or "").strip()
        if key.lower().startswith("bearer "):
            key = key[7:].strip()
        digest = hash_key(key) if key else ""
        now = time.monotonic()
        if digest:
            with self._lock:
                hit = self._cache.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        import sqlalchemy as sa

        from tidyllm.mart.schema import proxy_keys
        from tidyllm.mart.store import as_utc, utcnow

        row = None
        if digest:
            with self._mart.store.begin() as conn:
                found = conn.execute(sa.select(proxy_keys).where(proxy_keys.c.key_hash == digest)).mappings().first()
            row = dict(found) if found is not None else None
        if row is None:
            reason, message = ("missing", "no API key: send `Authorization: Bearer sk-tidy-...` (a key from "
                                          "`tidyllm keys create`)") if not key else \
                ("unknown", "unknown API key; ask your platform team for a key (`tidyllm keys create`)")
            self._refuse(reason, message, row, client, route, key)
        assert row is not None
        if row["revoked_at"] is not None:
            self._refuse("revoked", f"API key {row['prefix']}… was revoked"
                         + ("; use the key that replaced it" if row["replaced_by"] else ""), row, client, route, key)
        expires = as_utc(row["expires_at"])
        if expires is not None and expires <= utcnow():
            self._refuse("expired", f"API key {row['prefix']}… expired at {expires:%Y-%m-%d %H:%M} UTC; rotate it "
                         "with `tidyllm keys rotate`", row, client, route, key)
        identity = Identity(key_id=row["id"], department=row["department"], user_id=row["user_id"],
                            routes=tuple(row["routes"] or ()))
        if self.cache_seconds > 0:
            until = now + self.cache_seconds
            if expires is not None:
                # never trust a key past its expiry from the cache
                until = min(until, now + max(0.0, (expires - utcnow()).total_seconds()))
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (until, identity)
        return identity

    def _refuse(self, reason: str, message: str, row: dict[str, Any] | None, client: str | None,
                route: str | None, key: str) -> None:
        from tidyllm.mart.store import utcnow

        extra = {"key_id": row["id"] if row else None, "prefix": row["prefix"] if row else _safe_prefix(key),
                 "client": client, "path": route}
        with self._mart.store.begin(write=True) as conn:
            self._audit.append(conn, {
                "recorded_at": utcnow(), "user_id": row["user_id"] if row else None,
                "department": row["department"] if row else None, "decision": "refused",
                "rule": f"proxy_key:{reason}", "status": "refused", "error": f"KeyRefused: {message}",
                "extra": {k: v for k, v in extra.items() if v is not None}})
        raise KeyRefused(reason, message)

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._cache.pop(digest, None)


def _safe_prefix(key: str) -> str | None:
    """What of a refused key may be written down: tidyllm's prefix and 6 characters, nothing of another kind."""
    return key[:_SHOWN] if key.startswith(KEY_PREFIX) else None


def _name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"a proxy key needs a non-empty {what}")
    if len(value) > 200:
        raise ConfigurationError(f"{what} {value[:40]!r}… is longer than 200 characters")
    return value.strip()


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "key_hash"}

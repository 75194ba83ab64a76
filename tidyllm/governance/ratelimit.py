"""Requests- and tokens-per-minute limits per user, department and route, shared through the mart.

The tracking-server AI Gateway has no rate limits and the legacy gateway's are per worker and
in memory, so tidyllm enforces its own before the call: inside the same write transaction as
the budget reservation, it counts the calls admitted in the last 60 seconds for each limited
scope (table ``rate_events``), so every process sharing the mart sees one limit.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import sqlalchemy as sa

from tidyllm.errors import ConfigurationError
from tidyllm.governance.names import normalize_name
from tidyllm.mart.schema import rate_events
from tidyllm.mart.store import as_utc

if TYPE_CHECKING:
    from tidyllm.governance.context import CallContext
    from tidyllm.mart.fastsql import Tx

__all__ = ["RateLimiter", "RateLimit"]

_WINDOW = dt.timedelta(seconds=60)
_COLUMN = {"user": "user_id", "department": "department", "route": "route"}


@dataclass(frozen=True)
class RateLimit:
    """``rpm`` requests and/or ``tpm`` worst-case tokens per minute for one scope and name ("*" = each)."""

    scope: str
    name: str
    rpm: int | None = None
    tpm: int | None = None


class RateLimiter:
    """Sliding one-minute windows over ``rate_events``."""

    def __init__(self, limits: Sequence[Mapping[str, Any]] = ()) -> None:
        self.limits: list[RateLimit] = []
        for i, raw in enumerate(limits):
            scope = raw.get("scope")
            if scope not in _COLUMN:
                raise ConfigurationError(f"rate_limits #{i + 1}: scope must be user, department or route, got {scope!r}")
            name = raw.get("name", "*")
            values = {}
            for key in ("rpm", "tpm"):
                value = raw.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ConfigurationError(f"rate_limits #{i + 1}: {key} must be a positive whole number, got {value!r}")
                values[key] = value
            if not values["rpm"] and not values["tpm"]:
                raise ConfigurationError(f"rate_limits #{i + 1}: give rpm and/or tpm")
            # user and department names are matched normalised, as every call's are
            name = str(name)
            if scope != "route" and name != "*":
                name = normalize_name(name)
            self.limits.append(RateLimit(scope, name, values["rpm"], values["tpm"]))
        self._next_prune = 0.0

    def check_and_record(self, tx: "Tx", ctx: "CallContext", route: str | None, tokens: int,
                         now: dt.datetime) -> tuple[str, float] | None:
        """Record an admitted call, or return ``(message, retry_after_seconds)`` when a limit is reached.

        Runs in the caller's write transaction; events older than the window are pruned every ten seconds."""
        if not self.limits:
            return None
        since = now - _WINDOW
        if time.monotonic() >= self._next_prune:
            tx.run("rate_events.prune", _q_prune, before=since - _WINDOW)
            self._next_prune = time.monotonic() + 10.0
        values = {"user": ctx.user_id, "department": ctx.department, "route": route}
        for limit in self.limits:
            value = values[limit.scope]
            if value is None or (limit.name != "*" and limit.name != value):
                continue
            column = _COLUMN[limit.scope]
            count, used, oldest = tx.one(f"rate_events.window.{column}", lambda: _q_window(column),
                                         value=value, since=since)
            over = None
            if limit.rpm is not None and count + 1 > limit.rpm:
                over = f"{limit.rpm} requests per minute"
            elif limit.tpm is not None and used + tokens > limit.tpm:
                over = f"{limit.tpm} tokens per minute ({used} used, this call may use {tokens})"
            if over:
                oldest = as_utc(oldest)
                retry = max(0.0, ((oldest or now) + _WINDOW - now).total_seconds())
                return (f"{limit.scope} {value!r} reached its limit of {over}; retry after {retry:.1f} s", retry)
        tx.run("rate_events.insert", _q_insert, id=str(uuid.uuid4()), at=now, user_id=ctx.user_id,
               department=ctx.department, route=route, tokens=int(tokens))
        return None


def _q_prune() -> Any:
    return rate_events.delete().where(rate_events.c.at < sa.bindparam("before"))


def _q_window(column: str) -> Any:
    e = rate_events.c
    return (sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(e.tokens), 0), sa.func.min(e.at))
            .where(e[column] == sa.bindparam("value"), e.at >= sa.bindparam("since")))


def _q_insert() -> Any:
    return rate_events.insert(), [c.name for c in rate_events.c]

"""Hard hierarchical budgets with reserve-then-settle leases.

Scopes nest org ⊃ department ⊃ user (plus per-route and per-model budgets); periods are day,
week (from Monday), month and total, starting at midnight in the configured time zone. Before a
call the worst-case cost is reserved against *every* applicable budget's current window in one
transaction — ``BEGIN IMMEDIATE`` on SQLite, ``SELECT … FOR UPDATE`` row locks (taken in a fixed
order) on PostgreSQL — so concurrent callers in any number of threads, processes or hosts can
never together exceed a limit. After the call the reservation settles to the actual cost or is
released. A reservation is a lease: when its process dies it expires after a TTL and its amount
returns to the budget.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tidyllm.errors import ConfigurationError
from tidyllm.governance.names import normalize_name
from tidyllm.mart.fastsql import Tx, json_value
from tidyllm.mart.schema import budget_events, budget_windows, budgets, lease_owners, reservations
from tidyllm.mart.store import as_utc, utcnow
from tidyllm.money import usd

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.governance.context import CallContext
    from tidyllm.mart import TidyMart

__all__ = ["BudgetLedger", "Reservation", "Refusal", "Lease", "LeaseOwners", "SCOPES", "PERIODS", "usd",
           "window_bounds"]

log = logging.getLogger("tidyllm.governance")

SCOPES = ("org", "department", "user", "route", "model")
PERIODS = ("day", "week", "month", "total")
_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
#: a clamped answer shorter than this is no answer: refuse instead
MIN_CLAMPED_TOKENS = 16


@dataclass(frozen=True)
class Reservation:
    """A lease held for one call."""

    id: str
    amount_usd: float
    #: max_tokens to send (clamped to the headroom when the worst case did not fit)
    max_tokens: int
    clamped: bool
    windows: tuple[tuple[str, str], ...]
    #: an admission-credit block (see tidyllm.governance.credit), not one call's lease
    credit: bool = False


@dataclass(frozen=True)
class Lease:
    """An open reservation being reclaimed (see :meth:`BudgetLedger.expire_leases`)."""

    id: str
    amount: float
    windows: tuple[tuple[str, ...], ...]
    #: the call it pays for, or ``credit:<id>`` for an admission-credit block
    call_id: str
    #: ``host:pid:start`` of the process that held it
    owner: str | None


class LeaseOwners:
    """This process as a lease owner: its id on every reservation it makes, and — on a shared
    (PostgreSQL) mart — a heartbeat in ``lease_owners``, so that other hosts can tell it is alive."""

    def __init__(self, store: Any, *, heartbeat_seconds: float = 2.0) -> None:
        self._store = store
        self.heartbeat_seconds = float(heartbeat_seconds)
        self._pid = -1
        self._owner = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def owner(self) -> str:
        """This process's owner id (``host:pid:start``; a forked child gets its own)."""
        if self._pid != os.getpid():
            from tidyllm.governance.spool import owner_id

            self._owner = owner_id()
            self._pid = os.getpid()
            self._thread = None
        return self._owner

    def start(self) -> None:
        """Register this process and keep its heartbeat (PostgreSQL marts: they span hosts)."""
        owner = self.owner
        if self._store.dialect != "postgresql" or self._thread is not None:
            return
        self._beat(owner)
        self._thread = threading.Thread(target=self._run, args=(owner,), name="tidyllm-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _beat(self, owner: str) -> None:
        from sqlalchemy.dialects.postgresql import insert

        host, pid, _ = owner.rsplit(":", 2)
        now = utcnow()
        statement = insert(lease_owners).values(owner=owner, host=host, pid=int(pid), started_at=now,
                                                heartbeat_at=now)
        with self._store.begin(write=True) as conn:
            conn.execute(statement.on_conflict_do_update(index_elements=[lease_owners.c.owner],
                                                         set_={"heartbeat_at": now}))

    def _run(self, owner: str) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if owner != self.owner:
                return
            try:
                self._beat(owner)
            except Exception:  # noqa: BLE001 - a missed beat only lets another host reclaim sooner
                log.debug("lease heartbeat failed", exc_info=True)

    def why_reclaim(self, owner: str | None, expires_at: dt.datetime | None, heartbeat: dt.datetime | None,
                    now: dt.datetime, alive: dict[str, bool | None]) -> str | None:
        """Why a lease held by ``owner`` should be reclaimed now, or None."""
        from tidyllm.governance.spool import owner_alive

        if owner and owner != self.owner:
            if owner not in alive:
                alive[owner] = owner_alive(owner)
            if alive[owner] is False:
                return "owner-dead"
            if alive[owner] is None and heartbeat is not None \
                    and (now - heartbeat).total_seconds() > 3 * self.heartbeat_seconds:
                return "owner-silent"
        if expires_at is not None and expires_at < now:
            return "expired"
        return None


@dataclass(frozen=True)
class Refusal:
    """Why a reservation could not be made: the tightest budget."""

    budget_id: str
    scope: str
    name: str
    period: str
    limit_usd: float
    spent_usd: float
    reserved_usd: float
    needed_usd: float

    @property
    def remaining_usd(self) -> float:
        return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)

    def message(self) -> str:
        return (f"{self.scope} {self.name!r} has {usd(self.remaining_usd)} left of {usd(self.limit_usd)} "
                f"this {self.period if self.period != 'total' else 'budget'} (spent {usd(self.spent_usd)}, "
                f"reserved {usd(max(self.reserved_usd, 0.0))}); this call needs up to {usd(self.needed_usd)}. "
                f"Raise it with `tidyllm budget set {self.scope} {self.name} <usd> --period {self.period}`")


def _alert_thresholds(value: Any) -> list[float] | None:
    """A budget's own alert thresholds, sorted, each a fraction of the limit above 0 (None: the default)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(f"thresholds must be a list of fractions like [0.5, 0.8, 1.0], got {value!r}")
    out = set()
    for v in value:
        try:
            t = float(v)
        except (TypeError, ValueError):
            raise ConfigurationError(f"thresholds must be fractions like 0.8, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(t) or t <= 0:
            raise ConfigurationError(f"thresholds must be fractions of the limit above 0, got {v!r}")
        out.add(t)
    return sorted(out)


def window_bounds(period: str, now: dt.datetime, tz: ZoneInfo) -> tuple[dt.datetime, dt.datetime | None]:
    """UTC start and end of the ``period`` window containing ``now`` in time zone ``tz``."""
    if period == "total":
        return _EPOCH, None
    local = now.astimezone(tz)
    if period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    elif period == "week":
        start = (local - dt.timedelta(days=local.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=7)
    else:
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    # re-localise so DST changes inside the window give the right UTC instant
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    end = end.replace(tzinfo=None).replace(tzinfo=tz)
    return start.astimezone(dt.timezone.utc), end.astimezone(dt.timezone.utc)


class BudgetLedger:
    """Budgets, their windows and reservations, in the mart. Thread- and process-safe."""

    def __init__(self, mart: "TidyMart", *, timezone: str = "UTC", lease_ttl_seconds: float = 300.0,
                 soft_threshold: float = 0.8, credit_calls: int = 32, heartbeat_seconds: float = 2.0) -> None:
        try:
            self.tz = ZoneInfo(timezone)
        except Exception as exc:  # ZoneInfoNotFoundError, ValueError
            raise ConfigurationError(f"unknown time zone {timezone!r}; use an IANA name like 'UTC' or "
                                     "'Europe/Paris'") from exc
        self._mart = mart
        self._store = mart.store
        self.lease_ttl = float(lease_ttl_seconds)
        self.soft_threshold = float(soft_threshold)
        # (expires_at, rows): budgets change rarely, and selection outside the reserve transaction
        # may be a second stale — the reservation itself always re-reads them under its lock
        self._budgets_cache: tuple[float, list[dict[str, Any]]] | None = None
        #: monotonic time after which the next admission looks for expired leases
        self._next_expiry = 0.0
        #: budget id -> (headroom the last reservation in this process left, monotonic time seen)
        self._seen: dict[str, tuple[float, float]] = {}
        self._starts_cache: tuple[dt.datetime, dt.datetime, dict[str, dt.datetime]] | None = None
        #: (department, user, route, model, day) -> the lock statement's driver parameters
        self._lock_params: dict[tuple[Any, ...], Any] = {}
        from tidyllm.governance.credit import AdmissionCredit

        #: this process's admission-credit blocks (see tidyllm.governance.credit)
        self.credit = AdmissionCredit(self, calls=credit_calls)
        #: who holds leases: this process's owner id and heartbeat (see LeaseOwners)
        self.owners = LeaseOwners(self._store, heartbeat_seconds=heartbeat_seconds)
        #: ``(tx, lease, reason, now) -> charge``: what a reclaimed lease is charged, and the call and audit rows
        #: that say so (set by the Governor); by default the whole amount, as its call may have reached a provider
        self.reclaim_charge: Callable[[Tx, "Lease", str, dt.datetime], float] = lambda tx, lease, why, now: lease.amount
        #: checks and audits set()/delete() (a platform's ledger; None: unaudited, for tools and tests)
        self.admin: Any = None

    # --- configuration ------------------------------------------------------------------------

    def set(self, scope: str, name: str, limit_usd: Any, period: str = "month", *,
            soft_threshold: Any = None, thresholds: Any = None, reason: str | None = None,
            actor: str | None = None, via: str = "api") -> dict[str, Any]:
        """Create or change the budget of ``scope`` ``name`` for ``period``; returns its row.

        ``thresholds`` (fractions of the limit, e.g. ``[0.5, 0.8, 1.0]``) raise alerts (docs/operations.md).
        With :attr:`admin` set (a platform's ledger) the change is checked against ``governance.admins``
        and audited in the same transaction: who (``actor`` or the authenticated/OS user), old → new, ``reason``.
        """
        if scope not in SCOPES:
            raise ConfigurationError(f"unknown budget scope {scope!r}; use one of {', '.join(SCOPES)}")
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"a {scope} budget needs the {scope}'s name")
        name = _budget_name(scope, name)
        if period not in PERIODS:
            raise ConfigurationError(f"unknown budget period {period!r}; use one of {', '.join(PERIODS)}")
        if isinstance(limit_usd, bool):
            raise ConfigurationError(f"limit_usd must be a number of USD, got {limit_usd!r}")
        try:
            limit = float(limit_usd)
        except (TypeError, ValueError):
            raise ConfigurationError(f"limit_usd must be a number of USD, got {limit_usd!r}") from None
        if not math.isfinite(limit) or limit < 0:
            raise ConfigurationError(f"limit_usd must be a finite number ≥ 0, got {limit_usd!r}")
        threshold = None
        if soft_threshold is not None:
            try:
                threshold = float(soft_threshold)
            except (TypeError, ValueError):
                raise ConfigurationError(f"soft_threshold must be a fraction like 0.8, got {soft_threshold!r}") from None
            if not 0 < threshold <= 1:
                raise ConfigurationError(f"soft_threshold must be in (0, 1], got {soft_threshold!r}")
        alert_at = _alert_thresholds(thresholds)
        key = f"{scope}/{name}/{period}"
        new = {"limit_usd": limit, "soft_threshold": threshold, "thresholds": alert_at}
        who = self.admin.authorize("budget", key, action="set", reason=reason, actor=actor, new=new, via=via) \
            if self.admin is not None else None
        now = utcnow()
        self.credit.return_all()  # this process's credit must not outlive a changed limit
        with self._store.begin(write=True) as conn:
            self._store.lock_for_update(conn)  # concurrent creations of one budget: one inserts, the rest update
            row = conn.execute(sa.select(budgets.c.id, budgets.c.limit_usd, budgets.c.soft_threshold,
                                         budgets.c.thresholds).where(
                budgets.c.scope == scope, budgets.c.name == name, budgets.c.period == period)).first()
            old = None
            if row is None:
                budget_id = str(uuid.uuid4())
                conn.execute(budgets.insert().values(id=budget_id, scope=scope, name=name, period=period,
                                                     limit_usd=limit, soft_threshold=threshold, thresholds=alert_at,
                                                     created_at=now, updated_at=now))
            else:
                budget_id = row[0]
                old = {"limit_usd": row[1], "soft_threshold": row[2], "thresholds": row[3]}
                conn.execute(budgets.update().where(budgets.c.id == budget_id).values(
                    limit_usd=limit, soft_threshold=threshold, thresholds=alert_at, updated_at=now))
            if who is not None and old != new:
                self.admin.record(conn, "budget", key, action="set", old=old, new=new, reason=reason, who=who[0],
                                  source=who[1], via=via, department=name if scope == "department" else None)
        self._budgets_cache = None
        self._seen.clear()
        return {"id": budget_id, "scope": scope, "name": name, "period": period, "limit_usd": limit,
                "soft_threshold": threshold, "thresholds": alert_at}

    def delete(self, scope: str, name: str, period: str = "month", *, reason: str | None = None,
               actor: str | None = None, via: str = "api") -> bool:
        """Remove a budget (its history goes with it), audited like :meth:`set`. Returns whether it existed."""
        name = _budget_name(scope, name)
        key = f"{scope}/{name}/{period}"
        who = self.admin.authorize("budget", key, action="delete", reason=reason, actor=actor, via=via) \
            if self.admin is not None else None
        self.credit.return_all()
        with self._store.begin(write=True) as conn:
            row = conn.execute(sa.select(budgets.c.limit_usd, budgets.c.soft_threshold, budgets.c.thresholds).where(
                budgets.c.scope == scope, budgets.c.name == name, budgets.c.period == period)).first()
            result = conn.execute(budgets.delete().where(budgets.c.scope == scope, budgets.c.name == name,
                                                         budgets.c.period == period))
            if who is not None and row is not None:
                old = {"limit_usd": row[0], "soft_threshold": row[1], "thresholds": row[2]}
                self.admin.record(conn, "budget", key, action="delete", old=old, new=None, reason=reason, who=who[0],
                                  source=who[1], via=via, department=name if scope == "department" else None)
        self._budgets_cache = None
        self._seen.clear()
        return result.rowcount > 0

    def _all(self, conn: Connection | None = None) -> list[dict[str, Any]]:
        if conn is not None:
            return [dict(r) for r in conn.execute(sa.select(budgets)).mappings()]
        import time

        cached = self._budgets_cache
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        with self._store.begin() as c:
            rows = [dict(r) for r in c.execute(sa.select(budgets)).mappings()]
        self._budgets_cache = (time.monotonic() + 1.0, rows)
        return rows

    def has_department_budgets(self) -> bool:
        """Whether any department budget exists (read at most once a second; a call without a department
        is refused while one does, see tidyllm.governance.identity)."""
        return any(b["scope"] == "department" for b in self._all())

    @staticmethod
    def applicable(rows: Iterable[dict[str, Any]], ctx: "CallContext", route: str | None,
                   model: str | None) -> list[dict[str, Any]]:
        """The budgets that enclose a call: org, its department, its user, its route and its model."""
        keys = {("org", None)}
        if ctx.department:
            keys.add(("department", ctx.department))
        if ctx.user_id:
            keys.add(("user", ctx.user_id))
        if route:
            keys.add(("route", route))
        if model:
            keys.add(("model", model))
        return [b for b in rows if (b["scope"], None if b["scope"] == "org" else b["name"]) in keys]

    # --- enforcement --------------------------------------------------------------------------
    # The enforcement methods run inside the caller's write transaction (a :class:`Tx`, or a
    # SQLAlchemy connection, which is wrapped) and use prepared statements: they are on the path
    # of every governed call (see tidyllm.mart.fastsql).

    def count_enclosing(self, tx: Any, ctx: "CallContext", route: str | None, model: str | None) -> int:
        """How many budgets enclose a call, read in transaction ``tx``."""
        return Tx.of(tx, self._store).one("budgets.count", _q_count_applicable, department=ctx.department,
                                          user=ctx.user_id, route=route, model=model)[0]

    def expire_leases(self, tx: Any, now: dt.datetime) -> int:
        """Reclaim the leases whose time is up or whose owner is gone. Runs inside a write transaction.

        A lease is reclaimed when its TTL passed, when its owner process is dead (same host: its pid
        is gone), or when its owner on another host missed three heartbeats. Its call may have reached
        a provider, so it is not simply returned: :attr:`reclaim_charge` says what to charge (the worst
        case of the calls that may have been answered; the rest goes back), and the lease becomes
        ``unsettled`` — later evidence (the call's own settlement, replayed) corrects it."""
        tx = Tx.of(tx, self._store)
        rows = tx.all("reservations.open_others", _q_open_leases, now=now, me=self.owners.owner)
        reclaimed = 0
        alive: dict[str, bool | None] = {}
        for res_id, amount, windows, call_id, owner, expires_at, heartbeat in rows:
            why = self.owners.why_reclaim(owner, as_utc(expires_at), as_utc(heartbeat), now, alive)
            if why is None:
                continue
            lease = Lease(res_id, float(amount), tuple(tuple(w) for w in json_value(windows)), call_id, owner)
            charge = min(max(float(self.reclaim_charge(tx, lease, why, now)), 0.0), lease.amount)
            self._add(tx, lease.windows, spent=charge, reserved=-lease.amount)
            tx.run("reservations.close", _q_close_reservation, rid=res_id,
                   new_status="unsettled" if charge > 0 else "expired", settled=charge, closed=now)
            self.record_event(tx, now, None, "unsettled_lease" if charge > 0 else "expired_lease",
                              {"reservation_id": res_id, "call_id": call_id, "amount_usd": amount, "reason": why,
                               "charged_usd": charge, "owner": owner})
            log.warning("reservation %s for %s reclaimed (%s): $%.6f charged as unsettled, $%.6f returned",
                        res_id, call_id, why, charge, lease.amount - charge)
            reclaimed += 1
        self._next_expiry = time.monotonic() + self.expiry_interval
        return reclaimed

    def maybe_expire_leases(self, tx: Any, now: dt.datetime) -> int:
        """:meth:`expire_leases`, at most once per ``expiry_interval`` seconds in this process."""
        return self.expire_leases(tx, now) if self.expiry_due() else 0

    def expiry_due(self) -> bool:
        """Whether the next admission should look for expired leases."""
        return time.monotonic() >= self._next_expiry

    def reserve_in_one_statement(self, *, call_id: str, ctx: "CallContext", route: str, model: str,
                                 worst: float, now: dt.datetime, call_row: Mapping[str, Any]) -> str | None:
        """PostgreSQL: reserve ``worst`` and insert the call's pending row in one autocommit statement.

        It locks the enclosing budgets' current windows, and writes only when every one of them has
        a window and room for the whole worst case; then it returns the reservation id ("" when no
        budget encloses the call). Anything else — a refusal, a clamp, a missing window — writes
        nothing and returns None: the caller takes the general path (:meth:`reserve`), which decides.
        One round trip instead of six, for the common case."""
        starts = self._starts(now)
        res_id = str(uuid.uuid4())
        params = dict(call_row, department=ctx.department, user=ctx.user_id, route=route, model=model, **starts,
                      worst=worst, res_id=res_id, call_id=call_id, now=now,
                      expires=now + dt.timedelta(seconds=self.lease_ttl), owner=self.owners.owner)
        with self._store.autocommit() as cursor:
            ok, locked, rows = cursor.execute(_PG_RESERVE, params).fetchone()
        if not ok:
            return None
        windows = [_window_pair(row, starts) for row in rows or []]
        self._remember(windows, worst)
        for budget, window in windows:
            if self._warning_due(budget, window, worst):
                with self._store.tx() as tx:
                    self._soft_warning(tx, budget, window, worst, call_id, now)
        return res_id if locked else ""

    @property
    def expiry_interval(self) -> float:
        """How often admissions look for expired leases and dead owners: a tenth of the TTL, between 0.2
        and 5 s (a reservation that would be refused looks every time, before refusing)."""
        return min(max(self.lease_ttl / 10.0, 0.2), 5.0)

    def record_event(self, tx: Tx, now: dt.datetime, budget_id: str | None, kind: str, data: dict[str, Any]) -> None:
        """A ``budget_events`` row in transaction ``tx``."""
        tx.run("budget_events.insert", _q_insert_event, id=str(uuid.uuid4()), at=now, budget_id=budget_id,
               kind=kind, data=data)

    def day_start(self, now: dt.datetime) -> dt.datetime:
        """UTC start of the budget day containing ``now`` (every period's window starts on one)."""
        return self._starts(now)["day"]

    def _starts(self, now: dt.datetime) -> dict[str, dt.datetime]:
        """UTC start of the current window of each period (cached until the day changes)."""
        cached = self._starts_cache
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        starts = {p: window_bounds(p, now, self.tz)[0] for p in PERIODS}
        self._starts_cache = (starts["day"], window_bounds("day", now, self.tz)[1] or now, starts)
        return starts

    def _lock_windows(self, tx: Any, ctx: "CallContext", route: str | None, model: str | None,
                      now: dt.datetime) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Lock the current window row of every budget enclosing a call (creating missing ones), in
        budget-id order; ``[(budget, window), ...]``.

        One statement when every enclosing budget has its current window (it also counts the
        enclosing budgets, so a missing window is noticed); the first call of a new period, or of a
        new budget, creates the windows and locks again."""
        tx = Tx.of(tx, self._store)
        starts = self._starts(now)
        # the driver parameters of the lock depend only on who calls what, and the day: kept per process
        key = (ctx.department, ctx.user_id, route, model, starts["day"])
        lock = self._store.prepared("budget_windows.lock", _q_lock_windows)
        driver_params = self._lock_params.get(key)
        if driver_params is None:
            if len(self._lock_params) > 4096:
                self._lock_params.clear()
            driver_params = self._lock_params[key] = lock.params(
                dict(department=ctx.department, user=ctx.user_id, route=route, model=model, **starts))
        rows = tx.cursor.execute(lock.sql, driver_params).fetchall()
        enclosing = rows[0][-1] if rows else self.count_enclosing(tx, ctx, route, model)
        if len(rows) < enclosing:
            tx.run("budget_windows.ensure", lambda: _q_ensure_windows(self._store.dialect),
                   department=ctx.department, user=ctx.user_id, route=route, model=model, **starts)
            rows = tx.cursor.execute(lock.sql, driver_params).fetchall()
        return [_window_pair(row, starts) for row in rows]

    def reserve(self, tx: Any, *, call_id: str, ctx: "CallContext", route: str | None,
                model: str | None, prompt_cost_usd: float, output_cost_per_token: float, max_tokens: int,
                now: dt.datetime, block_usd: float = 0.0) -> Reservation | Refusal | None:
        """Reserve the worst case in the caller's write transaction ``tx``.

        Returns a :class:`Reservation`, a :class:`Refusal` naming the tightest budget, or None when
        no budget applies. ``max_tokens`` is clamped to the headroom when only a smaller answer fits.
        Expired leases are returned first when the call would otherwise not fit. With ``block_usd``
        (an admission-credit block, see tidyllm.governance.credit) the block is reserved instead of
        the worst case when every enclosing budget has room for twice the block; the reservation
        then says ``credit=True``.
        """
        tx = Tx.of(tx, self._store)
        windows = self._lock_windows(tx, ctx, route, model, now)
        if not windows:
            return None
        worst = prompt_cost_usd + max_tokens * output_cost_per_token
        if min(b["limit_usd"] - w["spent_usd"] - w["reserved_usd"] for b, w in windows) < worst + 1e-12 \
                and self.expire_leases(tx, now):
            windows = self._lock_windows(tx, ctx, route, model, now)
        headroom, tight_b, tight_w = min(((b["limit_usd"] - w["spent_usd"] - w["reserved_usd"], b, w)
                                          for b, w in windows), key=lambda h: h[0])
        tokens, clamped = max_tokens, False
        # a hair of tolerance so float rounding never refuses a call that exactly fits
        if worst > headroom + 1e-12:
            fit = math.floor((headroom - prompt_cost_usd) / output_cost_per_token) if output_cost_per_token > 0 else -1
            if fit >= MIN_CLAMPED_TOKENS and fit < max_tokens:
                tokens, clamped = int(fit), True
                worst = prompt_cost_usd + tokens * output_cost_per_token
            else:
                self._remember(windows, 0.0)
                return Refusal(tight_b["id"], tight_b["scope"], tight_b["name"], tight_b["period"],
                               tight_b["limit_usd"], tight_w["spent_usd"], tight_w["reserved_usd"], worst)
        keys = tuple((b["id"], _iso(w["window_start"])) for b, w in windows)
        res_id = str(uuid.uuid4())
        credit = not clamped and block_usd > worst and headroom >= 2 * block_usd
        holder = call_id
        if credit:
            from tidyllm.governance.credit import CREDIT_PREFIX

            worst, holder = block_usd, CREDIT_PREFIX + res_id
        for budget, window in windows:
            tx.run("budget_windows.add", _q_add, budget_id=budget["id"], start=window["window_start"], spent=0.0,
                   reserved=worst)
            self._soft_warning(tx, budget, window, worst, call_id, now)
        self._remember(windows, worst)
        tx.run("reservations.insert", _q_insert_reservation, id=res_id, call_id=holder, amount_usd=worst,
               windows=[list(k) for k in keys], created_at=now,
               expires_at=now + dt.timedelta(seconds=self.lease_ttl), status="open", owner=self.owners.owner)
        return Reservation(res_id, worst, tokens, clamped, keys, credit)

    def _remember(self, windows: list[tuple[dict[str, Any], dict[str, Any]]], adding: float) -> None:
        """Note the headroom each window has once ``adding`` is reserved (the routing pre-filter's view)."""
        seen_at = time.monotonic()
        for b, w in windows:
            self._seen[b["id"]] = (b["limit_usd"] - w["spent_usd"] - w["reserved_usd"] - adding, seen_at)

    def _warning_due(self, budget: dict[str, Any], window: dict[str, Any], adding: float) -> bool:
        """Whether a window's settled spend has reached its soft threshold and nothing was recorded yet.

        Spend, not reservations: ``adding`` (the reservation being made) and the window's open
        reservations do not count — an admission-credit block holds many calls' worst cases, so counting
        them raised "passed 80 %" at a few percent of spend. The comparison is exact at the threshold."""
        if window["warned"] or not budget["limit_usd"]:
            return False
        threshold = budget["soft_threshold"] or self.soft_threshold
        return window["spent_usd"] >= threshold * budget["limit_usd"] * (1 - 1e-12)

    def warning_due(self, budget: dict[str, Any], window: dict[str, Any]) -> bool:
        """Whether a window's soft-threshold warning is due (spend reached it, nothing recorded yet)."""
        return self._warning_due(budget, window, 0.0)

    def warn_if_due(self, tx: Any, budget: dict[str, Any], window: dict[str, Any], now: dt.datetime) -> None:
        """Record a window's soft-threshold warning once its spend reached it (the alert worker calls this
        after calls settle; admissions check it too)."""
        self._soft_warning(Tx.of(tx, self._store), budget, window, 0.0, None, now)

    def _soft_warning(self, tx: Tx, budget: dict[str, Any], window: dict[str, Any], adding: float,
                      call_id: str | None, now: dt.datetime) -> None:
        """Record the soft-threshold warning of a window, once: whoever flips ``warned`` first records it."""
        if not self._warning_due(budget, window, adding):
            return
        if tx.one("budget_windows.warn_once", _q_warn_once, budget_id=budget["id"],
                  start=window["window_start"]) is None:
            return
        threshold = budget["soft_threshold"] or self.soft_threshold
        used = window["spent_usd"]
        self.record_event(tx, now, budget["id"], "soft_threshold",
                    {"scope": budget["scope"], "name": budget["name"], "period": budget["period"],
                     "limit_usd": budget["limit_usd"], "used_usd": used, "threshold": threshold,
                     "call_id": call_id})
        log.warning("%s %r passed %.0f%% of its %s %s budget (spent %s)", budget["scope"], budget["name"],
                    threshold * 100, usd(budget["limit_usd"]), budget["period"], usd(used))

    def _add(self, tx: Tx, windows: Any, *, spent: float = 0.0, reserved: float = 0.0) -> None:
        for budget_id, start in windows:
            tx.run("budget_windows.add", _q_add, budget_id=budget_id, start=as_utc(start), spent=spent,
                   reserved=reserved)

    def settle(self, tx: Any, reservation_id: str, actual_usd: float, now: dt.datetime, *,
               status: str = "settled") -> None:
        """Charge ``actual_usd`` and return the reservation (a settled lease cannot be settled twice)."""
        tx = Tx.of(tx, self._store)
        row = tx.one("reservations.lock", _q_lock_reservation, rid=reservation_id)
        if row is None or row[2] in ("settled", "released"):
            return
        amount, windows, state, call_id, charged = row
        # an expired lease already gave its amount back: only the spend is added; an unsettled one was
        # charged its worst case: the spend is corrected to the actual cost
        give_back = -amount if state == "open" else 0.0
        spent = actual_usd - (charged or 0.0) if state == "unsettled" else actual_usd
        self._add(tx, json_value(windows), spent=spent, reserved=give_back)
        tx.run("reservations.close", _q_close_reservation, rid=reservation_id, new_status=status,
               settled=actual_usd, closed=now)

    def credit_reduce(self, tx: Any, block_id: str, windows: Any, *, less: float, spent: float, close: bool,
                      now: dt.datetime) -> None:
        """An admission-credit block hands back ``less`` (shares of finished calls, unused credit) and
        charges ``spent``; ``close`` settles it. What a block still holds in its windows is its
        ``amount_usd``, open or closed by its owner (a call written late, from the journal, still gives
        its share back); a lease that was reclaimed gave its amount back already, so only the spend is
        added — and for an ``unsettled`` one, which was charged the block's remainder, the call's share
        comes off that charge."""
        tx = Tx.of(tx, self._store)
        row = tx.one("reservations.lock", _q_lock_reservation, rid=block_id)
        if row is None:
            return
        amount, state = row[0], row[2]
        give = min(less, amount) if state in ("open", "settled") else 0.0
        if state == "unsettled":
            spent -= less
        if spent or give:
            self._add(tx, windows, spent=spent, reserved=-give)
        tx.run("reservations.credit", _q_credit_reduce, rid=block_id, less=give,
               charged=spent, new_status="settled" if close and state == "open" else state,
               closed=now if close else None)

    def release(self, tx: Any, reservation_id: str, now: dt.datetime) -> None:
        """Return an unused reservation (the call failed before costing anything)."""
        self.settle(tx, reservation_id, 0.0, now, status="released")

    def charge(self, tx: Any, ctx: "CallContext", route: str | None, model: str | None,
               amount_usd: float, now: dt.datetime) -> None:
        """Count spend that was not reserved (a plain sync call that bypassed enforcement)."""
        tx = Tx.of(tx, self._store)
        for budget, window in self._lock_windows(tx, ctx, route, model, now):
            tx.run("budget_windows.add", _q_add, budget_id=budget["id"], start=window["window_start"],
                   spent=amount_usd, reserved=0.0)

    def headroom(self, ctx: "CallContext", route: str | None = None, model: str | None = None, *,
                 max_age: float = 0.0) -> float | None:
        """USD left in the tightest applicable budget, or None when no budget applies.

        With ``max_age`` > 0 the answer may come from what this process's last reservations saw
        (no database read) when every applicable budget was seen within ``max_age`` seconds —
        the routing pre-filter uses that; reservations always read under their lock."""
        if max_age > 0:
            applicable = self.applicable(self._all(), ctx, route, model)
            if not applicable:
                return None
            horizon = time.monotonic() - max_age
            seen = [self._seen.get(b["id"]) for b in applicable]
            if all(s is not None and s[1] >= horizon for s in seen):
                return min(s[0] for s in seen if s is not None)
        starts = self._starts(utcnow())
        with self._store.tx(write=False) as tx:
            rows = tx.all("budgets.headroom", _q_headroom, department=ctx.department, user=ctx.user_id,
                          route=route, model=model, **starts)
        if not rows:
            return None
        return min(limit - (spent or 0.0) - (reserved or 0.0) for limit, spent, reserved in rows)

    def tightest(self, ctx: "CallContext", route: str | None = None, model: str | None = None) -> dict[str, Any] | None:
        """The applicable budget with the least left, as a status row, or None."""
        status = self.status()
        if status.empty:
            return None
        rows = []
        for b in self.applicable(status.to_dict("records"), ctx, route, model):
            rows.append(b)
        return min(rows, key=lambda r: r["remaining_usd"]) if rows else None

    # --- reporting ----------------------------------------------------------------------------

    def status(self, scope: str | None = None, name: str | None = None) -> "pd.DataFrame":
        """One row per budget for its current window: scope, name, period, limit_usd, spent_usd,
        reserved_usd, remaining_usd, window_start, window_end (UTC). A department or user ``name`` is
        matched normalised (``status(name=" Risk")`` finds department ``risk``)."""
        import pandas as pd

        now = utcnow()
        rows = []
        # this process's unused admission credit is reserved in the database but as good as free: shown as
        # not reserved (it goes back within seconds; other processes' unused credit shows as reserved)
        unused = self.credit.unused()
        with self._store.begin() as conn:
            for b in sorted(self._all(conn), key=lambda b: (SCOPES.index(b["scope"]), b["name"], b["period"])):
                if (scope and b["scope"] != scope) or (name and b["name"] != _budget_name(b["scope"], name)):
                    continue
                start, end = window_bounds(b["period"], now, self.tz)
                w = conn.execute(sa.select(budget_windows.c.spent_usd, budget_windows.c.reserved_usd).where(
                    (budget_windows.c.budget_id == b["id"]) & (budget_windows.c.window_start == start))).first()
                spent, reserved = (w[0], w[1]) if w else (0.0, 0.0)
                reserved -= unused.get((b["id"], _iso(start)), 0.0)
                reserved = reserved if reserved > 1e-12 else 0.0  # float residue of reserve/settle pairs
                rows.append({"scope": b["scope"], "name": b["name"], "period": b["period"],
                             "limit_usd": b["limit_usd"], "spent_usd": spent, "reserved_usd": max(reserved, 0.0),
                             "remaining_usd": max(b["limit_usd"] - spent - reserved, 0.0),
                             "window_start": start, "window_end": end})
        columns = ["scope", "name", "period", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd",
                   "window_start", "window_end"]
        frame = pd.DataFrame(rows, columns=columns)
        for col in ("limit_usd", "spent_usd", "reserved_usd", "remaining_usd"):
            frame[col] = frame[col].astype("float64")
        for col in ("window_start", "window_end"):
            frame[col] = pd.to_datetime(frame[col], utc=True).astype("datetime64[us, UTC]")
        return frame

    def open_reservations(self) -> int:
        """How many leases are open right now (after giving back this process's unused credit)."""
        self.credit.return_all()
        with self._store.begin() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(reservations)
                                .where(reservations.c.status == "open")).scalar_one()

    def reconcile(self) -> int:
        """Expire every lease past its TTL (run at start-up); returns how many."""
        with self._store.tx() as tx:
            return self.expire_leases(tx, utcnow())


# --- prepared statements (compiled once per database; see tidyllm.mart.fastsql) -------------------

_BUDGET_COLS = ("id", "scope", "name", "period", "limit_usd", "soft_threshold")


def _budget_name(scope: str, name: str) -> str:
    """A budget's name as calls are matched against it: department and user names normalised
    (:func:`~tidyllm.governance.identity.normalize_name`), route and model names as given."""
    return normalize_name(name) if scope in ("department", "user") else name


@functools.lru_cache(maxsize=256)
def _iso(start: dt.datetime) -> str:
    """A window start as the ISO text a reservation records (window starts repeat for a whole period)."""
    return start.isoformat()


def _window_pair(row: Any, starts: dict[str, dt.datetime]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(budget, window)`` from a row of the budget columns followed by spent, reserved and warned."""
    budget = dict(zip(_BUDGET_COLS, row[:6]))
    return budget, {"window_start": starts[budget["period"]], "spent_usd": row[6], "reserved_usd": row[7],
                    "warned": bool(row[8])}


def _applicable_where() -> Any:
    b = budgets.c
    return sa.or_(b.scope == "org",
                  sa.and_(b.scope == "department", b.name == sa.bindparam("department")),
                  sa.and_(b.scope == "user", b.name == sa.bindparam("user")),
                  sa.and_(b.scope == "route", b.name == sa.bindparam("route")),
                  sa.and_(b.scope == "model", b.name == sa.bindparam("model")))


def _period_start() -> Any:
    """The current window start of a budget's period, from the parameters day, week, month and total."""
    return sa.case(*((budgets.c.period == p, sa.bindparam(p, type_=budget_windows.c.window_start.type))
                     for p in PERIODS))


def _q_headroom() -> Any:
    b, w = budgets.c, budget_windows.c
    joined = budgets.outerjoin(budget_windows, sa.and_(w.budget_id == b.id, w.window_start == _period_start()))
    return sa.select(b.limit_usd, w.spent_usd, w.reserved_usd).select_from(joined).where(_applicable_where())


def _q_ensure_windows(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    b = budgets.c
    rows = sa.select(b.id, _period_start(), sa.literal(0.0, sa.Float), sa.literal(0.0, sa.Float), sa.false()) \
        .where(_applicable_where())
    return insert(budget_windows).from_select(
        ["budget_id", "window_start", "spent_usd", "reserved_usd", "warned"], rows).on_conflict_do_nothing()


def _q_count_applicable() -> Any:
    return sa.select(sa.func.count()).select_from(budgets).where(_applicable_where())


def _q_lock_windows() -> Any:
    b, w = budgets.c, budget_windows.c
    joined = budgets.join(budget_windows, sa.and_(w.budget_id == b.id, w.window_start == _period_start()))
    enclosing = _q_count_applicable().scalar_subquery()
    return (sa.select(*(b[c] for c in _BUDGET_COLS), w.spent_usd, w.reserved_usd, w.warned, enclosing)
            .select_from(joined).where(_applicable_where()).order_by(b.id).with_for_update(of=budget_windows))


def _window_key() -> Any:
    w = budget_windows.c
    return sa.and_(w.budget_id == sa.bindparam("budget_id"), w.window_start == sa.bindparam("start"))


def _q_add() -> Any:
    w = budget_windows.c
    return budget_windows.update().where(_window_key()).values(
        spent_usd=w.spent_usd + sa.bindparam("spent", type_=sa.Float),
        reserved_usd=w.reserved_usd + sa.bindparam("reserved", type_=sa.Float))


def _q_warn_once() -> Any:
    w = budget_windows.c
    return budget_windows.update().where(_window_key(), w.warned == sa.false()).values(warned=True).returning(
        w.budget_id)


_PG_APPLICABLE = """(b.scope = 'org' OR (b.scope = 'department' AND b.name = %(department)s)
        OR (b.scope = 'user' AND b.name = %(user)s) OR (b.scope = 'route' AND b.name = %(route)s)
        OR (b.scope = 'model' AND b.name = %(model)s))"""

#: see BudgetLedger.reserve_in_one_statement. In READ COMMITTED, FOR UPDATE returns the newest version of
#: each window once its lock is held, and the UPDATE re-reads that version: the check and the addition
#: both see every reservation committed before this one. Data-modifying CTEs run whether or not the
#: final SELECT reads them.
_PG_RESERVE = f"""
WITH lock AS (
    SELECT b.id AS budget_id, b.scope, b.name, b.period, b.limit_usd, b.soft_threshold,
           w.window_start, w.spent_usd, w.reserved_usd, w.warned
    FROM budgets b JOIN budget_windows w ON w.budget_id = b.id AND w.window_start = CASE b.period
        WHEN 'day' THEN %(day)s::timestamptz WHEN 'week' THEN %(week)s::timestamptz
        WHEN 'month' THEN %(month)s::timestamptz ELSE %(total)s::timestamptz END
    WHERE {_PG_APPLICABLE}
    ORDER BY b.id
    FOR UPDATE OF w
), verdict AS (
    SELECT COALESCE(bool_and(limit_usd - spent_usd - reserved_usd >= %(worst)s - 1e-12), true)
               AND count(*) = (SELECT count(*) FROM budgets b WHERE {_PG_APPLICABLE}) AS ok,
           count(*) AS locked
    FROM lock
), upd AS (
    UPDATE budget_windows w SET reserved_usd = w.reserved_usd + %(worst)s
    FROM lock WHERE w.budget_id = lock.budget_id AND w.window_start = lock.window_start
        AND (SELECT ok FROM verdict)
), res AS (
    INSERT INTO reservations (id, call_id, amount_usd, windows, created_at, expires_at, status, owner)
    SELECT %(res_id)s, %(call_id)s, %(worst)s,
           (SELECT json_agg(json_build_array(budget_id, to_char(window_start AT TIME ZONE 'UTC',
                                                                'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'))
                            ORDER BY budget_id) FROM lock),
           %(now)s, %(expires)s, 'open', %(owner)s
    WHERE (SELECT ok AND locked > 0 FROM verdict)
), ins AS (
    INSERT INTO llm_calls (id, started_at, call_type, user_id, department, use_case, data_sensitivity,
                           requested_model, route, status, stream, reserved_usd, price_id, execution_id,
                           identity_source, reserved_prompt_tokens)
    SELECT %(call_id)s, %(now)s, %(call_type)s, %(user_id)s, %(department)s, %(use_case)s, %(data_sensitivity)s,
           %(requested_model)s, %(route)s, 'pending', %(stream)s,
           CASE WHEN (SELECT locked FROM verdict) > 0 THEN %(worst)s ELSE 0 END, %(price_id)s, %(execution_id)s,
           %(identity_source)s, %(reserved_prompt_tokens)s
    WHERE (SELECT ok FROM verdict)
    RETURNING 1
)
SELECT (SELECT ok FROM verdict) AND (SELECT count(*) FROM ins) = 1,
       (SELECT locked FROM verdict),
       (SELECT json_agg(json_build_array(budget_id, scope, name, period, limit_usd, soft_threshold, spent_usd,
                                         reserved_usd, warned)) FROM lock)
"""


def _q_insert_reservation() -> Any:
    return reservations.insert(), [c.name for c in reservations.c]


def _q_insert_event() -> Any:
    return budget_events.insert(), [c.name for c in budget_events.c]


def _q_open_leases() -> Any:
    """Open leases that may need reclaiming: past their TTL, or held by another process."""
    r, o = reservations.c, lease_owners.c
    return (sa.select(r.id, r.amount_usd, r.windows, r.call_id, r.owner, r.expires_at, o.heartbeat_at)
            .select_from(reservations.outerjoin(lease_owners, o.owner == r.owner))
            .where(r.status == "open", sa.or_(r.expires_at < sa.bindparam("now"), r.owner.is_(None),
                                               r.owner != sa.bindparam("me")))
            .with_for_update(of=reservations, skip_locked=True))


def _q_lock_reservation() -> Any:
    r = reservations.c
    return sa.select(r.amount_usd, r.windows, r.status, r.call_id, r.settled_usd).where(
        r.id == sa.bindparam("rid")).with_for_update()


def _q_close_reservation() -> Any:
    r = reservations.c
    return reservations.update().where(r.id == sa.bindparam("rid")).values(
        status=sa.bindparam("new_status", type_=sa.String), settled_usd=sa.bindparam("settled", type_=sa.Float),
        closed_at=sa.bindparam("closed", type_=r.closed_at.type))


def _q_credit_reduce() -> Any:
    r = reservations.c
    return reservations.update().where(r.id == sa.bindparam("rid")).values(
        amount_usd=r.amount_usd - sa.bindparam("less", type_=sa.Float),
        settled_usd=sa.func.coalesce(r.settled_usd, 0.0) + sa.bindparam("charged", type_=sa.Float),
        status=sa.bindparam("new_status", type_=sa.String),
        closed_at=sa.func.coalesce(sa.bindparam("closed", type_=r.closed_at.type), r.closed_at))

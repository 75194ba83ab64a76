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
import logging
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tidyllm.errors import ConfigurationError
from tidyllm.mart.schema import budget_events, budget_windows, budgets, reservations
from tidyllm.mart.store import utcnow

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.governance.context import CallContext
    from tidyllm.mart import TidyMart

__all__ = ["BudgetLedger", "Reservation", "Refusal", "SCOPES", "PERIODS", "usd", "window_bounds"]

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


def usd(amount: float) -> str:
    """Dollars for messages: cents for whole amounts, significant digits for small ones."""
    if abs(amount) >= 1 or amount == 0:
        return f"${amount:,.2f}"
    return f"${amount:.4f}" if abs(amount) >= 0.01 else f"${amount:.6f}"


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


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
                 soft_threshold: float = 0.8) -> None:
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

    # --- configuration ------------------------------------------------------------------------

    def set(self, scope: str, name: str, limit_usd: Any, period: str = "month", *,
            soft_threshold: Any = None) -> dict[str, Any]:
        """Create or change the budget of ``scope`` ``name`` for ``period``; returns its row."""
        if scope not in SCOPES:
            raise ConfigurationError(f"unknown budget scope {scope!r}; use one of {', '.join(SCOPES)}")
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"a {scope} budget needs the {scope}'s name")
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
        now = utcnow()
        with self._store.begin(write=True) as conn:
            row = conn.execute(sa.select(budgets.c.id).where(
                budgets.c.scope == scope, budgets.c.name == name, budgets.c.period == period)).first()
            if row is None:
                budget_id = str(uuid.uuid4())
                conn.execute(budgets.insert().values(id=budget_id, scope=scope, name=name, period=period,
                                                     limit_usd=limit, soft_threshold=threshold,
                                                     created_at=now, updated_at=now))
            else:
                budget_id = row[0]
                conn.execute(budgets.update().where(budgets.c.id == budget_id).values(
                    limit_usd=limit, soft_threshold=threshold, updated_at=now))
        self._budgets_cache = None
        return {"id": budget_id, "scope": scope, "name": name, "period": period, "limit_usd": limit,
                "soft_threshold": threshold}

    def delete(self, scope: str, name: str, period: str = "month") -> bool:
        """Remove a budget (its history goes with it). Returns whether it existed."""
        with self._store.begin(write=True) as conn:
            result = conn.execute(budgets.delete().where(budgets.c.scope == scope, budgets.c.name == name,
                                                         budgets.c.period == period))
        self._budgets_cache = None
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

    def expire_leases(self, conn: Connection, now: dt.datetime) -> int:
        """Return the amounts of expired leases to their budgets. Runs inside a write transaction."""
        stale = conn.execute(sa.select(reservations.c.id, reservations.c.amount_usd, reservations.c.windows,
                                       reservations.c.call_id)
                             .where(reservations.c.status == "open", reservations.c.expires_at < now)
                             .with_for_update(skip_locked=True)).all()
        for res_id, amount, windows, call_id in stale:
            self._add(conn, windows, reserved=-amount)
            conn.execute(reservations.update().where(reservations.c.id == res_id).values(
                status="expired", closed_at=now))
            conn.execute(budget_events.insert().values(
                id=str(uuid.uuid4()), at=now, budget_id=None, kind="expired_lease",
                data={"reservation_id": res_id, "call_id": call_id, "amount_usd": amount}))
            log.warning("reservation %s for call %s expired; $%.6f returned to its budgets", res_id, call_id, amount)
        return len(stale)

    def _window_rows(self, conn: Connection, applicable: list[dict[str, Any]],
                     now: dt.datetime) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Lock (creating as needed) the current window row of each budget, in budget-id order."""
        out = []
        for budget in sorted(applicable, key=lambda b: b["id"]):
            start, _ = window_bounds(budget["period"], now, self.tz)
            key = (budget_windows.c.budget_id == budget["id"]) & (budget_windows.c.window_start == start)
            row = conn.execute(sa.select(budget_windows).where(key).with_for_update()).mappings().first()
            if row is None:
                if self._store.dialect == "postgresql":
                    from sqlalchemy.dialects.postgresql import insert as pg_insert

                    conn.execute(pg_insert(budget_windows).values(
                        budget_id=budget["id"], window_start=start, spent_usd=0.0, reserved_usd=0.0, warned=False
                    ).on_conflict_do_nothing())
                else:
                    conn.execute(budget_windows.insert().values(
                        budget_id=budget["id"], window_start=start, spent_usd=0.0, reserved_usd=0.0, warned=False))
                row = conn.execute(sa.select(budget_windows).where(key).with_for_update()).mappings().first()
            out.append((budget, dict(row)))
        return out

    def reserve(self, conn: Connection, *, call_id: str, ctx: "CallContext", route: str | None,
                model: str | None, prompt_cost_usd: float, output_cost_per_token: float, max_tokens: int,
                now: dt.datetime) -> Reservation | Refusal | None:
        """Reserve the worst case in the caller's write transaction ``conn``.

        Returns a :class:`Reservation`, a :class:`Refusal` naming the tightest budget, or None when
        no budget applies. ``max_tokens`` is clamped to the headroom when only a smaller answer fits.
        """
        applicable = self.applicable(self._all(conn), ctx, route, model)
        if not applicable:
            return None
        windows = self._window_rows(conn, applicable, now)
        headrooms = [(b["limit_usd"] - w["spent_usd"] - w["reserved_usd"], b, w) for b, w in windows]
        headroom, tight_b, tight_w = min(headrooms, key=lambda h: h[0])
        worst = prompt_cost_usd + max_tokens * output_cost_per_token
        tokens, clamped = max_tokens, False
        # a hair of tolerance so float rounding never refuses a call that exactly fits
        if worst > headroom + 1e-12:
            fit = math.floor((headroom - prompt_cost_usd) / output_cost_per_token) if output_cost_per_token > 0 else -1
            if fit >= MIN_CLAMPED_TOKENS and fit < max_tokens:
                tokens, clamped = int(fit), True
                worst = prompt_cost_usd + tokens * output_cost_per_token
            else:
                return Refusal(tight_b["id"], tight_b["scope"], tight_b["name"], tight_b["period"],
                               tight_b["limit_usd"], tight_w["spent_usd"], tight_w["reserved_usd"], worst)
        keys = tuple((b["id"], w["window_start"].isoformat() if isinstance(w["window_start"], dt.datetime)
                      else str(w["window_start"])) for b, w in windows)
        res_id = str(uuid.uuid4())
        for budget, window in windows:
            conn.execute(budget_windows.update().where(
                (budget_windows.c.budget_id == budget["id"]) & (budget_windows.c.window_start == window["window_start"])
            ).values(reserved_usd=budget_windows.c.reserved_usd + worst))
            self._soft_warning(conn, budget, window, worst, call_id, now)
        conn.execute(reservations.insert().values(
            id=res_id, call_id=call_id, amount_usd=worst, windows=[list(k) for k in keys], created_at=now,
            expires_at=now + dt.timedelta(seconds=self.lease_ttl), status="open"))
        return Reservation(res_id, worst, tokens, clamped, keys)

    def _soft_warning(self, conn: Connection, budget: dict[str, Any], window: dict[str, Any], adding: float,
                      call_id: str, now: dt.datetime) -> None:
        threshold = budget["soft_threshold"] or self.soft_threshold
        if window["warned"] or not budget["limit_usd"]:
            return
        used = window["spent_usd"] + window["reserved_usd"] + adding
        if used / budget["limit_usd"] >= threshold:
            conn.execute(budget_windows.update().where(
                (budget_windows.c.budget_id == budget["id"]) & (budget_windows.c.window_start == window["window_start"])
            ).values(warned=True))
            conn.execute(budget_events.insert().values(
                id=str(uuid.uuid4()), at=now, budget_id=budget["id"], kind="soft_threshold",
                data={"scope": budget["scope"], "name": budget["name"], "period": budget["period"],
                      "limit_usd": budget["limit_usd"], "used_usd": used, "threshold": threshold, "call_id": call_id}))
            log.warning("%s %r passed %.0f%% of its %s %s budget", budget["scope"], budget["name"],
                        threshold * 100, usd(budget["limit_usd"]), budget["period"])

    def _add(self, conn: Connection, windows: Any, *, spent: float = 0.0, reserved: float = 0.0) -> None:
        for budget_id, start in windows:
            start_dt = _aware(dt.datetime.fromisoformat(start)) if isinstance(start, str) else start
            conn.execute(budget_windows.update().where(
                (budget_windows.c.budget_id == budget_id) & (budget_windows.c.window_start == start_dt)
            ).values(spent_usd=budget_windows.c.spent_usd + spent,
                     reserved_usd=budget_windows.c.reserved_usd + reserved))

    def settle(self, conn: Connection, reservation_id: str, actual_usd: float, now: dt.datetime) -> None:
        """Charge ``actual_usd`` and return the reservation (a settled lease cannot be settled twice)."""
        row = conn.execute(sa.select(reservations).where(reservations.c.id == reservation_id)
                           .with_for_update()).mappings().first()
        if row is None or row["status"] in ("settled", "released"):
            return
        if actual_usd > row["amount_usd"] + 1e-12:
            log.warning("call %s cost $%.6f, more than the $%.6f reserved for its worst case",
                        row["call_id"], actual_usd, row["amount_usd"])
        # an expired lease already gave its amount back: only the spend is added
        give_back = -row["amount_usd"] if row["status"] == "open" else 0.0
        self._add(conn, row["windows"], spent=actual_usd, reserved=give_back)
        conn.execute(reservations.update().where(reservations.c.id == reservation_id).values(
            status="settled", settled_usd=actual_usd, closed_at=now))

    def release(self, conn: Connection, reservation_id: str, now: dt.datetime) -> None:
        """Return an unused reservation (the call failed before costing anything)."""
        self.settle(conn, reservation_id, 0.0, now)
        conn.execute(reservations.update().where(reservations.c.id == reservation_id).values(status="released"))

    def charge(self, conn: Connection, ctx: "CallContext", route: str | None, model: str | None,
               amount_usd: float, now: dt.datetime) -> None:
        """Count spend that was not reserved (a plain sync call that bypassed enforcement)."""
        applicable = self.applicable(self._all(conn), ctx, route, model)
        for budget, window in self._window_rows(conn, applicable, now):
            conn.execute(budget_windows.update().where(
                (budget_windows.c.budget_id == budget["id"]) & (budget_windows.c.window_start == window["window_start"])
            ).values(spent_usd=budget_windows.c.spent_usd + amount_usd))

    def headroom(self, ctx: "CallContext", route: str | None = None, model: str | None = None) -> float | None:
        """USD left in the tightest applicable budget now, or None when no budget applies."""
        now = utcnow()
        applicable = self.applicable(self._all(), ctx, route, model)
        if not applicable:
            return None
        with self._store.begin() as conn:
            left = []
            for b in applicable:
                start, _ = window_bounds(b["period"], now, self.tz)
                w = conn.execute(sa.select(budget_windows.c.spent_usd, budget_windows.c.reserved_usd).where(
                    (budget_windows.c.budget_id == b["id"]) & (budget_windows.c.window_start == start))).first()
                left.append(b["limit_usd"] - (w[0] + w[1] if w else 0.0))
        return min(left)

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
        reserved_usd, remaining_usd, window_start, window_end (UTC)."""
        import pandas as pd

        now = utcnow()
        rows = []
        with self._store.begin() as conn:
            for b in sorted(self._all(conn), key=lambda b: (SCOPES.index(b["scope"]), b["name"], b["period"])):
                if (scope and b["scope"] != scope) or (name and b["name"] != name):
                    continue
                start, end = window_bounds(b["period"], now, self.tz)
                w = conn.execute(sa.select(budget_windows.c.spent_usd, budget_windows.c.reserved_usd).where(
                    (budget_windows.c.budget_id == b["id"]) & (budget_windows.c.window_start == start))).first()
                spent, reserved = (w[0], w[1]) if w else (0.0, 0.0)
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
        """How many leases are open right now."""
        with self._store.begin() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(reservations)
                                .where(reservations.c.status == "open")).scalar_one()

    def reconcile(self) -> int:
        """Expire every lease past its TTL (run at start-up); returns how many."""
        with self._store.begin(write=True) as conn:
            return self.expire_leases(conn, utcnow())

"""What the dashboard shows, read from a mart into DataFrames (no drawing here).

Everything is derived from the mart's tables, so the same page can be built for any mart — a
laptop's SQLite file or the PostgreSQL database a whole organisation shares.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.governance.audit import VerifyResult
    from tidyllm.mart import TidyMart

__all__ = ["ReportData", "gather", "open_mart", "resolve_source", "budget_burn", "reward_summary"]

_CALL_COLUMNS = ["id", "started_at", "ended_at", "user_id", "department", "use_case", "data_sensitivity",
                 "requested_model", "route", "status", "prompt_tokens", "completion_tokens", "cost_usd",
                 "latency_ms", "error_type"]
_DECISION_COLUMNS = ["decided_at", "department", "use_case", "route", "propensity", "explored", "policy",
                     "reward", "quality", "cost_usd", "latency_ms", "failed", "context", "candidates"]
_EXECUTION_COLUMNS = ["module", "operation", "status", "started_at", "duration_ms", "error_type"]
_AUDIT_COLUMNS = ["seq", "recorded_at", "decision", "status", "department"]


@dataclass
class ReportData:
    """The frames and facts the dashboard is drawn from."""

    source: str
    generated_at: dt.datetime
    calls: "pd.DataFrame"
    budgets: "pd.DataFrame"
    decisions: "pd.DataFrame"
    executions: "pd.DataFrame"
    audit_rows: "pd.DataFrame"
    audit: "VerifyResult"
    #: ``budget_events`` of kind ``refused`` with the refusing budget's scope, name and period
    budget_refusals: "pd.DataFrame"
    #: :func:`reward_summary` of the decisions
    reward: dict[str, Any] = field(default_factory=dict)
    forecast: "pd.DataFrame | None" = None
    forecast_error: str | None = None
    #: the demo's learning figures from the simulation's ground truth (:mod:`tidyllm.report.learning`)
    learning: dict[str, Any] = field(default_factory=dict)

    @property
    def routed(self) -> "pd.DataFrame":
        """Calls that reached an endpoint (answered or failed there)."""
        return self.calls[self.calls["status"].isin(["success", "failure", "unenforced"])]

    @property
    def refused(self) -> "pd.DataFrame":
        """Calls governance refused before any provider saw them."""
        return self.calls[self.calls["status"] == "refused"]


def open_mart(url: str) -> "TidyMart":
    """Open an existing mart for reading; a SQLite URL naming no file is an error, not a new empty mart."""
    import sqlalchemy as sa

    from tidyllm.errors import ConfigurationError
    from tidyllm.mart import TidyMart

    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        from pathlib import Path

        if not Path(parsed.database).expanduser().is_file():
            raise ConfigurationError(f"no mart at {url}: pass --database-url (or TIDYLLM_DATABASE_URL) naming an "
                                     "existing mart, e.g. sqlite:///tidyllm-demo/tidyllm-demo.db after `tidyllm demo`")
    return TidyMart(url, read_only=True)


def resolve_source(source: Any, *, timezone: str = "UTC") -> tuple["TidyMart", Any, Any]:
    """``(mart, budget ledger, audit trail)`` for a Platform, a TidyMart or a database URL; ``timezone``
    is where budget periods start (a Platform brings its own)."""
    from tidyllm.errors import ConfigurationError
    from tidyllm.governance.audit import AuditTrail
    from tidyllm.governance.budgets import BudgetLedger
    from tidyllm.mart import TidyMart

    if isinstance(source, str):
        source = open_mart(source)
    if isinstance(source, TidyMart):
        return source, BudgetLedger(source, timezone=timezone), AuditTrail(source)
    mart = getattr(source, "mart", None)
    if isinstance(mart, TidyMart) and hasattr(source, "budgets") and hasattr(source, "audit"):
        return mart, source.budgets, source.audit
    raise ConfigurationError(f"a report needs a Platform, a TidyMart or a database URL, got {type(source).__name__}")


def gather(source: Any, *, forecast_hours: int = 24, now: dt.datetime | None = None,
           timezone: str = "UTC") -> ReportData:
    """Read everything the dashboard shows from ``source`` (Platform, TidyMart or database URL)."""
    from tidyllm.forecast import InsufficientHistoryError, forecast

    mart, ledger, audit = resolve_source(source, timezone=timezone)
    generated = now or dt.datetime.now(dt.timezone.utc)
    calls = mart.frame("llm_calls", columns=_CALL_COLUMNS, order_by="started_at")
    data = ReportData(
        source=mart.store.safe_url, generated_at=generated, calls=calls, budgets=ledger.status(),
        decisions=mart.frame("routing_decisions", columns=_DECISION_COLUMNS, order_by="decided_at"),
        executions=mart.frame("executions", columns=_EXECUTION_COLUMNS, order_by="started_at"),
        audit_rows=mart.frame("audit_log", columns=_AUDIT_COLUMNS), audit=audit.verify(),
        budget_refusals=_budget_refusals(mart))
    data.reward = reward_summary(data.decisions)
    try:
        data.forecast = forecast(calls, hours=forecast_hours, now=generated)
    except InsufficientHistoryError as exc:
        data.forecast_error = str(exc)
    return data


def _budget_refusals(mart: "TidyMart") -> "pd.DataFrame":
    """Budget refusals with the budget that refused (a department's refusal must not mark the org's
    budget exhausted too)."""
    events = mart.frame("budget_events", columns=["at", "budget_id", "kind"], kind="refused")
    budgets = mart.frame("budgets", columns=["id", "scope", "name", "period"])
    return events.merge(budgets, left_on="budget_id", right_on="id", how="inner")[["at", "scope", "name", "period"]]


def _scope_calls(calls: "pd.DataFrame", scope: str, name: str) -> "pd.DataFrame":
    column = {"department": "department", "user": "user_id", "route": "route", "model": "requested_model"}.get(scope)
    return calls if column is None else calls[calls[column] == name]


def budget_burn(data: ReportData) -> "pd.DataFrame":
    """Per budget: its current window's spend, the burn rate since the window's first call, and when
    the budget runs out at that rate (``exhausts_at``; NaT when it lasts the window)."""
    import pandas as pd

    now = pd.Timestamp(data.generated_at)
    rows = []
    for b in data.budgets.itertuples(index=False):
        in_window = _scope_calls(data.calls, b.scope, b.name)
        in_window = in_window[in_window["started_at"] >= b.window_start]
        spent = float(b.spent_usd)
        used = (spent + float(b.reserved_usd)) / b.limit_usd if b.limit_usd > 0 else math.nan
        events = data.budget_refusals
        refused = events[(events["scope"] == b.scope) & (events["name"] == b.name) & (events["period"] == b.period)
                         & (events["at"] >= b.window_start)]
        exhausts, state = pd.NaT, "ok"
        first = in_window["started_at"].min() if len(in_window) else pd.NaT
        elapsed_h = (now - first).total_seconds() / 3600.0 if pd.notna(first) else 0.0
        rate = spent / elapsed_h if elapsed_h > 0 else 0.0
        end = b.window_end if pd.notna(b.window_end) else pd.NaT
        if b.remaining_usd <= max(1e-9, 0.001 * b.limit_usd) or len(refused):
            state = "exhausted"
            exhausts = refused["at"].min() if len(refused) else in_window["started_at"].max()
        elif rate > 0:
            at = now + pd.Timedelta(hours=float(b.remaining_usd) / rate)
            if pd.isna(end) or at < end:
                exhausts, state = at, "at risk"
        rows.append({"scope": b.scope, "name": b.name, "period": b.period, "limit_usd": float(b.limit_usd),
                     "spent_usd": spent, "reserved_usd": float(b.reserved_usd),
                     "remaining_usd": float(b.remaining_usd), "used": used, "rate_usd_per_hour": rate,
                     "budget_refusals": len(refused), "exhausts_at": exhausts, "state": state,
                     "window_start": b.window_start, "window_end": end})
    frame = pd.DataFrame(rows, columns=["scope", "name", "period", "limit_usd", "spent_usd", "reserved_usd",
                                        "remaining_usd", "used", "rate_usd_per_hour", "budget_refusals",
                                        "exhausts_at", "state", "window_start", "window_end"])
    for col in ("exhausts_at", "window_start", "window_end"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    return frame


def reward_summary(decisions: "pd.DataFrame", *, n_bootstrap: int = 100, random_state: int = 0,
                   min_decisions: int = 30) -> dict[str, Any]:
    """The learning router's logged reward (overall, first and last third of its rewarded decisions)
    and, on the same last third, what each fixed route would have earned: a doubly robust off-policy
    estimate (:func:`tidyllm.routing.evaluate`) with its bootstrap interval. ``best_fixed_route`` and
    ``best_fixed`` name the best of them. With fewer than ``min_decisions`` rewarded decisions,
    only ``note`` says why there is nothing to compare."""
    import json

    from tidyllm.errors import RoutingError
    from tidyllm.routing import evaluate

    rewarded = decisions[decisions["reward"].notna()].reset_index(drop=True)
    out: dict[str, Any] = {"decisions": len(decisions), "rewarded": len(rewarded)}
    if len(rewarded) < min_decisions:
        out["note"] = (f"only {len(rewarded)} rewarded routing decisions: too few to compare with fixed routes"
                       if len(decisions) else "no routing decisions logged (routing.strategy: bandit logs them)")
        return out
    third = len(rewarded) // 3
    last = rewarded.iloc[-third:]
    out.update(logged=float(rewarded["reward"].mean()), first_third=float(rewarded["reward"].iloc[:third].mean()),
               last_third=float(last["reward"].mean()),
               explored=float(rewarded["explored"].fillna(False).astype(float).mean()))
    routes = sorted({r for cands in last["candidates"]
                     for r in (json.loads(cands) if isinstance(cands, str) else cands or [])})
    fixed: dict[str, dict[str, float]] = {}
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # many tiny ridge fits: BLAS threads only fight each other on a small machine
    with threadpool_limits(limits=1, user_api="blas"):
        for route in routes:
            try:
                ev = evaluate(route, last, n_bootstrap=n_bootstrap, random_state=random_state)
            except RoutingError:
                continue  # e.g. malformed logged rows: leave this route out rather than fail the page
            fixed[route] = {"value": ev.dr.value, "ci_low": ev.dr.ci_low, "ci_high": ev.dr.ci_high}
    out["fixed"] = fixed
    if fixed:
        best = max(fixed, key=lambda r: fixed[r]["value"])
        out.update(best_fixed_route=best, best_fixed=fixed[best]["value"])
    return out

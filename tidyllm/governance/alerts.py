"""Budget alerts: soft thresholds and forecast exhaustion, stored once per threshold per window and
delivered to people by a background worker.

A budget's window raises a ``threshold`` alert when its settled spend reaches a fraction of its limit
(``alerts.thresholds``, default 50/80/100 %, or the budget's own ``thresholds``; its ``soft_threshold``
too), and a ``forecast`` alert when, at the window's spend rate so far, the budget runs out before the
window ends and within ``alerts.forecast_hours``. The ``alert_events`` table's unique key
(budget, window, kind, threshold) makes each alert fire once, whichever process sees it first; that
process delivers it to the sinks: the ``tidyllm.alerts`` logger, a JSON webhook (``webhook_format:
slack`` sends ``{"text": ...}``) and an SMTP email. Failed deliveries are retried with exponential
backoff; the outcome per sink is stored in ``alert_events.deliveries``. Nothing here runs on a call's
path: a finished call only wakes the worker.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import sqlalchemy as sa

from tidyllm.mart.schema import alert_events, budget_windows, budgets
from tidyllm.mart.store import as_utc, utcnow

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.governance.budgets import BudgetLedger
    from tidyllm.mart import TidyMart
    from tidyllm.settings import AlertSettings

__all__ = ["Alerts", "LogSink", "WebhookSink", "EmailSink", "Sink"]

log = logging.getLogger("tidyllm.alerts")

#: seconds between two evaluations prompted by finished calls
_MIN_EVALUATION_GAP = 1.0
#: a forecast needs this share of its window behind it before it speaks (a first call is no trend)
_MIN_ELAPSED_SHARE = 0.05


class Sink(Protocol):
    """Somewhere alerts go. ``send`` raises on failure (the worker retries)."""

    name: str

    def send(self, alert: dict[str, Any]) -> None: ...


class LogSink:
    """Log each alert as a warning on the ``tidyllm.alerts`` logger."""

    name = "log"

    def send(self, alert: dict[str, Any]) -> None:
        log.warning("%s", alert["message"])


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters; a hostile budget name must stay text
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class WebhookSink:
    """POST each alert as JSON to ``url``: tidyllm's payload, or ``{"text": ...}`` with ``fmt="slack"``."""

    name = "webhook"

    def __init__(self, url: str, fmt: str = "json", timeout: float = 10.0) -> None:
        self.url, self.fmt, self.timeout = url, fmt, timeout

    def payload(self, alert: dict[str, Any]) -> dict[str, Any]:
        if self.fmt == "slack":
            return {"text": _slack_escape(alert["message"])}
        return {k: alert[k] for k in ("id", "at", "kind", "threshold", "message")} | {"budget": alert["data"]}

    def send(self, alert: dict[str, Any]) -> None:
        import urllib.request

        body = json.dumps(self.payload(alert), default=str).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "tidyllm"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - configured URL
            if not 200 <= response.status < 300:
                raise OSError(f"webhook answered HTTP {response.status}")


class EmailSink:
    """Email each alert through an SMTP server (``host:port``), with optional STARTTLS and login."""

    name = "email"

    def __init__(self, server: str, sender: str, recipients: Sequence[str], *, starttls: bool = False,
                 username: str | None = None, password: str | None = None, timeout: float = 10.0) -> None:
        host, _, port = server.rpartition(":") if ":" in server else (server, "", "25")
        self.host, self.port = host, int(port)
        self.sender, self.recipients = sender, list(recipients)
        self.starttls, self.username, self.password, self.timeout = starttls, username, password, timeout

    def send(self, alert: dict[str, Any]) -> None:
        import smtplib
        from email.message import EmailMessage

        msg = EmailMessage()
        msg["Subject"] = f"[tidyllm] {alert['message'][:150]}"
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg.set_content(alert["message"] + "\n\n" + json.dumps(alert["data"], indent=2, default=str))
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            if self.starttls:
                smtp.starttls()
            if self.username and self.password:
                smtp.login(self.username, self.password)
            smtp.send_message(msg)


def sinks_from_settings(settings: "AlertSettings", smtp_password: str | None = None) -> list[Any]:
    """The sinks ``settings`` configure."""
    sinks: list[Any] = []
    if settings.log:
        sinks.append(LogSink())
    if settings.webhook_url:
        sinks.append(WebhookSink(settings.webhook_url, settings.webhook_format))
    if settings.smtp_server and settings.email_to:
        sinks.append(EmailSink(settings.smtp_server, settings.email_from, settings.email_to,
                               starttls=settings.smtp_starttls, username=settings.smtp_username,
                               password=smtp_password))
    return sinks


@dataclass(order=True)
class _Delivery:
    due: float
    attempt: int = field(compare=False)
    sink: Any = field(compare=False)
    alert: dict[str, Any] = field(compare=False)


class Alerts:
    """Evaluates budget windows into alerts and delivers them in the background.

    Parameters
    ----------
    mart, ledger:
        The mart and its budget ledger (for time zones and soft-threshold warnings).
    thresholds:
        Default fractions of a limit that alert (a budget's own ``thresholds`` replace them).
    forecast_hours:
        Alert when the budget runs out within this many hours at the window's rate so far (0 = off).
    sinks:
        Where alerts go (:class:`LogSink`, :class:`WebhookSink`, :class:`EmailSink` or your own).
    retries, backoff_seconds:
        Delivery attempts per sink, and the first retry's delay (doubling each time).
    interval_seconds:
        How often the worker evaluates when no call wakes it.
    """

    def __init__(self, mart: "TidyMart", ledger: "BudgetLedger", *, thresholds: Sequence[float] = (0.5, 0.8, 1.0),
                 forecast_hours: float = 72.0, sinks: Sequence[Any] = (), retries: int = 5,
                 backoff_seconds: float = 1.0, interval_seconds: float = 30.0) -> None:
        self._mart = mart
        self._store = mart.store
        self.ledger = ledger
        self.thresholds = tuple(sorted(set(float(t) for t in thresholds)))
        self.forecast_hours = float(forecast_hours)
        self.sinks = list(sinks)
        self.retries = max(1, int(retries))
        self.backoff = float(backoff_seconds)
        self.interval = float(interval_seconds)
        self._queue: list[_Delivery] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._evaluate_due = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._results: dict[str, dict[str, Any]] = {}

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Record the alerts due now (each once per threshold per window) and queue their delivery;
        returns the new ones.

        It reads in a read transaction and takes the write lock only when something is new, so on SQLite
        it does not hold up admissions while nothing happens."""
        from tidyllm.governance.budgets import window_bounds

        now = now or utcnow()
        pending: list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]] = []
        with self._store.begin() as conn:
            fired = self._fired(conn)
            for b in conn.execute(sa.select(budgets)).mappings():
                b = dict(b)
                start, end = window_bounds(b["period"], now, self.ledger.tz)
                w = conn.execute(sa.select(budget_windows).where(
                    budget_windows.c.budget_id == b["id"], budget_windows.c.window_start == start)).mappings().first()
                if w is None or not b["limit_usd"]:
                    continue
                window = dict(w) | {"window_start": start}
                new = [{"id": str(uuid.uuid4()), "at": now, "budget_id": b["id"], "window_start": start, "kind": kind,
                        "threshold": threshold, "message": message, "data": data}
                       for kind, threshold, message, data in self._due(b, window, start, end, now)
                       if (b["id"], start, kind, threshold) not in fired]
                if new or self.ledger.warning_due(b, window):
                    pending.append((b, window, new))
        fresh: list[dict[str, Any]] = []
        if pending:
            with self._store.begin(write=True) as conn:
                for b, window, new in pending:
                    self.ledger.warn_if_due(conn, b, window, now)
                    for alert in new:
                        # RETURNING, not rowcount: psycopg reports 1 for a row ON CONFLICT DO NOTHING skipped
                        inserted = conn.execute(_insert_once(self._store.dialect).values(**alert)
                                                .returning(alert_events.c.id)).first()
                        if inserted is not None:
                            fresh.append(alert)
        for alert in fresh:
            self._enqueue(alert)
        return fresh

    @staticmethod
    def _fired(conn: Any) -> set[tuple[str, dt.datetime, str, float]]:
        """``(budget id, window start, kind, threshold)`` of every alert already recorded."""
        rows = conn.execute(sa.select(alert_events.c.budget_id, alert_events.c.window_start, alert_events.c.kind,
                                      alert_events.c.threshold)).all()
        return {(r[0], as_utc(r[1]), r[2], float(r[3])) for r in rows}

    def _due(self, b: dict[str, Any], w: dict[str, Any], start: dt.datetime, end: dt.datetime | None,
             now: dt.datetime) -> list[tuple[str, float, str, dict[str, Any]]]:
        limit, spent = float(b["limit_usd"]), float(w["spent_usd"] or 0.0)
        own = b.get("thresholds")  # parsed by SQLAlchemy
        levels = set(own) if own else set(self.thresholds)
        if b.get("soft_threshold"):
            levels.add(float(b["soft_threshold"]))
        what = f"{b['scope']} '{b['name']}'" if b["scope"] != "org" else "the org"
        period = b["period"] if b["period"] != "total" else "total"
        base = {"scope": b["scope"], "name": b["name"], "period": b["period"], "limit_usd": limit,
                "spent_usd": spent, "window_start": start.isoformat(), "window_end": end.isoformat() if end else None}
        out = []
        for t in sorted(levels):
            # exact at the threshold: 80.0 % of the limit alerts, 79.9 % does not (relative epsilon for rounding)
            if spent >= t * limit * (1 - 1e-12):
                out.append(("threshold", t, f"{what} has spent {spent / limit:.1%} of its {_usd(limit)} {period} "
                            f"budget ({_usd(spent)}); alert at {t:.0%}", base | {"threshold": t}))
        if self.forecast_hours > 0 and end is not None and 0 < spent < limit:
            elapsed = (now - start).total_seconds()
            length = (end - start).total_seconds()
            if elapsed >= _MIN_ELAPSED_SHARE * length:
                rate = spent / elapsed  # USD per second over the window so far
                hours_left = (limit - spent) / rate / 3600
                # compared in hours first: a trickle of spend projects past any date a datetime can hold
                if hours_left <= self.forecast_hours and hours_left * 3600 < (end - now).total_seconds():
                    runs_out = now + dt.timedelta(hours=hours_left)
                    left = f"{hours_left / 24:.1f} days" if hours_left >= 48 else f"{hours_left:.1f} hours"
                    out.append(("forecast", 0.0, f"{what} runs out in {left} at this rate ({_usd(spent)} of "
                                f"{_usd(limit)} spent; the {period} window ends {end:%Y-%m-%d %H:%M} UTC)",
                                base | {"runs_out_at": runs_out.isoformat(), "hours_left": hours_left}))
        return out

    # --- delivery -----------------------------------------------------------------------------

    def _enqueue(self, alert: dict[str, Any]) -> None:
        import heapq

        with self._lock:
            self._idle.clear()
            for sink in self.sinks:
                heapq.heappush(self._queue, _Delivery(time.monotonic(), 1, sink, alert))
            if not self.sinks:
                self._finish(alert["id"], {})
            self._check_idle()
        self._wake.set()

    def _check_idle(self) -> None:
        if not self._queue:
            self._idle.set()

    def deliver_due(self) -> None:
        """Deliver every queued alert whose turn has come (the worker calls this; tests may too)."""
        import heapq

        while True:
            with self._lock:
                if not self._queue or self._queue[0].due > time.monotonic():
                    self._check_idle()
                    return
                item = heapq.heappop(self._queue)
            error = None
            try:
                item.sink.send(item.alert)
            except Exception as exc:  # noqa: BLE001 - any sink failure is retried, then recorded
                from tidyllm.redact import redact

                error = redact(f"{type(exc).__name__}: {exc}")
            results = self._results.setdefault(item.alert["id"], {})
            if error is None or item.attempt >= self.retries:
                results[item.sink.name] = {"status": "delivered" if error is None else "failed",
                                           "attempts": item.attempt, "error": error}
                if error is not None:
                    log.error("alert %s could not be delivered to %s after %d attempts: %s", item.alert["id"],
                              item.sink.name, item.attempt, error)
                if len(results) == len(self.sinks):
                    self._finish(item.alert["id"], results)
            else:
                delay = self.backoff * 2 ** (item.attempt - 1)
                with self._lock:
                    heapq.heappush(self._queue, _Delivery(time.monotonic() + delay, item.attempt + 1, item.sink,
                                                          item.alert))

    def _finish(self, alert_id: str, results: dict[str, Any]) -> None:
        self._results.pop(alert_id, None)
        try:
            with self._store.begin(write=True) as conn:
                conn.execute(alert_events.update().where(alert_events.c.id == alert_id).values(deliveries=results))
        except Exception:  # noqa: BLE001 - a closed mart at shutdown: the alert itself is stored
            log.warning("could not record the delivery of alert %s", alert_id, exc_info=True)

    # --- the worker ---------------------------------------------------------------------------

    def poke(self) -> None:
        """Ask the worker to evaluate soon (a call finished); never blocks."""
        self._evaluate_due.set()
        self._wake.set()

    def start(self) -> "Alerts":
        """Start the background worker (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tidyllm-alerts", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        next_evaluation = time.monotonic()
        last_evaluation = -_MIN_EVALUATION_GAP
        while not self._stop.is_set():
            with self._lock:
                next_delivery = self._queue[0].due if self._queue else float("inf")
            timeout = max(0.0, min(next_delivery, next_evaluation) - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if self._evaluate_due.is_set():
                    # busy traffic pokes after every call: evaluate at most once a second
                    self._evaluate_due.clear()
                    next_evaluation = min(next_evaluation, last_evaluation + _MIN_EVALUATION_GAP)
                if time.monotonic() >= next_evaluation:
                    last_evaluation = time.monotonic()
                    next_evaluation = last_evaluation + self.interval
                    self.evaluate()
                self.deliver_due()
            except Exception:  # noqa: BLE001 - the worker must outlive a database hiccup
                log.warning("the alert worker failed; retrying", exc_info=True)
                next_evaluation = time.monotonic() + min(self.interval, 5.0)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued delivery is done (delivered or given up); returns whether it is."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (queued deliveries not yet done are dropped, their alerts stay stored)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def frame(self) -> "pd.DataFrame":
        """The ``alert_events`` table, newest last."""
        return self._mart.frame("alert_events", order_by="at")


def _usd(amount: float) -> str:
    from tidyllm.governance.budgets import usd

    return usd(amount)


def _insert_once(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(alert_events).on_conflict_do_nothing()

"""Budget alerts: exact thresholds, once per threshold per window, forecast exhaustion, and delivery to a
local HTTP receiver and a local SMTP server with retries, off the call's path."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import socket
import threading
import time
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.gateway.simulator import Simulator
from tidyllm.governance.budgets import window_bounds
from tidyllm.governance.context import CallContext
from tidyllm.mart.store import utcnow

from govhelpers import META, sim_router


def spend(platform: Any, department: str, amount: float) -> None:
    """Settled spend in the department's window (the ledger's charge, as a call that bypassed enforcement)."""
    with platform.mart.store.tx() as tx:
        platform.budgets.charge(tx, CallContext(department=department), None, None, amount, utcnow())


@pytest.fixture
def quiet(db_url: str) -> Iterator[Any]:
    p = tidyllm.install(database_url=db_url, alerts={"log": False})
    yield p
    tidyllm.uninstall()


def test_thresholds_are_exact_at_79_9_80_0_80_1_percent(quiet: Any) -> None:
    for dept, amount in (("a", 79.9), ("b", 80.0), ("c", 80.1)):
        quiet.budgets.set("department", dept, 100.0)
        spend(quiet, dept, amount)
    fired = [a for a in quiet.alerts.evaluate() if a["kind"] == "threshold"]
    by_dept: dict[str, list[float]] = {}
    for alert in fired:
        by_dept.setdefault(alert["data"]["name"], []).append(alert["threshold"])
    assert by_dept == {"a": [0.5], "b": [0.5, 0.8], "c": [0.5, 0.8]}
    events = quiet.mart.frame("budget_events", kind="soft_threshold", parse_json=True)
    assert sorted(e["name"] for e in events["data"]) == ["b", "c"]  # the soft warning agrees
    assert quiet.alerts.evaluate() == []  # once per threshold per window
    spend(quiet, "a", 0.1 + 1e-9)
    assert [a["threshold"] for a in quiet.alerts.evaluate()] == [0.8]
    assert (quiet.alerts.frame()["kind"] == "threshold").sum() == 6


def test_reservations_do_not_raise_the_soft_warning(quiet: Any) -> None:
    """The issue's case: "passed 80 %" at 4 % spend, because a big reservation counted as spend."""
    quiet.budgets.set("department", "risk", 100.0)
    spend(quiet, "risk", 4.0)
    with quiet.mart.store.tx() as tx:
        res = quiet.budgets.reserve(tx, call_id="big", ctx=CallContext(department="risk"), route="ep", model="ep",
                                    prompt_cost_usd=0.0, output_cost_per_token=0.09, max_tokens=1000, now=utcnow())
    assert res.amount_usd == pytest.approx(90.0)
    assert quiet.mart.frame("budget_events", kind="soft_threshold").empty
    assert [a["threshold"] for a in quiet.alerts.evaluate() if a["kind"] == "threshold"] == []


def test_forecast_exhaustion_alerts_once(quiet: Any) -> None:
    quiet.budgets.set("department", "slow", 100.0, "day")
    quiet.budgets.set("department", "fast", 100.0, "day")
    spend(quiet, "slow", 30.0)
    spend(quiet, "fast", 60.0)
    start, _ = window_bounds("day", utcnow(), dt.timezone.utc)  # type: ignore[arg-type]
    noon = start + dt.timedelta(hours=12)
    fired = [a for a in quiet.alerts.evaluate(now=noon) if a["kind"] == "forecast"]
    # at noon: "slow" has 70 left at 2.5/h (28 h: past midnight, no alert), "fast" 40 left at 5/h (8 h)
    assert [a["data"]["name"] for a in fired] == ["fast"]
    assert fired[0]["data"]["hours_left"] == pytest.approx(8.0)
    assert "department 'fast' runs out in 8.0 hours at this rate" in fired[0]["message"]
    assert [a for a in quiet.alerts.evaluate(now=noon) if a["kind"] == "forecast"] == []


# --- delivery -------------------------------------------------------------------------------------


class Receiver:
    """A local HTTP receiver: answers 500 to the first ``failures`` posts, then 200, after ``delay`` s."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.bodies: list[Any] = []
        self.attempts = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                receiver.attempts += 1
                if receiver.attempts <= failures:
                    self.send_response(500)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """A local SMTP debugging server (aiosmtpd) that keeps what it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[Any] = []
        mailbox = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
                mailbox.messages.append(envelope)
                return "250 OK"

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=port)
        self.controller.start()
        self.server = f"127.0.0.1:{port}"

    def close(self) -> None:
        self.controller.stop()


def test_webhook_email_and_log_with_retries_and_a_hostile_name(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    receiver, mailbox = Receiver(failures=2), Mailbox()
    try:
        p = tidyllm.install(database_url=db_url, alerts={
            "webhook_url": receiver.url, "smtp_server": mailbox.server, "email_to": ["finops@example.com"],
            "backoff_seconds": 0.05, "retries": 4, "thresholds": [0.8], "forecast_hours": 0})
        hostile = "<!channel> & $\\alpha$ risk"
        p.budgets.set("department", hostile, 10.0)
        spend(p, hostile, 8.5)
        with caplog.at_level("WARNING", logger="tidyllm.alerts"):
            p.alerts.poke()  # the worker evaluates and delivers
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                frame = p.alerts.frame()
                if len(frame) and not frame["deliveries"].isna().any():
                    break
                time.sleep(0.05)
        alert = p.mart.frame("alert_events", parse_json=True).iloc[0]
        assert alert["deliveries"]["webhook"] == {"status": "delivered", "attempts": 3, "error": None}
        assert alert["deliveries"]["email"]["status"] == "delivered"
        assert alert["deliveries"]["log"]["status"] == "delivered"
        assert receiver.attempts == 3 and len(receiver.bodies) == 1
        payload = receiver.bodies[0]
        assert payload["kind"] == "threshold" and payload["threshold"] == 0.8
        assert payload["budget"]["name"] == hostile and payload["budget"]["spent_usd"] == 8.5
        assert len(mailbox.messages) == 1 and mailbox.messages[0].rcpt_tos == ["finops@example.com"]
        import email
        from email import policy

        mail = email.message_from_bytes(mailbox.messages[0].content, policy=policy.default)
        assert mail["Subject"].startswith(f"[tidyllm] department '{hostile}' has spent 85.0% of its $10.00")
        assert "has spent 85.0% of its $10.00 month budget" in mail.get_body().get_content()
        assert any("has spent 85.0%" in r.getMessage() for r in caplog.records)
    finally:
        tidyllm.uninstall()
        receiver.close()
        mailbox.close()


def test_slack_payload_escapes_and_a_dead_webhook_is_given_up(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    good, dead = Receiver(), Receiver(failures=1000)
    try:
        url = f"sqlite:///{tmp_path / 'a.db'}"
        p = tidyllm.install(database_url=url, alerts={"webhook_url": good.url, "webhook_format": "slack",
                                                      "log": False, "thresholds": [0.5], "forecast_hours": 0})
        p.budgets.set("department", "<!here> ops", 10.0)
        spend(p, "<!here> ops", 6.0)
        p.alerts.evaluate()
        assert p.alerts.flush(10)
        assert good.bodies == [{"text": "department '&lt;!here&gt; ops' has spent 60.0% of its $10.00 month budget "
                                        "($6.00); alert at 50%"}]
        tidyllm.uninstall()
        p = tidyllm.install(database_url=url, alerts={"webhook_url": dead.url, "log": False, "retries": 2,
                                                      "backoff_seconds": 0.01, "thresholds": [0.5, 0.6],
                                                      "forecast_hours": 0})
        with caplog.at_level("ERROR", logger="tidyllm.alerts"):
            p.alerts.evaluate()
            assert p.alerts.flush(10)
        time.sleep(0.2)
        rows = p.mart.frame("alert_events", parse_json=True)
        last = rows[rows["threshold"] == 0.6].iloc[0]
        assert last["deliveries"]["webhook"]["status"] == "failed" and last["deliveries"]["webhook"]["attempts"] == 2
        assert "HTTP Error 500" in last["deliveries"]["webhook"]["error"]
        assert any("could not be delivered to webhook after 2 attempts" in r.getMessage() for r in caplog.records)
    finally:
        tidyllm.uninstall()
        good.close()
        dead.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=0, latency_scale=0) as s:
        yield s


def test_a_slow_sink_never_blocks_a_governed_call(tmp_path: Any, sim: Simulator) -> None:
    slow = Receiver(delay=3.0)
    try:
        p = tidyllm.install(database_url=f"sqlite:///{tmp_path / 'b.db'}", routing={"strategy": "cheapest"},
                            alerts={"webhook_url": slow.url, "log": False, "thresholds": [0.001]})
        router = sim_router(p, sim.url)
        router.completion(model="chat", messages=[{"role": "user", "content": "warm up"}], max_tokens=5,
                          metadata=dict(META))  # LiteLLM's first call imports a lot: not what is measured
        p.budgets.set("department", "risk", 0.01)
        started = time.monotonic()
        router.completion(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                          metadata=dict(META))
        p.wait_for_call(p.calls(order_by="-started_at").iloc[0]["id"])
        router.completion(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                          metadata=dict(META))
        assert time.monotonic() - started < 2.5  # the 3 s webhook is not on the calls' path
        deadline = time.monotonic() + 20
        while not slow.bodies and time.monotonic() < deadline:
            time.sleep(0.1)
        assert slow.bodies and slow.bodies[0]["budget"]["name"] == "risk"
    finally:
        tidyllm.uninstall()
        slow.close()

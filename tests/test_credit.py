"""Admission credit: a busy caller's calls are admitted from a block its process reserved in advance, with no
database write before the provider is called — and the limits, the rows and the audit chain stay exact
(SQLite and PostgreSQL). The 4 processes × 8 threads proof with credit is in test_concurrency.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import tidyllm
from govhelpers import CALL_ROWS
from tidyllm.errors import BudgetExceededError, ConfigurationError
from tidyllm.gateway.simulator import Simulator
from tidyllm.governance.credit import CREDIT_PREFIX
from tidyllm.mart.store import utcnow

TESTS = Path(__file__).parent
META = {"user_id": "ana", "department": "risk", "audit_reason": "MVR peer review", "use_case": "qa"}
MSG = [{"role": "user", "content": "Summarise the peer review findings."}]


def _mock_router(platform: Any) -> Any:
    from tidyllm._litellm import import_litellm

    litellm = import_litellm()
    router = litellm.Router(model_list=[{
        "model_name": "chat", "model_info": {"id": "ep"},
        "litellm_params": {"model": "openai/ep", "mock_response": "A mocked answer.", "api_key": "not-used-mock",
                           "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}], num_retries=0)
    return platform.govern(router)


@pytest.fixture
def platform(db_url: str) -> Iterator[Any]:
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
    p.prices.set("ep", 1.0, 2.0)
    yield p
    tidyllm.uninstall()


class _CallerWrites:
    """Counts the write transactions opened on the calling thread."""

    def __init__(self, platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        store = platform.mart.store
        original = store.tx
        caller = threading.current_thread()

        def counting(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is caller and kwargs.get("write", True):
                self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(store, "tx", counting)


def _call(router: Any, name: str, max_tokens: int = 32) -> Any:
    return router.completion(model="chat", messages=MSG, max_tokens=max_tokens,
                             metadata={**META, "tidyllm_call_id": name})


def _burst(platform: Any, router: Any, prefix: str, n: int) -> list[dict[str, Any]]:
    """``n`` calls in a row (a busy caller), then their settled rows."""
    names = [f"{prefix}-{i}" for i in range(n)]
    for name in names:
        _call(router, name)
    return [platform.wait_for_call(name) for name in names]


def _reservations(platform: Any) -> Any:
    return platform.mart.sql("SELECT call_id, amount_usd, status, settled_usd FROM reservations")


def test_a_busy_caller_is_admitted_from_credit_and_every_call_is_written(
        platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    platform.budgets.set("department", "risk", 10.0, "month")
    router = _mock_router(platform)
    writes = _CallerWrites(platform, monkeypatch)
    one_statement = []  # PostgreSQL writes each credit call in one statement (see Governor)
    original = platform.governor._record_credit_in_one_statement
    monkeypatch.setattr(platform.governor, "_record_credit_in_one_statement",
                        lambda *a, **k: one_statement.append(original(*a, **k)) or one_statement[-1])
    rows = _burst(platform, router, "busy", 40)
    names = [r["id"] for r in rows]

    # one block of 32 worst cases pays for up to 32 calls: 40 calls took the first call's lease and two or
    # three blocks (the worst case shrinks or grows as the route's estimate learns from the provider's
    # counts), and no write transaction at all on the caller's thread for the others
    reservations = _reservations(platform)
    blocks = reservations[reservations["call_id"].str.startswith(CREDIT_PREFIX)]
    assert len(blocks) in (2, 3) and len(reservations) == 1 + len(blocks)
    # (+1 when a block ran short as the worst case grew: its leftover goes back before the next grant)
    assert 1 + len(blocks) <= writes.count <= 2 + len(blocks)
    assert all(r["status"] == "success" for r in rows)
    is_postgres = platform.mart.store.dialect == "postgresql"
    # (the first few may come before the first call created the audit chain's head: the general transaction)
    assert (len(one_statement), all(one_statement[-30:])) == ((39, True) if is_postgres else (0, True))
    worst = max(r["reserved_usd"] for r in rows)
    assert worst > 0 and all(r["cost_usd"] <= r["reserved_usd"] for r in rows)
    assert blocks["amount_usd"].max() <= 32 * worst + 1e-12  # what is left of each block

    # status() shows this process's unused credit as not reserved; open_reservations() gives it back
    status = platform.budgets.status(scope="department", name="risk").iloc[0]
    calls = platform.calls()
    assert len(calls) == 40 and (calls["status"] == "success").all()
    assert status["spent_usd"] == pytest.approx(calls["cost_usd"].sum())
    assert status["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
    assert platform.budgets.open_reservations() == 0
    blocks = _reservations(platform)
    blocks = blocks[blocks["call_id"].str.startswith(CREDIT_PREFIX)]
    assert (blocks["status"] == "settled").all() and blocks["amount_usd"].abs().max() < 1e-12
    # the blocks charged exactly what their calls cost (the first call had a lease of its own)
    assert blocks["settled_usd"].sum() == pytest.approx(calls.loc[calls["id"] != names[0], "cost_usd"].sum())

    audit = platform.mart.frame("audit_log", parse_json=True, decision=["allowed", "refused", "unenforced"])
    from_credit = audit["extra"].map(lambda e: bool(e and e.get("credit_id")))
    assert from_credit.sum() == 39 and set(audit.loc[from_credit, "extra"].map(lambda e: e["credit_id"])) \
        == {r[len(CREDIT_PREFIX):] for r in blocks["call_id"]}
    assert len(audit) == 40 and set(audit["call_id"]) == set(names)
    assert platform.audit.verify().ok


def test_unused_credit_goes_back_by_itself_when_the_caller_goes_quiet(platform: Any) -> None:
    platform.budgets.set("department", "risk", 10.0, "month")
    _burst(platform, _mock_router(platform), "quiet", 5)
    # read the window itself (status() shows this process's unused credit as not reserved)
    held = lambda: float(platform.mart.sql("SELECT SUM(reserved_usd) AS r FROM budget_windows").iloc[0]["r"])  # noqa: E731
    assert held() > 0  # the block's unused part: no call is in flight
    deadline = time.monotonic() + 5
    while held() > 1e-12:
        assert time.monotonic() < deadline, "idle credit was not given back"
        time.sleep(0.05)
    assert (_reservations(platform)["status"] != "open").all()


def test_near_the_limit_calls_are_admitted_one_by_one_and_idle_credit_never_refuses(platform: Any) -> None:
    router = _mock_router(platform)
    platform.budgets.set("department", "risk", 10.0, "month")
    _call(router, "probe")
    probe = platform.wait_for_call("probe")
    worst = probe["reserved_usd"]
    limit = probe["cost_usd"] + 80 * worst  # room for one block (twice its size is needed) and then the exact path
    platform.budgets.set("department", "risk", limit, "month")
    admitted, refusal = 0, None
    for i in range(2000):
        try:
            _call(router, f"near-{i}")
            admitted += 1
        except BudgetExceededError as err:
            refusal = err
            break
    assert refusal is not None
    # what was held at the refusal was in-flight calls' worst cases, not a block's unused credit
    assert refusal.reserved_usd < 3 * worst
    for i in range(admitted):
        platform.wait_for_call(f"near-{i}")
    status = platform.budgets.status(scope="department", name="risk").iloc[0]
    assert status["spent_usd"] <= limit + 1e-12 and status["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
    # refused only when not even one more worst case fitted
    assert limit - status["spent_usd"] < 4 * worst
    blocks = _reservations(platform)
    assert blocks["call_id"].str.startswith(CREDIT_PREFIX).sum() >= 1
    assert platform.audit.verify().ok


def test_changing_a_budget_gives_this_process_credit_back_at_once(platform: Any) -> None:
    platform.budgets.set("department", "risk", 10.0, "month")
    router = _mock_router(platform)
    worst = _burst(platform, router, "before", 3)[-1]["reserved_usd"]
    platform.budgets.set("department", "risk", 2 * worst, "month")  # lowered below the block: it stops
    with pytest.raises(BudgetExceededError):
        for i in range(4):
            _call(router, f"after-{i}")
    status = platform.budgets.status(scope="department", name="risk").iloc[0]
    assert status["reserved_usd"] == pytest.approx(0.0, abs=1e-12)


def test_a_forked_child_does_not_admit_from_its_parents_credit(platform: Any) -> None:
    platform.budgets.set("department", "risk", 10.0, "month")
    router = _mock_router(platform)
    for i in range(3):
        _call(router, f"parent-{i}")
    credit = platform.budgets.credit
    key = ("risk", "ana", "ep", "chat")
    day = platform.budgets.day_start(utcnow())
    pid = os.fork()
    if pid == 0:  # the child: the parent's block is not there
        ok = credit.take(key, day, 1e-9, "child-call") == (None, 0.0) and not credit._open
        os._exit(0 if ok else 1)
    _, code = os.waitpid(pid, 0)
    assert code == 0
    assert credit.take(key, day, 1e-9, "parent-probe")[0] is not None  # the parent still admits from it


def test_credit_can_be_turned_off_and_bad_values_are_refused(db_url: str) -> None:
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"},
                        governance={"admission_credit_calls": 0})
    try:
        p.prices.set("ep", 1.0, 2.0)
        p.budgets.set("department", "risk", 10.0, "month")
        _burst(p, _mock_router(p), "off", 6)
        assert sorted(_reservations(p)["call_id"]) == sorted(f"off-{i}" for i in range(6))
    finally:
        tidyllm.uninstall()
    with pytest.raises(ConfigurationError, match="admission_credit_calls"):
        tidyllm.install(database_url=db_url, governance={"admission_credit_calls": -1})


KILLED = r"""
import sys, threading
sys.path.insert(0, sys.argv[3])
import tidyllm
from govhelpers import sim_router, META
platform = tidyllm.install(database_url=sys.argv[1], routing={"strategy": "cheapest"},
                           governance={"lease_ttl_seconds": 2})
router = sim_router(platform, sys.argv[2], routes={"ep-slow": ("sim-gpt-large", 10.0, 30.0)}, timeout=60)
def call():
    router.completion(model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=100,
                      metadata=dict(META))
first = threading.Thread(target=call)
first.start()
threading.Event().wait(0.3)
call()  # the second call of a busy caller: admitted with a credit block
"""


def test_a_killed_process_leases_are_reclaimed_at_once_and_its_calls_charged(db_url: str) -> None:
    """A SIGKILLed process's leases are reclaimed at once (its pid is gone), not at TTL: the calls it had at
    the provider — its per-call lease, and the credit call its journal shows in flight — are charged at
    their worst case as ``unsettled`` call rows with audit rows; the block's unused credit goes back."""
    with Simulator(seed=2, latency_scale=20.0) as slow:  # the large model answers in ~30 s: plenty to kill it
        platform = tidyllm.install(database_url=db_url, governance={"lease_ttl_seconds": 300})
        try:
            platform.budgets.set("department", "risk", 1.0, "month")
            proc = subprocess.Popen([sys.executable, "-c", KILLED, db_url, slow.url, str(TESTS)],
                                    stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 60
                while not _reservations(platform)["call_id"].str.startswith(CREDIT_PREFIX).any():
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "no credit block was reserved"
                    time.sleep(0.1)
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            reserved = platform.budgets.status().iloc[0]["reserved_usd"]
            assert reserved > 0
            assert platform.budgets.reconcile() == 2  # the first call's lease and the block: no TTL wait
            status = platform.budgets.status().iloc[0]
            calls = platform.mart.frame("llm_calls")
            assert sorted(calls["status"]) == ["unsettled", "unsettled"]
            worst = calls["reserved_usd"]
            assert list(calls["cost_usd"]) == pytest.approx(list(worst))
            assert status["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
            assert status["spent_usd"] == pytest.approx(worst.sum()) and worst.sum() < reserved
            assert (_reservations(platform)["status"] == "unsettled").all()
            audit = platform.audit.frame(decision=CALL_ROWS)
            assert sorted(audit["call_id"]) == sorted(calls["id"]) and set(audit["status"]) == {"unsettled"}
            assert platform.audit.verify().ok
        finally:
            tidyllm.uninstall()

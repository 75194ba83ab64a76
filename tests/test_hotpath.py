"""The governed call's hot path: prepared statements, lease expiry on an interval, the routing pre-filter's
cached headroom, and first registrations racing each other (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.errors import BudgetExceededError

from govhelpers import CALL_ROWS

META = {"user_id": "ana", "department": "risk", "audit_reason": "MVR peer review", "use_case": "qa"}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def platform(db_url: str) -> Iterator[Any]:
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"},
                        governance={"lease_ttl_seconds": 0.5})
    p.prices.set("ep", 1_000.0, 1_000.0)  # $0.001 per token in and out
    yield p
    tidyllm.uninstall()


def _admit(platform: Any, max_tokens: int) -> Any:
    gov = platform.governor
    return gov.admit(ctx=gov.context(dict(META)), route="ep", requested_model="chat", messages=MSG,
                     max_tokens=max_tokens, prompt_tokens=10)


def test_an_expired_lease_is_charged_until_its_call_reports(platform: Any) -> None:
    """A lease whose time ran out while its call may be at the provider is charged at its worst case
    (``unsettled``), by the next admission that needs its money — never simply returned; the call's own
    settlement, arriving late, corrects the charge to the real cost."""
    from tidyllm.records import CallRecord

    platform.budgets.set("department", "risk", 0.1, "month")
    held = _admit(platform, 80)  # 10 in + 80 out tokens: $0.09 held, the call still out
    assert held.reserved_usd == pytest.approx(0.09)
    with pytest.raises(BudgetExceededError):
        _admit(platform, 50)  # the lease is still valid: $0.06 does not fit in $0.01
    time.sleep(0.6)  # past the TTL
    with pytest.raises(BudgetExceededError) as refused:
        _admit(platform, 50)  # the expired lease is charged, not returned: still no room
    assert refused.value.spent_usd == pytest.approx(0.09) and refused.value.reserved_usd == pytest.approx(0, abs=1e-12)
    events = platform.mart.frame("budget_events", kind="unsettled_lease", parse_json=True)
    assert list(events["data"].map(lambda d: d["call_id"])) == [held.call_id]
    call = platform.mart.frame("llm_calls", id=held.call_id).iloc[0]
    assert call["status"] == "unsettled" and call["cost_usd"] == pytest.approx(0.09)
    # the call reports after all (10 in + 20 out tokens = $0.03): the charge is corrected
    record = CallRecord(
        ok=True, litellm_call_id=None, call_type="completion", stamp=None, metadata={}, model="ep", model_id=None,
        model_group=None, provider=None, api_base=None, provider_model=None, stream=False, prompt_tokens=10,
        completion_tokens=20, cached_tokens=None, reasoning_tokens=None, litellm_cost=None, latency_ms=1.0,
        started_at=call["started_at"], ended_at=call["started_at"], error_type=None, error_message=None,
        exception=None, messages=None, tools=None, mock=True, tool_calls=(), partial=False)
    platform.governor._finish(record, held, None)
    call = platform.mart.frame("llm_calls", id=held.call_id).iloc[0]
    assert call["status"] == "success" and call["cost_usd"] == pytest.approx(0.03)
    status = platform.budgets.status(scope="department", name="risk").iloc[0]
    assert status["spent_usd"] == pytest.approx(0.03) and status["reserved_usd"] == pytest.approx(0, abs=1e-12)
    audit = platform.audit.frame(call_id=held.call_id)
    assert list(audit["status"]) == ["unsettled", "success"] and platform.audit.verify().ok
    admitted = _admit(platform, 50)  # $0.06 fits in the $0.07 left
    assert admitted.reserved_usd == pytest.approx(0.06) and not admitted.clamped


def test_a_refusal_after_expiry_still_names_the_real_numbers(platform: Any) -> None:
    platform.budgets.set("department", "risk", 0.02, "month")
    _admit(platform, 10)  # $0.02 held: nothing left
    time.sleep(0.6)
    with pytest.raises(BudgetExceededError) as refused:
        # after the expired $0.02 came back, 10 answer tokens would fit: fewer than a useful answer
        _admit(platform, 100)
    assert refused.value.reserved_usd == pytest.approx(0.0, abs=1e-12)
    assert refused.value.limit_usd == pytest.approx(0.02)


def test_first_registrations_racing_each_other_all_succeed(platform: Any) -> None:
    """Threads registering the same new price and budget at once: one inserts, the others find it."""
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def register() -> None:
        try:
            barrier.wait()
            platform.prices.set("ep-new", 2.0, 4.0)
            platform.budgets.set("department", "newdept", 5.0, "month")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(platform.mart.frame("prices", model="ep-new")) == 1
    assert len(platform.mart.frame("budgets", name="newdept")) == 1


def test_the_prefilter_headroom_follows_reservations_and_budget_changes(platform: Any) -> None:
    budgets = platform.budgets
    ctx = platform.governor.context(dict(META))
    budgets.set("department", "risk", 1.0, "month")
    assert budgets.headroom(ctx, None, "chat", max_age=1.0) == pytest.approx(1.0)  # read: nothing seen yet
    _admit(platform, 90)  # $0.1 held
    # what this process's reservation saw is answered without a read, and equals the database's answer
    assert budgets.headroom(ctx, None, "chat", max_age=1.0) == pytest.approx(0.9)
    assert budgets.headroom(ctx, None, "chat") == pytest.approx(0.9)
    budgets.set("department", "risk", 0.5, "month")  # a changed limit is never answered from memory
    assert budgets.headroom(ctx, None, "chat", max_age=1.0) == pytest.approx(0.4)


def test_a_new_period_creates_its_window_on_the_first_call(platform: Any) -> None:
    """Windows are created only when missing: a budget made after others, and a new day, both get theirs."""
    platform.budgets.set("department", "risk", 1.0, "month")
    _admit(platform, 10)
    platform.budgets.set("user", "ana", 1.0, "day")  # a second enclosing budget, no window yet
    _admit(platform, 10)
    windows = platform.mart.frame("budget_windows")
    assert len(windows) == 2
    assert (windows["reserved_usd"] > 0).all()  # both windows hold both reservations' share
    by_budget = platform.budgets.status().set_index("scope")
    assert by_budget.loc["user", "reserved_usd"] == pytest.approx(0.02)
    assert by_budget.loc["department", "reserved_usd"] == pytest.approx(0.04)


def test_an_image_is_reserved_by_its_token_cost_not_its_base64_length() -> None:
    """A base64 image is megabytes of text but at most ~1,600 tokens to any provider: the estimate counts
    IMAGE_TOKENS per image, and the text around it as before."""
    import base64

    from tidyllm.litellm_bridge.tokens import IMAGE_TOKENS, estimate_prompt_tokens

    text_only = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}]}]
    picture = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 2000).decode()  # ~680 KB
    with_image = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                               {"type": "image_url", "image_url": {"url": picture}}]}]
    base = estimate_prompt_tokens("gpt-4o", messages=text_only)
    estimate = estimate_prompt_tokens("gpt-4o", messages=with_image)
    assert IMAGE_TOKENS <= estimate - base <= IMAGE_TOKENS + 40  # the placeholder part's own JSON only
    assert estimate < len(picture) / 100  # was one token per two characters of the base64 text
    two = estimate_prompt_tokens("gpt-4o", messages=[with_image[0], with_image[0]])
    assert two >= 2 * IMAGE_TOKENS + base


def test_sqlite_write_transactions_share_one_process_connection(tmp_path: Any) -> None:
    """SQLite write transactions of tx() run on one kept connection of the process, from any thread; a nested
    one is a clear error; an error rolls back and becomes a StorageError; dispose() closes the connection; a
    forked child opens its own."""
    import os
    import sqlite3

    from tidyllm.errors import StorageError
    from tidyllm.mart import TidyMart

    mart = TidyMart(f"sqlite:///{tmp_path / 'm.db'}")
    store = mart.store
    seen: list[int] = []

    def write(n: int) -> None:
        with store.tx() as tx:
            seen.append(id(tx.cursor.connection))
            tx.cursor.execute("INSERT INTO budget_events (id, at, kind, data) VALUES (?, ?, 'test', '{}')",
                              (f"e{n}", "2026-01-01 00:00:00.000000"))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    write(4)
    assert len(set(seen)) == 1  # one connection for every thread
    with pytest.raises(StorageError, match="already open in this thread"):
        with store.tx():
            with store.tx():  # would wait for itself for the whole busy timeout: a clear error at once
                pass
    with pytest.raises(StorageError, match="UNIQUE"):
        with store.tx() as tx:
            tx.cursor.execute("INSERT INTO budget_events (id, at, kind, data) VALUES ('e5', '2026-01-01', 't', '{}')")
            tx.cursor.execute("INSERT INTO budget_events (id, at, kind, data) VALUES ('e0', '2026-01-01', 't', '{}')")
    count = mart.sql("SELECT COUNT(*) AS n FROM budget_events")["n"].iloc[0]
    assert count == 5  # the failed transaction left nothing (e5 rolled back with it)
    first = store._hot[1]
    if hasattr(os, "fork"):
        pid = os.fork()
        if pid == 0:  # the child must not use its parent's connection
            code = 0
            try:
                write(99)
                code = 0 if store._hot[1] is not first and store._hot[0] == os.getpid() else 3
            except BaseException:  # noqa: BLE001
                code = 4
            os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        assert mart.sql("SELECT COUNT(*) AS n FROM budget_events WHERE id = 'e99'")["n"].iloc[0] == 1
    mart.close()
    with pytest.raises(sqlite3.ProgrammingError):
        first.execute("SELECT 1")  # dispose() closed it


def test_settlement_chains_non_ascii_content_and_counts_a_call_once(db_url: str) -> None:
    """The settlement (one statement on PostgreSQL, the digest computed by the server) writes rows that
    verify with tidyllm's own digest, whatever the text; a second success event for the same call writes
    nothing more; an edited row is still caught."""
    from tidyllm._litellm import import_litellm
    from tidyllm.records import CallRecord

    litellm = import_litellm()
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"}, audit={"capture": "full"})
    try:
        p.prices.set("ep", 1.0, 2.0)
        p.budgets.set("department", "risk", 10.0, "month")
        router = p.govern(litellm.Router(model_list=[{
            "model_name": "chat", "model_info": {"id": "ep"},
            "litellm_params": {"model": "openai/ep", "mock_response": "Olá — ✓ 监管", "api_key": "x"}}]))
        tokens: list[Any] = []
        p.governor.add_listener(lambda rec, adm: tokens.append(rec.stamp))
        meta = {**META, "user_id": "josé", "audit_reason": "revisão ✓ 监管", "tidyllm_call_id": "unicode-1"}
        router.completion(model="chat", messages=[{"role": "user", "content": "Résumé 😀 \\ \" 监管"}],
                          max_tokens=8, metadata=meta)
        row = p.wait_for_call("unicode-1")
        assert row["status"] == "success" and row["cost_usd"] > 0
        assert "unicode-1" not in p.governor.listeners_done  # the call's listeners ran
        audit = p.audit.frame(decision=CALL_ROWS)
        assert list(audit["call_id"]) == ["unicode-1"] and audit["user_id"].iloc[0] == "josé"
        assert p.audit.verify().ok
        status = p.budgets.status(scope="department", name="risk").iloc[0]
        assert status["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
        assert status["spent_usd"] == pytest.approx(row["cost_usd"])
        # LiteLLM delivering the success event twice: the second finds the seal claimed and writes nothing
        record = CallRecord(
            ok=True, litellm_call_id=None, call_type="completion", stamp=tokens[0], metadata={}, model="ep",
            model_id=None, model_group=None, provider=None, api_base=None, provider_model=None, stream=False,
            prompt_tokens=1, completion_tokens=1, cached_tokens=None, reasoning_tokens=None, litellm_cost=None,
            latency_ms=1.0, started_at=row["started_at"], ended_at=row["started_at"], error_type=None,
            error_message=None, exception=None, messages=None, tools=None, mock=True, tool_calls=(), partial=False)
        p.governor.dispatch(record)
        assert len(p.audit.frame(decision=CALL_ROWS)) == 1
        assert p.budgets.status(scope="department", name="risk").iloc[0]["spent_usd"] == pytest.approx(row["cost_usd"])
        with p.mart.store.begin(write=True) as conn:
            import sqlalchemy as sa

            conn.execute(sa.text("UPDATE audit_log SET user_id = 'mallory'"))
        assert not p.audit.verify().ok
    finally:
        tidyllm.uninstall()


def test_the_routing_strategy_follows_the_routers_deployment_changes(tmp_path: Any) -> None:
    """The strategy keeps each group's deployments while LiteLLM's registry version stays the same: adding
    or removing a deployment must still be seen by the next call."""
    from tidyllm._litellm import import_litellm

    litellm = import_litellm()

    def deployment(route: str) -> dict[str, Any]:
        return {"model_name": "chat", "model_info": {"id": route},
                "litellm_params": {"model": f"openai/{route}", "mock_response": "ok", "api_key": "not-used-mock"}}

    p = tidyllm.install(database_url=f"sqlite:///{tmp_path / 'm.db'}", routing={"strategy": "cheapest"})
    try:
        p.prices.set("ep-a", 2.0, 2.0)
        p.prices.set("ep-b", 1.0, 1.0)  # cheaper: the cheapest strategy takes it whenever it is there
        router = p.govern(litellm.Router(model_list=[deployment("ep-a")], num_retries=0))

        def route(name: str) -> str:
            router.completion(model="chat", messages=MSG, metadata={**META, "tidyllm_call_id": name})
            return p.wait_for_call(name)["route"]

        assert route("one") == "ep-a"
        router.set_model_list([deployment("ep-a"), deployment("ep-b")])
        assert route("two") == "ep-b"
        from litellm.router_api import ChangeSet
        from litellm.types.router import Deployment

        router.apply(ChangeSet(delete=["ep-b"]))
        assert route("three") == "ep-a"
        router.apply(ChangeSet(upsert=[Deployment(**deployment("ep-b"))]))
        assert route("four") == "ep-b"
    finally:
        tidyllm.uninstall()

"""Governance: budgets, authorisation, audit, every LiteLLM call path — provider hits counted on the simulator."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

import tidyllm
from tidyllm.errors import (BudgetExceededError, ConfigurationError, MetadataError, RateLimitedError,
                            RouteNotAuthorizedError, UnpricedModelError)
from tidyllm.gateway.simulator import Simulator

from govhelpers import CALL_ROWS, META, sim_router

MSG = [{"role": "user", "content": "Summarise the peer review findings in two sentences."}]


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=0, latency_scale=0) as s:
        yield s


@pytest.fixture
def platform(db_url: str) -> Iterator[Any]:
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"},
                        governance={"require_audit": True})
    yield p
    tidyllm.uninstall()


def flush_async() -> None:
    from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

    async def go() -> None:
        await asyncio.sleep(0)
        await GLOBAL_LOGGING_WORKER.flush()

    asyncio.run(go())


def wait_settled(platform: Any, timeout: float = 10.0) -> None:
    """Sync success callbacks run on LiteLLM's logging threads: wait until no call is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        calls = platform.mart.frame("llm_calls")
        if not (calls["status"] == "pending").any():
            return
        time.sleep(0.05)
    raise AssertionError("calls still pending after callbacks should have run")


def test_router_sync_call_is_costed_settled_and_audited(platform: Any, sim: Simulator) -> None:
    router = sim_router(platform, sim.url)
    platform.budgets.set("department", "risk", 5.0, "month")
    resp = router.completion(model="chat", messages=MSG, max_tokens=50, metadata=dict(META))
    wait_settled(platform)
    call = platform.calls().iloc[0]
    assert call["status"] == "success" and call["route"] == "ep-small"  # cheapest rule
    assert call["prompt_tokens"] == resp.usage.prompt_tokens
    expected = (resp.usage.prompt_tokens * 1.0 + resp.usage.completion_tokens * 2.0) / 1e6
    assert call["cost_usd"] == pytest.approx(expected)
    assert call["reserved_usd"] >= call["cost_usd"]
    status = platform.budgets.status()
    assert status.iloc[0]["spent_usd"] == pytest.approx(expected) and status.iloc[0]["reserved_usd"] == 0
    audit = platform.audit.frame(decision=CALL_ROWS)
    assert list(audit["decision"]) == ["allowed"] and audit.iloc[0]["audit_reason"] == "MVR peer review"
    assert audit.iloc[0]["content_hash"] and audit.iloc[0]["content"] is None
    prices = platform.prices.frame()
    assert call["price_id"] in set(prices["id"])
    assert platform.audit.verify().ok


@pytest.mark.parametrize("path", ["router-sync", "router-async", "acompletion", "tidyllm-provider"])
def test_refused_calls_never_reach_the_provider(platform: Any, sim: Simulator, path: str) -> None:
    import litellm

    router = sim_router(platform, sim.url)
    platform.budgets.set("department", "risk", 0.0, "month")
    sim.reset_stats()
    platform.prices.set("openai/sim-gpt-small", 1.0, 2.0)
    with pytest.raises(Exception) as info:
        if path == "router-sync":
            router.completion(model="chat", messages=MSG, metadata=dict(META))
        elif path == "router-async":
            asyncio.run(router.acompletion(model="chat", messages=MSG, metadata=dict(META)))
        elif path == "acompletion":
            asyncio.run(litellm.acompletion(model="openai/sim-gpt-small", api_base=sim.url, api_key="sk-x",
                                            messages=MSG, metadata=dict(META)))
        else:
            platform._router = router  # the tidyllm/ provider forwards to the platform's Router
            litellm.completion(model="tidyllm/chat", messages=MSG, metadata=dict(META))
    err = info.value
    if path == "tidyllm-provider":
        # LiteLLM re-wraps a custom provider's exception; the budget message comes through
        assert isinstance(err, litellm.BadRequestError) and "has $0" in str(err)
    else:
        assert isinstance(err, BudgetExceededError) and "tidyllm budget set department risk" in str(err)
    assert sim.hits() == 0
    if path != "router-sync":
        flush_async()
    audit = platform.audit.frame(decision=CALL_ROWS)
    assert list(audit["decision"]) == ["refused"] and audit.iloc[0]["rule"].startswith("budget:department:risk")
    assert platform.audit.verify().ok


def test_plain_acompletion_is_governed(platform: Any, sim: Simulator) -> None:
    import litellm

    platform.prices.set("openai/sim-gpt-small", 1.0, 2.0)
    platform.budgets.set("user", "ana", 1.0, "day")

    async def go() -> Any:
        r = await litellm.acompletion(model="openai/sim-gpt-small", api_base=sim.url, api_key="sk-x",
                                      messages=MSG, max_tokens=40, metadata=dict(META))
        await asyncio.sleep(0)
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

        await GLOBAL_LOGGING_WORKER.flush()
        return r

    resp = asyncio.run(go())
    wait_settled(platform)
    call = platform.calls().iloc[0]
    assert call["status"] == "success" and call["user_id"] == "ana"
    assert call["cost_usd"] == pytest.approx((resp.usage.prompt_tokens + 2 * resp.usage.completion_tokens) / 1e6)
    assert platform.budgets.status().iloc[0]["reserved_usd"] == 0


def test_plain_sync_completion_is_enforced(platform: Any, sim: Simulator) -> None:
    """``install()`` instruments LiteLLM's sync entry points: a plain sync call over budget is refused before
    the provider is called, like any other governed call."""
    import litellm

    platform.prices.set("openai/sim-gpt-small", 1.0, 2.0)
    platform.prices.set("openai/sim-embed", 0.02, 0.0)
    platform.budgets.set("department", "risk", 0.0, "month")
    hits = sim.stats()["total"]
    with pytest.raises(BudgetExceededError):
        litellm.completion(model="openai/sim-gpt-small", api_base=sim.url, api_key="sk-x", messages=MSG,
                           metadata=dict(META))
    with pytest.raises(BudgetExceededError):
        litellm.embedding(model="openai/sim-embed", api_base=sim.url, api_key="sk-x", input=["a text"],
                          metadata=dict(META))
    assert sim.stats()["total"] == hits  # the provider was never contacted
    assert list(platform.audit.frame(decision=CALL_ROWS)["status"]) == ["refused", "refused"]


def test_plain_sync_completion_without_instrumentation_is_visible_as_unenforced(db_url: str, sim: Simulator) -> None:
    import litellm

    platform = tidyllm.install(database_url=db_url, governance={"instrument_sync": False})
    try:
        platform.prices.set("sim-gpt-small", 1.0, 2.0)
        platform.budgets.set("department", "risk", 0.0, "month")
        resp = litellm.completion(model="openai/sim-gpt-small", api_base=sim.url, api_key="sk-x", messages=MSG,
                                  metadata=dict(META))
        assert resp.choices[0].message.content  # nothing can stop it …
        deadline = time.monotonic() + 5
        while platform.calls().empty and time.monotonic() < deadline:
            time.sleep(0.05)
        call = platform.calls().iloc[0]
        assert call["status"] == "unenforced" and call["cost_usd"] > 0  # … but it is recorded
        assert platform.audit.frame(decision=CALL_ROWS).iloc[0]["decision"] == "unenforced"
        assert platform.budgets.status().iloc[0]["spent_usd"] == pytest.approx(call["cost_usd"])  # and counted
    finally:
        tidyllm.uninstall()


def test_tidyllm_provider_success_goes_through_the_router(platform: Any, sim: Simulator) -> None:
    import litellm

    platform._router = sim_router(platform, sim.url)
    resp = litellm.completion(model="tidyllm/chat", messages=MSG, max_tokens=30, metadata=dict(META))
    assert resp.choices[0].message.content
    wait_settled(platform)
    calls = platform.calls()
    assert list(calls["status"]) == ["success"] and calls.iloc[0]["route"] == "ep-small"
    assert len(platform.audit.frame(decision=CALL_ROWS)) == 1


def test_max_tokens_is_clamped_to_the_headroom(platform: Any, sim: Simulator) -> None:
    router = sim_router(platform, sim.url)
    platform.budgets.set("department", "risk", 0.0005, "month")  # 500 µ$: prompt + ~230 output tokens
    router.completion(model="chat", messages=MSG, max_tokens=4000, metadata=dict(META))
    wait_settled(platform)
    call = platform.calls().iloc[0]
    assert call["status"] == "success" and call["reserved_usd"] <= 0.0005 + 1e-12
    audit = platform.audit.frame(decision=CALL_ROWS).iloc[0]
    assert audit["rule"] == "clamped"
    # the soft warning follows settled spend, not the clamped reservation (which holds the whole headroom)
    spent = platform.budgets.status().iloc[0]["spent_usd"]
    platform.alerts.evaluate()
    assert platform.mart.frame("budget_events", kind="soft_threshold").shape[0] == int(spent >= 0.8 * 0.0005)


def test_authorisation_rules_and_route_sensitivity(db_url: str, sim: Simulator) -> None:
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"}, authorization=[
        {"name": "interns-small-only", "departments": ["interns"], "routes": ["ep-small"]},
        {"name": "confidential-on-prem", "sensitivity": ["confidential"], "require_tags": {"on_prem": "true"}},
    ])
    try:
        router = sim_router(p, sim.url, routes={"ep-large": ("sim-gpt-large", 10.0, 30.0)})
        sim.reset_stats()
        with pytest.raises(RouteNotAuthorizedError, match="interns-small-only"):
            router.completion(model="chat", messages=MSG, metadata={"department": "interns", "user_id": "i1"})
        with pytest.raises(RouteNotAuthorizedError, match="on_prem=true"):
            router.completion(model="chat", messages=MSG,
                              metadata={"department": "risk", "data_sensitivity": "confidential"})
        assert sim.hits() == 0
        rules = list(p.audit.frame(decision=CALL_ROWS)["rule"])
        assert rules == ["interns-small-only", "confidential-on-prem"]
        router.completion(model="chat", messages=MSG, max_tokens=10, metadata={"department": "risk"})
        assert sim.hits() == 1
    finally:
        tidyllm.uninstall()


@pytest.mark.parametrize("metadata, match", [
    ({"user_id": ["ana"], "audit_reason": "x"}, r"metadata\['user_id'\] must be a string"),
    ({"department": 42, "audit_reason": "x"}, r"metadata\['department'\] must be a string"),
    ({"department": "risk", "audit_reason": "x", "data_sensitivity": "top-secret"}, "not a known class"),
    ({"department": "risk"}, "requires an audit reason"),
])
def test_bad_metadata_is_refused_clearly(platform: Any, sim: Simulator, metadata: Any, match: str) -> None:
    router = sim_router(platform, sim.url)
    sim.reset_stats()
    with pytest.raises(MetadataError, match=match):
        router.completion(model="chat", messages=MSG, metadata=metadata)
    assert sim.hits() == 0
    assert len(platform.audit.frame(decision=CALL_ROWS)) == 1 and platform.calls().iloc[0]["status"] == "refused"


def test_non_dict_metadata_is_a_clear_error() -> None:
    from tidyllm.governance.context import CallContext

    with pytest.raises(MetadataError, match="metadata must be a dict"):
        CallContext.from_metadata("risk")


def test_unpriced_model_fails_closed_under_a_budget(platform: Any, sim: Simulator) -> None:
    import litellm

    platform.budgets.set("department", "risk", 10.0)
    sim.reset_stats()
    router = platform.govern(litellm.Router(model_list=[{"model_name": "chat", "litellm_params": {
        "model": "openai/sim-claude", "api_base": sim.url, "api_key": "x"}, "model_info": {"id": "ep-unpriced"}}]))
    with pytest.raises(UnpricedModelError, match="has no price"):
        router.completion(model="chat", messages=MSG, metadata=dict(META))
    assert sim.hits() == 0


def test_rate_limits_are_enforced_and_audited(db_url: str, sim: Simulator) -> None:
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"},
                        rate_limits=[{"scope": "user", "name": "*", "rpm": 2}])
    try:
        router = sim_router(p, sim.url)
        for _ in range(2):
            router.completion(model="chat", messages=MSG, max_tokens=5, metadata={"user_id": "bob", "department": "risk"})
        with pytest.raises(RateLimitedError) as info:
            router.completion(model="chat", messages=MSG, max_tokens=5, metadata={"user_id": "bob", "department": "risk"})
        assert 0 < info.value.retry_after <= 60 and "2 requests per minute" in str(info.value)
        router.completion(model="chat", messages=MSG, max_tokens=5, metadata={"user_id": "carol", "department": "risk"})
        assert "rate_limit" in set(p.audit.frame(decision=CALL_ROWS)["rule"].dropna())
    finally:
        tidyllm.uninstall()


@pytest.mark.parametrize("args, match", [
    (("team", "risk", 10), "unknown budget scope 'team'"),
    (("department", "risk", -1), "finite number"),
    (("department", "risk", "lots"), "must be a number"),
    (("department", "risk", 10, "fortnight"), "unknown budget period"),
    (("department", "", 10), "needs the department's name"),
])
def test_bad_budgets_are_clear_errors_and_write_nothing(platform: Any, args: tuple, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        platform.budgets.set(*args)
    assert platform.budgets.status().empty


def test_bad_timezone_and_prices(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match="not a known IANA"):
        tidyllm.install(database_url=db_url, governance={"timezone": "Atlantis/Capital"})
    p = tidyllm.install(database_url=db_url)
    try:
        with pytest.raises(ConfigurationError, match="non-negative"):
            p.prices.set("ep", -1, 2)
        with pytest.raises(ConfigurationError, match="date like"):
            p.prices.set("ep", 1, 2, effective="someday")
        assert p.prices.frame().empty
    finally:
        tidyllm.uninstall()


def test_effective_dated_prices(platform: Any) -> None:
    import datetime as dt

    platform.prices.set("ep", 1.0, 2.0, "2026-01-01")
    platform.prices.set("ep", 5.0, 6.0, "2026-06-01")
    jan = platform.prices.lookup("ep", dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc))
    jul = platform.prices.lookup("ep", dt.datetime(2026, 7, 1, tzinfo=dt.timezone.utc))
    assert (jan.input_per_1m, jul.input_per_1m) == (1.0, 5.0) and jan.id != jul.id
    assert platform.prices.lookup("never-heard-of-it") is None
    assert platform.prices.lookup("gpt-4o-mini").source == "litellm"  # LiteLLM's own price as the fallback
    with pytest.raises(ConfigurationError, match="immutable"):
        platform.prices.set("ep", 9.0, 9.0, "2026-01-01")


def test_windows_follow_the_time_zone() -> None:
    import datetime as dt
    from zoneinfo import ZoneInfo

    from tidyllm.governance.budgets import window_bounds

    now = dt.datetime(2026, 3, 31, 23, 30, tzinfo=dt.timezone.utc)  # already April 1st in Paris
    start, end = window_bounds("month", now, ZoneInfo("Europe/Paris"))
    assert start == dt.datetime(2026, 3, 31, 22, 0, tzinfo=dt.timezone.utc)
    assert end == dt.datetime(2026, 4, 30, 22, 0, tzinfo=dt.timezone.utc)
    start, _ = window_bounds("week", now, ZoneInfo("UTC"))
    assert start.weekday() == 0 and start.date() == dt.date(2026, 3, 30)


def test_install_is_idempotent_and_uninstall_removes(tmp_path: Path) -> None:
    import litellm

    url = f"sqlite:///{tmp_path / 'i.db'}"
    p1 = tidyllm.install(database_url=url)
    p2 = tidyllm.install(database_url=url)
    assert p1 is p2
    ours = [c for c in litellm.callbacks if getattr(c, "tidyllm_platform", None)]
    assert len(ours) == 1
    assert sum(1 for p in litellm.custom_provider_map if p["provider"] == "tidyllm") == 1
    tidyllm.uninstall()
    assert not [c for c in litellm.callbacks if getattr(c, "tidyllm_platform", None)]
    assert not [c for c in litellm._async_success_callback if getattr(c, "tidyllm_platform", None)]
    assert not any(p["provider"] == "tidyllm" for p in litellm.custom_provider_map)


def test_audit_chain_detects_edit_delete_and_reorder(platform: Any, sim: Simulator) -> None:
    router = sim_router(platform, sim.url)
    for _ in range(5):
        router.completion(model="chat", messages=MSG, max_tokens=5, metadata=dict(META))
    wait_settled(platform)
    assert platform.audit.verify().rows == 5
    engine = platform.mart.store.engine

    def tamper(sql: str) -> Any:
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
        return platform.audit.verify()

    with engine.connect() as conn:
        original = conn.execute(sa.text("SELECT cost_usd FROM audit_log WHERE seq = 3")).scalar_one()
    result = tamper("UPDATE audit_log SET cost_usd = 0 WHERE seq = 3")
    assert not result.ok and result.first_broken_seq == 3 and "content was changed" in result.reason
    assert tamper(f"UPDATE audit_log SET cost_usd = {original!r} WHERE seq = 3").ok  # restored: intact again
    result = tamper("DELETE FROM audit_log WHERE seq = 2")
    assert not result.ok and result.first_broken_seq == 3 and "deleted" in result.reason


def test_audit_detects_deleting_the_newest_row(platform: Any, sim: Simulator) -> None:
    router = sim_router(platform, sim.url)
    for _ in range(3):
        router.completion(model="chat", messages=MSG, max_tokens=5, metadata=dict(META))
    wait_settled(platform)
    with platform.mart.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE seq = 3"))
    result = platform.audit.verify()
    assert not result.ok and "newest rows deleted" in result.reason


def test_audit_detects_reordering(platform: Any, sim: Simulator) -> None:
    router = sim_router(platform, sim.url)
    for _ in range(3):
        router.completion(model="chat", messages=MSG, max_tokens=5, metadata=dict(META))
    wait_settled(platform)
    with platform.mart.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET seq = 100 WHERE seq = 1"))
        conn.execute(sa.text("UPDATE audit_log SET seq = 1 WHERE seq = 2"))
        conn.execute(sa.text("UPDATE audit_log SET seq = 2 WHERE seq = 100"))
    result = platform.audit.verify()
    assert not result.ok and result.first_broken_seq == 1


def test_audit_export_csv_and_jsonl(platform: Any, sim: Simulator) -> None:
    import csv
    import io
    import json

    router = sim_router(platform, sim.url)
    router.completion(model="chat", messages=MSG, max_tokens=5, metadata=dict(META))
    router.completion(model="chat", messages=MSG, max_tokens=5, metadata={**META, "department": "finance"})
    wait_settled(platform)
    rows = list(csv.DictReader(io.StringIO(platform.audit.export("csv"))))
    assert len(rows) == 2 and {r["department"] for r in rows} == {"risk", "finance"}
    lines = platform.audit.export("jsonl", department="finance").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["department"] == "finance"
    with pytest.raises(ConfigurationError, match="csv or jsonl"):
        platform.audit.export("xml")


def test_no_secret_reaches_the_mart_or_the_logs(db_url: str, sim: Simulator, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import litellm

    planted = "sk-planted-SECRET-0123456789abcdef"
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"}, audit={"capture": "full"})
    try:
        p.prices.set("ep-key", 1.0, 2.0)
        router = p.govern(litellm.Router(model_list=[{"model_name": "chat", "litellm_params": {
            "model": "openai/sim-gpt-small", "api_base": sim.url, "api_key": planted},
            "model_info": {"id": "ep-key"}}], num_retries=0))
        caplog.set_level(logging.DEBUG, logger="tidyllm")
        router.completion(model="chat", messages=MSG, max_tokens=5, metadata=dict(META))
        sim.set_outage("sim-gpt-small", True)
        with pytest.raises(Exception):
            router.completion(model="chat", messages=MSG, max_tokens=5, metadata=dict(META),
                              extra_headers={"Authorization": f"Bearer {planted}"})
        sim.set_outage("sim-gpt-small", False)
        wait_settled(p)
        with p.mart.store.engine.connect() as conn:
            for table in p.mart.tables():
                for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                    assert planted not in str(tuple(row)), table
        assert planted not in caplog.text
    finally:
        tidyllm.uninstall()

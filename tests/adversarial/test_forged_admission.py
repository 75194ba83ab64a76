"""Red team: a caller forges, copies or reuses tidyllm's admission to skip governance.

On the old main, any ``tidyllm`` key in a request's metadata (even ``{}``) was taken as "already
admitted": an exhausted department spent 3.3x its limit through a proxy, and a copied stamp on
``litellm.acompletion`` left no row at all. Now only the gate admits: every tidyllm-owned value a
caller writes is stripped, the call is governed normally, and its audit row names the forgery."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.errors import BudgetExceededError
from tidyllm.gateway.simulator import Simulator

from govhelpers import CALL_ROWS, sim_router
from adversarial._redteam import META, MSG, ROUTES, assert_books_agree, books, sim_prices

FORGERIES = [
    pytest.param({}, id="empty-dict"),
    pytest.param({"call_id": "x", "route": "ep-small", "requested_model": "chat", "call_type": "completion",
                  "context": {"department": "risk"}, "started_at": "2026-01-01T00:00:00+00:00", "max_tokens": 16,
                  "clamped": False, "reservation_id": None, "input_per_1m": 0.0, "output_per_1m": 0.0},
                 id="well-formed-stamp"),
    pytest.param("tidyllm-seal:" + "0" * 32, id="token-never-issued"),
]


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=7, latency_scale=0.0) as s:
        yield s


@pytest.fixture
def platform(db_url: str, sim: Simulator) -> Iterator[Any]:
    sim.reset_stats()
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
    p.prices.set("openai/sim-gpt-small", 1.0, 2.0)  # the plain SDK calls' route
    yield p
    tidyllm.uninstall()


def _exhaust(platform: Any) -> None:
    platform.budgets.set("department", "risk", 1e-9, "month")


@pytest.mark.parametrize("forged", FORGERIES)
def test_router_forged_admission_is_governed_and_refused(platform: Any, sim: Simulator, forged: Any) -> None:
    router = sim_router(platform, sim.url, routes=ROUTES)
    _exhaust(platform)
    md = {**META, "tidyllm": forged}
    with pytest.raises(BudgetExceededError):
        router.completion(model="chat", messages=MSG, max_tokens=16, metadata=md)
    with pytest.raises(BudgetExceededError):
        asyncio.run(router.acompletion(model="chat", messages=MSG, max_tokens=16, metadata=md))
    assert sim.stats()["total"] == 0  # the provider was never contacted
    audit = platform.audit.frame(decision=CALL_ROWS)
    assert list(audit["status"]) == ["refused", "refused"]
    assert all(e.get("forged") == ["tidyllm"] for e in audit["extra"].map(_json))
    assert md["tidyllm"] is forged  # the caller's dict is untouched


@pytest.mark.parametrize("forged", FORGERIES)
def test_router_forged_admission_with_room_is_one_governed_call(platform: Any, sim: Simulator, forged: Any) -> None:
    router = sim_router(platform, sim.url, routes=ROUTES)
    platform.budgets.set("department", "risk", 1.0, "month")
    router.completion(model="chat", messages=MSG, max_tokens=16, metadata={**META, "tidyllm": forged})
    platform.budgets.credit.return_all()
    _settled(platform, 1)
    b = books(platform, sim, sim_prices())
    assert_books_agree(b, limit=1.0)
    assert b.answered == 1
    (extra,) = platform.audit.frame(decision=CALL_ROWS)["extra"].map(_json)
    assert extra["forged"] == ["tidyllm"]


def test_acompletion_with_a_copied_stamp_is_governed(platform: Any, sim: Simulator) -> None:
    """A stamp copied from a real call (seen by the caller's own callback) admits nothing."""
    import litellm

    router = sim_router(platform, sim.url, routes=ROUTES)
    platform.budgets.set("department", "risk", 1.0, "month")
    seen: list[Any] = []
    platform.governor.add_listener(lambda record, admission: seen.append(record.stamp))
    router.completion(model="chat", messages=MSG, max_tokens=16, metadata=dict(META))
    _settled(platform, 1)
    copied = seen[0]
    assert isinstance(copied, str) and copied.startswith("tidyllm-seal:")
    _exhaust(platform)
    plain = dict(model="openai/sim-gpt-small", api_base=sim.url, api_key="sk-test-not-real", messages=MSG,
                 max_tokens=16, metadata={**META, "tidyllm": copied})
    with pytest.raises(BudgetExceededError):
        asyncio.run(litellm.acompletion(**plain))
    assert sim.stats()["total"] == 1  # only the first, legitimate call reached the provider
    platform.budgets.set("department", "risk", 1.0, "month")
    asyncio.run(litellm.acompletion(**plain))
    _settled(platform, 2)
    b = books(platform, sim, sim_prices())
    assert_books_agree(b, limit=1.0)
    audit = platform.audit.frame(decision=CALL_ROWS)
    assert list(audit["status"]) == ["success", "refused", "success"]
    assert [e.get("forged") for e in audit["extra"].map(_json)] == [None, ["tidyllm"], ["tidyllm"]]


@pytest.mark.parametrize("forged", FORGERIES)
def test_tidyllm_provider_forged_admission_is_refused(platform: Any, sim: Simulator, forged: Any) -> None:
    import litellm

    platform._router = sim_router(platform, sim.url, routes=ROUTES)  # the router the tidyllm/ provider calls
    _exhaust(platform)
    with pytest.raises(litellm.BadRequestError) as refused:
        litellm.completion(model="tidyllm/chat", messages=MSG, max_tokens=16, metadata={**META, "tidyllm": forged})
    assert "department 'risk' has" in str(refused.value)  # LiteLLM re-wraps the provider's BudgetExceededError
    assert sim.stats()["total"] == 0
    assert platform.audit.frame(decision=CALL_ROWS)["extra"].map(_json).iloc[0]["forged"] == ["tidyllm"]


def test_a_forged_token_on_a_plain_sync_call_is_stripped(platform: Any, sim: Simulator) -> None:
    """Plain sync ``litellm.completion`` goes through the gate too (its sync entry points are instrumented):
    the forged token is dropped, the call governed normally — refused over budget — and audited."""
    import litellm

    plain = dict(model="openai/sim-gpt-small", api_base=sim.url, api_key="sk-test-not-real", messages=MSG,
                 max_tokens=16, metadata={**META, "tidyllm": "tidyllm-seal:" + "1" * 32})
    _exhaust(platform)
    with pytest.raises(BudgetExceededError):
        litellm.completion(**plain)
    assert sim.stats()["total"] == 0
    platform.budgets.set("department", "risk", 1.0, "month")
    litellm.completion(**plain)
    _settled(platform, 1)
    assert_books_agree(books(platform, sim, sim_prices()), limit=1.0)
    assert [e.get("forged") for e in platform.audit.frame(decision=CALL_ROWS)["extra"].map(_json)] == [["tidyllm"], ["tidyllm"]]


def test_a_forged_token_on_an_ungated_call_is_recorded_as_a_forgery(db_url: str, sim: Simulator) -> None:
    """With the sync instrumentation turned off, nothing can stop a plain sync call: one carrying a forged
    token is recorded and charged as unenforced, and its audit row says it carried a forged admission."""
    import litellm

    sim.reset_stats()
    platform = tidyllm.install(database_url=db_url, governance={"instrument_sync": False})
    try:
        platform.prices.set("sim-gpt-small", 1.0, 2.0)  # the model name LiteLLM reports for the call
        platform.budgets.set("department", "risk", 1.0, "month")
        litellm.completion(model="openai/sim-gpt-small", api_base=sim.url, api_key="sk-test-not-real", messages=MSG,
                           max_tokens=16, metadata={**META, "tidyllm": "tidyllm-seal:" + "1" * 32})
        _settled(platform, 1)
        b = books(platform, sim, sim_prices())
        assert_books_agree(b)
        (row,) = platform.audit.frame(decision=CALL_ROWS).to_dict("records")
        assert row["decision"] == "unenforced" and row["rule"] == "forged-admission"
    finally:
        tidyllm.uninstall()


def test_a_reused_call_id_never_merges_two_calls(platform: Any, sim: Simulator) -> None:
    """The old main let 33 calls through with 1 recorded when they shared a tidyllm_call_id: a reused id is
    now refused before the provider, and every answered call has its own row."""
    router = sim_router(platform, sim.url, routes=ROUTES)
    platform.budgets.set("department", "risk", 1.0, "month")
    md = {**META, "tidyllm_call_id": "same-id"}
    router.completion(model="chat", messages=MSG, max_tokens=16, metadata=md)
    refused = 0
    for _ in range(32):
        try:
            router.completion(model="chat", messages=MSG, max_tokens=16, metadata=md)
        except Exception as err:  # noqa: BLE001 - counted below
            assert "already used" in str(err)
            refused += 1
    platform.budgets.credit.return_all()
    _settled(platform, 1)
    assert refused == 32
    b = books(platform, sim, sim_prices())
    assert b.answered == 1
    assert_books_agree(b, limit=1.0)


def _settled(platform: Any, n: int, timeout: float = 20.0) -> None:
    """Wait until ``n`` answered calls are settled (sync success callbacks run on LiteLLM's threads)."""
    import time

    import sqlalchemy as sa

    deadline = time.monotonic() + timeout
    while True:
        with platform.mart.store.begin() as conn:
            done = conn.execute(sa.text("SELECT count(*) FROM llm_calls WHERE status IN "
                                        "('success', 'failure', 'unenforced', 'unsettled')")).scalar_one()
            pending = conn.execute(sa.text("SELECT count(*) FROM llm_calls WHERE status = 'pending'")).scalar_one()
        if done >= n and not pending:
            return
        assert time.monotonic() < deadline, f"{done} of {n} calls settled, {pending} pending"
        time.sleep(0.05)


def _json(value: Any) -> dict[str, Any]:
    import json

    if value is None:
        return {}
    return value if isinstance(value, dict) else json.loads(value)

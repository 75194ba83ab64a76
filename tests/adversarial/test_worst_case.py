"""Red team: a request whose billable size the reservation does not cover.

On the old main one call with ``n=20`` spent 7.5x a $0.01 budget (the reservation ignored ``n``), and a
provider that reported more prompt tokens than tidyllm counted took the spend to 1.25x the limit unnoticed.
Now every choice is reserved, an overshoot is charged, flagged in the audit row and learned from."""

from __future__ import annotations

import datetime as dt
import pickle
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.errors import BudgetExceededError
from tidyllm.gateway.simulator import Simulator

from adversarial._redteam import META, MSG, assert_books_agree, books
from adversarial.test_forged_admission import _json, _settled
from govhelpers import CALL_ROWS, sim_router


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=13, latency_scale=0.0) as s:
        yield s


def test_n_choices_are_all_reserved(db_url: str, sim: Simulator) -> None:
    sim.reset_stats()
    platform = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
    try:
        limit = 0.01
        platform.budgets.set("department", "risk", limit, "month")
        router = sim_router(platform, sim.url, routes={"ep-small": ("sim-gpt-small", 10.0, 30.0)})
        answered = 0
        for _ in range(6):
            try:
                router.completion(model="chat", messages=MSG, max_tokens=200, n=20, metadata=dict(META))
                answered += 1
            except BudgetExceededError:
                pass
        platform.budgets.credit.return_all()
        _settled(platform, answered)
        b = books(platform, sim, {"sim-gpt-small": (10.0, 30.0)})
        assert_books_agree(b, limit=limit)  # 20 choices of up to 200 tokens are reserved, not one
        calls = platform.mart.frame("llm_calls")
        ok = calls[calls["status"] == "success"]
        assert (ok["cost_usd"] <= ok["reserved_usd"] + 1e-12).all()
    finally:
        tidyllm.uninstall()


def test_an_overshoot_is_charged_flagged_and_learned(db_url: str) -> None:
    from tidyllm.records import CallRecord

    platform = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
    try:
        platform.prices.set("ep", 1_000.0, 1_000.0)
        platform.budgets.set("department", "risk", 10.0, "month")
        gov = platform.governor
        before = gov.estimate_prompt("ep", messages=MSG)
        admission = gov.admit(ctx=gov.context(dict(META)), route="ep", requested_model="chat", messages=MSG,
                              max_tokens=10)
        assert admission.prompt_tokens == before
        reported = before * 3  # the provider counted three times what tidyllm reserved for the prompt
        now = dt.datetime.now(dt.timezone.utc)
        record = CallRecord(
            ok=True, litellm_call_id=None, call_type="completion", stamp=None, metadata={}, model="ep",
            model_id=None, model_group=None, provider=None, api_base=None, provider_model=None, stream=False,
            prompt_tokens=reported, completion_tokens=10, cached_tokens=None, reasoning_tokens=None,
            litellm_cost=None, latency_ms=1.0, started_at=now, ended_at=now, error_type=None, error_message=None,
            exception=None,
            messages=None, tools=None, mock=False, tool_calls=(), partial=False)
        gov._finish(record, admission, None)
        cost = (reported + 10) * 1_000.0 / 1e6
        status = platform.budgets.status(scope="department", name="risk").iloc[0]
        assert status["spent_usd"] == pytest.approx(cost) and cost > admission.reserved_usd  # the overshoot is charged
        (extra,) = platform.audit.frame(decision=CALL_ROWS)["extra"].map(_json)
        assert extra["overshoot_usd"] == pytest.approx(cost - admission.reserved_usd)
        assert gov.estimate_prompt("ep", messages=MSG) >= reported  # the next reservation covers it
    finally:
        tidyllm.uninstall()


def _refuse_in_a_worker() -> None:
    raise BudgetExceededError("department 'risk' has $0.0001 left", scope="department", name="risk",
                              spent_usd=0.5, reserved_usd=0.4999, limit_usd=1.0)


def test_refusals_pickle_across_processes() -> None:
    """A ProcessPoolExecutor worker's refusal reaches its parent as the same class, with its numbers (the old
    main's classes were local to a function: ``Can't pickle local object``)."""
    err = pickle.loads(pickle.dumps(BudgetExceededError("no room", scope="user", name="ana", spent_usd=1.0,
                                                        reserved_usd=0.5, limit_usd=1.5)))
    assert type(err) is tidyllm.BudgetExceededError and (err.scope, err.name, err.limit_usd) == ("user", "ana", 1.5)
    for cls in ("RouteNotAuthorizedError", "RateLimitedError", "MetadataError", "UnpricedModelError"):
        original = getattr(tidyllm.errors, cls)("refused")
        assert type(pickle.loads(pickle.dumps(original))) is original.__class__
    with ProcessPoolExecutor(max_workers=1) as pool:
        with pytest.raises(BudgetExceededError) as refused:
            pool.submit(_refuse_in_a_worker).result()
    assert refused.value.spent_usd == 0.5 and str(refused.value) == "department 'risk' has $0.0001 left"


@pytest.mark.parametrize("governance, says", [
    ({"lease_ttl_seconds": 0}, "lease_ttl_seconds must be more than 0"),
    ({"lease_ttl_seconds": -5}, "lease_ttl_seconds must be more than 0"),
    ({"unpriced_by_department": {"risk": "maybe"}}, "must be one of refuse, allow"),
    ({"default_max_tokens": float("nan")}, "finite"),
])
def test_governance_values_that_would_open_the_gate_are_configuration_errors(
        tmp_path: Any, governance: dict[str, Any], says: str) -> None:
    """On the old main ``lease_ttl_seconds: 0`` was accepted (and gave 195 % of the limit) and a typo in
    ``unpriced_by_department`` let unpriced calls through at $0: they are refused at load time now."""
    from tidyllm.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=says):
        tidyllm.install(database_url=f"sqlite:///{tmp_path / 'm.db'}", governance=governance)
    assert not (tmp_path / "m.db").exists()  # nothing opened or written


PROSE = (" ".join(["The validation team reviewed the model's conceptual soundness, the quality of its development "
                   "data, its performance on out-of-time samples and the compensating controls for its known "
                   "limitations; the findings below list each issue with its severity and evidence."] * 22))


def test_a_tight_worst_case_lets_the_limit_pay_for_what_it_can(db_url: str) -> None:
    """On the old main the prompt estimate (one token per two characters) reserved 1.46x a ~1,000-token prompt:
    with 32 calls in flight only 7 of the 10 calls a limit paid for were answered. The route's factor is
    learned from what the provider reports, so once a few calls taught it the reservation is within a few
    per cent of the bill — never under it — and the limit pays for (nearly) every call it can."""
    import concurrent.futures as cf

    from _fixtures import instant_profiles

    profiles = instant_profiles(chat={"output_tokens": {"min": 50, "max": 50}, "error_rate": 0.0})
    with Simulator(profiles, seed=21, latency_scale=0.0) as sim:
        platform = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"},
                                   governance={"admission_credit_calls": 0})
        try:
            router = sim_router(platform, sim.url, routes={"ep-small": ("sim-gpt-small", 10.0, 30.0)})
            messages = [{"role": "user", "content": PROSE}]
            platform.budgets.set("department", "risk", 10.0, "month")
            for _ in range(6):  # a few calls teach the route's factor what its provider counts
                router.completion(model="chat", messages=messages, max_tokens=50, metadata=dict(META))
            _settled(platform, 6)
            calls = platform.mart.frame("llm_calls")
            cost = float(calls["cost_usd"].iloc[-1])
            reserve = platform.governor.worst_case("ep-small", messages=messages, max_tokens=50)
            prompt = int(calls["prompt_tokens"].iloc[-1])
            assert prompt <= reserve.prompt_tokens <= 1.15 * prompt  # tight, and never under the bill
            # a fresh department whose limit pays for exactly 10 of these calls; 32 at once
            platform.budgets.set("department", "credit", 10 * cost, "month")
            sim.reset_stats()

            def call(_: int) -> bool:
                try:
                    router.completion(model="chat", messages=messages, max_tokens=50,
                                      metadata={**META, "department": "credit"})
                    return True
                except BudgetExceededError:
                    return False

            with cf.ThreadPoolExecutor(32) as pool:
                answered = sum(pool.map(call, range(32)))
            assert answered >= 9, answered  # the old estimate let 7 through
            _settled(platform, 6 + answered)
            status = platform.budgets.status(scope="department", name="credit").iloc[0]
            assert status["spent_usd"] <= 10 * cost + 1e-12
            assert status["spent_usd"] >= 0.9 * 10 * cost  # at most a tenth of the budget left unspent
            assert sim.stats()["total"] == answered
        finally:
            tidyllm.uninstall()

"""Quality signals: judges, checks, human feedback, executions and implicit signals reach the router exactly
once per call and source, late and out of order; a refused judge leaves the answered call intact;
calibration recovers a judge's bias. Real governed LiteLLM Routers against the provider simulator."""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.errors import ConfigurationError
from tidyllm.gateway.simulator import Latency, ModelProfile, Simulator
from tidyllm.mart.tracking import current_execution_id
from tidyllm.signals import fit_calibration, parse_signals
from tidyllm.litellm_bridge.records import answer_text

from govhelpers import sim_router

PROFILES = {
    "sim-gpt-small": ModelProfile("sim-gpt-small", latency=Latency(base_ms=0), quality={"default": 0.6}),
    "sim-gpt-large": ModelProfile("sim-gpt-large", latency=Latency(base_ms=0), quality={"default": 0.9}),
    "sim-judge": ModelProfile("sim-judge", latency=Latency(base_ms=0), quality={"default": 0.5},
                              judge={"noise": 0.0, "bias": {"sim-gpt-small": 0.1}}),
}
ROUTES = {"ep-small": ("sim-gpt-small", 1.0, 2.0), "ep-large": ("sim-gpt-large", 10.0, 30.0)}
JUDGE_ROUTE = {"ep-judge": ("sim-judge", 1.0, 1.0)}
META = {"user_id": "ana", "department": "risk", "audit_reason": "signals test", "use_case": "code"}
SIGNALS = {"judges": [{"name": "q", "model": "judge", "department": "evaluation", "sample": 1.0, "weight": 0.5}],
           "checks": {"code": [{"name": "parses", "python_parses": True}, {"name": "short", "length": {"max": 5}}]},
           "regenerate_window_s": 60}


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(PROFILES, seed=0, latency_scale=0, report_quality=False) as s:
        yield s


def _platform(db_url: str, sim: Simulator, judge_budget: float = 10.0) -> tuple[Any, Any]:
    p = tidyllm.install(database_url=db_url, routing={"strategy": "bandit", "random_state": 0, "refresh_seconds": 0},
                        signals=SIGNALS, budgets=[{"scope": "department", "name": "evaluation",
                                                   "limit_usd": judge_budget, "period": "month"}])
    router = sim_router(p, sim.url, ROUTES)
    import litellm

    for name, (_, price_in, price_out) in JUDGE_ROUTE.items():
        p.prices.set(name, price_in, price_out)
    judge_router = p.govern(litellm.Router(model_list=[{
        "model_name": "judge", "litellm_params": {"model": "openai/sim-judge", "api_base": sim.url, "api_key": "sk-x"},
        "model_info": {"id": "ep-judge"}}], num_retries=0))
    p.signals.judge_call = lambda judge, messages, metadata: answer_text(judge_router.completion(
        model=judge.model, messages=messages, metadata=metadata, max_tokens=judge.max_tokens)) or ""
    p.signals.judge_routes = lambda judge: {"ep-judge"}
    return p, router


@pytest.fixture
def platform(db_url: str, sim: Simulator) -> Iterator[tuple[Any, Any]]:
    p, router = _platform(db_url, sim)
    yield p, router
    tidyllm.uninstall()


def _call(p: Any, router: Any, call_id: str, content: str = "write a function", **meta: Any) -> Any:
    resp = router.completion(model="chat", messages=[{"role": "user", "content": content}], max_tokens=20,
                             metadata={**META, **meta, "tidyllm_call_id": call_id})
    p.wait_for_call(call_id)
    return resp


def _wait_for(p: Any, call_id: str, *sources: str, timeout: float = 15.0) -> None:
    """Wait until ``sources`` scored ``call_id``: the answer reaches the signal worker from LiteLLM's logging
    thread, which may run after the call's settlement (what wait_for_call waits for)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = p.mart.frame("call_signals", call_id=call_id)
        if set(sources) <= set(got["source"]) and got["applied_at"].notna().all():
            assert p.signals.drain(timeout)
            return
        time.sleep(0.02)
    raise AssertionError(f"{sources} did not score {call_id} within {timeout} s")


def _signals(p: Any, call_id: str) -> Any:
    return p.mart.frame("call_signals", call_id=call_id, parse_json=True).set_index("source")


def test_every_source_reaches_the_bandit_exactly_once_late_and_out_of_order(platform: tuple[Any, Any]) -> None:
    p, router = platform
    bandit = p.chooser().bandit
    # out of order: a human label arrives before the call it scores has even been made
    p.feedback("late-1", 0.2, comment="arrived first")
    assert _signals(p, "late-1")["applied_at"].isna().all()
    n0 = bandit.n_updates_ if hasattr(bandit, "routes_") else 0
    resp = _call(p, router, "late-1")
    _wait_for(p, "late-1", "human", "check:parses", "check:short", "judge:q")
    got = _signals(p, "late-1")
    # human (before the call), two checks (every answer of the use case), the judge (sampled at 100 %)
    assert set(got.index) == {"human", "check:parses", "check:short", "judge:q"}
    assert got["applied_at"].notna().all() and (got["applied_by"] == p.chooser().instance).all()
    assert got.loc["check:parses", "score"] == 0.0 and "does not parse" in got.loc["check:parses", "comment"]
    assert got.loc["check:short", "score"] == 0.0  # longer than 5 characters
    route = p.mart.frame("routing_decisions", call_id="late-1").iloc[0]["route"]
    assert bandit.n_updates_ == n0 + 4
    # the judge scored the answer's true quality plus its bias towards the small model
    true_q = 0.6 if route == "ep-small" else 0.9
    assert got.loc["judge:q", "score"] == pytest.approx(min(1.0, true_q + (0.1 if route == "ep-small" else 0.0)), abs=1e-3)
    assert answer_text(resp)
    # late repeats of every source change nothing
    p.feedback("late-1", 0.9)
    for source in ("check:parses", "check:short", "judge:q"):
        p.signals.record("late-1", source, 1.0)
    assert bandit.n_updates_ == n0 + 4
    assert _signals(p, "late-1").loc["human", "score"] == 0.2
    # the decision's quality is the weighted mean of its learned sources
    row = p.mart.frame("routing_decisions", call_id="late-1").iloc[0]
    assert 0.0 <= row["quality"] <= 1.0 and row["reward"] is not None


def test_the_judge_never_scores_its_own_route_and_its_calls_are_governed(platform: tuple[Any, Any]) -> None:
    p, router = platform
    _call(p, router, "own-1")
    _wait_for(p, "own-1", "judge:q")
    judge_calls = p.calls(department="evaluation")
    assert len(judge_calls) == 1 and judge_calls.iloc[0]["route"] == "ep-judge"
    assert judge_calls.iloc[0]["status"] == "success" and judge_calls.iloc[0]["cost_usd"] > 0
    assert judge_calls.iloc[0]["use_case"] == "judge"
    # the judge's own calls are neither judged nor checked
    assert _signals(p, judge_calls.iloc[0]["id"]).empty
    p.signals.judge_routes = lambda judge: {"ep-small", "ep-large"}  # say the judged routes were the judge's
    before = p.signals.stats["skipped_own_route"]
    _call(p, router, "own-2")
    _wait_for(p, "own-2", "check:parses", "check:short")
    assert p.signals.stats["skipped_own_route"] == before + 1
    assert "judge:q" not in _signals(p, "own-2").index


def test_a_judge_refused_by_its_budget_leaves_the_answered_call_intact(db_url: str, sim: Simulator) -> None:
    p, router = _platform(db_url, sim, judge_budget=1e-9)
    try:
        resp = _call(p, router, "refused-1")
        _wait_for(p, "refused-1", "check:parses", "check:short")
        assert answer_text(resp)
        assert p.signals.stats["judge_refused"] == 1
        call = p.calls(id="refused-1").iloc[0]
        assert call["status"] == "success" and call["cost_usd"] > 0
        refused = p.calls(department="evaluation")
        assert list(refused["status"]) == ["refused"] and refused.iloc[0]["error_type"] == "BudgetExceededError"
        got = _signals(p, "refused-1")
        assert "judge:q" not in got.index and {"check:parses", "check:short"} <= set(got.index)
        assert p.audit.verify().ok
    finally:
        tidyllm.uninstall()


def test_scores_given_to_an_execution_reward_the_calls_made_inside(platform: tuple[Any, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    p, router = platform
    # the admission gate records current_execution_id() with each admission (the lead's gate does it as
    # Admission.execution_id; this stands in for it the documented way, through extra)
    admit = p.governor.admit

    def admit_with_execution(*args: Any, **kwargs: Any) -> Any:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "execution_id": current_execution_id()}
        return admit(*args, **kwargs)

    monkeypatch.setattr(p.governor, "admit", admit_with_execution)
    bandit = p.chooser().bandit
    with p.mart.track_execution("app", "review") as tracker:
        _call(p, router, "exec-1", use_case="qa")
        tracker.record_result({"ok": True}, score=0.8)
    decision = p.mart.frame("routing_decisions", call_id="exec-1").iloc[0]
    assert decision["execution_id"] == tracker.execution_id
    got = _signals(p, "exec-1")
    assert got.loc["execution", "score"] == 0.8 and got.loc["execution", "execution_id"] == tracker.execution_id
    # out of order: the execution is scored before its call's decision is written (a call still running)
    mart_score = p.mart.learn_from_execution({"module": "app", "execution_id": "exec-early",
                                              "performance_score": 0.3})
    assert mart_score
    monkeypatch.setattr(p.governor, "admit", lambda *a, **k: admit(*a, **{**k, "extra": {
        **(k.get("extra") or {}), "execution_id": "exec-early"}}))
    _call(p, router, "exec-2", use_case="qa")
    _wait_for(p, "exec-2", "execution", "judge:q")
    got = _signals(p, "exec-2")
    assert got.loc["execution", "score"] == 0.3 and got["applied_at"].notna().all()
    n = bandit.n_updates_
    p.mart.learn_from_execution({"module": "app", "execution_id": "exec-early", "performance_score": 0.9})
    assert bandit.n_updates_ == n  # once per call and source
    best = p.mart.get_optimal_config("gateway", {"department": "risk", "use_case": "qa", "model_group": "chat"})
    assert best["preferred_route"] == best["parameters"]["preferred_route"] in ROUTES


def test_failures_and_regenerations_are_implicit_signals(platform: tuple[Any, Any]) -> None:
    p, router = platform
    _call(p, router, "regen-1", content="same prompt", use_case="qa")
    _call(p, router, "regen-2", content="same prompt", use_case="qa")  # asked again: the first was not good
    got = _signals(p, "regen-1")
    assert got.loc["regenerate", "score"] == 0.0 and got.loc["regenerate", "weight"] == 0.25
    assert got.loc["regenerate", "data"]["regenerated_by"] == "regen-2"
    assert "regenerate" not in _signals(p, "regen-2").index
    failed_router = sim_router(p, "http://127.0.0.1:9/v1", {"ep-dead": ("sim-gpt-small", 1.0, 1.0)})
    with pytest.raises(Exception):
        failed_router.completion(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                 metadata={**META, "use_case": "qa", "tidyllm_call_id": "fail-1"})
    p.wait_for_call("fail-1")
    got = _signals(p, "fail-1")
    assert got.loc["failure", "score"] == 0.0 and got.loc["failure", "applied_at"] is not None
    assert p.mart.frame("routing_decisions", call_id="fail-1").iloc[0]["reward"] == 0.0


def test_calibration_recovers_a_known_judge_bias() -> None:
    rng = random.Random(0)
    truth = [rng.uniform(0.3, 0.9) for _ in range(400)]
    judge = [min(1.0, max(0.0, q + 0.1 + rng.gauss(0, 0.15))) for q in truth]
    human = [min(1.0, max(0.0, q + rng.gauss(0, 0.03))) for q in truth]
    cal = fit_calibration("judge:q", judge, human, min_pairs=8)
    assert cal.calibrated and cal.bias == pytest.approx(0.1, abs=0.02)
    raw_error = sum(j - q for j, q in zip(judge, truth)) / len(truth)
    fixed_error = sum(cal.apply(j) - q for j, q in zip(judge, truth)) / len(truth)
    assert raw_error == pytest.approx(0.1, abs=0.02) and abs(fixed_error) < 0.01
    assert 0.0 < cal.weight(0.5) < 0.5  # a noisy judge counts for less than its configured weight
    assert not fit_calibration("judge:q", judge[:5], human[:5], min_pairs=8).calibrated


def test_calibration_through_the_hub_corrects_the_judge_before_learning(mart: Any) -> None:
    from tidyllm.signals import SignalHub

    hub = SignalHub(mart, parse_signals({"judges": [{"name": "q", "model": "judge"}]}))
    rng = random.Random(1)
    for i in range(30):
        q = rng.uniform(0.2, 0.8)
        hub.record(f"cal-{i}", "judge:q", min(1.0, q + 0.1 + rng.gauss(0, 0.05)))
        hub.record(f"cal-{i}", "human", q)
    cal = hub.calibration("judge:q")
    assert cal.pairs == 30 and cal.bias == pytest.approx(0.1, abs=0.03)
    assert cal.apply(0.6) == pytest.approx(0.5, abs=0.05)
    [row] = [r for r in hub.agreement() if r["source"] == "judge:q"]
    assert row["pairs"] == 30 and row["correlation"] > 0.9 and row["calibrated"]
    hub.close()


def test_the_execution_id_follows_threads_and_asyncio_tasks(mart: Any) -> None:
    seen: dict[str, Any] = {}
    assert current_execution_id() is None
    with mart.track_execution("app", "outer") as outer:
        assert current_execution_id() == outer.execution_id
        with mart.track_execution("app", "inner") as inner:
            assert current_execution_id() == inner.execution_id
        assert current_execution_id() == outer.execution_id
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(lambda: seen.__setitem__("thread", current_execution_id()),))
        t.start()
        t.join()
    assert seen["thread"] == outer.execution_id and current_execution_id() is None

    async def main() -> None:
        async with mart.track_execution("app", "async") as tracker:
            async def child() -> str | None:
                await asyncio.sleep(0)
                return current_execution_id()

            seen["task"] = (await asyncio.gather(asyncio.create_task(child())))[0]
            seen["id"] = tracker.execution_id
        seen["after"] = current_execution_id()

    asyncio.run(main())
    assert seen["task"] == seen["id"] and seen["after"] is None
    with pytest.raises(RuntimeError):
        with mart.track_execution("app", "boom"):
            raise RuntimeError("boom")
    assert current_execution_id() is None


def test_bad_signal_settings_name_the_key() -> None:
    with pytest.raises(ConfigurationError, match=r"signals.judges\[0\].sample.default must be a share"):
        parse_signals({"judges": [{"name": "q", "model": "judge", "sample": 5}]})
    with pytest.raises(ConfigurationError, match=r"signals.checks.code\[0\].regex .* does not compile"):
        parse_signals({"checks": {"code": [{"regex": "("}]}})
    with pytest.raises(ConfigurationError, match="unknown key"):
        parse_signals({"judge": []})
    with pytest.raises(ConfigurationError, match="not a valid JSON schema"):
        parse_signals({"checks": {"x": [{"json_schema": {"type": "nope"}}]}})
    with pytest.raises(ConfigurationError, match="signals.judges"):
        tidyllm.install(database_url="sqlite:///:memory:", signals={"judges": [{"name": "q"}]})


def test_checks_score_answers() -> None:
    from tidyllm.signals.checks import run_check

    s = parse_signals({"checks": {"x": [
        {"name": "json", "json_schema": {"type": "object", "required": ["amount"]}},
        {"name": "code", "python_parses": True}, {"name": "re", "regex": r"\d{4}"},
        {"name": "len", "length": {"min": 3, "max": 10}},
        {"name": "fn", "callable": "tidyllm.signals.checks:_payload"}]}})
    json_check, code, regex, length, _ = s.checks["x"]
    assert run_check(json_check, '```json\n{"amount": 3}\n```')[0] == 1.0
    assert run_check(json_check, '{"total": 3}')[0] == 0.0
    assert run_check(code, "def f():\n    return 1\n")[0] == 1.0 and run_check(code, "def f(:")[0] == 0.0
    assert run_check(regex, "in 2024")[0] == 1.0 and run_check(length, "ab")[0] == 0.0


def test_route_weight_is_the_prior_share_and_fades_with_evidence() -> None:
    from tidyllm.routing import RouteBandit

    bandit = RouteBandit(random_state=0, floor=0.0)
    ctx = {"department": "risk", "use_case": "qa"}
    probs = [bandit.choose(ctx, ["a", "b"], prior={"a": 3.0, "b": 1.0}) for _ in range(400)]
    share = sum(c.route == "a" for c in probs) / len(probs)
    assert share == pytest.approx(0.75, abs=0.06)
    assert all(c.propensity == pytest.approx(0.75) for c in probs if c.route == "a")
    # evidence that b is better overrides the prior
    bandit.partial_fit([ctx] * 200, ["a", "b"] * 100, [0.2, 0.9] * 100)
    later = [bandit.choose(ctx, ["a", "b"], prior={"a": 3.0, "b": 1.0}).route for _ in range(200)]
    assert later.count("b") > 150


EXIT_SCRIPT = r"""
import sys, time
from tidyllm.mart import TidyMart
from tidyllm.signals import SignalHub, parse_signals

hub = SignalHub(TidyMart(sys.argv[1]), parse_signals({"checks": {"code": [{"name": "parses", "python_parses": True}]},
                                                     "queue_size": 2}))
for i in range(50):  # a database write per job: the bounded queue overflows, the rest is dropped
    hub.observe(f"exit-{i}", "ep-small", {"use_case": "code"}, [], "def f(:")
print(hub.stats["dropped"])
"""


def test_the_worker_queue_is_bounded_and_drained_at_exit(tmp_path: Any) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'exit.db'}"
    run = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    dropped = int(run.stdout.strip())
    from tidyllm.mart import TidyMart

    signals = TidyMart(url).frame("call_signals")
    # nothing queued was lost at exit: every job that was not dropped ran, also those still queued at the end
    assert len(signals) == 50 - dropped and dropped >= 1
    assert (signals["score"] == 0.0).all() and (signals["source"] == "check:parses").all()


def test_the_weighted_strategy_splits_traffic_by_route_weight() -> None:
    from tidyllm.routing.chooser import WeightedChooser

    chooser = WeightedChooser({"a": 3.0, "b": 1.0, "c": 4.0}, random_state=0)
    picks = [chooser.choose({}, "chat", ["a", "b"], {}) for _ in range(2000)]
    assert sum(p.route == "a" for p in picks) / len(picks) == pytest.approx(0.75, abs=0.03)
    assert {p.propensity for p in picks} == {0.75, 0.25} and {p.policy for p in picks} == {"weighted"}
    # a candidate filtered out (unauthorised, unhealthy) leaves the others' shares in proportion
    assert {chooser.choose({}, "chat", ["c"], {}).propensity for _ in range(5)} == {1.0}


def test_routes_status_reports_signals_and_judge_human_agreement(platform: tuple[Any, Any]) -> None:
    from click.testing import CliRunner

    from tidyllm.cli import main

    p, router = platform
    _call(p, router, "status-1", use_case="qa")
    _wait_for(p, "status-1", "judge:q")
    rng = random.Random(2)
    for i in range(25):
        q = rng.uniform(0.2, 0.9)
        p.signals.record(f"rated-{i}", "judge:q", min(1.0, q + 0.1))
        p.feedback(f"rated-{i}", q)
    result = CliRunner().invoke(main, ["routes", "status", "--database-url", p.settings.database_url])
    assert result.exit_code == 0, result.output
    assert "Quality signals per source" in result.output and "Judge–human agreement" in result.output
    agreement = result.output.split("Judge–human agreement", 1)[1]
    row = next(line for line in agreement.splitlines() if line.startswith("judge:q"))
    assert row.split()[1] == "25" and "True" in row  # calibrated: 25 calls scored by both

"""The learning router end to end: real MLflow legacy gateway, provider simulator, governance, bandit."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

import tidyllm
from tidyllm.stack import LocalStack

USE_CASES = ["qa", "code", "summarise"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    db = tmp_path_factory.mktemp("e2e") / "mart.db"
    with LocalStack(latency_scale=0, database_url=f"sqlite:///{db}",
                    routing={"strategy": "bandit", "random_state": 0, "refresh_seconds": 0}) as s:
        yield s


def _workload(platform: Any, n: int, start: int = 0) -> list[str]:
    router = platform.router()
    ids = []
    for i in range(start, start + n):
        call_id = f"e2e-{i}"
        router.completion(model="chat", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=30,
                          metadata={"user_id": "ana", "department": ["risk", "finance"][i % 2],
                                    "use_case": USE_CASES[i % 3], "tidyllm_call_id": call_id})
        ids.append(call_id)
    platform.wait_for_call(ids[-1])
    return ids


def test_decisions_and_rewards_land_in_the_mart(stack: LocalStack) -> None:
    p = stack.platform
    ids = _workload(p, 60)
    for call_id in ids:
        p.wait_for_call(call_id)
    decisions = p.mart.frame("routing_decisions", parse_json=True)
    assert len(decisions) >= 60 and set(ids) <= set(decisions["call_id"])
    assert decisions["policy"].eq("bandit").all()
    assert decisions["propensity"].between(0, 1, inclusive="right").all()
    assert decisions["reward"].notna().all() and decisions["quality"].notna().sum() >= 55
    for _, row in decisions.iterrows():  # only candidates are ever chosen
        assert row["route"] in row["candidates"]
    assert set(decisions["route"]) <= {"chat-large", "chat-small", "chat-claude", "chat-onprem"}
    best = p.mart.get_optimal_config("gateway", {"department": "risk", "use_case": "code", "model_group": "chat"})
    assert best["source"] == "bandit" and best["parameters"]["preferred_route"].startswith("chat-")
    assert best["samples"] >= 60


def test_late_feedback_is_joined_by_call_id(stack: LocalStack) -> None:
    p = stack.platform
    [call_id] = _workload(p, 1, start=1000)
    before = p.chooser().bandit.n_updates_
    provider = p.mart.frame("call_signals", call_id=call_id, source="provider").iloc[0]
    p.feedback(call_id, 0.05, comment="wrong figures")
    signals = p.mart.frame("call_signals", call_id=call_id).set_index("source")
    assert signals.loc["human", "score"] == pytest.approx(0.05) and signals.loc["human", "comment"] == "wrong figures"
    assert signals["applied_at"].notna().all()
    row = p.mart.frame("routing_decisions", call_id=call_id).iloc[0]
    # the decision's quality is the weighted mean of its sources: the provider's report and the human label
    assert row["quality"] == pytest.approx((provider["score"] + 0.05) / 2)
    assert p.chooser().bandit.n_updates_ == before + 1  # the human label is one more observation ...
    p.feedback(call_id, 0.9)
    assert p.chooser().bandit.n_updates_ == before + 1  # ... learned once: a repeat is ignored


RESTART = r"""
import sys, tidyllm
from tidyllm.settings import load_settings
p = tidyllm.install(database_url=sys.argv[1], gateway_uri=sys.argv[2], gateway_config=sys.argv[3],
                    routing={"strategy": "bandit", "random_state": 0})
print(p.chooser().bandit.n_updates_)
"""


def test_a_restarted_process_resumes_from_the_mart(stack: LocalStack) -> None:
    p = stack.platform
    p.chooser().save()
    learned = p.chooser().bandit.n_updates_
    out = subprocess.run([sys.executable, "-c", RESTART, p.settings.database_url, stack.gateway.uri,
                          str(stack.gateway_config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) == learned


def test_a_refused_call_is_not_the_routes_fault(stack: LocalStack) -> None:
    p = stack.platform
    p.budgets.set("user", "zoe", 0.0, "day")
    before = len(p.mart.frame("routing_decisions"))
    with pytest.raises(tidyllm.BudgetExceededError):
        p.router().completion(model="chat", messages=[{"role": "user", "content": "hi"}],
                              metadata={"user_id": "zoe", "department": "risk"})
    assert len(p.mart.frame("routing_decisions")) == before


def test_routes_cli_status_and_evaluate(stack: LocalStack) -> None:
    from tidyllm.cli import main

    _workload(stack.platform, 12, start=2000)
    url = stack.platform.settings.database_url
    args = ["--database-url", url]
    env = {"TIDYLLM_GATEWAY_URI": stack.gateway.uri, "TIDYLLM_GATEWAY_CONFIG": str(stack.gateway_config)}
    counts = {t: len(stack.platform.mart.frame(t)) for t in ("prices", "reservations", "bandit_state",
                                                                    "budget_events", "audit_log")}
    result = CliRunner(env=env).invoke(main, ["routes", "status", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Preferred route per context" in result.output and "chat-" in result.output
    result = CliRunner(env=env).invoke(main, ["routes", "evaluate", "--bootstrap", "20", *args],
                                       catch_exceptions=False)
    assert result.exit_code == 0 and "snips" in result.output.lower()
    # read commands write nothing (the mart is opened read-only)
    assert {t: len(stack.platform.mart.frame(t)) for t in counts} == counts
    missing = CliRunner(env=env).invoke(main, ["routes", "status", "--database-url", "sqlite:////tmp/no/such.db"])
    assert missing.exit_code != 0 and not os.path.exists("/tmp/no/such.db")


def test_enterprise_gateway_returns_the_seed_dict(stack: LocalStack) -> None:
    # last in the module: TidyLLMGateway installs its own platform (require_audit on), replacing the stack's
    gw = tidyllm.TidyLLMGateway(mlflow_gateway_uri=stack.gateway.uri,
                                enterprise_config=tidyllm.EnterpriseConfig(require_audit=True),
                                config=stack.platform.settings)
    out = gw.completion(model="chat", messages=[{"role": "user", "content": "Summarise Q3."}], user_id="ana",
                        department="finance", audit_reason="MVR peer review", use_case="summarise", max_tokens=30)
    assert out["route"].startswith("chat-") and out["cost_usd"] > 0 and out["usage"]["total_tokens"] > 0
    assert out["content"] and out["model"].startswith("sim-")
    with pytest.raises(tidyllm.MetadataError, match="audit reason"):
        gw.completion(model="chat", messages=[{"role": "user", "content": "x"}], user_id="ana", department="risk")

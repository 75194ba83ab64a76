"""`tidyllm demo` end to end (a short run), and its workload and summary helpers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tidyllm.demo import DEPARTMENTS, make_workload

CLI = [sys.executable, "-c", "from tidyllm.cli import main; main()"]


def test_workload_is_reproducible_and_realistic() -> None:
    a, b = make_workload(400, seed=3), make_workload(400, seed=3)
    assert a == b and a != make_workload(400, seed=4)
    departments = {r.department for r in a}
    use_cases = {r.use_case for r in a}
    assert departments == {d.name for d in DEPARTMENTS} and len(departments) >= 3
    assert len(use_cases) >= 3
    # shares follow the departments' weights, within sampling noise
    for dept in DEPARTMENTS:
        share = sum(r.department == dept.name for r in a) / len(a)
        assert abs(share - dept.share) < 0.07, (dept.name, share)
    # confidential data appears only where a department has it; every request carries an audit reason
    assert {r.department for r in a if r.data_sensitivity == "confidential"} == {"risk"}
    assert all(r.audit_reason and r.user_id for r in a)
    assert all(r.metadata()["use_case"] == r.use_case for r in a)


def _child_pids(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_demo_end_to_end(tmp_path: Path) -> None:
    """200 requests through the real legacy MLflow gateway: summary printed, dashboard and mart written,
    marketing ran out of budget, an endpoint went down, the audit chain verifies, nothing left running."""
    out = tmp_path / "demo"
    t0 = time.monotonic()
    run = subprocess.run([*CLI, "demo", "--requests", "200", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    elapsed = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = run.stdout
    for heading in ("== Spend and refusals per department ==", "== Route share per context",
                    "== Outage ==", "== Reward", "== Audit =="):
        assert heading in text, heading
    rows = {m.group(1): m.groups() for m in re.finditer(
        r"^(finance|marketing|research|risk)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\$(\S+)", text, re.M)}
    assert set(rows) == {"finance", "marketing", "research", "risk"}
    assert sum(int(r[1]) for r in rows.values()) == 200
    marketing = rows["marketing"]
    assert int(marketing[4]) > 0 and int(marketing[5]) == int(marketing[4])  # refused, all for its budget
    assert 0 < int(marketing[2]) < int(marketing[1])  # some answered before the budget ran out, not all
    outage = re.search(r"was down from request 60 to 90: (\d+) of (\d+) attempts on chat-\w+ failed", text)
    assert outage and int(outage.group(1)) >= 1, text
    assert re.search(r"audit chain verified: \d+ rows intact", text)
    assert "learning router:" in text and "best fixed route" in text
    # the simulator reported no quality: the router learned from the judge, the check, ratings and failures
    assert "== Quality signals the router learned from" in text and "judge:quality" in text
    assert re.search(r"difference [+-]\d\.\d{4}, 95% interval \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", text)
    import json

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    learning = summary["learning"]
    assert learning["best_fixed_route"].startswith("chat-") and 0 < learning["best_fixed_value"] <= 1
    assert 0 < learning["router_value"] <= 1 and len(learning["difference_ci"]) == 2
    assert learning["difference_ci"][0] <= learning["difference"] <= learning["difference_ci"][1]
    assert summary["totals"]["requests"] == 200 and summary["totals"]["spend_usd"] > 0
    assert summary["totals"]["requests_refused"] == int(marketing[4])
    assert summary["signals"]["judge:quality"]["learned"] > 0
    assert {d["department"] for d in summary["departments"]} >= {"risk", "marketing", "evaluation"}
    # the progress bar went to stderr, the LiteLLM/tidyllm warnings to the log file, not the terminal
    assert "requests:" in run.stderr and "LiteLLM:WARNING" not in run.stdout + run.stderr
    assert (out / "demo.log").exists()

    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count('<img id="chart-') == 9
    from tidyllm.mart import TidyMart

    mart = TidyMart(f"sqlite:///{out / 'tidyllm-demo.db'}")
    calls = mart.frame("llm_calls")
    assert calls["status"].isin(["success", "failure", "refused"]).all()  # nothing left pending
    status = mart.frame("budget_windows").merge(mart.frame("budgets"), left_on="budget_id", right_on="id")
    assert (status["spent_usd"] <= status["limit_usd"] + 1e-12).all()  # no department overspent its hard budget
    assert (status["reserved_usd"].abs() < 1e-9).all()
    assert len(mart.frame("routing_decisions")) > 100
    assert set(mart.frame("executions")["module"]) == {"mvr_review", "close_commentary", "campaign_studio",
                                                       "research_assistant"}
    mart.close()
    print(f"demo --requests 200: {elapsed:.1f} s")


def test_demo_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM mid-run: exit code 130 and no gateway or simulator process left behind."""
    proc = subprocess.Popen([*CLI, "demo", "--requests", "5000", "--out", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    children: set[int] = set()
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:  # wait until requests flow, remembering the processes it started
        lines.append(line)
        children |= _child_pids(proc.pid)
        if "ready after" in line or time.monotonic() > deadline:
            break
    time.sleep(2)
    children |= _child_pids(proc.pid)
    assert children, "".join(lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted: the gateway and the simulator were stopped" in rest
    time.sleep(0.5)
    alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline() for p in alive]


def test_summary_formatting_of_a_strategy_without_decisions() -> None:
    """With the cheapest rule there are no rewarded decisions: the summary says so instead of failing."""
    from tidyllm.report.data import reward_summary

    import pandas as pd

    empty = pd.DataFrame(columns=["reward", "explored", "candidates", "context", "route", "propensity"])
    assert "no routing decisions" in reward_summary(empty)["note"]
    few = pd.DataFrame({"reward": [0.5] * 5, "explored": [False] * 5, "candidates": [["a"]] * 5,
                        "context": [{}] * 5, "route": ["a"] * 5, "propensity": [1.0] * 5})
    assert "too few" in reward_summary(few)["note"]


def test_demo_rejects_a_tiny_workload(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from tidyllm.cli import main

    result = CliRunner().invoke(main, ["demo", "--requests", "3", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--requests" in result.output

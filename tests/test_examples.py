"""Each of ``examples/*.py`` runs as a script, offline, and prints what it did.

They share one provider simulator and one real MLflow legacy gateway (``TIDYLLM_GATEWAY_URI``), each
with its own mart, and run at the same time: starting a gateway per example would cost more than the
examples themselves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def gateway_uri() -> Iterator[str]:
    from tidyllm.gateway.processes import start_gateway
    from tidyllm.gateway.simulator import Simulator
    from tidyllm.stack import bundled_gateway_config

    with Simulator(seed=0, latency_scale=0.02) as sim:
        gateway = start_gateway(str(bundled_gateway_config()), mode="legacy", env={"TIDYLLM_SIMULATOR_URL": sim.url})
        try:
            yield gateway.uri
        finally:
            gateway.stop()


@pytest.fixture(scope="module")
def outputs(gateway_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every example at once against the shared gateway; their outputs by name."""
    tmp = tmp_path_factory.mktemp("examples")
    procs = {}
    for script in sorted(EXAMPLES.glob("[!_]*.py")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDYLLM_")}
        env.update(TIDYLLM_GATEWAY_URI=gateway_uri, TIDYLLM_DATABASE_URL=f"sqlite:///{tmp / script.stem}.db",
                   TIDYLLM_HOME=str(tmp / "home"), LITELLM_LOCAL_MODEL_COST_MAP="True")
        procs[script.stem] = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def ok(outputs: dict[str, subprocess.CompletedProcess[str]], name: str) -> str:
    run = outputs[name]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    return run.stdout


def test_every_example_is_covered(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert set(outputs) == {"tidymart_mlflow_integration", "mlflow_route_optimizer", "enterprise_ai_workflow",
                            "auto_optimizing_gateway"}


def test_tidymart_mlflow_integration(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = ok(outputs, "tidymart_mlflow_integration")
    assert "using the MLflow gateway at http://127.0.0.1:" in out
    for label in ("risk/qa", "finance/analysis", "research/summarise", "risk/qa (confidential)"):
        assert re.search(rf"^{re.escape(label)}\s+(chat-\w+|refused)", out, re.M), label
    tracked = re.search(r"tracked executions: (\d+) \(module 'gateway', operation 'mlflow_query'\)", out)
    assert tracked and int(tracked.group(1)) == 12
    assert "'configuration_optimized': 12" in out and "'mlflow_execution': " in out
    assert "confidential requests answered on premises only: ['chat-onprem']" in out
    assert re.search(r"audit chain verified: \d+ rows intact", out)


def test_mlflow_route_optimizer(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = ok(outputs, "mlflow_route_optimizer")
    assert "30 requests through the learning router" in out
    rows = re.findall(r"^(research/code|finance/extraction|risk/qa)\s+(chat-\w+)\s+(chat-\w+)\s+([\d.]+)", out, re.M)
    assert len(rows) == 3
    assert all(float(confidence) > 0 for *_, confidence in rows)  # it learned something for every context
    learned = re.search(r"learned outcomes stored: (\d+); routing decisions logged: (\d+)", out)
    assert learned and int(learned.group(1)) >= 25 and int(learned.group(2)) >= int(learned.group(1))


def test_enterprise_ai_workflow(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = ok(outputs, "enterprise_ai_workflow")
    runs = re.findall(r"^\d+\s+(risk/analysis|finance/summarise)\s+(chat-\w+)\s+([\d.]+)\s+(\d+)", out, re.M)
    assert len(runs) == 12 and all(float(cost) > 0 and int(tokens) > 0 for *_, cost, tokens in runs)
    assert "(exploring)" in out and "(history)" in out
    assert "without an audit reason: refused (this platform requires an audit reason" in out
    assert out.count("learned configuration for") == 2
    assert re.search(r"tracked workflow executions: 12, status \{'success': 12\}; audit chain verified", out)


def test_auto_optimizing_gateway(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = ok(outputs, "auto_optimizing_gateway")
    summary = re.search(r"30 requests, (\d+) refused by governance", out)
    assert summary and int(summary.group(1)) > 0  # marketing's small budget ran out
    assert "refused before reaching a provider: department 'marketing'" in out
    assert "exploring research/code -> chat-" in out
    assert re.search(r"optimal for research/code: chat-\w+ \(confidence [\d.]+, \d+ updates\)", out)
    assert re.search(r"audit chain verified: \d+ rows intact", out)

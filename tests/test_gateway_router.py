"""The governed Router over real MLflow gateways in front of the provider simulator.

The module starts one provider simulator and, in parallel, one legacy gateway (``mlflow gateway
start``) and one tracking server (``mlflow server``) over the bundled seed-format routes file;
the tracking server also answers one warm-up request meanwhile (its first request takes
seconds). Only one platform can be installed per process: the tracking-server test installs and
uninstalls its own first, then one legacy platform serves the rest of the module. Keep that
test first.

The simulator's models run with no random errors, 429 bursts or scheduled outages, so every
failure here is one the test caused. Circuit breakers run on a manual clock: a cool-down passes
when the test says so.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

import tidyllm
from tidyllm.gateway.health import RouteHealth
from tidyllm.gateway.processes import GatewayProcess, start_gateway
from tidyllm.gateway.simulator import ModelProfile, Simulator, load_profiles
from tidyllm.platform import current
from tidyllm.stack import bundled_gateway_config

# LiteLLM 1.110 builds a pydantic schema with ReadOnly TypedDict items on first use; pydantic warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning")

MSG = [{"role": "user", "content": "Summarise the peer review findings in two sentences."}]
META = {"user_id": "ana", "department": "risk", "audit_reason": "MVR peer review", "use_case": "qa"}
RISK_LIMIT = 5.0
#: cheapest-first routing over group "chat" picks chat-onprem ($0.05/$0.05), then chat-small
CHEAPEST, NEXT = "chat-onprem", "chat-small"
SETTINGS = {
    "routing": {"strategy": "cheapest"},
    "governance": {"require_audit": True},
    "budgets": [{"scope": "department", "name": "risk", "limit_usd": RISK_LIMIT, "period": "month"}],
    # only the premium route is limited, so the other tests never meet the limit
    "rate_limits": [{"scope": "route", "name": "chat-large", "rpm": 2}],
}


def steady_profiles() -> dict[str, ModelProfile]:
    """The bundled simulator profiles without random errors, 429 bursts or scheduled outages."""
    return {name: dataclasses.replace(p, error_rate=0.0, rpm=None, rate_limits=(), outages=(),
                                      stream_failure_rate=0.0)
            for name, p in load_profiles().items()}


def gateway_routes() -> dict[str, dict[str, Any]]:
    """The bundled seed-format gateway file, read as plain YAML (independently of tidyllm's parser)."""
    data = yaml.safe_load(bundled_gateway_config().read_text())
    return {r["name"]: r for r in data["routes"]}


def expected_cost(route: str, prompt_tokens: int, completion_tokens: int) -> float:
    price = gateway_routes()[route]["price"]
    return (prompt_tokens * price["input_per_1m"] + completion_tokens * price.get("output_per_1m", 0.0)) / 1e6


class ManualClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Gateways:
    sim: Simulator
    legacy: GatewayProcess
    server: GatewayProcess


@dataclass
class Legacy:
    platform: Any
    router: Any
    clock: ManualClock
    sim: Simulator
    gateway: GatewayProcess


def install(gateway: GatewayProcess, database: Path) -> Any:
    """The governed platform over ``gateway`` (what ``tidyllm.stack.LocalStack`` installs)."""
    return tidyllm.install(SETTINGS, database_url=f"sqlite:///{database}", gateway_uri=gateway.uri,
                           gateway_mode=gateway.mode, gateway_config=str(bundled_gateway_config()))


def wait_settled(platform: Any, timeout: float = 15.0) -> Any:
    """Sync callbacks settle on LiteLLM's logging threads: wait until no call is pending; return the calls."""
    deadline = time.monotonic() + timeout
    while True:
        calls = platform.calls()
        if not (calls["status"] == "pending").any():
            return calls
        if time.monotonic() > deadline:
            raise AssertionError(f"calls still pending:\n{calls[calls['status'] == 'pending']}")
        time.sleep(0.05)


def new_rows(frame: Any, before: set[str], key: str = "id") -> Any:
    return frame[~frame[key].isin(before)]


def chat(router: Any, model: str = "chat", **kwargs: Any) -> Any:
    return router.completion(model=model, messages=MSG, max_tokens=64, metadata=dict(META), **kwargs)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    data = tmp_path_factory.mktemp("gateways")
    with Simulator(steady_profiles(), seed=0, latency_scale=0) as sim:
        env = {"TIDYLLM_SIMULATOR_URL": sim.url}

        def server() -> GatewayProcess:
            gw = start_gateway(str(bundled_gateway_config()), mode="server", env=env, data_dir=data / "mlflow",
                               timeout=180)
            try:
                # plain HTTP, not LiteLLM: nothing governed or recorded
                reply = httpx.post(f"{gw.api_base}/chat/completions", timeout=120,
                                   json={"model": CHEAPEST, "messages": MSG, "max_tokens": 8})
                assert reply.status_code == 200, reply.text
            except BaseException:
                gw.stop()
                raise
            return gw

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(start_gateway, str(bundled_gateway_config()), mode="legacy", env=env),
                       pool.submit(server)]
            started = []
            try:
                for f in futures:
                    started.append(f.result())
            except BaseException:
                for f in futures:
                    if f.exception() is None:
                        f.result().stop()
                raise
        with started[0] as legacy, started[1] as server_gw:
            yield Gateways(sim, legacy, server_gw)


# --- the tracking-server flavour (first: it installs and uninstalls its own platform) ---------------


def test_governed_router_call_through_the_tracking_server_gateway(gateways: Gateways, tmp_path: Path) -> None:
    sim, gw = gateways.sim, gateways.server
    platform = install(gw, tmp_path / "mart.db")
    try:
        assert platform.gateway.mode == "server"
        assert platform.gateway.api_base == f"{gw.uri}/gateway/mlflow/v1"
        assert {r["name"] for r in platform.gateway.endpoints().to_dict("records")} == set(gateway_routes())
        hits = sim.hits("sim-onprem-llama")
        resp = chat(platform.router())
        assert resp.model == "sim-onprem-llama"
        assert sim.hits("sim-onprem-llama") == hits + 1
        calls = wait_settled(platform)
        assert len(calls) == 1
        row = calls.iloc[0]
        assert (row["route"], row["status"]) == (CHEAPEST, "success")
        assert row["cost_usd"] == pytest.approx(expected_cost(CHEAPEST, resp.usage.prompt_tokens,
                                                              resp.usage.completion_tokens), rel=1e-9)
        audit = platform.audit.frame(decision=["allowed", "refused", "unenforced"])  # the routes' setup is audited too
        assert audit["call_id"].tolist() == [row["id"]]
        assert audit.iloc[0]["status"] == "success" and platform.audit.verify().ok
    finally:
        tidyllm.uninstall()
    assert current() is None


# --- the legacy flavour, one platform for the rest of the module -----------------------------------


@pytest.fixture(scope="module")
def legacy(gateways: Gateways, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Legacy]:
    platform = install(gateways.legacy, tmp_path_factory.mktemp("legacy") / "mart.db")
    try:
        # a breaker on the manual clock, in place before the Router (and its strategy) is built
        clock = ManualClock()
        platform.routes = RouteHealth(failure_threshold=3, cooldown_s=30.0, clock=clock)
        # built and used once here: the prices the Router registers with LiteLLM and the callback
        # lists LiteLLM fills on a first call then belong to the state conftest saves and restores
        # around each test (restoring an earlier state would unregister the platform's callbacks)
        router = platform.router()
        chat(router)
        wait_settled(platform)
        yield Legacy(platform, router, clock, gateways.sim, gateways.legacy)
    finally:
        tidyllm.uninstall()


def test_seed_format_config_starts_the_legacy_gateway(legacy: Legacy) -> None:
    text = bundled_gateway_config().read_text()
    assert "\nroutes:\n" in text and "route_type: llm/v1/chat" in text  # the seed's format, not MLflow 3's
    gw = legacy.platform.gateway
    assert gw.mode == "legacy" and gw.uri == legacy.gateway.uri
    assert gw.api_base == f"{gw.uri}/v1" and gw.uri.startswith("http://127.0.0.1:")
    endpoints = gw.endpoints()
    routes = gateway_routes()
    assert {(e["name"], e["endpoint_type"], e["provider"], e["model"]) for e in endpoints.to_dict("records")} == {
        (name, r["route_type"], r["model"]["provider"], r["model"]["name"]) for name, r in routes.items()}
    # every endpoint is a deployment of its group and of its own name, with its explicit price
    deployments = legacy.router.registry().deployments()
    by_group: dict[str, set[str]] = {}
    for d in deployments:
        by_group.setdefault(d["model_name"], set()).add(d["model_info"]["tidyllm_route"])
        price = routes[d["model_info"]["tidyllm_route"]]["price"]
        assert d["litellm_params"]["model"] == f"openai/{d['model_info']['tidyllm_route']}"
        assert d["litellm_params"]["api_base"] == gw.api_base
        assert d["litellm_params"]["input_cost_per_token"] == pytest.approx(price["input_per_1m"] / 1e6)
    assert by_group["chat"] == {"chat-large", "chat-small", "chat-claude", "chat-onprem"}
    assert by_group["embed"] == {"embed"} and by_group["chat-large"] == {"chat-large"}


def test_governed_call_reaches_the_simulator_with_usage_and_exact_cost(legacy: Legacy) -> None:
    platform = legacy.platform
    before_calls = set(wait_settled(platform)["id"])
    before_budget = platform.budgets.status(scope="department", name="risk").iloc[0]
    hits = legacy.sim.hits("sim-onprem-llama")

    resp = chat(legacy.router)

    assert resp.model == "sim-onprem-llama"
    assert legacy.sim.hits("sim-onprem-llama") == hits + 1
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 64
    cost = expected_cost(CHEAPEST, resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert cost > 0
    # LiteLLM costs it from the deployment's explicit price too, never at $0
    assert resp._hidden_params["response_cost"] == pytest.approx(cost, rel=1e-9)

    rows = new_rows(wait_settled(platform), before_calls)
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["route"], row["requested_model"], row["status"]) == (CHEAPEST, "chat", "success")
    assert (row["department"], row["user_id"], row["use_case"]) == ("risk", "ana", "qa")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert row["cost_usd"] == pytest.approx(cost, rel=1e-9)
    audit = platform.audit.frame()
    mine = audit[audit["call_id"] == row["id"]]
    assert len(mine) == 1
    entry = mine.iloc[0]
    assert (entry["decision"], entry["status"], entry["route"]) == ("allowed", "success", CHEAPEST)
    assert entry["cost_usd"] == pytest.approx(cost, rel=1e-9)
    assert entry["audit_reason"] == META["audit_reason"]
    budget = platform.budgets.status(scope="department", name="risk").iloc[0]
    assert budget["spent_usd"] - before_budget["spent_usd"] == pytest.approx(cost, rel=1e-6)
    assert budget["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
    assert budget["limit_usd"] == RISK_LIMIT
    assert platform.audit.verify().ok


def test_route_status_shows_state_latency_error_rate_and_calls(legacy: Legacy) -> None:
    chat(legacy.router)
    wait_settled(legacy.platform)
    status = legacy.platform.routes.status()
    assert list(status.columns) == ["route", "state", "calls", "failures", "error_rate", "latency_ms_p50"]
    row = status.set_index("route").loc[CHEAPEST]
    assert row["state"] == "closed" and row["calls"] >= 1 and row["error_rate"] == 0.0
    assert row["latency_ms_p50"] > 0
    assert legacy.platform.routes.state(CHEAPEST) == "closed"


def test_outage_opens_the_circuit_moves_traffic_and_closes_after_recovery(legacy: Legacy) -> None:
    platform, router, sim, routes = legacy.platform, legacy.router, legacy.sim, legacy.platform.routes
    before_calls = set(wait_settled(platform)["id"])
    before_audit = set(platform.audit.frame()["call_id"])
    down_hits = sim.hits("sim-onprem-llama")
    outcomes: list[str] = []
    sim.set_outage("sim-onprem-llama", True)
    try:
        # each call tries the cheapest endpoint, gets the simulator's 503 through the gateway, and is
        # retried by the Router on the next endpoint; three consecutive failures open the circuit
        deadline = time.monotonic() + 30
        while routes.state(CHEAPEST) != "open":
            assert time.monotonic() < deadline, routes.status()
            outcomes.append(chat(router).model)
            wait_settled(platform)
        assert set(outcomes) == {"sim-gpt-small"}  # every caller still got an answer
        failed_attempts = sim.hits("sim-onprem-llama") - down_hits
        assert failed_attempts >= 3
        status = routes.status().set_index("route").loc[CHEAPEST]
        assert status["failures"] >= 3 and status["error_rate"] > 0

        # open: traffic goes to the other endpoints of the group without touching the dead one
        small = sim.hits("sim-gpt-small")
        for _ in range(3):
            assert chat(router).model == "sim-gpt-small"
        assert sim.hits("sim-onprem-llama") - down_hits == failed_attempts
        assert sim.hits("sim-gpt-small") == small + 3
        # asking for the dead endpoint by name is a clear, audited refusal, not a provider call
        with pytest.raises(tidyllm.RouteNotAuthorizedError, match="unhealthy.*circuit open.*chat-onprem"):
            chat(router, model=CHEAPEST)
        assert sim.hits("sim-onprem-llama") - down_hits == failed_attempts
        assert routes.state(CHEAPEST) == "open"
    finally:
        sim.set_outage("sim-onprem-llama", False)

    calls = new_rows(wait_settled(platform), before_calls)
    audit = new_rows(platform.audit.frame(), before_audit, key="call_id")
    # every attempt — served, failed over, or refused — has exactly one audit row
    assert sorted(audit["call_id"]) == sorted(calls["id"])
    by_status = calls.groupby(["route", "status"]).size().to_dict()
    assert by_status == {(CHEAPEST, "failure"): failed_attempts, (NEXT, "success"): len(outcomes) + 3,
                         (CHEAPEST, "refused"): 1}
    failures = audit[audit["status"] == "failure"]
    assert failures["error"].str.contains("ServiceUnavailable").all()
    refused = audit[audit["status"] == "refused"].iloc[0]
    assert refused["rule"] == "no-healthy-route" and refused["decision"] == "refused"

    # the endpoint is back; after the cool-down one probe goes to it and closes the circuit
    legacy.clock.advance(31)
    assert routes.state(CHEAPEST) == "half_open"
    # LiteLLM's own cooldown (cooldown_time, real seconds) may still hold the deployment back
    deadline = time.monotonic() + 15
    while router.health().cooldowns.get_active_cooldowns([CHEAPEST], None):
        assert time.monotonic() < deadline, "LiteLLM kept chat-onprem in cooldown"
        time.sleep(0.2)
    hits = sim.hits("sim-onprem-llama")
    assert chat(router).model == "sim-onprem-llama"
    assert sim.hits("sim-onprem-llama") == hits + 1
    wait_settled(platform)
    assert routes.state(CHEAPEST) == "closed"
    assert chat(router).model == "sim-onprem-llama"
    assert platform.audit.verify().ok


def test_rate_limited_route_refuses_with_retry_after_audited_and_provider_not_hit(legacy: Legacy) -> None:
    platform = legacy.platform
    before_calls = set(wait_settled(platform)["id"])
    hits = legacy.sim.hits("sim-gpt-large")
    for _ in range(2):  # rpm: 2 on chat-large
        assert chat(legacy.router, model="chat-large").model == "sim-gpt-large"
    with pytest.raises(tidyllm.RateLimitedError) as caught:
        chat(legacy.router, model="chat-large")
    err = caught.value
    assert 0 < err.retry_after <= 60
    assert "route 'chat-large'" in str(err) and "2 requests per minute" in str(err)
    assert isinstance(err, tidyllm.GovernanceError)
    assert legacy.sim.hits("sim-gpt-large") == hits + 2

    calls = new_rows(wait_settled(platform), before_calls)
    assert calls["status"].value_counts().to_dict() == {"success": 2, "refused": 1}
    refused = calls[calls["status"] == "refused"].iloc[0]
    assert (refused["route"], refused["error_type"]) == ("chat-large", "RateLimitedError")
    entry = platform.audit.show(refused["id"])
    assert entry is not None
    assert (entry["decision"], entry["rule"], entry["status"]) == ("refused", "rate_limit", "refused")
    assert "RateLimitedError" in entry["error"]
    # other routes are not limited
    assert chat(legacy.router).model == "sim-onprem-llama"
    assert platform.audit.verify().ok

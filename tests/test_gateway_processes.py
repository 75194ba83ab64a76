"""Real MLflow gateways on 127.0.0.1 in front of the provider simulator: start, call, sync, auth, stop.

One legacy gateway and one tracking server (with MLflow's basic-auth app on) are shared by the
module: they take seconds to start.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml
from click.testing import CliRunner

from tidyllm.errors import GatewayConfigError, GatewayError
from tidyllm.gateway.client import auth_headers, detect_mode, embeddings_api_base, list_endpoints
from tidyllm.gateway.processes import GatewayProcess, _group_members, start_gateway
from tidyllm.gateway.simulator import Simulator, load_profiles
from tidyllm.gateway.sync import sync_gateway

EXAMPLE = Path(__file__).resolve().parents[1] / "tidyllm" / "examples_data" / "gateway.yaml"
ADMIN = ("admin", "tidyllm-test-Passw0rd")

# LiteLLM 1.110 builds a pydantic schema with ReadOnly TypedDict items on first use; pydantic warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning")


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(load_profiles(), seed=0, latency_scale=0) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def sim_env(sim: Simulator) -> dict[str, str]:
    return {"TIDYLLM_SIMULATOR_URL": sim.url}


@dataclass
class CliGateway:
    """`tidyllm gateway start` running in a subprocess, as a user runs it."""

    proc: subprocess.Popen[str]
    uri: str
    api_base: str
    output: str


@pytest.fixture(scope="module")
def legacy(sim_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliGateway]:
    """The bundled example served by the legacy gateway, started through the CLI."""
    env = {**os.environ, **sim_env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", "from tidyllm.cli import main; main()", "gateway", "start", "--config", str(EXAMPLE)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=tmp_path_factory.mktemp("cli"))
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    output = "".join(lines)
    try:
        uri = output.split("MLflow legacy gateway at ")[1].split()[0]
        api = output.split("api_base='")[1].split("'")[0]
    except IndexError:
        proc.kill()
        pytest.fail(f"`tidyllm gateway start` did not start:\n{output}{proc.communicate()[0]}")
    yield CliGateway(proc, uri, api, output)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


WARMUP = {"routes": [{"name": "warmup", "route_type": "llm/v1/chat", "model": {
    "provider": "openai", "name": "sim-gpt-small",
    "config": {"openai_api_key": "$TIDYLLM_TEST_SIM_KEY", "openai_api_base": "$TIDYLLM_SIMULATOR_URL"}}}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sim_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A tracking server with authentication on, provisioned at start with one route."""
    data = tmp_path_factory.mktemp("mlflow-server")
    env = {**sim_env, "TIDYLLM_TEST_SIM_KEY": "sk-warmup-key"}
    with start_gateway(WARMUP, mode="server", data_dir=data, auth=ADMIN, env=env, timeout=180) as gw:
        yield gw


def litellm() -> Any:
    from tidyllm._litellm import import_litellm

    return import_litellm()


def chat(gw: GatewayProcess | CliGateway, endpoint: str, **kwargs: Any) -> Any:
    return litellm().completion(model=f"openai/{endpoint}", api_base=gw.api_base, api_key="x",
                                messages=[{"role": "user", "content": "hello gateway"}], **kwargs)


# --- legacy ----------------------------------------------------------------------------------


def test_legacy_gateway_reaches_the_simulator(legacy: CliGateway, sim: Simulator) -> None:
    assert legacy.api_base == f"{legacy.uri}/v1" and legacy.uri.startswith("http://127.0.0.1:")
    before = sim.hits("sim-gpt-small")
    response = chat(legacy, "chat-small")
    assert response.model == "sim-gpt-small"
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert sim.hits("sim-gpt-small") == before + 1
    embedding = litellm().embedding(model="openai/embed", api_base=embeddings_api_base(legacy.uri, "legacy"),
                                    api_key="x", input=["one chunk", "another"])
    assert len(embedding.data) == 2 and embedding.usage.prompt_tokens > 0


def test_legacy_gateway_lists_its_endpoints(legacy: CliGateway) -> None:
    assert detect_mode(legacy.uri) == "legacy"
    rows = list_endpoints(legacy.uri)
    assert {r["name"]: (r["endpoint_type"], r["provider"], r["model"]) for r in rows} == {
        "chat-large": ("llm/v1/chat", "openai", "sim-gpt-large"),
        "chat-small": ("llm/v1/chat", "openai", "sim-gpt-small"),
        "chat-claude": ("llm/v1/chat", "openai", "sim-claude"),
        "chat-onprem": ("llm/v1/chat", "openai", "sim-onprem-llama"),
        "embed": ("llm/v1/embeddings", "openai", "sim-embed"),
    }
    result = CliRunner().invoke(_cli(), ["gateway", "endpoints", "--uri", legacy.uri])
    assert result.exit_code == 0, result.output
    assert re.search(r"^chat-onprem +llm/v1/chat +openai +sim-onprem-llama$", result.output, re.M), result.output


def test_unset_variable_is_refused_before_anything_starts(sim_env: dict[str, str], tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["routes"][1]["model"]["config"]["openai_api_key"] = "$TIDYLLM_TEST_UNSET_KEY"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    before = _our_supervisors()
    with pytest.raises(GatewayConfigError, match=r"route 'chat-small'.*\$TIDYLLM_TEST_UNSET_KEY, which is not set"):
        start_gateway(path, env=sim_env)
    assert _our_supervisors() == before


def test_port_in_use_is_a_clear_error(sim_env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(GatewayError, match=f"port {port} on 127.0.0.1 is already in use.*--port"):
            start_gateway(EXAMPLE, env=sim_env, port=port)


# --- tracking server -------------------------------------------------------------------------


def _config(tmp_path: Path, sim: Simulator, *, drop: str | None = None, small_model: str = "sim-gpt-small") -> Path:
    """The bundled example plus a fallback route and a traffic split, with the simulator's URL."""
    data = yaml.safe_load(EXAMPLE.read_text())
    routes = [r for r in data["routes"] if r["name"] != drop]
    for r in routes:
        r["model"]["config"]["openai_api_key"] = "$TIDYLLM_TEST_SIM_KEY"
        if r["name"] == "chat-small":
            r["model"]["name"] = small_model
    routes.append({"name": "chat-resilient", "route_type": "llm/v1/chat", "group": "chat",
                   "model": {"provider": "openai", "name": "sim-claude",
                             "config": {"openai_api_key": "$TIDYLLM_TEST_SIM_KEY",
                                        "openai_api_base": "$TIDYLLM_SIMULATOR_URL"}},
                   "fallbacks": ["chat-onprem"], "usage_tracking": False})
    routes.append({"name": "chat-split", "destinations": [{"name": "chat-large", "traffic_percentage": 50},
                                                          {"name": "chat-onprem", "traffic_percentage": 50}]})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"routes": routes}))
    return path


def test_server_sync_call_resync_update_prune(server: GatewayProcess, sim: Simulator, tmp_path: Path) -> None:
    env = {"TIDYLLM_SIMULATOR_URL": sim.url, "TIDYLLM_TEST_SIM_KEY": "sk-simulator-test-key"}
    names = ["chat-large", "chat-small", "chat-claude", "chat-onprem", "embed", "chat-resilient", "chat-split"]
    assert [r["name"] for r in list_endpoints(server.uri, auth=ADMIN)] == ["warmup"]  # synced at start
    first = sync_gateway(server.uri, _config(tmp_path, sim), auth=ADMIN, environ=env)
    assert sorted(first.created) == sorted(names) and not (first.updated or first.unchanged or first.deleted)

    headers = auth_headers(*ADMIN)
    before = sim.hits("sim-gpt-large")
    response = chat(server, "chat-large", extra_headers=headers)
    assert response.model == "sim-gpt-large" and response.usage.total_tokens > 0
    assert sim.hits("sim-gpt-large") == before + 1

    again = sync_gateway(server.uri, _config(tmp_path, sim), auth=ADMIN, environ=env)
    assert not again.changed and sorted(again.unchanged) == sorted(names)

    # a changed model updates its route only; a rotated key (MLflow never shows it) every route using it
    moved = sync_gateway(server.uri, _config(tmp_path, sim, small_model="sim-gpt-large"), auth=ADMIN, environ=env)
    assert moved.updated == ("chat-small",) and not (moved.created or moved.deleted)
    env["TIDYLLM_TEST_SIM_KEY"] = "sk-simulator-rotated"
    rotated = sync_gateway(server.uri, _config(tmp_path, sim, small_model="sim-gpt-large"), auth=ADMIN, environ=env)
    assert sorted(rotated.updated) == sorted(n for n in names if n != "chat-split")
    assert rotated.unchanged == ("chat-split",)
    assert not sync_gateway(server.uri, _config(tmp_path, sim, small_model="sim-gpt-large"), auth=ADMIN,
                            environ=env).changed

    # a dropped route stays until --prune
    dropped = _config(tmp_path, sim, small_model="sim-gpt-large", drop="chat-claude")
    kept = sync_gateway(server.uri, dropped, auth=ADMIN, environ=env)
    assert not kept.changed and "chat-claude" not in kept.unchanged
    pruned = sync_gateway(server.uri, dropped, prune=True, auth=ADMIN, environ=env)
    assert sorted(pruned.deleted) == ["chat-claude", "warmup"] and not (pruned.created or pruned.updated)
    listed = {r["name"]: r for r in list_endpoints(server.uri, auth=ADMIN)}
    assert set(listed) == set(names) - {"chat-claude"}
    assert listed["embed"]["endpoint_type"] == "llm/v1/embeddings"
    assert listed["chat-small"]["model"] == "sim-gpt-large"

    # what the gateway serves follows (the server caches an endpoint's config once it was called, for
    # MLFLOW_SERVER_SECRETS_CACHE_TTL seconds: these endpoints were not called before)
    assert chat(server, "chat-small", extra_headers=headers).model == "sim-gpt-large"
    with pytest.raises(litellm().NotFoundError):
        chat(server, "chat-claude", extra_headers=headers)

    # the split spreads calls over both destinations; the fallback serves while its primary is down
    models = {chat(server, "chat-split", extra_headers=headers).model for _ in range(12)}
    assert models == {"sim-gpt-large", "sim-onprem-llama"}
    sim.set_outage("sim-claude")
    try:
        assert chat(server, "chat-resilient", extra_headers=headers).model == "sim-onprem-llama"
    finally:
        sim.set_outage("sim-claude", down=False)
    embedding = litellm().embedding(model="openai/embed", api_base=embeddings_api_base(server.uri, "server"),
                                    api_key="x", input=["a chunk"], extra_headers=headers)
    assert len(embedding.data) == 1


def test_server_refuses_missing_or_wrong_credentials(server: GatewayProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_mode(server.uri) == "server"
    with pytest.raises(GatewayError, match="requires authentication.*MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        list_endpoints(server.uri)
    with pytest.raises(GatewayError, match="rejected the credentials of user 'admin'.*MLFLOW_TRACKING_USERNAME"):
        list_endpoints(server.uri, auth=("admin", "wrong-password"))
    with pytest.raises(GatewayError, match="rejected the credentials"):
        sync_gateway(server.uri, EXAMPLE, auth=("admin", "wrong-password"), environ={"TIDYLLM_SIMULATOR_URL": "http://x"})
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    assert isinstance(list_endpoints(server.uri), list)  # credentials from MLflow's standard variables
    response = httpx.post(f"{server.api_base}/chat/completions", headers=auth_headers("admin", "wrong"),
                          json={"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert response.status_code == 401


def test_cli_sync_and_endpoints(server: GatewayProcess, sim: Simulator, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDYLLM_SIMULATOR_URL", sim.url)
    monkeypatch.setenv("TIDYLLM_TEST_SIM_KEY", "sk-cli-key")
    path = tmp_path / "warmup.yaml"
    path.write_text(yaml.safe_dump(WARMUP))
    runner = CliRunner()
    refused = runner.invoke(_cli(), ["gateway", "sync", "--server", server.uri, "--config", str(path)])
    assert refused.exit_code == 1
    assert "requires authentication (HTTP 401); set MLFLOW_TRACKING_USERNAME" in refused.output
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    result = runner.invoke(_cli(), ["gateway", "sync", "--server", server.uri, "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "created: warmup" in result.output or "updated: warmup" in result.output
    result = runner.invoke(_cli(), ["gateway", "endpoints", "--uri", server.uri])
    assert result.exit_code == 0 and re.search(r"^warmup +llm/v1/chat +openai +sim-gpt-small$", result.output, re.M)
    assert ADMIN[1] not in result.output + refused.output


def test_sync_refuses_an_endpoint_it_did_not_create(server: GatewayProcess, sim: Simulator) -> None:
    rest = httpx.Client(base_url=f"{server.uri}/api/3.0/mlflow/gateway", auth=ADMIN, timeout=30)
    secret = rest.post("/secrets/create", json={"secret_name": "hand-made", "secret_value": {"api_key": "k"},
                                                "provider": "openai"}).json()["secret"]
    definition = rest.post("/model-definitions/create", json={
        "name": "hand-made", "secret_id": secret["secret_id"], "provider": "openai",
        "model_name": "sim-gpt-small"}).json()["model_definition"]
    rest.post("/endpoints/create", json={"name": "hand-made", "model_configs": [
        {"model_definition_id": definition["model_definition_id"], "linkage_type": "PRIMARY"}]}).raise_for_status()
    config = {"routes": [{"name": "hand-made", "route_type": "llm/v1/chat", "model": {
        "provider": "openai", "name": "sim-gpt-small", "config": {"openai_api_key": "k", "openai_api_base": sim.url}}}]}
    with pytest.raises(GatewayError, match="already has an endpoint 'hand-made' that tidyllm did not create"):
        sync_gateway(server.uri, config, auth=ADMIN)
    # and prune never deletes it
    sync_gateway(server.uri, {"routes": [dict(config["routes"][0], name="other")]}, prune=True, auth=ADMIN)
    assert "hand-made" in {r["name"] for r in list_endpoints(server.uri, auth=ADMIN)}


# --- stopping --------------------------------------------------------------------------------


def test_supervisor_takes_the_group_down_when_its_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup in the parent; the supervisor notices and stops the gateway's group."""
    worker = "import subprocess, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"
    parent = ("import os, subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-m', 'tidyllm.gateway.processes', '--parent', str(os.getpid()), "
              f"'--', sys.executable, '-c', {worker!r}], start_new_session=True); "
              "print(p.pid, flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pgid = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        while len(_group_members(pgid)) < 3 and time.monotonic() < deadline:  # supervisor, worker, sleep
            time.sleep(0.05)
        assert len(_group_members(pgid)) == 3
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = _group_members(pgid)
    if survivors:  # do not leave them behind when the test fails
        os.killpg(pgid, signal.SIGKILL)
    assert survivors == []


def test_cli_stops_on_sigterm_and_leaves_no_orphans(legacy: CliGateway) -> None:
    """SIGTERM to `tidyllm gateway start` stops the gateway's whole process group; /proc shows no survivor."""
    supervisor = _children(legacy.proc.pid)
    assert len(supervisor) == 1
    members = _group_members(supervisor[0])
    assert len(members) >= 4, members  # supervisor, mlflow CLI, gunicorn master and worker
    legacy.proc.send_signal(signal.SIGTERM)
    out, _ = legacy.proc.communicate(timeout=30)
    assert legacy.proc.returncode == 0 and out.strip().endswith("stopped")
    assert [pid for pid in members if _alive(pid)] == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{legacy.uri}/health", timeout=2)


def test_server_stop_leaves_no_orphans(server: GatewayProcess) -> None:
    """Last in the module: stops the shared tracking server through the API."""
    members = _group_members(server.pid)
    assert server.pid in members and len(members) >= 3  # supervisor, mlflow CLI, uvicorn
    data_dir = server.data_dir
    server.stop()
    assert [pid for pid in members if _alive(pid)] == []
    assert _group_members(server.pid) == [] and not server.is_running()
    assert (data_dir / "mlflow.db").exists()  # a data_dir the caller gave is kept
    assert stat.S_IMODE((data_dir / "kek_passphrase").stat().st_mode) == 0o600
    assert ADMIN[1] not in (data_dir / "basic_auth.ini").read_text()
    server.stop()  # idempotent


# --- helpers ---------------------------------------------------------------------------------


def _cli() -> Any:
    from tidyllm.cli import main

    return main


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children()]


def _our_supervisors() -> set[int]:
    """Gateway supervisors started by this test process (other sessions' gateways do not count)."""
    import psutil

    marker = ["tidyllm.gateway.processes", "--parent", str(os.getpid())]
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if all(m in (p.info["cmdline"] or []) for m in marker)}

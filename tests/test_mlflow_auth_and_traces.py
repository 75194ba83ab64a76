"""The tracking-server AI Gateway with MLflow's basic-auth app: tidyllm passes the credential (settings or
MLFLOW_TRACKING_USERNAME/PASSWORD), never stores or logs it, reports a missing or wrong one clearly, and
links each audit row to the gateway's MLflow trace (``tidyllm audit show`` prints the UI link).

One server for the whole module: it takes 15-60 s to start on a busy 2-core machine."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import tidyllm
from tidyllm.errors import GatewayError
from tidyllm.gateway.processes import start_gateway
from tidyllm.gateway.simulator import Simulator, parse_profiles
from tidyllm.stack import bundled_gateway_config

USER = "tidy-admin"
PASSWORD = "corp-" + secrets.token_hex(12)
PROFILES = parse_profiles({"models": {
    name: {"latency": {"base_ms": 0}, "output_tokens": {"min": 20, "max": 20}}
    for name in ("sim-gpt-small", "sim-gpt-large", "sim-claude", "sim-onprem-llama")} | {
    "sim-embed": {"kind": "embedding", "latency": {"base_ms": 0}, "embedding_dim": 16}}})
MSG = [{"role": "user", "content": "Two-line summary of the liquidity stress test, please."}]
#: the server exports traces in batches every 5 s by default; every 0.2 s here
FAST_TRACES = {"MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "200"}


class Server:
    """The running pieces: simulator, authenticated MLflow server, installed platform."""

    def __init__(self, sim: Simulator, gateway: Any, platform: Any, db: Path) -> None:
        self.sim, self.gateway, self.platform, self.db = sim, gateway, platform, db


pytestmark = pytest.mark.slow  # starts an MLflow gateway


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("auth") / "mart.db"
    with Simulator(PROFILES, latency_scale=0) as sim:
        with start_gateway(str(bundled_gateway_config()), mode="server", auth=(USER, PASSWORD), timeout=240,
                           env={"TIDYLLM_SIMULATOR_URL": sim.url, **FAST_TRACES}) as gateway:
            platform = tidyllm.install(database_url=f"sqlite:///{db}", gateway_uri=gateway.uri, gateway_mode="server",
                                       gateway_config=str(bundled_gateway_config()), mlflow_username=USER,
                                       mlflow_password=PASSWORD, routing={"strategy": "cheapest"},
                                       budgets=[{"scope": "department", "name": "risk", "limit_usd": 5.0}])
            try:
                yield Server(sim, gateway, platform, db)
            finally:
                tidyllm.uninstall()


def meta(call_id: str) -> dict[str, Any]:
    return {"user_id": "ana", "department": "risk", "audit_reason": "ALCO pack", "use_case": "summarise",
            "tidyllm_call_id": call_id}


def other_platform(server: Server, tmp_path: Path, **creds: Any) -> Any:
    """A second, unregistered platform on the same server with other credentials."""
    from tidyllm.platform import Platform
    from tidyllm.settings import load_settings

    return Platform(load_settings(database_url=f"sqlite:///{tmp_path / 'other.db'}", gateway_uri=server.gateway.uri,
                                  gateway_mode="server", gateway_config=str(bundled_gateway_config()), **creds))


def test_the_right_credential_works_and_the_audit_row_links_the_trace(server: Server,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    p = server.platform
    call_id = f"traced-{uuid.uuid4().hex[:6]}"
    resp = p.router().completion(model="chat-small", messages=MSG, metadata=meta(call_id))
    assert resp.choices[0].message.content
    call = p.wait_for_call(call_id, timeout=30)
    assert call["status"] == "success" and call["cost_usd"] > 0
    row = p.audit.show(call_id)
    trace_id, experiment = row["trace_id"], row["extra"]["trace_experiment_id"]
    assert trace_id and trace_id.startswith("tr-")
    # the trace is the gateway's own record of this very call
    body = httpx.post(f"{server.gateway.uri}/api/3.0/mlflow/traces/search", auth=(USER, PASSWORD), json={
        "locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment}}],
        "filter": f"metadata.`mlflow.gateway.caller` = 'tidyllm/{call_id}'"}).json()
    [trace] = body["traces"]
    assert trace["trace_id"] == trace_id and trace["trace_metadata"]["mlflow.auth.username"] == USER
    assert trace["trace_location"]["mlflow_experiment"]["experiment_id"] == experiment

    from tidyllm.cli import main

    monkeypatch.setenv("TIDYLLM_GATEWAY_URI", server.gateway.uri)
    monkeypatch.setenv("TIDYLLM_GATEWAY_MODE", "server")
    result = CliRunner().invoke(main, ["audit", "show", call_id, "--database-url", f"sqlite:///{server.db}"])
    assert result.exit_code == 0, result.output
    assert f"{server.gateway.uri}/#/experiments/{experiment}/traces/{trace_id}" in result.output
    # that route is MLflow 3's trace page, served by the same UI
    assert httpx.get(f"{server.gateway.uri}/", auth=(USER, PASSWORD)).status_code == 200


def test_async_and_plain_calls_carry_the_credential_and_get_trace_links(server: Server) -> None:
    import litellm

    p = server.platform
    a, b = f"async-{uuid.uuid4().hex[:6]}", f"embed-{uuid.uuid4().hex[:6]}"

    async def go() -> None:
        await p.router().acompletion(model="chat-small", messages=MSG, metadata=meta(a))
        await p.router().aembedding(model="embed", input=["liquidity buffer", "stress outflow"], metadata=meta(b))
        await asyncio.sleep(0)
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

        await GLOBAL_LOGGING_WORKER.flush()
        await asyncio.to_thread(p.wait_for_call, a, 30)
        await asyncio.to_thread(p.wait_for_call, b, 30)

    asyncio.run(go())
    assert p.wait_for_call(a)["status"] == "success" and p.wait_for_call(b)["status"] == "success"
    assert p.audit.show(a)["trace_id"].startswith("tr-")
    assert p.audit.show(b)["trace_id"].startswith("tr-")  # the embeddings passthrough is traced too
    # a plain acompletion to the gateway endpoint, with the credential header the caller adds itself
    c = f"plain-{uuid.uuid4().hex[:6]}"

    async def plain() -> None:
        await litellm.acompletion(model="openai/chat-small", api_base=p.gateway.api_base, api_key="x",
                                  extra_headers=p.gateway.auth_headers(), messages=MSG, metadata=meta(c))
        await asyncio.to_thread(p.wait_for_call, c, 30)

    asyncio.run(plain())
    assert p.audit.show(c)["trace_id"].startswith("tr-")


@pytest.mark.parametrize("creds, match", [
    ({}, "requires authentication.*MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ({"mlflow_username": USER, "mlflow_password": "wrong-password"},
     f"rejected the credentials of user '{USER}'.*MLFLOW_TRACKING_USERNAME"),
    ({"mlflow_username": USER}, "MLFLOW_TRACKING_PASSWORD is missing"),
])
def test_a_missing_or_wrong_credential_is_a_clear_error(server: Server, tmp_path: Path, creds: dict[str, str],
                                                         match: str) -> None:
    before = server.sim.hits()
    with pytest.raises(GatewayError, match=match) as info:
        other_platform(server, tmp_path, **creds).router()
    assert "wrong-password" not in str(info.value) and PASSWORD not in str(info.value)
    assert server.sim.hits() == before


def test_the_credential_comes_from_the_standard_mlflow_variables(server: Server, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    router = other_platform(server, tmp_path).router()
    assert router is not None  # the credential check passed


def test_a_credential_rejected_at_call_time_is_reported_clearly(server: Server, tmp_path: Path) -> None:
    """A credential revoked after the router was built: the tidyllm/ path names what to set."""
    import litellm

    from tidyllm.gateway.router import model_list

    p = server.platform
    stale = other_platform(server, tmp_path, mlflow_username=USER, mlflow_password="revoked-password")
    p._router = p.govern(litellm.Router(model_list=model_list(stale), num_retries=0))
    try:
        # LiteLLM re-wraps a custom provider's error (as APIConnectionError); tidyllm's message survives
        with pytest.raises(litellm.APIConnectionError, match="rejected the credential.*MLFLOW_TRACKING_USERNAME"):
            litellm.completion(model="tidyllm/chat-small", messages=MSG, metadata=meta(f"stale-{uuid.uuid4().hex[:6]}"))
    finally:
        p._router = None


def test_the_password_is_never_stored_or_logged(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tidyllm")
    caplog.set_level(logging.INFO)  # and every other logger (LiteLLM's, MLflow's) at INFO
    p = server.platform
    # the password as typed, and as it travels (base64 in the X-MLflow-Authorization header)
    secrets_ = [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    call_id = f"secret-{uuid.uuid4().hex[:6]}"
    p.router().completion(model="chat-small", messages=MSG, metadata=meta(call_id))
    p.wait_for_call(call_id, timeout=30)
    with p.mart.store.engine.connect() as conn:
        for table in p.mart.tables():
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                assert not any(secret in str(tuple(row)) for secret in secrets_), table
    for path in server.db.parent.iterdir():  # the SQLite file and its WAL, byte for byte
        assert not any(secret.encode() in path.read_bytes() for secret in secrets_), path
    exported = p.audit.export("jsonl")
    for secret in secrets_:
        assert secret not in exported and secret not in caplog.text
    assert PASSWORD not in repr(p.settings) and PASSWORD not in repr(p.governor.trace_lookup)

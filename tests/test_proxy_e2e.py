"""The real LiteLLM proxy (`tidyllm proxy`, two processes) over the provider simulator, a real MLflow gateway and
one PostgreSQL mart, driven with the official ``openai`` package.

One module-scoped stack (the proxies take ~20 s each to start): keys per department, 30 concurrent calls over
both proxies against one small department budget, identity claims, a revoked key, a stream the client drops
midway, embeddings, one log line per refusal, and no process left behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from _fixtures import instant_profiles

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: the console script beside this interpreter (it imports tidyllm from PYTHONPATH first: this checkout)
TIDYLLM = [str(Path(sys.executable).with_name("tidyllm"))]
#: the streamed route: slow enough per token that the client can leave midway
SLOW = "chat-claude"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*TIDYLLM, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def _start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    from tidyllm.gateway.processes import free_port

    port = free_port()
    with open(log, "wb") as fh:
        popen = subprocess.Popen([*TIDYLLM, "proxy", "--port", str(port), "--key-cache-seconds", "0"], env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return popen, f"http://127.0.0.1:{port}"


def _wait(popen: subprocess.Popen[bytes], uri: str, log: Path, timeout: float = 240) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert popen.poll() is None, log.read_text()
        try:
            if httpx.get(f"{uri}/health/liveliness", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"proxy {uri} did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from conftest import _drop_postgres_database, postgres_url_or_skip
    from tidyllm.gateway.processes import start_gateway
    from tidyllm.gateway.simulator import Simulator
    from tidyllm.stack import bundled_gateway_config

    url = postgres_url_or_skip()
    tmp = tmp_path_factory.mktemp("proxy")
    profiles = instant_profiles(extra={"sim-claude": {"latency": {"base_ms": 0, "per_output_token_ms": 40},
                                                      "output_tokens": {"min": 150, "max": 150}}})
    sim = Simulator(profiles, latency_scale=1.0).start()
    gateway = start_gateway(str(bundled_gateway_config()), env={"TIDYLLM_SIMULATOR_URL": sim.url})
    settings = tmp / "tidyllm.yaml"
    settings.write_text(yaml.safe_dump({
        "database_url": url, "gateway_uri": gateway.uri, "gateway_config": str(bundled_gateway_config()),
        "routing": {"strategy": "cheapest"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDYLLM_")}
    env.update(TIDYLLM_CONFIG=str(settings), TIDYLLM_HOME=str(tmp / "home"), LITELLM_LOCAL_MODEL_COST_MAP="True",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        str(Path(__file__).resolve().parent)])))
    procs = []
    try:
        for name in ("a", "b"):
            procs.append((*_start(env, tmp / f"proxy-{name}.log"), tmp / f"proxy-{name}.log"))
        for popen, uri, log in procs:
            _wait(popen, uri, log)
        yield {"env": env, "uris": [uri for _, uri, _ in procs], "logs": [log for _, _, log in procs],
               "procs": [p for p, _, _ in procs], "url": url, "sim": sim}
    finally:
        for popen, _, _ in procs:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for popen, _, _ in procs:
            try:
                popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
        gateway.stop()
        sim.stop()
        _drop_postgres_database(url)


def _mart(stack: dict[str, Any]) -> Any:
    from tidyllm.mart import TidyMart

    return TidyMart(stack["url"])


def _budget(stack: dict[str, Any], department: str, limit: float) -> str:
    return _cli(stack["env"], "budget", "set", "department", department, str(limit)).stdout


def _budget_status(stack: dict[str, Any], department: str) -> Any:
    from tidyllm.governance.budgets import BudgetLedger

    mart = _mart(stack)
    try:
        return BudgetLedger(mart).status(scope="department", name=department).iloc[0]
    finally:
        mart.close()


def _key(stack: dict[str, Any], department: str, *extra: str, user: str | None = "ana") -> str:
    args = ["keys", "create", "--department", department, *(["--user", user] if user else []), *extra]
    return _cli(stack["env"], *args).stdout.strip()


def _client(uri: str, key: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{uri}/v1", api_key=key, max_retries=0, timeout=60)


def _rows(stack: dict[str, Any], table: str, **where: Any) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from tidyllm.mart.schema import TABLES

    t = TABLES[table]
    mart = _mart(stack)
    try:
        with mart.store.begin() as conn:
            query = sa.select(t).where(*[t.c[k] == v for k, v in where.items()])
            return [dict(r) for r in conn.execute(query).mappings()]
    finally:
        mart.close()


def _settled(stack: dict[str, Any], department: str, expected: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in _rows(stack, "llm_calls", department=department) if r["status"] != "pending"]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_postgres_budget_held_across_two_proxies_with_429s(stack: dict[str, Any]) -> None:
    import openai

    from tidyllm.mart import TidyMart

    dept = f"risk-{uuid.uuid4().hex[:6]}"
    assert _budget(stack, dept, 0.00004) == f"department '{dept}': $0.00004 per month (audited)\n"
    key = _key(stack, dept)
    clients = [_client(uri, key) for uri in stack["uris"]]

    def call(i: int) -> Any:
        try:
            r = clients[i % 2].chat.completions.create(model="chat", max_tokens=100,
                                                       messages=[{"role": "user", "content": f"summarise item {i}"}])
            return r.choices[0].message.content
        except openai.APIStatusError as exc:
            return exc

    with cf.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(call, range(30)))
    answered = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if not isinstance(r, str)]
    assert answered and refused, results
    for err in refused:
        assert err.status_code == 429, (err.status_code, err.body)
        assert err.body["type"] == "insufficient_quota" and err.body["code"] == "429"
        message = err.body["message"]
        assert message.startswith(f"department '{dept}' has $") and "\n" not in message
        assert "Raise it with `tidyllm budget set department" in message

    rows = _settled(stack, dept, 30)
    ok = [r for r in rows if r["status"] == "success"]
    assert len(ok) == len(answered) and len([r for r in rows if r["status"] == "refused"]) == len(refused)
    spent = sum(r["cost_usd"] for r in ok)
    assert 0 < spent <= 0.00004 + 1e-12
    # answered no more calls than the limit pays for at the cheapest answered call's cost
    assert len(ok) <= 0.00004 / min(r["cost_usd"] for r in ok)
    assert all(r["user_id"] == "ana" for r in rows)
    audit = _rows(stack, "audit_log", department=dept)
    assert sorted(r["decision"] for r in audit if r["decision"] != "admin") == sorted(
        ["allowed"] * len(ok) + ["refused"] * len(refused))
    mart = TidyMart(stack["url"])
    from tidyllm.governance.audit import AuditTrail

    assert AuditTrail(mart).verify()
    mart.close()
    # one line per refusal in the proxies' logs, no traceback
    logs = "".join(p.read_text() for p in stack["logs"])
    assert "Traceback" not in logs
    assert sum("proxy: refused chat (HTTP 429" in line for line in logs.splitlines()) >= len(refused)
    # each refusal is one line: LiteLLM's own records of it (with the refusal message) were dropped
    # (the alert sink's lines — "department … has spent 83% …" — are alerts, not refusals)
    assert f"department '{dept}' has $" not in "\n".join(
        line for line in logs.splitlines() if "proxy: refused" not in line)


def test_postgres_key_claiming_another_department_is_governed_as_its_own(stack: dict[str, Any]) -> None:
    import openai

    own, other = f"ops-{uuid.uuid4().hex[:6]}", f"finance-{uuid.uuid4().hex[:6]}"
    client = _client(stack["uris"][0], _key(stack, own, user="bo"))
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"metadata": {"department": other, "audit_reason": "q3 close"}})
    assert info.value.status_code == 403 and info.value.body["type"] == "permission_denied"
    assert f"bound to department '{own}'" in info.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], user="eve")
    # the honest request: the OpenAI `user` field equal to the key's user, metadata carrying the rest
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], user="bo",
                                           extra_body={"metadata": {"audit_reason": "q3 close", "use_case": "qa"}})
    assert reply.choices[0].message.content
    assert _rows(stack, "llm_calls", department=other) == []
    audit = _rows(stack, "audit_log", department=own)
    refused = [r for r in audit if r["decision"] == "refused"]
    assert sorted(r["rule"] for r in refused) == ["proxy_identity:department", "proxy_identity:user"]
    assert all(r["user_id"] == "bo" for r in refused)
    allowed = _settled(stack, own, 3)
    assert [(r["status"], r["user_id"], r["use_case"]) for r in allowed if r["status"] == "success"] == [
        ("success", "bo", "qa")]


def test_postgres_redteam_forged_admission_through_the_proxy(stack: dict[str, Any]) -> None:
    """Red team (issue 14): on the old main a client that put a ``tidyllm`` key into its request metadata
    through a LiteLLM proxy with tidyllm's callbacks was treated as already admitted — an exhausted
    department spent 3.3x its limit. Now any such value is refused before routing (403, audited), whatever
    the budget, and the provider is never called."""
    import openai

    dept = f"risk-{uuid.uuid4().hex[:6]}"
    _budget(stack, dept, 0.0000001)
    client = _client(stack["uris"][0], _key(stack, dept))
    hits = stack["sim"].stats()["total"]
    stamp = {"call_id": "x", "route": "chat-small", "requested_model": "chat", "call_type": "completion",
             "context": {"department": dept}, "started_at": "2026-01-01T00:00:00+00:00", "max_tokens": 16,
             "clamped": False, "reservation_id": None, "input_per_1m": 0.0, "output_per_1m": 0.0}
    for forged in ({}, stamp, "tidyllm-seal:" + "0" * 32):
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"metadata": {"tidyllm": forged, "audit_reason": "x"}})
        assert "reserved for tidyllm" in info.value.body["message"]
    assert stack["sim"].stats()["total"] == hits  # the provider was never contacted
    refused = [r for r in _rows(stack, "audit_log", department=dept) if r["decision"] == "refused"]
    assert [r["rule"] for r in refused] == ["proxy_identity:forged"] * 3
    assert [r for r in _rows(stack, "llm_calls", department=dept) if r["status"] == "success"] == []


def test_postgres_application_key_names_the_user_with_the_openai_user_field(stack: dict[str, Any]) -> None:
    dept = f"apps-{uuid.uuid4().hex[:6]}"
    client = _client(stack["uris"][1], _key(stack, dept, "--routes", "chat*", user=None))
    client.chat.completions.create(model="chat-small", messages=[{"role": "user", "content": "hi"}], user="carol")
    import openai

    with pytest.raises(openai.PermissionDeniedError) as info:
        client.embeddings.create(model="embed", input=["not a chat route"], user="carol")
    assert "may call chat*" in info.value.body["message"]
    rows = _settled(stack, dept, 2)
    assert sorted((r["status"], r["user_id"], r["route"]) for r in rows) == [
        ("refused", "carol", "embed"), ("success", "carol", "chat-small")]


def test_postgres_revoked_and_unknown_keys_get_401_and_are_audited(stack: dict[str, Any]) -> None:
    import openai

    dept = f"legal-{uuid.uuid4().hex[:6]}"
    key = _key(stack, dept)
    client = _client(stack["uris"][0], key)
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    key_id = _rows(stack, "proxy_keys", department=dept)[0]["id"]
    assert _cli(stack["env"], "keys", "revoke", key_id[:8]).stdout.startswith(f"revoked key {key_id}")
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401 and "was revoked" in info.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(stack["uris"][1], "sk-tidy-not-a-key").chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])
    audit = _rows(stack, "audit_log", department=dept)
    assert sorted((r["decision"], r["rule"]) for r in audit) == [
        ("admin", "proxy_key:created"), ("admin", "proxy_key:revoked"), ("allowed", None),
        ("refused", "proxy_key:revoked")]
    assert all(key not in str(r) for r in audit)
    # a refused key is not also recorded as a call (no unenforced row, for this key or the unknown one)
    assert [r["status"] for r in _settled(stack, dept, 1)] == ["success"]
    assert _rows(stack, "llm_calls", status="unenforced") == []
    # LiteLLM's management API is not open to a tidyllm key
    import httpx

    other = _key(stack, dept)
    answer = httpx.post(f"{stack['uris'][0]}/key/generate", headers={"Authorization": f"Bearer {other}"}, json={})
    assert answer.status_code == 403 and "not part of the API" in answer.json()["error"]["message"]


def test_postgres_stream_dropped_midway_is_charged_what_was_delivered(stack: dict[str, Any]) -> None:
    dept = f"stream-{uuid.uuid4().hex[:6]}"
    _budget(stack, dept, 1.0)
    client = _client(stack["uris"][0], _key(stack, dept))
    # a whole answer streams fine and is charged in full
    full = client.chat.completions.create(model=SLOW, max_tokens=400, stream=True,
                                          messages=[{"role": "user", "content": "tell me"}])
    assert "".join(c.choices[0].delta.content or "" for c in full if c.choices)
    stream = client.chat.completions.create(model=SLOW, max_tokens=400, stream=True,
                                            messages=[{"role": "user", "content": "tell me more"}])
    received = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received.append(chunk.choices[0].delta.content)
        if len(received) >= 10:
            break
    stream.close()  # the client goes away after 10 of ~150 tokens
    rows = _settled(stack, dept, 2)
    by_outcome = {r["outcome"]: r for r in rows}
    assert set(by_outcome) == {"completed", "abandoned"}, rows
    whole, cut = by_outcome["completed"], by_outcome["abandoned"]
    assert whole["completion_tokens"] == 150
    assert 10 <= cut["completion_tokens"] < 150
    price_in, price_out = 3.00 / 1e6, 15.00 / 1e6  # chat-claude in the bundled routes file
    assert cut["cost_usd"] == pytest.approx(cut["prompt_tokens"] * price_in + cut["completion_tokens"] * price_out)
    # both reservations settled: nothing held, the budget charged exactly the two calls
    window = _budget_status(stack, dept)
    assert window["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
    assert window["spent_usd"] == pytest.approx(whole["cost_usd"] + cut["cost_usd"])


def test_postgres_embeddings_through_the_proxy_are_governed(stack: dict[str, Any]) -> None:
    dept = f"search-{uuid.uuid4().hex[:6]}"
    client = _client(stack["uris"][1], _key(stack, dept))
    result = client.embeddings.create(model="embed", input=["first text", "second text"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 256
    rows = _settled(stack, dept, 1)
    assert [(r["status"], r["route"], r["call_type"]) for r in rows] == [("success", "embed", "embedding")]
    assert rows[0]["cost_usd"] == pytest.approx(rows[0]["prompt_tokens"] * 0.02 / 1e6)


def test_postgres_killed_cli_leaves_no_proxy_process(stack: dict[str, Any], tmp_path: Path) -> None:
    import psutil

    popen, uri = _start(stack["env"], tmp_path / "proxy-c.log")
    _wait(popen, uri, tmp_path / "proxy-c.log")
    below = psutil.Process(popen.pid).children(recursive=True)
    assert any("litellm.proxy.proxy_cli" in " ".join(p.cmdline()) for p in below)
    popen.kill()  # SIGKILL: no Python cleanup runs in the CLI; its supervisor takes the proxy down
    popen.wait(timeout=10)
    gone, alive = psutil.wait_procs(below, timeout=40)
    assert alive == [], [p.cmdline() for p in alive]

"""Tool calls governed and costed like any call (names audited, arguments only under full capture), and
``governance.gateway_only``: nothing reaches a provider except through a configured MLflow gateway
endpoint (real legacy gateway, provider simulator)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from tidyllm.errors import RouteNotAuthorizedError
from tidyllm.gateway.simulator import parse_profiles
from tidyllm.stack import LocalStack

PROFILES = parse_profiles({"models": {
    name: {"latency": {"base_ms": 0}, "output_tokens": {"min": 30, "max": 30}}
    for name in ("sim-gpt-small", "sim-gpt-large", "sim-claude", "sim-onprem-llama")} | {
    "sim-embed": {"kind": "embedding", "latency": {"base_ms": 0}, "embedding_dim": 16}}})
TOOLS = [
    {"type": "function", "function": {"name": "get_rate", "description": "FX rate",
                                      "parameters": {"type": "object", "properties": {
                                          "currency": {"type": "string", "enum": ["EUR", "USD"]}}}}},
    {"type": "function", "function": {"name": "lookup_client", "description": "client record by id",
                                      "parameters": {"type": "object", "properties": {
                                          "client_id": {"type": "string"}}, "required": ["client_id"]}}},
]
CHOOSE = {"type": "function", "function": {"name": "lookup_client"}}
#: the argument value the simulator fills in for lookup_client(client_id): must never be audited by default
ARGUMENT = "sim-client_id"
MSG = [{"role": "user", "content": "Pull the record of the client behind exposure 42."}]
PRICE_IN, PRICE_OUT = 0.15, 0.60  # chat-small


pytestmark = pytest.mark.slow  # starts an MLflow gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    db = tmp_path_factory.mktemp("tools") / "mart.db"
    with LocalStack(profiles=PROFILES, latency_scale=0, database_url=f"sqlite:///{db}",
                    routing={"strategy": "cheapest"},
                    governance={"gateway_only": True, "allow_mock": False},
                    budgets=[{"scope": "department", "name": "risk", "limit_usd": 5.0}]) as s:
        yield s


def meta(call_id: str, dept: str = "risk") -> dict[str, Any]:
    return {"user_id": "ana", "department": dept, "audit_reason": "exposure review", "use_case": "extraction",
            "tidyllm_call_id": call_id}


def flush_and_wait(stack: LocalStack, call_id: str) -> dict[str, Any]:
    from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

    async def go() -> None:
        await asyncio.sleep(0)
        await GLOBAL_LOGGING_WORKER.flush()

    asyncio.run(go())
    return stack.platform.wait_for_call(call_id, timeout=20)


def mart_text(stack: LocalStack) -> str:
    """Every row of every mart table, as text."""
    p = stack.platform
    out = []
    with p.mart.store.engine.connect() as conn:
        for table in p.mart.tables():
            out.extend(str(tuple(row)) for row in conn.execute(sa.text(f"SELECT * FROM {table}")))
    return "\n".join(out)


# --- tool calls -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["router", "router-stream", "tidyllm-stream"])
def test_tool_calls_are_governed_costed_and_audited_by_name(stack: LocalStack, path: str) -> None:
    import litellm

    p = stack.platform
    call_id = f"tools-{path}-{uuid.uuid4().hex[:6]}"
    kwargs: dict[str, Any] = dict(messages=MSG, tools=TOOLS, tool_choice=CHOOSE, metadata=meta(call_id))
    if path == "router":
        resp = p.router().completion(model="chat-small", **kwargs)
        called = resp.choices[0].message.tool_calls[0]
        name, arguments = called.function.name, called.function.arguments
    else:
        stream = (p.router().completion(model="chat-small", stream=True, **kwargs) if path == "router-stream"
                  else litellm.completion(model="tidyllm/chat-small", stream=True, **kwargs))
        chunks = list(stream)
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        name = next(tc.function.name for tc in calls if tc.function.name)
        arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert name == "lookup_client" and json.loads(arguments) == {"client_id": ARGUMENT}
    call = p.wait_for_call(call_id)
    assert call["status"] == "success" and call["prompt_tokens"] > 0 and call["completion_tokens"] > 0
    assert call["cost_usd"] == pytest.approx(
        (call["prompt_tokens"] * PRICE_IN + call["completion_tokens"] * PRICE_OUT) / 1e6)
    assert call["reserved_usd"] >= call["cost_usd"]  # the tool schemas were in the worst case too
    row = p.audit.show(call_id)
    assert row["tools"] == {"offered": ["get_rate", "lookup_client"], "called": ["lookup_client"]}
    assert ARGUMENT not in mart_text(stack)  # argument values are never kept under capture "hash"


def test_tool_definitions_count_towards_the_reservation(stack: LocalStack) -> None:
    p = stack.platform
    p.router().completion(model="chat-small", messages=MSG, max_tokens=30, metadata=meta("plain-q"))
    p.router().completion(model="chat-small", messages=MSG, max_tokens=30, tools=TOOLS, tool_choice="none",
                          metadata=meta("tools-q"))
    plain, tools = p.wait_for_call("plain-q"), p.wait_for_call("tools-q")
    assert tools["prompt_tokens"] > plain["prompt_tokens"] and tools["reserved_usd"] > plain["reserved_usd"]
    assert p.audit.show("tools-q")["tools"] == {"offered": ["get_rate", "lookup_client"], "called": []}


def test_full_capture_keeps_tool_arguments(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    p = stack.platform
    monkeypatch.setattr(p.audit, "capture", "full")
    call_id = f"full-{uuid.uuid4().hex[:6]}"
    p.router().completion(model="chat-small", messages=MSG, tools=TOOLS, tool_choice=CHOOSE, metadata=meta(call_id))
    p.wait_for_call(call_id)
    row = p.audit.show(call_id)
    assert row["extra"]["tool_calls"] == [{"name": "lookup_client", "arguments": json.dumps({"client_id": ARGUMENT})}]
    assert row["content"] == MSG and p.audit.verify().ok


# --- gateway-only mode --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["acompletion", "aembedding", "router", "router-async"])
def test_gateway_only_refuses_a_direct_provider_call_and_audits_it(stack: LocalStack, path: str) -> None:
    import litellm

    p = stack.platform
    sim = stack.simulator
    call_id = f"direct-{path}-{uuid.uuid4().hex[:6]}"
    before = sim.hits()
    direct = {"model": "openai/sim-gpt-small", "api_base": sim.url, "api_key": "sk-direct"}
    with pytest.raises(RouteNotAuthorizedError, match="governance.gateway_only") as info:
        if path == "acompletion":
            asyncio.run(litellm.acompletion(messages=MSG, metadata=meta(call_id), **direct))
        elif path == "aembedding":
            asyncio.run(litellm.aembedding(model="openai/sim-embed", api_base=sim.url, api_key="sk-direct",
                                           input=["a chunk"], metadata=meta(call_id)))
        else:
            router = p.govern(litellm.Router(model_list=[{"model_name": "gpt", "litellm_params": direct,
                                                          "model_info": {"id": "direct-small"}}], num_retries=0))
            if path == "router":
                router.completion(model="gpt", messages=MSG, metadata=meta(call_id))
            else:
                asyncio.run(router.acompletion(model="gpt", messages=MSG, metadata=meta(call_id)))
    assert "MLflow gateway endpoint" in str(info.value)
    assert sim.hits() == before
    row = p.audit.show(call_id)
    assert row["decision"] == "refused" and row["rule"] == "gateway_only"
    assert p.calls(id=call_id).iloc[0]["status"] == "refused"


def test_gateway_endpoints_still_work_in_gateway_only_mode(stack: LocalStack) -> None:
    import litellm

    p = stack.platform
    p.router().completion(model="chat", messages=MSG, max_tokens=20, metadata=meta("via-group"))
    asyncio.run(litellm.acompletion(model="openai/chat-small", api_base=stack.gateway.api_base, api_key="x",
                                    messages=MSG, max_tokens=20, metadata=meta("via-endpoint")))
    assert p.wait_for_call("via-group")["status"] == "success"
    assert flush_and_wait(stack, "via-endpoint")["status"] == "success"


def test_mock_responses_need_allow_mock(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    import litellm

    p = stack.platform
    with pytest.raises(RouteNotAuthorizedError, match="gateway_only"):
        asyncio.run(litellm.acompletion(model="openai/gpt-4o", messages=MSG, mock_response="ok",
                                        metadata=meta("mock-refused")))
    monkeypatch.setattr(p.governor, "settings", dataclasses.replace(p.governor.settings, allow_mock=True))
    resp = asyncio.run(litellm.acompletion(model="openai/gpt-4o", messages=MSG, mock_response="ok",
                                           metadata=meta("mock-allowed")))
    assert resp.choices[0].message.content == "ok"
    assert flush_and_wait(stack, "mock-allowed")["status"] == "success"


def test_a_direct_sync_call_is_refused_in_gateway_only_mode(stack: LocalStack) -> None:
    """Plain sync ``litellm.completion`` straight to a provider: instrumented at install(), it is refused under
    gateway_only before the provider is contacted, and audited."""
    import litellm

    hits = stack.simulator.stats()["total"]
    with pytest.raises(RouteNotAuthorizedError, match="gateway_only"):
        litellm.completion(model="openai/sim-gpt-small", api_base=stack.simulator.url, api_key="sk-direct",
                           messages=MSG, metadata=meta("direct-sync"))
    assert stack.simulator.stats()["total"] == hits
    rows = stack.platform.audit.frame()
    refused = rows[rows["rule"] == "gateway_only"]
    assert len(refused) >= 1 and refused.iloc[-1]["status"] == "refused"

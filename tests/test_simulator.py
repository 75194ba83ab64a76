"""The provider simulator: OpenAI-compatible answers, profiles, determinism, faults, admin and CLI."""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from click.testing import CliRunner

from tidyllm.errors import ConfigurationError, GatewayError
from tidyllm.gateway.simulator import (
    Latency,
    ModelProfile,
    OutputTokens,
    Simulator,
    SimulatorClient,
    Window,
    bundled_profiles_path,
    count_tokens,
    load_profiles,
    parse_profiles,
)

# LiteLLM 1.110's streaming wrapper builds a pydantic schema for a TypedDict with ReadOnly items on first
# use, and pydantic warns about it; not ours to fix (pyproject turns warnings into errors).
pytestmark = pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning")

REPO = Path(__file__).resolve().parents[1]
USE_CASES = ("qa", "summarise", "code", "analysis", "extraction")
MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(None, seed=0, latency_scale=0) as s:
        yield s


@pytest.fixture(scope="module")
def litellm() -> Any:
    from tidyllm._litellm import import_litellm

    return import_litellm()


def chat(url: str, model: str = "sim-gpt-small", **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json={"model": model, "messages": MSG, **body}, timeout=10)


def one(profile: ModelProfile, **kw: Any) -> Simulator:
    return Simulator({profile.name: profile}, latency_scale=0, **kw)


# --- answers ---------------------------------------------------------------------------------


def test_chat_over_http_reports_usage_quality_and_names_itself(sim: Simulator) -> None:
    r = chat(sim.url, max_tokens=500, user="ana;use_case=analysis")
    assert r.status_code == 200
    assert r.headers["x-tidyllm-simulator"] == "1"
    body = r.json()
    content = body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert body["id"].startswith("chatcmpl-sim-") and body["system_fingerprint"] == "tidyllm-simulator"
    assert usage["completion_tokens"] == count_tokens(content)
    assert usage["prompt_tokens"] == 3 + 3 + count_tokens(MSG[0]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    q = body["tidyllm_simulator"]["quality"]
    assert body["tidyllm_simulator"]["use_case"] == "analysis"
    assert float(r.headers["x-tidyllm-sim-quality"]) == q == usage["tidyllm_sim_quality"]
    assert abs(q - sim.profiles["sim-gpt-small"].quality["analysis"]) < 0.3


def test_use_case_sources_in_priority_order(sim: Simulator) -> None:
    exact = {"sim-exact": ModelProfile("sim-exact", quality={"default": 0.5, "qa": 0.9, "code": 0.2})}
    with Simulator(exact, latency_scale=0) as s:
        def q(headers: dict[str, str] | None = None, **body: Any) -> tuple[str | None, float]:
            r = httpx.post(f"{s.url}/chat/completions", headers=headers,
                           json={"model": "sim-exact", "messages": MSG, **body})
            return r.json()["tidyllm_simulator"]["use_case"], r.json()["tidyllm_simulator"]["quality"]

        assert q() == (None, 0.5)
        assert q(user="qa") == ("qa", 0.9)
        assert q(user="bob") == (None, 0.5)
        assert q(user="bob|use_case=code") == ("code", 0.2)
        assert q(user="use_case=code", metadata={"use_case": "qa"}) == ("qa", 0.9)
        assert q({"x-tidyllm-use-case": "code"}, metadata={"use_case": "qa"}) == ("code", 0.2)


def test_litellm_completion_gets_usage_and_quality(sim: Simulator, litellm: Any) -> None:
    resp = litellm.completion(model="openai/sim-gpt-small", api_base=sim.url, api_key="x", messages=MSG,
                              max_tokens=30, extra_body={"metadata": {"use_case": "extraction"}})
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 30
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.tidyllm_simulator["use_case"] == "extraction"
    assert resp.usage.tidyllm_sim_quality == resp.tidyllm_simulator["quality"]
    assert sim.hits("sim-gpt-small") == 1


def test_litellm_stream_ends_with_usage_chunk_and_matches_plain_answer(litellm: Any) -> None:
    with Simulator(None, seed=5, latency_scale=0) as a, Simulator(None, seed=5, latency_scale=0) as b:
        plain = litellm.completion(model="openai/sim-claude", api_base=a.url, api_key="x", messages=MSG)
        stream = litellm.completion(model="openai/sim-claude", api_base=b.url, api_key="x", messages=MSG,
                                    stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == count_tokens(text)
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def sse(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_sse_format_usage_by_default_and_opt_out(sim: Simulator) -> None:
    for opts, has_usage in ((None, True), ({"include_usage": True}, True), ({"include_usage": False}, False)):
        body = {"model": "sim-gpt-small", "messages": MSG, "stream": True, "max_tokens": 9}
        if opts is not None:
            body["stream_options"] = opts
        with httpx.stream("POST", f"{sim.url}/chat/completions", json=body) as r:
            assert r.headers["content-type"] == "text/event-stream"
            events = sse(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert [c["choices"][0]["finish_reason"] for c in finish] == ["length"]
        if has_usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
        else:
            assert all("usage" not in c for c in chunks)


def test_stream_failure_cuts_the_connection_and_the_server_carries_on() -> None:
    with one(ModelProfile("sim-flaky", stream_failure_rate=1.0)) as s:
        events: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", f"{s.url}/chat/completions",
                              json={"model": "sim-flaky", "messages": MSG, "stream": True}) as r:
                for line in r.iter_lines():
                    events.append(line)
        assert events and "[DONE]" not in "".join(events)
        # a client abandoning a stream midway must not break the server either
        with httpx.stream("POST", f"{s.url}/chat/completions",
                          json={"model": "sim-flaky", "messages": MSG, "stream": True}) as r:
            next(r.iter_lines())
        assert chat(s.url, "sim-flaky").status_code == 200


def test_embeddings_str_list_base64_and_litellm(sim: Simulator, litellm: Any) -> None:
    r = httpx.post(f"{sim.url}/embeddings", json={"model": "sim-embed", "input": "risk review of loans"})
    single = r.json()
    vec = single["data"][0]["embedding"]
    assert len(vec) == 256 and abs(math.sqrt(sum(x * x for x in vec)) - 1) < 1e-3
    assert single["usage"] == {"prompt_tokens": count_tokens("risk review of loans"),
                               "total_tokens": count_tokens("risk review of loans")}
    batch = httpx.post(f"{sim.url}/embeddings", json={"model": "sim-embed", "encoding_format": "base64",
                                                      "input": ["risk review of loans", "cake recipe"]}).json()
    decoded = struct.unpack("<256f", base64.b64decode(batch["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, vec)) < 1e-6
    resp = litellm.embedding(model="openai/sim-embed", api_base=sim.url, api_key="x",
                             input=["risk review of loans", "review of loans", "cake recipe"])
    a, b, c = (d["embedding"] for d in resp.data)
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    assert dot(a, b) > dot(a, c) + 0.3  # texts sharing words are closer
    assert resp.usage.prompt_tokens > 0
    bad = httpx.post(f"{sim.url}/embeddings", json={"model": "sim-gpt-small", "input": "x"})
    assert bad.status_code == 400 and "chat model" in bad.json()["error"]["message"]


TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "get_rate", "parameters": {"type": "object", "properties": {
        "ccy": {"type": "string", "enum": ["EUR", "USD"]}, "days": {"type": "integer"}, "note": {"type": "string"}}}}},
]


def test_tool_calls(sim: Simulator, litellm: Any) -> None:
    named = {"type": "function", "function": {"name": "get_rate"}}
    body = chat(sim.url, tools=TOOLS, tool_choice=named).json()
    choice = body["choices"][0]
    call = choice["message"]["tool_calls"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert call["function"]["name"] == "get_rate"
    assert json.loads(call["function"]["arguments"]) == {"ccy": "EUR", "days": 1, "note": "sim-note"}
    assert chat(sim.url, tools=TOOLS).json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert chat(sim.url, tools=TOOLS, tool_choice="none").json()["choices"][0]["finish_reason"] == "stop"
    after = MSG + [{"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": call["id"], "content": "1.08"}]
    r = httpx.post(f"{sim.url}/chat/completions", json={"model": "sim-gpt-small", "messages": after, "tools": TOOLS})
    assert r.json()["choices"][0]["message"]["content"]
    resp = litellm.completion(model="openai/sim-gpt-small", api_base=sim.url, api_key="x", messages=MSG,
                              tools=TOOLS, tool_choice=named)
    assert resp.choices[0].message.tool_calls[0].function.name == "get_rate"
    stream = litellm.completion(model="openai/sim-gpt-small", api_base=sim.url, api_key="x", messages=MSG,
                                tools=TOOLS, tool_choice=named, stream=True)
    names = [tc.function.name for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert names == ["get_rate"]


def test_max_tokens_and_n_are_respected() -> None:
    with one(ModelProfile("sim-m", output_tokens=OutputTokens(50, 50))) as s:
        cut = chat(s.url, "sim-m", max_tokens=10).json()
        assert cut["usage"]["completion_tokens"] == 10 and cut["choices"][0]["finish_reason"] == "length"
        full = chat(s.url, "sim-m", max_tokens=100).json()
        assert full["usage"]["completion_tokens"] == 50 and full["choices"][0]["finish_reason"] == "stop"
        new_name = chat(s.url, "sim-m", max_completion_tokens=7).json()
        assert new_name["usage"]["completion_tokens"] == 7
        many = chat(s.url, "sim-m", n=3, max_tokens=5).json()
        assert [c["index"] for c in many["choices"]] == [0, 1, 2] and many["usage"]["completion_tokens"] == 15
        tool = chat(s.url, "sim-m", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_rate"}},
                    max_tokens=2).json()
        assert tool["usage"]["completion_tokens"] == 2 and tool["choices"][0]["finish_reason"] == "length"
        assert chat(s.url, "sim-m", max_tokens=0).status_code == 400


# --- determinism and faults ------------------------------------------------------------------


def statuses(url: str, model: str, count: int) -> list[int]:
    with httpx.Client(timeout=10) as client:
        return [client.post(f"{url}/chat/completions", json={"model": model, "messages": MSG}).status_code
                for _ in range(count)]


def test_error_rate_is_deterministic_under_a_seed() -> None:
    profile = ModelProfile("sim-err", error_rate=0.3)
    runs = {}
    for seed in (1, 1, 2):
        with one(profile, seed=seed) as s:
            runs.setdefault(seed, []).append(statuses(s.url, "sim-err", 60))
    first, again = runs[1]
    assert first == again and first != runs[2][0]
    assert set(first) == {200, 500} and 8 <= first.count(500) <= 30
    with one(profile, seed=1) as s:
        body = httpx.post(f"{s.url}/chat/completions", json={"model": "sim-err", "messages": MSG})
        assert body.status_code == first[0]
        s.reset_stats()  # restarts the request numbering: the same sequence again
        assert statuses(s.url, "sim-err", 60) == first
        assert s.stats()["outcomes"]["sim-err"] == {"ok": first.count(200), "error": first.count(500)}


def test_answers_and_latency_are_deterministic() -> None:
    profile = ModelProfile("sim-lat", latency=Latency(base_ms=60, per_output_token_ms=0.5, jitter=0.5),
                           quality={"default": 0.5}, quality_noise=0.1)
    bodies = []
    for _ in range(2):
        with Simulator({"sim-lat": profile}, seed=3, latency_scale=1.0) as s:
            started = time.perf_counter()
            r = chat(s.url, "sim-lat").json()
            elapsed = time.perf_counter() - started
            bodies.append((r["choices"][0]["message"]["content"], r["tidyllm_simulator"]["quality"]))
        expected_ms = 60 + 0.5 * r["usage"]["completion_tokens"]
        assert expected_ms * 0.5 / 1000 <= elapsed < expected_ms * 1.5 / 1000 + 0.5
    assert bodies[0] == bodies[1] and bodies[0][1] != 0.5


def test_outage_toggled_by_api_and_by_http_admin(sim: Simulator) -> None:
    sim.set_outage("sim-claude")
    r = chat(sim.url, "sim-claude")
    assert r.status_code == 503 and "simulated outage" in r.json()["error"]["message"]
    assert chat(sim.url, "sim-gpt-small").status_code == 200
    sim.set_outage("sim-claude", down=False)
    assert chat(sim.url, "sim-claude").status_code == 200

    client = SimulatorClient(sim.url)
    client.set_outage("sim-claude", True)
    assert chat(sim.url, "sim-claude").status_code == 503
    assert client.stats()["down"] == ["sim-claude"]
    assert client.hits("sim-claude") == 3 and client.hits() == 4
    client.set_outage("sim-claude", False)
    assert chat(sim.url, "sim-claude").status_code == 200
    client.reset_stats()
    assert sim.hits() == 0 and client.stats()["outcomes"] == {}
    with pytest.raises(GatewayError, match="no simulated model 'nope'"):
        client.set_outage("nope")
    with pytest.raises(ConfigurationError, match="no model 'nope'"):
        sim.set_outage("nope")
    raw = httpx.post(f"{sim.url[:-3]}/_sim/outage", json={"model": "sim-claude", "down": "yes"})
    assert raw.status_code == 400


def test_scheduled_outage_windows() -> None:
    profile = ModelProfile("sim-o", outages=(Window(2, 4, "requests"), Window(10, 11, "requests", every=20)))
    with one(profile) as s:
        codes = statuses(s.url, "sim-o", 32)
    assert [i for i, c in enumerate(codes) if c == 503] == [2, 3, 10, 30]
    now = ModelProfile("sim-now", outages=(Window(0, 3600),))
    later = ModelProfile("sim-later", outages=(Window(3600, 7200),))
    with Simulator({"sim-now": now, "sim-later": later}, latency_scale=0) as s:
        r = chat(s.url, "sim-now")
        assert r.status_code == 503 and 3590 <= int(r.headers["retry-after"]) <= 3600
        assert chat(s.url, "sim-later").status_code == 200
        assert s.stats()["outcomes"] == {"sim-now": {"outage": 1}, "sim-later": {"ok": 1}}


def test_rate_limit_bursts_answer_429_with_retry_after(litellm: Any) -> None:
    burst = ModelProfile("sim-burst", rate_limits=(Window(1, 3, "requests", retry_after_s=2),))
    timed = ModelProfile("sim-timed", rate_limits=(Window(0, 100),))
    rpm = ModelProfile("sim-rpm", rpm=3)
    with Simulator({m.name: m for m in (burst, timed, rpm)}, latency_scale=0) as s:
        codes = [chat(s.url, "sim-burst") for _ in range(4)]
        assert [r.status_code for r in codes] == [200, 429, 429, 200]
        assert codes[1].headers["retry-after"] == "2" and codes[1].headers["retry-after-ms"] == "2000"
        assert codes[1].json()["error"]["type"] == "rate_limit_error"
        r = chat(s.url, "sim-timed")
        assert r.status_code == 429 and 98 <= int(r.headers["retry-after"]) <= 100
        limited = [chat(s.url, "sim-rpm") for _ in range(5)]
        assert [r.status_code for r in limited] == [200, 200, 200, 429, 429]
        assert 58 <= int(limited[3].headers["retry-after"]) <= 60
        with pytest.raises(litellm.RateLimitError):
            litellm.completion(model="openai/sim-rpm", api_base=s.url, api_key="x", messages=MSG, max_retries=0)


def test_hits_count_every_request_including_errors_and_unknown_models(sim: Simulator) -> None:
    assert sim.hits() == 0
    chat(sim.url, "sim-gpt-small")
    chat(sim.url, "sim-gpt-large")
    sim.set_outage("sim-gpt-large")
    chat(sim.url, "sim-gpt-large")
    missing = chat(sim.url, "gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert chat(sim.url, "sim-gpt-small", messages=[]).status_code == 400  # malformed: never reaches a model
    assert (sim.hits("sim-gpt-small"), sim.hits("sim-gpt-large"), sim.hits("gpt-4o"), sim.hits()) == (1, 2, 1, 4)
    assert sim.hits("sim-claude") == 0
    httpx.get(f"{sim.url}/models")
    httpx.get(f"{sim.url[:-3]}/health")
    assert sim.hits() == 4  # listing and health are not provider calls


def test_thirty_concurrent_clients() -> None:
    profile = ModelProfile("sim-c", latency=Latency(base_ms=150), output_tokens=OutputTokens(20, 20))
    with Simulator({"sim-c": profile}, latency_scale=1.0) as s:
        results: list[int] = []
        lock = threading.Lock()
        started: list[float] = []
        barrier = threading.Barrier(30, action=lambda: started.append(time.perf_counter()))

        def worker() -> None:
            with httpx.Client(timeout=10) as client:
                barrier.wait()
                for _ in range(3):
                    code = client.post(f"{s.url}/chat/completions", json={"model": "sim-c", "messages": MSG}).status_code
                    with lock:
                        results.append(code)

        threads = [threading.Thread(target=worker) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started[0]
        assert results == [200] * 90 and s.hits("sim-c") == 90
    # 90 calls of 150 ms each in 3 rounds of 30 parallel ones: ~0.5 s, against 13.5 s if served one by one
    assert elapsed < 2.5


def test_keep_alive_requests_do_not_stall_on_delayed_acks(sim: Simulator) -> None:
    # With Nagle's algorithm on, each keep-alive request waits ~44 ms for a delayed ACK.
    times = []
    with httpx.Client() as client:
        for stream in (False, True) * 10:
            started = time.perf_counter()
            client.post(f"{sim.url}/chat/completions",
                        json={"model": "sim-gpt-small", "messages": MSG, "stream": stream}).read()
            times.append(time.perf_counter() - started)
    assert sorted(times)[len(times) // 2] < 0.025


# --- HTTP surface ----------------------------------------------------------------------------


def test_models_health_and_bad_requests(sim: Simulator) -> None:
    models = httpx.get(f"{sim.url}/models").json()
    assert {m["id"] for m in models["data"]} == set(sim.profiles)
    assert all(m["owned_by"] == "tidyllm-simulator" for m in models["data"])
    assert httpx.get(f"{sim.url}/models/sim-embed").json()["kind"] == "embedding"
    health = httpx.get(f"{sim.url[:-3]}/health")
    assert health.status_code == 200 and health.json()["simulator"] is True
    bad = httpx.post(f"{sim.url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert httpx.post(f"{sim.url}/completions", json={}).status_code == 404
    body = json.dumps({"model": "sim-gpt-small", "messages": MSG}).encode()
    chunked = httpx.post(f"{sim.url}/chat/completions", content=iter([body[:10], body[10:]]))  # no content-length
    assert chunked.status_code == 200 and chunked.json()["usage"]["prompt_tokens"] > 0
    assert chat(sim.url, "sim-embed").status_code == 400
    for bad_input in ([None], [["a"]], {"a": 1}, []):
        r = httpx.post(f"{sim.url}/embeddings", json={"model": "sim-embed", "input": bad_input})
        assert r.status_code == 400, bad_input
    tokens = httpx.post(f"{sim.url}/embeddings", json={"model": "sim-embed", "input": [[1, 2, 3], [4]]}).json()
    assert tokens["usage"]["prompt_tokens"] == 4 and len(tokens["data"]) == 2
    accented = chat(sim.url, metadata={"use_case": "résumé"})
    assert accented.status_code == 200 and accented.json()["tidyllm_simulator"]["use_case"] == "résumé"


def test_port_in_use_is_a_clear_error(sim: Simulator) -> None:
    with pytest.raises(GatewayError, match=f"cannot listen on 127.0.0.1:{sim.port}.*--port"):
        Simulator(None, port=sim.port).start()


def test_stop_closes_idle_keep_alive_connections() -> None:
    s = Simulator(None, latency_scale=0).start()
    with httpx.Client() as client:
        assert client.get(f"{s.url}/models").status_code == 200  # leaves a pooled connection open
        started = time.perf_counter()
        s.stop()
        assert time.perf_counter() - started < 2
        with pytest.raises(httpx.TransportError):
            client.get(f"{s.url}/models")
    s.stop()  # idempotent


# --- profiles --------------------------------------------------------------------------------


def test_bundled_profiles_offer_distinct_trade_offs() -> None:
    profiles = load_profiles()
    assert bundled_profiles_path().name == "profiles.yaml"
    assert {"sim-gpt-large", "sim-gpt-small", "sim-claude", "sim-onprem-llama", "sim-embed"} <= set(profiles)
    chat_models = [p for p in profiles.values() if p.kind == "chat"]
    assert len(chat_models) >= 4 and profiles["sim-embed"].kind == "embedding"
    for p in chat_models:
        assert set(USE_CASES) <= set(p.quality), p.name
    large, small, claude = profiles["sim-gpt-large"], profiles["sim-gpt-small"], profiles["sim-claude"]
    best = {uc: max(chat_models, key=lambda p: p.quality_for(uc)).name for uc in USE_CASES}
    assert best["analysis"] == "sim-gpt-large" and best["summarise"] == best["qa"] == "sim-claude"
    assert small.quality_for("analysis") < 0.5 < small.quality_for("extraction")
    assert small.latency.base_ms < claude.latency.base_ms < large.latency.base_ms


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profiles.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("models: [", "not valid YAML"),
    ("other: {}", "top-level 'models:'"),
    ("models:\n  sim-a: {}\nextra: 1", "unknown top-level key 'extra'"),
    ("models:\n  sim-a: {eror_rate: 0.1}", "model 'sim-a': unknown field 'eror_rate'; known fields:"),
    ("models:\n  sim-a: {error_rate: 1.5}", r"model 'sim-a': field 'error_rate' must be a number in \[0, 1\]"),
    ("models:\n  sim-a: {latency: {base: 3}}", "model 'sim-a'.*base"),
    ("models:\n  sim-a: {latency: {base_ms: -1}}", "model 'sim-a': latency: field 'base_ms'"),
    ("models:\n  sim-a: {output_tokens: {min: 9, max: 3}}", "model 'sim-a': output_tokens: min"),
    ("models:\n  sim-a: {outages: [[5, 2]]}", "model 'sim-a': field 'outages': window: end"),
    ("models:\n  sim-a: {outages: [{hours: [1, 2]}]}", "model 'sim-a': field 'outages': a window needs exactly one"),
    ("models:\n  sim-a: {rate_limits: {requests: [1, 2]}}", "model 'sim-a': field 'rate_limits' must be a list"),
    ("models:\n  sim-a: {kind: audio}", "model 'sim-a': field 'kind'"),
    ("models:\n  sim-a: {quality: {qa: 2}}", r"model 'sim-a': field 'quality.qa'"),
    ("models:\n  sim-a: {rpm: 0}", "model 'sim-a': field 'rpm'"),
])
def test_bad_profile_files_name_file_model_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError, match=message) as info:
        load_profiles(path)
    assert str(info.value).startswith(str(path))


def test_missing_file_and_good_file_shorthands(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="nope.yaml: cannot read simulator profiles"):
        load_profiles(tmp_path / "nope.yaml")
    profiles = load_profiles(write(tmp_path, (
        "models:\n  sim-a:\n    output_tokens: 100\n    quality: 0.7\n"
        "    outages: [[1, 2], {requests: [3, 4], every: 10}]\n  sim-b:\n    quality: {qa: 0.2, code: 0.4}\n")))
    a, b = profiles["sim-a"], profiles["sim-b"]
    assert (a.output_tokens.min, a.output_tokens.max) == (50, 150)
    assert a.quality_for("anything") == 0.7
    assert a.outages == (Window(1, 2, "seconds"), Window(3, 4, "requests", every=10))
    assert b.quality_for("qa") == 0.2 and b.quality_for("other") == pytest.approx(0.3)
    assert parse_profiles({"models": {"sim-c": None}})["sim-c"] == ModelProfile("sim-c")


# --- CLI -------------------------------------------------------------------------------------


def test_cli_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tidyllm.cli.simulate import simulate; simulate()", "--port", "0",
         "--latency-scale", "0", "--seed", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "provider simulator" in line and "not a real provider" in line
        url = line.split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert chat(url).status_code == 200
        assert SimulatorClient(url).hits("sim-gpt-small") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "stopped" in out


def test_cli_bad_profiles_and_busy_port_are_one_line_errors(tmp_path: Path) -> None:
    from tidyllm.cli import main

    bad = write(tmp_path, "models:\n  sim-a: {error_rate: 7}")
    result = CliRunner().invoke(main, ["simulate", "--profiles", str(bad), "--port", "0"])
    assert result.exit_code == 1 and "field 'error_rate'" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = CliRunner().invoke(main, ["simulate", "--port", str(taken.getsockname()[1])])
    assert result.exit_code == 1 and "cannot listen on" in result.output

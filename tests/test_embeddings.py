"""Governed embeddings through the real MLflow legacy gateway's ``embed`` route (``llm/v1/embeddings``):
priced per input token, reserved, settled, audited and authorised like chat; a batch is one request;
a RAG pipeline embedding 2,000 chunks stops exactly at its budget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _fixtures import budget_status, instant_profiles, new_department, stack_fixture

from tidyllm.errors import BudgetExceededError, RouteNotAuthorizedError
from tidyllm.gateway.simulator import count_tokens as sim_tokens
from tidyllm.stack import LocalStack

PRICE_IN = 0.02  # USD per 1M input tokens, the bundled embed route
PROFILES = instant_profiles(extra={"sim-embed": {"embedding_dim": 32}})
WORDS = ("credit", "risk", "model", "validation", "board", "capital", "liquidity", "stress", "scenario",
         "exposure", "limit", "review", "finding", "control", "policy", "market")


def chunk(i: int) -> str:
    """A deterministic document chunk of 12 to 27 words."""
    return f"chunk {i}: " + " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12 + i % 16))


pytestmark = pytest.mark.slow  # starts an MLflow gateway


stack = stack_fixture(PROFILES, "embed")


def meta(dept: str, call_id: str | None = None, **more: Any) -> dict[str, Any]:
    md = {"user_id": "ana", "department": dept, "audit_reason": "index the policy library", "use_case": "extraction"}
    if call_id:
        md["tidyllm_call_id"] = call_id
    return {**md, **more}


def test_router_embedding_is_priced_per_input_token_reserved_settled_and_audited(stack: LocalStack) -> None:
    dept = new_department(stack, "rag", 1.0)
    batch = [chunk(i) for i in range(8)]
    before = stack.simulator.hits("sim-embed")
    # the worst case the admission reserves (computed before the call: the route's factor learns from it)
    reserved = stack.platform.governor.estimate_prompt("embed", text=batch) * PRICE_IN / 1e6
    resp = stack.platform.router().embedding(model="embed", input=batch, metadata=meta(dept, f"emb-{dept}"))
    assert len(resp.data) == 8 and stack.simulator.hits("sim-embed") == before + 1  # one request for the batch
    call = stack.platform.wait_for_call(f"emb-{dept}")
    assert call["call_type"] == "embedding" and call["status"] == "success" and call["route"] == "embed"
    assert call["prompt_tokens"] == resp.usage.prompt_tokens == sum(sim_tokens(t) for t in batch)
    assert not call["completion_tokens"]
    assert call["cost_usd"] == pytest.approx(resp.usage.prompt_tokens * PRICE_IN / 1e6)
    assert call["reserved_usd"] == pytest.approx(reserved) and call["reserved_usd"] >= call["cost_usd"]
    s = budget_status(stack, dept)
    assert s["spent_usd"] == pytest.approx(call["cost_usd"]) and s["reserved_usd"] == pytest.approx(0, abs=1e-15)
    row = stack.platform.audit.show(f"emb-{dept}")
    assert row["decision"] == "allowed" and row["requested_model"] == "embed" and row["content_hash"]


@pytest.mark.parametrize("path", ["router-sync", "router-async", "aembedding", "tidyllm-provider"])
def test_a_refused_embedding_batch_never_reaches_the_provider(stack: LocalStack, path: str) -> None:
    import litellm

    dept = new_department(stack, "rag", 0.0)
    call_id = f"emb-refused-{path}-{dept}"
    batch = [chunk(i) for i in range(20)]
    before = stack.simulator.hits("sim-embed")
    with pytest.raises(Exception) as info:
        if path == "router-sync":
            stack.platform.router().embedding(model="embed", input=batch, metadata=meta(dept, call_id))
        elif path == "router-async":
            asyncio.run(stack.platform.router().aembedding(model="embed", input=batch, metadata=meta(dept, call_id)))
        elif path == "aembedding":
            asyncio.run(litellm.aembedding(model="openai/embed", api_base=stack.gateway.api_base, api_key="x",
                                           input=batch, metadata=meta(dept, call_id)))
        else:
            litellm.embedding(model="tidyllm/embed", input=batch, metadata=meta(dept, call_id))
    if path == "tidyllm-provider":
        assert "has $0" in str(info.value)  # LiteLLM re-wraps a custom provider's error; the message survives
    else:
        assert isinstance(info.value, BudgetExceededError)
    assert stack.simulator.hits("sim-embed") == before
    row = stack.platform.audit.show(call_id)
    assert row["decision"] == "refused" and row["rule"].startswith(f"budget:department:{dept}")


def test_embeddings_are_authorised_like_chat(stack: LocalStack) -> None:
    """The embed route accepts public and internal data only: confidential chunks are refused."""
    dept = new_department(stack, "rag", 1.0)
    before = stack.simulator.hits("sim-embed")
    with pytest.raises(RouteNotAuthorizedError, match="confidential"):
        stack.platform.router().embedding(model="embed", input=["client list: ..."],
                                          metadata=meta(dept, f"conf-{dept}", data_sensitivity="confidential"))
    assert stack.simulator.hits("sim-embed") == before
    assert stack.platform.audit.show(f"conf-{dept}")["decision"] == "refused"


def test_plain_aembedding_and_the_tidyllm_provider_are_governed(stack: LocalStack) -> None:
    import litellm

    dept = new_department(stack, "rag", 1.0)
    batch = [chunk(i) for i in range(5)]

    async def go() -> Any:
        resp = await litellm.aembedding(model="openai/embed", api_base=stack.gateway.api_base, api_key="x",
                                        input=batch, metadata=meta(dept, f"aemb-{dept}"))
        await asyncio.to_thread(stack.platform.wait_for_call, f"aemb-{dept}")
        return resp

    resp = asyncio.run(go())
    call = stack.platform.wait_for_call(f"aemb-{dept}")
    assert call["status"] == "success" and call["cost_usd"] == pytest.approx(resp.usage.prompt_tokens * PRICE_IN / 1e6)
    sync = litellm.embedding(model="tidyllm/embed", input=batch, metadata=meta(dept, f"semb-{dept}"))
    assert len(sync.data) == 5
    call = stack.platform.wait_for_call(f"semb-{dept}")
    assert call["status"] == "success" and call["route"] == "embed"
    assert budget_status(stack, dept)["reserved_usd"] == pytest.approx(0, abs=1e-15)


def test_a_rag_pipeline_of_2000_chunks_stops_exactly_at_its_budget(stack: LocalStack) -> None:
    """Embed 2,000 chunks in batches of 50 against a budget that pays for about half of them."""
    p = stack.platform
    chunks = [chunk(i) for i in range(2000)]
    batches = [chunks[i:i + 50] for i in range(0, len(chunks), 50)]
    limit = 0.00045
    dept = new_department(stack, "rag", limit)
    router = p.router()
    embedded, hits = 0, stack.simulator.hits("sim-embed")
    refused_batch = None
    for n, batch in enumerate(batches):
        before = budget_status(stack, dept)
        worst = stack.platform.governor.estimate_prompt("embed", text=batch) * PRICE_IN / 1e6
        try:
            resp = router.embedding(model="embed", input=batch, metadata=meta(dept, f"rag-{dept}-{n}"))
        except BudgetExceededError:
            refused_batch = n
            # it was refused because its worst case really did not fit what was left
            assert before["spent_usd"] + before["reserved_usd"] + worst > limit
            break
        # the last allowed batch fits: what was spent plus its worst case stays within the limit
        assert before["spent_usd"] + worst <= limit + 1e-15
        assert len(resp.data) == len(batch)
        embedded += len(batch)
        p.wait_for_call(f"rag-{dept}-{n}")
    assert refused_batch is not None and 10 < refused_batch < 30  # it stopped about halfway
    assert embedded == refused_batch * 50
    assert stack.simulator.hits("sim-embed") == hits + refused_batch  # the refused batch never reached it
    final = budget_status(stack, dept)
    assert final["spent_usd"] <= limit and final["reserved_usd"] == pytest.approx(0, abs=1e-15)
    calls = p.calls(department=dept)
    assert (calls["status"] == "success").sum() == refused_batch and (calls["status"] == "refused").sum() == 1
    assert calls.loc[calls["status"] == "success", "cost_usd"].sum() == pytest.approx(final["spent_usd"])
    audit = p.audit.frame(department=dept, decision=["allowed", "refused"])  # (setting its budget is audited too)
    assert len(audit) == refused_batch + 1 and p.audit.verify().ok

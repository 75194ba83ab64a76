"""The QA orchestrator: ask several routes (or one route several times), compare, answer with a confidence.

``ask(question, context=None, strategy="consensus", routes=None, **caller)``:

- ``consensus`` asks every route in ``routes`` (default: the model group's routes) — or, given one route,
  samples it ``samples`` times — extracts each final answer (the ``Answer:`` line the prompt asks for),
  and returns the majority with ``confidence`` = its share of the votes and the dissenting answers. A tie
  is settled by a ``judge`` route when one is given.
- ``cascade`` (the RouteLLM idea) walks a ladder of routes from cheap to strong: at each rung it samples the
  route ``samples`` times and stops when the samples agree at least ``threshold``; only a low-confidence
  rung escalates. The ladder starts at the learning router's preferred route for the caller's context when
  it has one (``get_optimal_config("gateway", ...)``), else at the cheapest route.

Every sub-call is a governed call inside one tracked execution (module ``ask``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from tidyllm.apps._run import AppRun, CallResult, CostEstimate, PlannedCall, route_prices
from tidyllm.apps.documents import Document, count_tokens
from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.platform import Platform

__all__ = ["Answer", "ask", "extract_answer", "STRATEGIES"]

STRATEGIES = ("consensus", "cascade")
SYSTEM_PROMPT = ("Answer the question from the context when one is given. Be brief. End with one line of the "
                 "form 'Answer: <the short final answer>'.")
_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*[:\-]\s*(.+?)\s*$")
_CHOICE = re.compile(r"(?i)choice\s*[:\-]?\s*(\d+)")


def extract_answer(text: str) -> str:
    """The final answer in a model's reply: its last ``Answer:`` line, else the whole reply, normalised
    (lower case, single spaces, no surrounding punctuation) so equal answers compare equal."""
    lines = _ANSWER_LINE.findall(text)
    answer = lines[-1] if lines else text
    return re.sub(r"\s+", " ", answer).strip().strip(".!*\"'`").strip().lower()


@dataclass
class Answer:
    """What :func:`ask` returns: the answer, how sure, and every vote behind it."""

    question: str
    answer: str
    text: str
    confidence: float
    strategy: str
    #: one row per sub-call: rung, route, answer, text, call_id, cost_usd
    votes: "pd.DataFrame"
    disagreement: list[dict[str, Any]]
    escalated: bool
    estimate: CostEstimate
    actual_usd: float
    execution_id: str
    platform: "Platform" = field(repr=False)

    def feedback(self, score: float, **fields: Any) -> str:
        """Rate the answer in [0, 1]: reaches the router for every sub-call and the ``ask`` history."""
        from tidyllm.apps._run import feedback

        return feedback(self.execution_id, score, platform=self.platform, **fields)

    def __str__(self) -> str:
        return self.answer


def _context_text(context: "str | Document | None", limit_tokens: int) -> str:
    if context is None:
        return ""
    if isinstance(context, Document):  # whole paragraphs, in order, up to the limit
        out, used = [], 0
        for block in context.blocks:
            tokens = count_tokens(block.text) + 1
            if out and used + tokens > limit_tokens:
                break
            out.append(block.text)
            used += tokens
        return "\n".join(out)
    if not isinstance(context, str):
        raise ConfigurationError(f"context must be text or a Document, got {type(context).__name__}")
    return context


def _messages(question: str, context: str) -> list[dict[str, str]]:
    user = f"Context:\n{context}\n\nQuestion: {question}" if context else f"Question: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _chat_routes(platform: "Platform", model: str) -> list[str]:
    config = platform.gateway.config
    routes = [r.name for r in (config.routes if config is not None else ())
              if model in (r.name, r.group) and "embeddings" not in r.endpoint_type]
    if not routes:
        raise ConfigurationError(f"no chat route serves {model!r}; name routes=[...] or a model group")
    return routes


def _by_price(platform: "Platform", routes: Sequence[str]) -> list[str]:
    prices = {r: route_prices(platform, r)[r] for r in routes}
    return sorted(routes, key=lambda r: (prices[r][0] + prices[r][1], r))


def _tally(calls: Sequence[tuple[str, CallResult]]) -> tuple[str, float, Counter[str]]:
    votes = Counter(extract_answer(c.text) for _, c in calls)
    best, n = max(votes.items(), key=lambda kv: (kv[1], -list(votes).index(kv[0])))
    return best, n / max(1, sum(votes.values())), votes


def ask(question: str, context: "str | Document | None" = None, strategy: str = "consensus",
        routes: Sequence[str] | None = None, *, model: str = "chat", samples: int | None = None,
        threshold: float = 0.75, judge: str | None = None, max_tokens: int = 200, max_cost: float | None = None,
        platform: "Platform | None" = None, **caller: Any) -> Answer:
    """Answer ``question`` (optionally from ``context``) by ``strategy`` over ``routes``; see the module doc.

    ``caller`` is the caller context (``user_id``, ``department``, ``audit_reason``, ``use_case``,
    ``data_sensitivity``). The worst case (every route, every sample, every rung) is estimated first and
    refused up front when ``max_cost`` or the caller's budgets cannot cover it."""
    import pandas as pd

    if strategy not in STRATEGIES:
        raise ConfigurationError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not isinstance(question, str) or not question.strip():
        raise ConfigurationError("ask() needs a non-empty question")
    if not 0.0 < threshold <= 1.0:
        raise ConfigurationError(f"threshold must be in (0, 1], got {threshold!r}")
    caller.setdefault("use_case", "qa")
    run = AppRun(platform, "ask", strategy, caller, {"model": model, "strategy": strategy}, max_cost=max_cost)
    platform = run.platform
    chosen = list(routes) if routes else _chat_routes(platform, model)
    messages = _messages(question, _context_text(context, 3000))
    if strategy == "consensus":
        n = samples if samples is not None else (3 if len(chosen) == 1 else 1)
        plan = [(0, route) for route in chosen for _ in range(n)]
        ladder = chosen
    else:
        n = samples if samples is not None else 2
        ladder = _by_price(platform, chosen)
        preferred = _preferred(platform, run.context, model)
        if preferred in ladder:
            ladder = ladder[ladder.index(preferred):]
        plan = [(rung, route) for rung, route in enumerate(ladder) for _ in range(n)]
    if n < 1:
        raise ConfigurationError(f"samples must be at least 1, got {n}")
    planned = [PlannedCall(route, messages, max_tokens) for _, route in plan]
    if judge is not None:
        planned.append(PlannedCall(judge, messages, max_tokens, pending_tokens=len(plan) * max_tokens))
    est = run.plan(planned)
    calls: list[tuple[int, str, CallResult]] = []
    escalated = False
    with run:
        run.step("plan", {"strategy": strategy, "routes": ladder, "samples": n})
        if strategy == "consensus":
            for _, route in plan:
                calls.append((0, route, run.chat(route, messages, max_tokens=max_tokens, purpose=f"vote {route}")))
            best, confidence, votes = _tally([(r, c) for _, r, c in calls])
            if judge is not None and sum(1 for v in votes.values() if v == votes[best]) > 1:
                best = _judge(run, judge, question, messages, list(votes), max_tokens) or best
                confidence = votes[best] / sum(votes.values())
        else:
            for rung, route in enumerate(ladder):
                rung_calls = [run.chat(route, messages, max_tokens=max_tokens, purpose=f"rung {rung} {route}")
                              for _ in range(n)]
                calls.extend((rung, route, c) for c in rung_calls)
                best, confidence, votes = _tally([(route, c) for c in rung_calls])
                run.step("rung", {"rung": rung, "route": route, "confidence": confidence, "answer": best})
                if confidence >= threshold:
                    break
            escalated = calls[-1][0] > 0
            final = [c for rung_, _, c in calls if rung_ == calls[-1][0]]
            best, confidence, _ = _tally([("", c) for c in final])
        frame = pd.DataFrame([{"rung": rung, "route": c.route or route, "answer": extract_answer(c.text),
                               "text": c.text, "call_id": c.call_id, "cost_usd": c.cost_usd}
                              for rung, route, c in calls],
                             columns=["rung", "route", "answer", "text", "call_id", "cost_usd"])
        pool = frame if strategy == "consensus" else frame[frame["rung"] == frame["rung"].max()]
        text = pool[pool["answer"] == best]["text"].iloc[0] if (pool["answer"] == best).any() else best
        disagreement = pool[pool["answer"] != best][["route", "answer"]].to_dict("records")
        run.finish({"answer": best, "confidence": confidence, "escalated": escalated,
                    "rungs": int(frame["rung"].max()) + 1})
    return Answer(question, best, text, float(confidence), strategy, frame, disagreement, escalated, est,
                  run.actual_usd, run.execution_id, platform)


def _preferred(platform: "Platform", context: dict[str, str], model: str) -> str | None:
    """The learning router's preferred route for this caller and model group, when it has one."""
    ctx = {k: v for k, v in context.items() if k in ("department", "use_case", "data_sensitivity")}
    answer = platform.mart.get_optimal_config("gateway", {**ctx, "model_group": model})
    params = answer.get("parameters") or {}
    return params.get("preferred_route") or params.get("route")


def _judge(run: AppRun, judge: str, question: str, messages: list[dict[str, str]], candidates: list[str],
           max_tokens: int) -> str | None:
    listing = "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, start=1))
    prompt = [messages[0], {"role": "user", "content": f"{messages[1]['content']}\n\nCandidate answers:\n{listing}\n\n"
                                                       "Which candidate is correct? Reply 'Choice: <number>'."}]
    call = run.chat(judge, prompt, max_tokens=max_tokens, purpose=f"judge {judge}")
    m = _CHOICE.search(call.text)
    if m and 1 <= int(m.group(1)) <= len(candidates):
        return candidates[int(m.group(1)) - 1]
    return None

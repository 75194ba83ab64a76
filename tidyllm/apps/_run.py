"""What every application shares: the caller, the cost before work, one tracked execution, governed calls.

An application run (:class:`AppRun`) is one ``mart.track_execution(app, operation, context)`` block. Before
any call it prices the planned calls at their worst case (:class:`CostEstimate`: prompt tokens of the real
messages, ``max_tokens`` of output, at today's price of the most expensive route the model name may use) and
refuses up front (:class:`CostLimitError`) when the estimate exceeds ``max_cost`` or what the caller's
budgets have left. Every sub-call goes through the platform's governed Router with the caller's metadata
(``user_id``, ``department``, ``audit_reason``, ``use_case``, ``data_sensitivity``) plus the execution id,
and is recorded as a step with its ``call_id``, route and exact cost read back from ``llm_calls``.
Quality feedback on a run (:func:`feedback`) reaches the router (``platform.feedback`` per call) and the
application's own history (``learn_from_execution``), which ``get_optimal_config(app, context)`` reads.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from tidyllm.errors import ConfigurationError, TidyLLMError

if TYPE_CHECKING:
    from tidyllm.mart.tracking import Tracker
    from tidyllm.platform import Platform

__all__ = ["AppRun", "Batch", "CallResult", "CostEstimate", "CostLimitError", "PlannedCall", "CONTEXT_KEYS", "feedback",
           "resolve_platform", "split_context", "parse_json_object"]

log = logging.getLogger("tidyllm.apps")

#: caller context every sub-call carries (the governed call's metadata)
CONTEXT_KEYS = ("user_id", "department", "audit_reason", "use_case", "data_sensitivity")
#: estimated input tokens of a text: the larger of its cl100k_base count and its characters / 4 (the usual
#: rule of thumb, higher for text with long words that other tokenizers split finely), times this margin
PROMPT_MARGIN = 1.1
_FRAME_TOKENS = 4  # per message, as chat formats add


class CostLimitError(TidyLLMError):
    """An application would cost more than ``max_cost`` or than the caller's budgets have left; nothing ran."""


def resolve_platform(platform: "Platform | None") -> "Platform":
    """``platform`` or the installed one (``tidyllm.install``)."""
    if platform is not None:
        return platform
    from tidyllm.platform import current

    installed = current()
    if installed is None:
        raise ConfigurationError("no tidyllm platform is installed: call tidyllm.install('tidyllm.yaml') first "
                                 "(or pass platform=...)")
    return installed


def split_context(context: Mapping[str, Any]) -> dict[str, str]:
    """The caller context among an application's keyword arguments; an unknown keyword is an error."""
    unknown = sorted(set(context) - set(CONTEXT_KEYS))
    if unknown:
        raise ConfigurationError(f"unknown argument {unknown[0]!r}; the caller context is "
                                 f"{', '.join(CONTEXT_KEYS)}")
    out = {}
    for key, value in context.items():
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigurationError(f"{key} must be a non-empty string, got {value!r}")
        out[key] = value
    return out


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in a model's answer (bare, or in a ```json fence), else None."""
    fence = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.S)
    candidates = [fence.group(1)] if fence else []
    start = text.find("{")
    if start >= 0:
        candidates.append(text[start:text.rfind("}") + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


# --- cost before work -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedCall:
    """A call an application will make: the model name, the messages (or embedding inputs), ``max_tokens``."""

    model: str
    messages: Sequence[Mapping[str, Any]] = ()
    max_tokens: int = 0
    inputs: Sequence[str] = ()  # embedding inputs
    #: input tokens known only during the run (e.g. earlier answers a reduce step will read), at most
    pending_tokens: int = 0

    def prompt_tokens(self) -> int:
        """Upper estimate of the input tokens (:func:`text_tokens` of each text, plus framing)."""
        if self.inputs:
            return sum(text_tokens(t) + 1 for t in self.inputs)
        body = sum(text_tokens(str(m.get("content") or "")) for m in self.messages)
        return body + math.ceil(self.pending_tokens * PROMPT_MARGIN) + _FRAME_TOKENS * len(self.messages) + 3


def text_tokens(text: str) -> int:
    """Upper estimate of the tokens a provider counts for ``text`` (see :data:`PROMPT_MARGIN`)."""
    from tidyllm.apps.documents import count_tokens

    return math.ceil(max(count_tokens(text), len(text) / 4.0) * PROMPT_MARGIN)


@dataclass(frozen=True)
class CostEstimate:
    """The worst case of a run: ``calls`` calls costing at most ``total_usd`` at today's prices."""

    app: str
    calls: int
    total_usd: float
    prompt_tokens: int
    output_tokens: int
    #: route -> (USD per 1M input tokens, per 1M output tokens) of every route a call may use
    routes: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: worst case of each planned call, in order
    per_call_usd: tuple[float, ...] = ()

    def __str__(self) -> str:
        routes = ", ".join(sorted(self.routes)) or "no priced route"
        return (f"{self.app}: {self.calls} call(s), up to {self.prompt_tokens:,} input + {self.output_tokens:,} "
                f"output tokens, at most ${self.total_usd:.6f} at today's prices ({routes})")


def route_prices(platform: "Platform", model: str) -> dict[str, tuple[float, float]]:
    """Today's price of every gateway route the model name (a group or a route) may be served by."""
    config = platform.gateway.config
    routes = [] if config is None else [r.name for r in config.routes if model in (r.name, r.group)]
    routes = routes or [model]
    out = {}
    for route in routes:
        price = platform.prices.lookup(route)
        if price is None:
            raise ConfigurationError(f"model {model!r}: route {route!r} has no price, so the run cannot be "
                                     f"estimated; set one with `tidyllm routes` / platform.prices.set({route!r}, ...)")
        out[route] = (float(price.input_per_1m), float(price.output_per_1m or 0.0))
    return out


def estimate(platform: "Platform", app: str, planned: Sequence[PlannedCall]) -> CostEstimate:
    """Price ``planned`` at its worst case: each call at its most expensive candidate route."""
    prices: dict[str, tuple[float, float]] = {}
    per_call, prompt_total, output_total = [], 0, 0
    cache: dict[str, dict[str, tuple[float, float]]] = {}
    for call in planned:
        routes = cache.get(call.model) or cache.setdefault(call.model, route_prices(platform, call.model))
        prices.update(routes)
        tokens = call.prompt_tokens()
        prompt_total += tokens
        output_total += call.max_tokens
        per_call.append(max((tokens * p_in + call.max_tokens * p_out) / 1e6 for p_in, p_out in routes.values()))
    return CostEstimate(app, len(planned), sum(per_call), prompt_total, output_total, prices, tuple(per_call))


def tightest_budget(platform: "Platform", context: Mapping[str, str]) -> tuple[str, float] | None:
    """("department 'risk' (month)", remaining USD) of the caller's enclosing budget with the least left."""
    status = platform.budgets.status()
    applies = ((status["scope"] == "org")
               | ((status["scope"] == "department") & (status["name"] == context.get("department", "\x00")))
               | ((status["scope"] == "user") & (status["name"] == context.get("user_id", "\x00"))))
    rows = status[applies]
    if rows.empty:
        return None
    row = rows.loc[rows["remaining_usd"].idxmin()]
    label = "org" if row["scope"] == "org" else f"{row['scope']} {row['name']!r}"
    return f"{label} ({row['period']})", float(row["remaining_usd"])


# --- one run --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallResult:
    """One governed sub-call: the answer and its settled ``llm_calls`` facts."""

    text: str
    call_id: str
    route: str | None
    cost_usd: float
    prompt_tokens: int | None
    completion_tokens: int | None
    #: embeddings, for an embedding call
    vectors: tuple[tuple[float, ...], ...] = ()


class AppRun:
    """One application run: a tracked execution, governed sub-calls and their costs.

    Use as a context manager; :meth:`plan` first (estimate, refusal), then :meth:`chat` / :meth:`embed`."""

    def __init__(self, platform: "Platform | None", app: str, operation: str, context: Mapping[str, Any],
                 parameters: Mapping[str, Any] | None = None, *, max_cost: float | None = None) -> None:
        self.platform = resolve_platform(platform)
        self.app = app
        self.operation = operation
        self.context = split_context(context)
        self.parameters = dict(parameters or {})
        if max_cost is not None and (isinstance(max_cost, bool) or not isinstance(max_cost, (int, float))
                                     or not max_cost > 0):
            raise ConfigurationError(f"max_cost must be a positive number of USD, got {max_cost!r}")
        self.max_cost = float(max_cost) if max_cost is not None else None
        self.estimate: CostEstimate | None = None
        self.calls: list[CallResult] = []
        self._tracker: "Tracker | None" = None

    # --- cost before work ---------------------------------------------------------------------------

    def plan(self, planned: Sequence[PlannedCall], *, partial: bool = False) -> CostEstimate:
        """Estimate ``planned`` and refuse it up front when it cannot be afforded.

        With ``partial`` (batches) only the first planned call must fit: :meth:`allowance` then says how much
        of the batch may run."""
        est = estimate(self.platform, self.app, planned)
        self.estimate = est
        log.info("estimate: %s", est)
        limit = self.allowance()
        need = est.per_call_usd[0] if (partial and est.per_call_usd) else est.total_usd
        if limit is not None and need > limit[1] + 1e-12:
            what = "its first item alone" if partial else "it"
            raise CostLimitError(
                f"{est}; {what} may cost ${need:.6f}, more than {limit[0]} allows (${limit[1]:.6f}): raise "
                f"--max-cost or the budget (`tidyllm budget set`), pick a cheaper model, or give less input")
        return est

    def allowance(self) -> tuple[str, float] | None:
        """(what limits it, USD) the run may commit at worst: ``max_cost`` or the caller's tightest budget."""
        limits = []
        if self.max_cost is not None:
            limits.append((f"--max-cost ${self.max_cost:.6f}", self.max_cost))
        budget = tightest_budget(self.platform, self.context)
        if budget is not None:
            limits.append((f"the {budget[0]} budget", budget[1]))
        return min(limits, key=lambda x: x[1]) if limits else None

    # --- the tracked execution ----------------------------------------------------------------------

    @property
    def execution_id(self) -> str:
        """The tracked execution's id (the run must be open)."""
        if self._tracker is None:
            raise RuntimeError("the run is not open: use `with AppRun(...) as run:`")
        return self._tracker.execution_id

    def __enter__(self) -> "AppRun":
        ctx = {k: v for k, v in self.context.items() if k != "audit_reason"}
        self._tracker = self.platform.mart.track_execution(self.app, self.operation, {**ctx, **self.parameters})
        self._tracker.__enter__()
        if self.estimate is not None:
            self.step("estimate", {"calls": self.estimate.calls, "estimate_usd": self.estimate.total_usd,
                                   "routes": sorted(self.estimate.routes)})
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._tracker is not None
        self._tracker.__exit__(exc_type, exc, tb)

    def step(self, name: str, data: Mapping[str, Any]) -> None:
        """Record a step of the run."""
        assert self._tracker is not None
        self._tracker.record_step(name, data)

    def finish(self, result: Mapping[str, Any]) -> None:
        """Record the run's result (with its actual cost and the configuration it used)."""
        assert self._tracker is not None
        self._tracker.record_result({**result, "actual_usd": self.actual_usd,
                                     "estimate_usd": self.estimate.total_usd if self.estimate else None,
                                     "calls": len(self.calls), "parameters": self.parameters,
                                     "route": self.main_route()})

    @property
    def actual_usd(self) -> float:
        """Exact cost of the sub-calls so far (from ``llm_calls``)."""
        return float(sum(c.cost_usd for c in self.calls))

    def main_route(self) -> str | None:
        """The route that served most sub-calls."""
        routes = Counter(c.route for c in self.calls if c.route)
        return routes.most_common(1)[0][0] if routes else None

    # --- governed calls -----------------------------------------------------------------------------

    def _metadata(self, call_id: str) -> dict[str, Any]:
        # the call is made inside this run's tracked execution: the gate records it in llm_calls.execution_id
        return {**self.context, "tidyllm_call_id": call_id}

    def _settle(self, metadata: Mapping[str, Any], call_id: str, purpose: str, text: str,
                vectors: tuple[tuple[float, ...], ...] = ()) -> CallResult:
        # the attempt that answered: a Router retry is recorded as <call_id>#<n>
        row = self.platform.wait_for_call(call_id, last_attempt=True)
        call_id = str(row.get("id") or call_id)
        result = CallResult(text, call_id, row.get("route"), float(row.get("cost_usd") or 0.0),
                            row.get("prompt_tokens"), row.get("completion_tokens"), vectors)
        self.calls.append(result)
        self.step("llm_call", {"purpose": purpose, "call_id": call_id, "route": result.route,
                               "cost_usd": result.cost_usd, "prompt_tokens": result.prompt_tokens,
                               "completion_tokens": result.completion_tokens})
        return result

    def chat(self, model: str, messages: list[dict[str, str]], *, max_tokens: int, purpose: str,
             temperature: float | None = None) -> CallResult:
        """One governed chat completion through the platform's Router."""
        call_id = f"{self.app}-{uuid.uuid4()}"
        metadata = self._metadata(call_id)
        options: dict[str, Any] = {}
        if temperature is not None:
            options["temperature"] = temperature
        if "use_case" in self.context:  # the provider simulator scores quality per use case
            options["extra_body"] = {"metadata": {"use_case": self.context["use_case"]}}
        resp = self.platform.router().completion(model=model, messages=messages, max_tokens=max_tokens,
                                                 metadata=metadata, **options)
        text = resp.choices[0].message.content or ""
        return self._settle(metadata, call_id, purpose, text)

    def embed(self, model: str, inputs: list[str], *, purpose: str) -> CallResult:
        """One governed embedding call (a batch of ``inputs``)."""
        call_id = f"{self.app}-{uuid.uuid4()}"
        metadata = self._metadata(call_id)
        resp = self.platform.router().embedding(model=model, input=inputs, metadata=metadata)
        vectors = tuple(tuple(float(x) for x in item["embedding"]) for item in
                        sorted(resp.data, key=lambda d: d["index"]))
        return self._settle(metadata, call_id, purpose, "", vectors)


class Batch:
    """Runs items while their committed worst case fits the run's allowance; remembers why it stopped."""

    def __init__(self, run: AppRun, est: CostEstimate, unit: str, total: int) -> None:
        self.run, self.est, self.unit, self.total = run, est, unit, total
        limit = run.allowance()
        self.limit = limit
        self.committed = 0.0
        self.done = 0
        self.stopped: str | None = None

    def admit(self, worst_usd: float) -> bool:
        """Whether an item costing at most ``worst_usd`` still fits; records the stop when it does not."""
        if self.limit is not None and self.committed + worst_usd > self.limit[1] + 1e-12:
            self.stopped = (f"stopped after {self.done} of {self.total} {self.unit}s: the next one may cost "
                            f"${worst_usd:.6f} and {self.limit[0]} has ${self.limit[1] - self.committed:.6f} left "
                            f"uncommitted; raise it (or --max-cost) and run the rest")
            log.warning("%s: %s", self.run.app, self.stopped)
            return False
        self.committed += worst_usd
        return True

    def refused(self, exc: Exception) -> None:
        """Governance refused a call for budget: stop here with its message."""
        self.stopped = f"stopped after {self.done} of {self.total} {self.unit}s: {str(exc).splitlines()[0]}"
        log.warning("%s: %s", self.run.app, self.stopped)


# --- feedback -------------------------------------------------------------------------------------------


def feedback(execution_id: str, score: float, *, platform: "Platform | None" = None, **fields: Any) -> str:
    """Score an application run in [0, 1]: every sub-call's score reaches the router (``platform.feedback``),
    and the run's configuration (route, chunk size, ...) is learned for its application, so
    ``mart.get_optimal_config(app, context)`` can recommend what worked. Returns the outcome id."""
    platform = resolve_platform(platform)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
        raise ConfigurationError(f"a feedback score must be a number in [0, 1], got {score!r}")
    mart = platform.mart
    frame = mart.executions(id=execution_id)
    if frame.empty:
        raise ConfigurationError(f"no tracked execution {execution_id!r} in {mart.store.safe_url}; use the "
                                 "execution_id an application returned")
    row = frame.iloc[0]
    steps = mart.steps(execution_id=execution_id)
    call_ids = [d["call_id"] for d in _json_values(steps["data"]) if isinstance(d, Mapping) and d.get("call_id")]
    for call_id in call_ids:
        platform.feedback(call_id, float(score), source=f"{row['module']} feedback")
    context = _json_value(row["context"]) or {}
    result = _json_value(row["result"]) or {}
    parameters = dict(result.get("parameters") or {})
    if result.get("route"):  # the route that served most of the run's calls
        parameters["route"] = result["route"]
    learned_context = {k: context[k] for k in ("department", "use_case", "data_sensitivity") if k in context}
    return mart.learn_from_execution({"module": row["module"], "operation": row["operation"],
                                      "context": learned_context, "parameters": parameters,
                                      "performance_score": float(score), "execution_id": execution_id,
                                      "calls": len(call_ids), **fields})


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _json_values(values: Any) -> Iterator[Any]:
    for value in values:
        yield _json_value(value)

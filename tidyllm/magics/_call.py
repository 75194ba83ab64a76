"""The governed call behind ``%%llm``: which router serves a model name, the call, its settled receipt,
and one-line explanations of everything that can go wrong.

Every ``%%llm`` call goes through a governed ``litellm.Router`` — the platform's router over the MLflow
gateway for a model group or endpoint, or a governed one-deployment Router for any other LiteLLM
model name — so authorisation, budgets, audit and routing apply to it like to any other call.
(A plain sync ``litellm.completion`` cannot be stopped by governance; the magic never makes one.)
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from IPython.core.error import UsageError

from tidyllm.magics._render import Receipt

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.platform import Platform

__all__ = ["Target", "resolve_target", "adhoc_router", "complete", "name_call", "SettleWatch", "settled_row",
           "receipt_for", "gateway_down", "explain", "health_frame", "preference_frame"]


@dataclass(frozen=True)
class Target:
    """Where a ``%%llm`` call goes: a governed Router and the model name to ask it for."""

    router: Any
    model: str
    #: "gateway" (a model group or endpoint of the MLflow gateway) or "litellm" (any other model name)
    kind: str


def _catalogue(platform: "Platform") -> str:
    cfg = platform.gateway.config
    if cfg is None:
        return ("no gateway routes are configured (set gateway_config and gateway_uri in tidyllm.yaml, or "
                "%llm_config gateway_config=... gateway_uri=...)")
    groups = ", ".join(f"{g} ({', '.join(r.name for r in rs)})" for g, rs in cfg.groups().items())
    return f"the gateway serves model groups {groups}"


def resolve_target(platform: "Platform", model: str, route: str | None, *, model_given: bool,
                   adhoc: Callable[[str], Any]) -> Target:
    """The governed Router for ``-m MODEL`` / ``--route ENDPOINT``; ``UsageError`` for unknown names.

    ``adhoc(model)`` returns the governed one-deployment Router for a LiteLLM model name."""
    cfg = platform.gateway.config
    routes = {r.name: r for r in cfg.routes} if cfg is not None else {}
    if route is not None:
        if route not in routes:
            raise UsageError(f"unknown endpoint {route!r} for --route: {_catalogue(platform)}")
        if model_given and model not in (route, routes[route].group):
            raise UsageError(f"--route {route} is an endpoint of model group {routes[route].group!r}, "
                             f"not of {model!r}: drop -m or pick a matching route")
        name = route
    else:
        name = model
    members = [routes[name]] if name in routes else (cfg.groups().get(name, []) if cfg is not None else [])
    if members:
        if all("embeddings" in r.endpoint_type for r in members):
            raise UsageError(f"{name!r} serves embeddings; %%llm needs a chat model group ({_catalogue(platform)})")
        from tidyllm.errors import ConfigurationError

        try:
            router = platform.router()
        except ConfigurationError as exc:  # routes configured, but no gateway URI to reach them
            raise UsageError(str(exc)) from None
        return Target(router, name, "gateway")
    from tidyllm._litellm import import_litellm

    litellm = import_litellm()
    try:
        litellm.get_llm_provider(name)
    except Exception:  # noqa: BLE001 - LiteLLM raises BadRequestError for a name it cannot place
        raise UsageError(f"unknown model group {name!r}: {_catalogue(platform)}; any LiteLLM model name "
                         "(e.g. openai/gpt-4o-mini) also works") from None
    return Target(adhoc(name), name, "litellm")


def adhoc_router(platform: "Platform", model: str) -> Any:
    """A governed ``litellm.Router`` with the single deployment ``model`` (not a gateway route, so
    ``governance.gateway_only`` refuses it; priced from tidyllm's prices or LiteLLM's map)."""
    from tidyllm._litellm import import_litellm

    litellm = import_litellm()
    router = litellm.Router(model_list=[{"model_name": model, "litellm_params": {"model": model},
                                         "model_info": {"id": model}}], num_retries=0)
    return platform.govern(router, gateway_routes=set())


def complete(target: Target, *, messages: list[dict[str, str]], metadata: dict[str, Any], stream: bool,
             on_token: Callable[[str], None] | None, **params: Any) -> Any:
    """Make the call; stream through ``on_token`` when asked.

    Returns LiteLLM's response object (for a stream, the response rebuilt from its chunks)."""
    kwargs = {k: v for k, v in params.items() if v is not None}
    if not stream:
        return target.router.completion(model=target.model, messages=messages, metadata=metadata, **kwargs)
    from tidyllm.litellm_bridge.records import assembled, chunk_text

    chunks = []
    for chunk in target.router.completion(model=target.model, messages=messages, metadata=metadata, stream=True,
                                          stream_options={"include_usage": True}, **kwargs):
        chunks.append(chunk)
        delta = chunk_text(chunk)
        if delta and on_token is not None:
            on_token(delta)
    return assembled(chunks, messages)


def name_call(metadata: dict[str, Any]) -> str:
    """Name the cell's call (``tidyllm_call_id``, a fresh id): tidyllm never writes into the caller's
    metadata, so the magic chooses the id it will look its row up by."""
    import uuid

    call_id = metadata["tidyllm_call_id"] = str(uuid.uuid4())
    return call_id


class SettleWatch:
    """A governor listener that remembers which calls were recorded, so the magic can wait for its own.

    Sync success callbacks run on LiteLLM's logging threads a moment after the call returns; the
    governor calls its listeners once the call's settlement is committed."""

    def __init__(self, keep: int = 1000) -> None:
        self._done: dict[str, None] = {}
        self._keep = keep
        self._cond = threading.Condition()

    def __call__(self, record: Any, admission: Any) -> None:
        if admission is None:
            return
        with self._cond:
            self._done[admission.call_id] = None
            while len(self._done) > self._keep:  # the oldest ids first: dicts keep insertion order
                del self._done[next(iter(self._done))]
            self._cond.notify_all()

    def wait(self, call_id: str, timeout: float) -> str | None:
        """The id ``call_id``'s last attempt was recorded under (``call_id``, or ``call_id#n`` for the
        Router's n-th retry) once it is recorded within ``timeout`` seconds, else None."""
        def last() -> str | None:
            attempts = [c for c in self._done if c == call_id or c.startswith(call_id + "#")]
            return max(attempts, key=lambda c: int(c.rpartition("#")[2]) if "#" in c else 0) if attempts else None

        with self._cond:
            self._cond.wait_for(lambda: last() is not None, timeout)
            return last()


def settled_row(platform: "Platform", call_id: str, watch: SettleWatch, timeout: float) -> dict[str, Any]:
    """The call's ``llm_calls`` row once its settlement is written (or the pending row after ``timeout``)."""
    call_id = watch.wait(call_id, timeout) or call_id
    frame = platform.mart.frame("llm_calls", id=call_id)
    if frame.empty:
        raise UsageError(f"call {call_id} left no llm_calls row in {platform.mart.store.safe_url}")
    return frame.iloc[0].to_dict()


def receipt_for(platform: "Platform", call_id: str, context: Mapping[str, Any], requested_model: str,
                watch: SettleWatch, timeout: float) -> Receipt:
    """The receipt of a finished call, from the mart: its row and its tightest budget after settlement."""
    row = settled_row(platform, call_id, watch, timeout)
    call_id = row["id"]
    ctx = platform.governor.context(dict(context))
    budget = platform.budgets.tightest(ctx, row["route"], requested_model)

    def num(value: Any) -> Any:
        return None if value is None or value != value else value  # NaN / NA -> None

    tokens = [num(row["prompt_tokens"]), num(row["completion_tokens"])]
    return Receipt(
        call_id=call_id, requested_model=requested_model, route=row["route"], status=row["status"],
        prompt_tokens=int(tokens[0]) if tokens[0] is not None else None,
        completion_tokens=int(tokens[1]) if tokens[1] is not None else None,
        cost_usd=num(row["cost_usd"]), latency_ms=num(row["latency_ms"]),
        budget_scope=budget["scope"] if budget else None, budget_name=budget["name"] if budget else None,
        budget_period=budget["period"] if budget else None,
        remaining_usd=budget["remaining_usd"] if budget else None, limit_usd=budget["limit_usd"] if budget else None)


# --- errors ------------------------------------------------------------------------------------------------

def _one_line(message: str) -> str:
    # the Router appends "\n\nLiteLLM: model group 'x' failed with the error above..." to every error
    message = message.split("\n\nLiteLLM:", 1)[0]
    return re.sub(r"\s*\n\s*", " ", message).strip()


def gateway_down(platform: "Platform") -> str | None:
    """The one-line explanation when the platform's MLflow gateway does not answer, else None."""
    import httpx

    uri = platform.gateway.uri
    if uri is None:
        return None
    try:
        httpx.get(f"{uri}/health", timeout=2.0)
        return None
    except httpx.HTTPError:
        pass
    config = platform.settings.gateway_config or "gateway.yaml"
    mode = " --mode server" if platform.gateway.mode == "server" else ""
    return (f"the MLflow gateway at {uri} is unreachable: start it with `tidyllm gateway start --config {config}"
            f"{mode}` (or `tidyllm.stack.LocalStack().start()` in a notebook) and re-run the cell")


def explain(exc: BaseException, platform: "Platform", target: Target) -> str | None:
    """One line for an error a notebook user can act on; None for a bug (which keeps its traceback).

    A provider error or a group whose endpoints are all unhealthy is blamed on the gateway when the
    call went to the gateway and the gateway does not answer."""
    import openai

    from tidyllm.errors import BudgetExceededError, RouteNotAuthorizedError, TidyLLMError

    down = (lambda: gateway_down(platform)) if target.kind == "gateway" else (lambda: None)
    if isinstance(exc, TidyLLMError):
        message = _one_line(str(exc))
        if isinstance(exc, RouteNotAuthorizedError) and exc.rule == "no-healthy-route":
            return down() or message
        if isinstance(exc, BudgetExceededError):
            return f"over budget: {message}"
        return message
    if isinstance(exc, openai.APIError):
        return down() or f"{type(exc).__name__}: {_one_line(str(exc))}"
    return None


# --- routes ------------------------------------------------------------------------------------------------

def health_frame(platform: "Platform") -> "pd.DataFrame":
    """One row per configured endpoint: group, circuit state, calls, failures, error rate, p50 latency, prices."""
    import pandas as pd

    cfg = platform.gateway.config
    health = platform.routes.status().set_index("route")
    rows = []
    for route in (cfg.routes if cfg is not None else ()):
        price = platform.prices.lookup(route.name)
        h = health.loc[route.name].to_dict() if route.name in health.index else {}
        rows.append({"endpoint": route.name, "group": route.group, "state": platform.routes.state(route.name),
                     "calls": int(h.get("calls", 0)), "failures": int(h.get("failures", 0)),
                     "error_rate": float(h.get("error_rate", 0.0)),
                     "latency_ms_p50": float(h.get("latency_ms_p50", float("nan"))),
                     "input_per_1m": price.input_per_1m if price else None,
                     "output_per_1m": price.output_per_1m if price else None})
    columns = ["endpoint", "group", "state", "calls", "failures", "error_rate", "latency_ms_p50", "input_per_1m",
               "output_per_1m"]
    return pd.DataFrame(rows, columns=columns)


def preference_frame(platform: "Platform", contexts: list[dict[str, Any]]) -> "pd.DataFrame":
    """The router's preferred endpoint per context and chat model group (``get_optimal_config("gateway", ...)``)."""
    import pandas as pd

    cfg = platform.gateway.config
    groups = [g for g, rs in (cfg.groups().items() if cfg is not None else ())
              if not all("embeddings" in r.endpoint_type for r in rs)]
    platform.chooser()  # the learning router registers itself as the "gateway" optimizer when it is built
    rows = []
    for context in contexts:
        for group in groups:
            answer = platform.mart.get_optimal_config("gateway", {**context, "model_group": group})
            params = answer.get("parameters") or {}
            rows.append({"department": context.get("department"), "use_case": context.get("use_case"),
                         "model_group": group,
                         "preferred_route": params.get("preferred_route") or params.get("route"),
                         "confidence": answer.get("confidence"), "samples": answer.get("samples"),
                         "source": answer.get("source")})
    return pd.DataFrame(rows, columns=["department", "use_case", "model_group", "preferred_route", "confidence",
                                       "samples", "source"])

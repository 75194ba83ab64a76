"""The LiteLLM Router strategy: govern, then route among authorised, healthy, affordable endpoints.

Registered with ``router.register_plugin(strategy)``. For every attempt (LiteLLM asks again on
retries and fallbacks) it:

1. validates the caller context (``metadata``);
2. takes the group's deployments that are not cooling down in LiteLLM and whose circuit is
   closed (or half-open and due a probe), drops those the caller is not authorised to use, and
   those whose cheapest possible answer does not fit the tightest budget;
3. asks the chooser (the learning bandit, or the cheapest-first rule) for one, with its propensity;
4. reserves the worst case through the :class:`~tidyllm.governance.engine.Governor` and clamps
   ``max_tokens`` to the headroom; stamps the admission into ``metadata["tidyllm"]``;
5. returns the deployment.

A refusal raises ``BudgetExceededError`` / ``RouteNotAuthorizedError`` (LiteLLM does not retry
those) after the governor audited it: the provider is never contacted.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from tidyllm.errors import MetadataError, RoutingError
from tidyllm.governance.context import STAMP_KEY

if TYPE_CHECKING:
    from tidyllm.gateway.health import RouteHealth
    from tidyllm.governance.context import CallContext
    from tidyllm.governance.engine import Governor

__all__ = ["Decision", "Chooser", "CheapestChooser", "build_strategy", "route_of", "TRIED_KEY", "CALL_ID_KEY"]

log = logging.getLogger("tidyllm.routing")
#: metadata key listing the routes already tried by this request (retries avoid them)
TRIED_KEY = "tidyllm_tried"
#: metadata key a caller may set to choose the call id of its request
CALL_ID_KEY = "tidyllm_call_id"


@dataclass(frozen=True)
class Decision:
    """A chooser's pick."""

    route: str
    propensity: float
    policy: str
    explored: bool = False
    model_version: int = 0
    scores: Mapping[str, float] = field(default_factory=dict)


class Chooser(Protocol):
    """Picks one route of ``candidates`` for a call context."""

    name: str

    def choose(self, context: Mapping[str, Any], group: str, candidates: Sequence[str],
               prices: Mapping[str, float | None]) -> Decision: ...


class CheapestChooser:
    """The simple documented rule: the cheapest candidate (input + output price per 1M tokens),
    ties broken by name; unpriced routes last."""

    name = "cheapest"

    def choose(self, context: Mapping[str, Any], group: str, candidates: Sequence[str],
               prices: Mapping[str, float | None]) -> Decision:
        ranked = sorted(candidates, key=lambda r: (prices.get(r) is None, prices.get(r) or 0.0, r))
        return Decision(ranked[0], 1.0, self.name)


def route_of(deployment: Mapping[str, Any]) -> str:
    """The tidyllm route (gateway endpoint) a deployment serves."""
    info = deployment.get("model_info") or {}
    return str(info.get("tidyllm_route") or info.get("id") or deployment.get("model_name"))


def build_strategy(router: Any, governor: "Governor", health: "RouteHealth", chooser: Chooser,
                   gateway_routes: set[str] | None = None) -> Any:
    """The strategy object to register with ``router.register_plugin``.

    ``gateway_routes`` names the routes that are MLflow gateway endpoints; ``None`` decides per
    deployment from its ``model`` and ``api_base``. Building it also makes the router's
    ``completion`` / ``acompletion`` return governed streams for ``stream=True``
    (:func:`tidyllm.governance.streams.guard_router_streams`): LiteLLM reports nothing when a
    caller abandons a stream, so the stream object itself must settle it."""
    from litellm.router import CustomRoutingStrategyBase

    from tidyllm.governance.streams import guard_router_streams

    guard_router_streams(router, governor)

    class GovernedRoutingStrategy(CustomRoutingStrategyBase):
        """tidyllm's governed, health-aware routing (see :mod:`tidyllm.routing.strategy`)."""

        def __init__(self) -> None:
            self.router = router
            self.governor = governor
            self.health = health
            self.chooser = chooser
            self.gateway_routes = gateway_routes
            #: model group -> (registry version, deployments, ids); see _group
            self._groups: dict[str, tuple[Any, list[Any], list[str]]] = {}

        # LiteLLM calls these two -------------------------------------------------------------
        def get_available_deployment(self, model: str, messages: Any = None, input: Any = None,
                                     specific_deployment: Any = False, request_kwargs: Any = None) -> Any:
            group, ids = self._group(model)
            cooling = {m for m, *_ in self.router.health().cooldowns.get_active_cooldowns(ids, None)}
            healthy = [d for d in group if d["model_info"]["id"] not in cooling]
            return self._decide(model, healthy, messages, input, request_kwargs if request_kwargs is not None else {})

        async def async_get_available_deployment(self, model: str, messages: Any = None, input: Any = None,
                                                 specific_deployment: Any = False, request_kwargs: Any = None) -> Any:
            request_kwargs = request_kwargs if request_kwargs is not None else {}
            healthy = await self.router.select(model, request_kwargs, kind="healthy", messages=messages)
            healthy = [healthy] if isinstance(healthy, Mapping) else list(healthy or [])
            # the decision writes to the mart: keep that blocking work off the event loop
            return await asyncio.to_thread(self._decide, model, healthy, messages, input, request_kwargs)

        def _group(self, model: str) -> tuple[list[Any], list[str]]:
            """The deployments of ``model`` and their ids, kept while the router's registry ``version``
            (LiteLLM's documented marker: it changes whenever the deployments change) stays the same —
            reading them back from LiteLLM's Rust core costs 0.1–0.2 ms per call."""
            registry = self.router.registry()
            version = registry.version
            cached = self._groups.get(model)
            if cached is not None and cached[0] == version:
                return cached[1], cached[2]
            group = list(registry.deployments(model) or [])
            ids = [d["model_info"]["id"] for d in group]
            if len(self._groups) > 1024:
                self._groups.clear()
            self._groups[model] = (version, group, ids)
            return group, ids

        # the decision ---------------------------------------------------------------------------
        def _decide(self, model: str, healthy: list[Mapping[str, Any]], messages: Any, input: Any,
                    request_kwargs: dict[str, Any]) -> Any:
            md = request_kwargs.setdefault("metadata", {})
            if not isinstance(md, dict):
                md = request_kwargs["metadata"] = dict(md or {})
            previous = md.pop(STAMP_KEY, None)
            tried = list(md.get(TRIED_KEY) or [])
            if isinstance(previous, Mapping) and previous.get("route"):
                tried.append(previous["route"])
                md[TRIED_KEY] = tried
            is_embedding = input is not None and messages is None
            call_type = "embedding" if is_embedding else "completion"
            gov = self.governor
            try:
                ctx = gov.context(md)
            except MetadataError as err:
                gov.refuse_metadata(err, metadata=md, route=model, requested_model=model, call_type=call_type,
                                    messages=messages if messages is not None else input)
            by_route = {route_of(d): d for d in healthy}
            open_ = [r for r in by_route if not self.health.allow(r)]
            candidates = [r for r in by_route if r not in open_]
            if not candidates:
                self._no_route(ctx, model, call_type, messages, input, open_ or list(by_route))
            # a caller may name the call (metadata["tidyllm_call_id"]) to find its rows; retries get suffixes
            wanted = md.get(CALL_ID_KEY)
            call_id = (str(wanted) if not tried else f"{wanted}#{len(tried)}") if wanted else None
            refusals = {r: gov.check_authorized(ctx, r) for r in candidates}
            allowed = [r for r in candidates if refusals[r] is None]
            if not allowed:
                # raises RouteNotAuthorizedError, audited
                gov.admit(ctx=ctx, route=candidates[0], requested_model=model, call_type=call_type,
                          messages=messages, text=input, call_id=call_id)
            # a retry avoids the authorised routes that already failed for this request, when it has a choice
            allowed = [r for r in allowed if r not in tried] or allowed
            from tidyllm.governance.engine import estimate_prompt_tokens

            tools = request_kwargs.get("tools")
            prompt_tokens = estimate_prompt_tokens(model, messages=messages, text=input, tools=tools)
            now_prices = {r: gov.prices.lookup(r) for r in allowed}
            totals = {r: (p.input_per_1m + p.output_per_1m) if p else None for r, p in now_prices.items()}
            affordable = self._affordable(ctx, model, allowed, now_prices, prompt_tokens, is_embedding)
            pool = affordable or sorted(allowed, key=lambda r: (totals[r] is None, totals[r] or 0.0))[:1]
            decision = self.chooser.choose(ctx.as_dict() | {"model_group": model}, model, pool, totals)
            if decision.route not in pool:
                raise RoutingError(f"the {self.chooser.name} chooser picked {decision.route!r}, not a candidate")
            stream = bool(request_kwargs.get("stream"))
            deployment = by_route[decision.route]
            params = deployment.get("litellm_params") or {}
            gateway = self._is_gateway(decision.route, params)
            lookup = gov.trace_lookup if gateway else None
            traced = lookup is not None
            admission = gov.admit(
                ctx=ctx, route=decision.route, requested_model=model, call_type=call_type, messages=messages,
                text=input, tools=tools, max_tokens=request_kwargs.get("max_tokens"), prompt_tokens=prompt_tokens,
                stream=stream, call_id=call_id,
                mock=bool(params.get("mock_response") or request_kwargs.get("mock_response")), gateway=gateway,
                extra={"decision": {"policy": decision.policy, "propensity": decision.propensity,
                                    "explored": decision.explored, "model_version": decision.model_version,
                                    "candidates": list(pool), "group": model,
                                    "features": ctx.as_dict() | {"model_group": model}},
                       **({"traced": True} if traced else {})})
            md[STAMP_KEY] = admission.stamp()
            if not is_embedding:
                request_kwargs["max_tokens"] = admission.max_tokens
            if traced or request_kwargs.get("extra_headers"):
                # per-call extra_headers replace the deployment's in LiteLLM 1.110 (measured): keep the
                # deployment's (the gateway credential) and add the trace tag (tidyllm.gateway.traces)
                request_kwargs["extra_headers"] = {
                    **(request_kwargs.get("extra_headers") or {}), **(params.get("extra_headers") or {}),
                    **(lookup.headers(admission.call_id) if lookup is not None else {})}
            self.health.picked(decision.route)
            return dict(deployment)  # a copy: the kept deployments are read by every call

        def _is_gateway(self, route: str, params: Mapping[str, Any]) -> bool:
            """Whether the deployment is a configured MLflow gateway endpoint (``governance.gateway_only``)."""
            if self.gateway_routes is not None:
                return route in self.gateway_routes
            return self.governor.is_gateway_endpoint(str(params.get("model") or ""), params.get("api_base"))

        def _affordable(self, ctx: "CallContext", model: str, allowed: list[str], prices: Mapping[str, Any],
                        prompt_tokens: int, is_embedding: bool) -> list[str]:
            """The routes whose cheapest possible answer fits the tightest applicable budget.

            A pre-filter: it uses the headroom this process's last reservations saw (under a
            second old) unless some route's cost comes within half of it, then it reads the
            budgets; the reservation itself is always exact."""
            from tidyllm.governance.budgets import MIN_CLAMPED_TOKENS

            out_tokens = 0 if is_embedding else MIN_CLAMPED_TOKENS
            least = {r: (prompt_tokens * prices[r].input_per_1m + out_tokens * prices[r].output_per_1m) / 1e6
                     for r in allowed if prices[r] is not None}
            budgets = self.governor.budgets
            headroom = budgets.headroom(ctx, None, model, max_age=1.0)
            if headroom is None:
                return allowed
            if any(cost > headroom / 2 for cost in least.values()):
                headroom = budgets.headroom(ctx, None, model)
                if headroom is None:
                    return allowed
            return [r for r in allowed if r not in least or least[r] <= headroom]

        def _no_route(self, ctx: "CallContext", model: str, call_type: str, messages: Any, input: Any,
                      routes: list[str]) -> None:
            from tidyllm.errors import RouteNotAuthorizedError

            if routes:
                why = f"every endpoint of {model!r} is unhealthy (circuit open: {', '.join(sorted(routes))}); retry later"
            else:
                why = f"model group {model!r} has no endpoint available"
            err = RouteNotAuthorizedError(why, rule="no-healthy-route")
            from tidyllm.mart.store import utcnow

            self.governor._refuse(error=err, call_id=str(uuid.uuid4()), ctx=ctx, route=model, requested_model=model,
                                  call_type=call_type, messages=messages if messages is not None else input,
                                  tools=None, stream=False, now=utcnow())

    return GovernedRoutingStrategy()

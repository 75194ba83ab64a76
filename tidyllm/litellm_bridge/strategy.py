"""The LiteLLM Router strategy: govern, then route among authorised, healthy, affordable endpoints.

Registered with ``router.register_plugin(strategy)``. For every attempt (LiteLLM asks again on
retries and fallbacks) it reads the request into :class:`~tidyllm.governance.gate.RequestFacts`
(on a copy of the caller's metadata: tidyllm never writes into a caller's objects), takes the
group's deployments that are not cooling down in LiteLLM, and hands both to the one admission
:class:`~tidyllm.governance.gate.Gate` (health ∩ authorised ∩ affordable, the chooser, the
reservation, the seal). It then puts the seal's token, the clamped ``max_tokens`` and the trace tag
into LiteLLM's own request dict and returns the chosen deployment.

A refusal raises ``BudgetExceededError`` / ``RouteNotAuthorizedError`` (LiteLLM does not retry
those) after the gate audited it: the provider is never contacted.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Mapping

from litellm.router import CustomRoutingStrategyBase

from tidyllm.governance.context import STAMP_KEY
from tidyllm.governance.gate import TRIED_KEY, Candidate, Gate, RequestFacts
from tidyllm.litellm_bridge.streams import guard_router_streams
from tidyllm.routing.strategy import route_of

if TYPE_CHECKING:
    from tidyllm.gateway.health import RouteHealth
    from tidyllm.routing.strategy import Chooser

__all__ = ["GovernedRoutingStrategy", "build_strategy", "request_facts"]

#: request parameters besides max_tokens, n and best_of that change what a provider can bill
_BILLABLE = ("max_completion_tokens", "functions", "reasoning_effort", "thinking")


def request_facts(gate: Gate, group: str, messages: Any, input: Any, request_kwargs: Mapping[str, Any], *,
                  entry: str, call_type: str | None = None) -> tuple[RequestFacts, dict[str, Any]]:
    """The facts of a request, and the (stripped) copy of its metadata the bridge will send on."""
    clean, forged, tried = gate.strip(request_kwargs.get("metadata"))
    is_embedding = input is not None and messages is None
    max_tokens = request_kwargs.get("max_tokens")
    billable = {k: request_kwargs[k] for k in _BILLABLE if request_kwargs.get(k) is not None}
    facts = RequestFacts(
        group=group, call_type=call_type or ("embedding" if is_embedding else "completion"), metadata=clean,
        messages=messages, text=input, tools=request_kwargs.get("tools"), max_tokens=max_tokens,
        n=request_kwargs.get("n"), best_of=request_kwargs.get("best_of"), stream=bool(request_kwargs.get("stream")),
        mock=bool(request_kwargs.get("mock_response")), forged=forged, tried=tried, entry=entry, billable=billable)
    return facts, clean


class GovernedRoutingStrategy(CustomRoutingStrategyBase):
    """tidyllm's governed, health-aware routing (see :mod:`tidyllm.litellm_bridge.strategy`)."""

    def __init__(self, router: Any, gate: Gate, health: "RouteHealth", chooser: "Chooser",
                 gateway_routes: set[str] | None = None) -> None:
        self.router = router
        self.gate = gate
        self.governor = gate.governor
        self.health = health
        self.chooser = chooser
        self.gateway_routes = gateway_routes
        #: model group -> (registry version, deployments, ids); see _group
        self._groups: dict[str, tuple[Any, list[Any], list[str]]] = {}

    # LiteLLM calls these two -------------------------------------------------------------------
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

    # the decision -------------------------------------------------------------------------------
    def _decide(self, model: str, healthy: list[Mapping[str, Any]], messages: Any, input: Any,
                request_kwargs: dict[str, Any]) -> Any:
        facts, md = request_facts(self.gate, model, messages, input, request_kwargs, entry="router")
        by_route = {route_of(d): d for d in healthy}
        lookup = self.governor.trace_lookup
        candidates = []
        for route, deployment in by_route.items():
            params = deployment.get("litellm_params") or {}
            gateway = self._is_gateway(route, params)
            candidates.append(Candidate(route, gateway, bool(params.get("mock_response")),
                                        traced=gateway and lookup is not None))
        sealed = self.gate.admit(facts, candidates, chooser=self.chooser, health=self.health)
        deployment = by_route[sealed.route]
        params = deployment.get("litellm_params") or {}
        traced = bool(sealed.admission.extra.get("traced"))
        # LiteLLM's own request dict gets tidyllm's copy of the metadata (the caller's dict is untouched)
        md[STAMP_KEY] = sealed.token
        md[TRIED_KEY] = [*facts.tried, sealed.route]
        request_kwargs["metadata"] = md
        if not facts.embedding:
            # the reserved bound is sent: nothing else bounds the answer (or a reasoning model's thinking)
            request_kwargs["max_tokens"] = sealed.admission.max_tokens
        if traced or request_kwargs.get("extra_headers"):
            # per-call extra_headers replace the deployment's in LiteLLM 1.110 (measured): keep the
            # deployment's (the gateway credential) and add the trace tag (tidyllm.gateway.traces)
            request_kwargs["extra_headers"] = {
                **(request_kwargs.get("extra_headers") or {}), **(params.get("extra_headers") or {}),
                **(lookup.headers(sealed.admission.call_id) if traced and lookup is not None else {})}
        return dict(deployment)  # a copy: the kept deployments are read by every call

    def _is_gateway(self, route: str, params: Mapping[str, Any]) -> bool:
        """Whether the deployment is a configured MLflow gateway endpoint (``governance.gateway_only``)."""
        if self.gateway_routes is not None:
            return route in self.gateway_routes
        return self.governor.is_gateway_endpoint(str(params.get("model") or ""), params.get("api_base"))


def build_strategy(router: Any, gate: Gate, health: "RouteHealth", chooser: "Chooser",
                   gateway_routes: set[str] | None = None) -> GovernedRoutingStrategy:
    """The strategy object to register with ``router.register_plugin``.

    ``gateway_routes`` names the routes that are MLflow gateway endpoints; ``None`` decides per
    deployment from its ``model`` and ``api_base``. Building it also makes the router's
    ``completion`` / ``acompletion`` return governed streams for ``stream=True``
    (:func:`tidyllm.litellm_bridge.streams.guard_router_streams`): LiteLLM reports nothing when a
    caller abandons a stream, so the stream object itself must settle it."""
    guard_router_streams(router, gate.governor)
    return GovernedRoutingStrategy(router, gate, health, chooser, gateway_routes)

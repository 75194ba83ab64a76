"""The one admission gate: every entry point admits a call here, and only here.

The sequence, the same for the Router strategy, the async pre-call hook, the ``tidyllm/`` provider
and the sync instrumentation (all in :mod:`tidyllm.litellm_bridge`, which turns LiteLLM's request
objects into :class:`RequestFacts`):

1. **facts** — what the caller asked for, with every ``tidyllm`` key it wrote stripped
   (:func:`strip_metadata`; a stripped value is a forgery attempt, audited with the call);
2. **context** — who asks, for which department and why (:meth:`Governor.context`);
3. **candidates** — healthy (circuit breaker) ∩ authorised ∩ affordable routes;
4. **choice** — the chooser (the learning bandit, or the cheapest rule) picks one, with its propensity;
5. **admission** — the worst case is reserved (:meth:`Governor.admit`), or the call is refused and audited;
6. **seal** — the admission is kept in this process (:class:`~tidyllm.governance.seal.Seals`) under a
   fresh token; only the token travels with the request, in the bridge's own copy of it.

What an embedding is, what the worst case is and what a call costs are decided once each:
:attr:`RequestFacts.embedding`, :meth:`Governor.worst_case`, :meth:`tidyllm.pricing.Price.cost`.
This module imports no LiteLLM.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tidyllm.errors import MetadataError, RoutingError
from tidyllm.governance.context import STAMP_KEY
from tidyllm.governance.seal import Seals

if TYPE_CHECKING:
    from tidyllm.gateway.health import RouteHealth
    from tidyllm.governance.context import CallContext
    from tidyllm.governance.engine import Admission, Governor
    from tidyllm.routing.strategy import Chooser

__all__ = ["Gate", "RequestFacts", "Candidate", "Sealed", "strip_metadata", "CALLER_KEYS", "TRIED_KEY",
           "CALL_ID_KEY"]

log = logging.getLogger("tidyllm.governance")

#: metadata key a caller may set to name its call (must be unique: a reused one is refused)
CALL_ID_KEY = "tidyllm_call_id"
#: metadata key (in the bridge's own copy of a request) listing the routes already tried by it
TRIED_KEY = "tidyllm_tried"
#: ``tidyllm*`` metadata keys a caller may write; every other one is tidyllm's own and is stripped
CALLER_KEYS = frozenset({CALL_ID_KEY, "tidyllm_token"})


def strip_metadata(metadata: Any, seals: Seals[Any]) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    """A copy of a request's metadata that tidyllm may govern with: ``(clean, forged, tried)``.

    ``clean`` has no tidyllm-owned key. A ``tidyllm`` stamp that this process issued for the same
    request (LiteLLM asking the strategy again on a retry) keeps the list of routes already tried;
    anything else under a tidyllm-owned key — a stamp copied from another call, a dict that looks
    like an admission, a token this process never issued — is a forgery: it is dropped and its key
    named in ``forged``, for the audit row. The caller's object is never changed."""
    if not isinstance(metadata, Mapping):
        return {}, (), ()
    clean: dict[str, Any] = {}
    forged: list[str] = []
    stamp = metadata.get(STAMP_KEY)
    # LiteLLM asking again on a retry hands back tidyllm's own copy: its token and the routes it tried
    retry = stamp is not None and seals.issued(stamp) and isinstance(metadata.get(TRIED_KEY), (list, tuple))
    tried: tuple[str, ...] = ()
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.lower().startswith("tidyllm") or key in CALLER_KEYS:
            clean[key] = value
        elif key == TRIED_KEY and retry and isinstance(value, (list, tuple)):
            tried = tuple(str(v) for v in value)
        elif key == STAMP_KEY and retry:
            continue
        else:
            forged.append(key)
    return clean, tuple(forged), tried


@dataclass(frozen=True)
class RequestFacts:
    """What a caller asked for, as the bridge read it from LiteLLM's request objects."""

    #: the model or model group asked for
    group: str
    #: completion, embedding, text_completion ...
    call_type: str
    #: the caller's metadata, a copy with tidyllm-owned keys stripped (see :func:`strip_metadata`)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    messages: Any = None
    #: an embedding's input, or a text completion's prompt
    text: Any = None
    tools: Any = None
    max_tokens: int | None = None
    #: choices asked for (``n``), and ``best_of`` (candidates generated and billed)
    n: int | None = None
    best_of: int | None = None
    stream: bool = False
    mock: bool = False
    #: tidyllm-owned metadata keys the caller wrote (dropped, audited as a forgery)
    forged: tuple[str, ...] = ()
    #: routes this request already tried (a retry avoids them when it has a choice)
    tried: tuple[str, ...] = ()
    #: which entry point admitted it: router, acompletion-hook, sync
    entry: str = "router"
    #: other request fields that change the bill: max_completion_tokens, functions, reasoning_effort, thinking
    billable: Mapping[str, Any] = field(default_factory=dict)

    @property
    def embedding(self) -> bool:
        """Whether the call is an embedding (priced on input only; no ``max_tokens``)."""
        return "embed" in self.call_type

    @property
    def content(self) -> Any:
        """The request's content, for the audit row of a refusal."""
        return self.messages if self.messages is not None else self.text

    @property
    def choices(self) -> int:
        """How many answers the provider generates and bills: ``max(n, best_of)``, at least 1."""
        return max(int(self.n or 1), int(self.best_of or 1), 1)


@dataclass(frozen=True)
class Candidate:
    """A route the request may go to."""

    route: str
    #: whether it is a configured MLflow gateway endpoint (``governance.gateway_only``)
    gateway: bool
    #: whether the deployment answers with LiteLLM's mock response
    mock: bool = False
    #: whether the route's gateway traces calls (tracking server): the call row waits for its trace
    traced: bool = False


@dataclass(frozen=True)
class Sealed:
    """An admitted call: the admission (kept in this process) and the token that stands for it."""

    admission: "Admission"
    token: str

    @property
    def route(self) -> str:
        return self.admission.route


class Gate:
    """The admission sequence (see the module docstring), shared by every entry point."""

    def __init__(self, governor: "Governor") -> None:
        self.governor = governor
        self.seals: Seals[Admission] = governor.seals

    def strip(self, metadata: Any) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
        """:func:`strip_metadata` with this process's seals."""
        return strip_metadata(metadata, self.seals)

    def admit(self, facts: RequestFacts, candidates: Sequence[Candidate], *, chooser: "Chooser | None" = None,
              health: "RouteHealth | None" = None) -> Sealed:
        """Admit ``facts`` to one of ``candidates`` (the chooser picks when it is given, else the first),
        or raise the audited refusal."""
        gov = self.governor
        if facts.forged:
            log.warning("a request to %r carried tidyllm-owned metadata (%s): dropped, governed normally, audited",
                        facts.group, ", ".join(facts.forged))
        try:
            ctx = gov.context(facts.metadata)
        except MetadataError as err:
            gov.refuse_metadata(err, metadata=facts.metadata, route=facts.group, requested_model=facts.group,
                                call_type=facts.call_type, messages=facts.content, forged=facts.forged)
            raise
        wanted = facts.metadata.get(CALL_ID_KEY)
        call_id = (str(wanted) if not facts.tried else f"{wanted}#{len(facts.tried)}") if wanted else None
        by_route = {c.route: c for c in candidates}
        pool = list(by_route)
        if health is not None:
            closed = [r for r in pool if health.allow(r)]
            if not closed:
                self._no_route(ctx, facts, pool)
            pool = closed
        if not pool:
            self._no_route(ctx, facts, [])
        allowed = [r for r in pool if gov.check_authorized(ctx, r) is None]
        if not allowed:
            # raises RouteNotAuthorizedError, audited
            gov.admit(ctx=ctx, route=pool[0], requested_model=facts.group, call_type=facts.call_type,
                      messages=facts.messages, text=facts.text, call_id=call_id, forged=facts.forged)
        # a retry avoids the authorised routes that already failed for this request, when it has a choice
        allowed = [r for r in allowed if r not in facts.tried] or allowed
        # the prompt's worst case for the affordability pre-filter; the chosen route's is reserved below
        prompt_tokens = gov.estimate_prompt(facts.group, messages=facts.messages, text=facts.text, tools=facts.tools)
        extra: dict[str, Any] = {}
        if chooser is not None:
            prices = {r: gov.prices.lookup(r) for r in allowed}
            totals = {r: (p.input_per_1m + p.output_per_1m) if p else None for r, p in prices.items()}
            affordable = self._affordable(ctx, facts, allowed, prices, prompt_tokens)
            offered = affordable or sorted(allowed, key=lambda r: (totals[r] is None, totals[r] or 0.0))[:1]
            features = ctx.as_dict() | {"model_group": facts.group}
            decision = chooser.choose(features, facts.group, offered, totals)
            if decision.route not in offered:
                raise RoutingError(f"the {chooser.name} chooser picked {decision.route!r}, not a candidate")
            route = decision.route
            extra["decision"] = {"policy": decision.policy, "propensity": decision.propensity,
                                 "explored": decision.explored, "model_version": decision.model_version,
                                 "candidates": list(offered), "group": facts.group, "features": features}
        else:
            route = allowed[0]
        chosen = by_route[route]
        if chosen.traced:
            extra["traced"] = True
        worst = gov.worst_case(route, messages=facts.messages, text=facts.text, tools=facts.tools,
                               max_tokens=facts.max_tokens, n=facts.n, best_of=facts.best_of,
                               embedding=facts.embedding, **facts.billable)
        extra["estimate"] = {"counted": worst.counted, "fixed": worst.fixed_tokens}
        admission = gov.admit(
            ctx=ctx, route=route, requested_model=facts.group, call_type=facts.call_type, messages=facts.messages,
            text=facts.text, tools=facts.tools, max_tokens=worst.max_tokens or None, choices=worst.choices,
            prompt_tokens=worst.prompt_tokens, stream=facts.stream, mock=chosen.mock or facts.mock,
            gateway=chosen.gateway, call_id=call_id, extra=extra, forged=facts.forged)
        if health is not None:
            health.picked(route)
        return Sealed(admission, self.seals.seal(admission))

    def _affordable(self, ctx: "CallContext", facts: RequestFacts, allowed: list[str], prices: Mapping[str, Any],
                    prompt_tokens: int) -> list[str]:
        """The routes whose cheapest possible answer fits the tightest applicable budget.

        A pre-filter: it uses the headroom this process's last reservations saw (under a
        second old) unless some route's cost comes within half of it, then it reads the
        budgets; the reservation itself is always exact."""
        from tidyllm.governance.budgets import MIN_CLAMPED_TOKENS

        out_tokens = 0 if facts.embedding else MIN_CLAMPED_TOKENS
        least = {r: prices[r].cost(prompt_tokens, out_tokens) for r in allowed if prices[r] is not None}
        budgets = self.governor.budgets
        headroom = budgets.headroom(ctx, None, facts.group, max_age=1.0)
        if headroom is None:
            return allowed
        if any(cost > headroom / 2 for cost in least.values()):
            headroom = budgets.headroom(ctx, None, facts.group)
            if headroom is None:
                return allowed
        return [r for r in allowed if r not in least or least[r] <= headroom]

    def _no_route(self, ctx: "CallContext", facts: RequestFacts, routes: list[str]) -> None:
        from tidyllm.errors import RouteNotAuthorizedError

        if routes:
            why = (f"every endpoint of {facts.group!r} is unhealthy (circuit open: {', '.join(sorted(routes))}); "
                   "retry later")
        else:
            why = f"model group {facts.group!r} has no endpoint available"
        self.governor.refuse(RouteNotAuthorizedError(why, rule="no-healthy-route"), ctx=ctx, route=facts.group,
                             requested_model=facts.group, call_type=facts.call_type, messages=facts.content,
                             call_id=str(uuid.uuid4()), forged=facts.forged)

"""The governor: admit a call (authorise, rate-limit, price, reserve) and finish it (settle, record, audit).

The admission :class:`~tidyllm.governance.gate.Gate` calls :meth:`Governor.admit` before the provider is
contacted and seals the returned :class:`Admission` (:mod:`tidyllm.governance.seal`); the success and
failure callbacks hand the finished call to :meth:`Governor.dispatch`, which claims the seal — a call
settles exactly once. Whoever refuses writes the audit row of the refusal (callbacks ignore governance
refusals), so every attempt has exactly one. A settlement write that fails is kept in the process's
journal (:mod:`tidyllm.governance.spool`) and replayed, never dropped. This module imports no LiteLLM:
token counts come from the counter it is given (:mod:`tidyllm.litellm_bridge.tokens`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from tidyllm.errors import ConfigurationError, GovernanceError, MetadataError, UnpricedModelError
from tidyllm.governance.context import STAMP_KEY, CallContext
from tidyllm.governance.estimate import WorstCase, WorstCaseEstimator
from tidyllm.governance.policy import RouteFacts
from tidyllm.governance.seal import Seals
from tidyllm.mart.schema import llm_calls
from tidyllm.mart.store import utcnow
from tidyllm.redact import redact

if TYPE_CHECKING:
    from tidyllm.governance.audit import AuditTrail
    from tidyllm.gateway.traces import TraceLookup, TraceRef
    from tidyllm.governance.budgets import BudgetLedger, Lease, Reservation
    from tidyllm.governance.identity import IdentityResolver
    from tidyllm.governance.policy import AuthorizationPolicy
    from tidyllm.governance.spool import Spool
    from tidyllm.litellm_bridge.streams import StreamTally
    from tidyllm.mart.fastsql import Tx
    from tidyllm.governance.ratelimit import RateLimiter
    from tidyllm.mart import TidyMart
    from tidyllm.pricing import Price, PriceBook
    from tidyllm.records import CallRecord
    from tidyllm.settings import GovernanceSettings

__all__ = ["Governor", "Admission", "TokenCounter"]

log = logging.getLogger("tidyllm.governance")

#: LiteLLM's mock responses always report 20 completion tokens, whatever max_tokens says
MOCK_COMPLETION_TOKENS = 20


@dataclass(frozen=True)
class Admission:
    """An admitted call: what was reserved, at which price, with which (possibly clamped) max_tokens."""

    call_id: str
    route: str
    requested_model: str
    call_type: str
    context: dict[str, Any]
    started_at: str
    max_tokens: int
    clamped: bool
    reservation_id: str | None = None
    reserved_usd: float = 0.0
    price_id: str | None = None
    input_per_1m: float | None = None
    output_per_1m: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the admission-credit block the call was admitted from (see tidyllm.governance.credit)
    credit_id: str | None = None
    #: input tokens the reservation assumed (the estimate learns from what the provider reports)
    prompt_tokens: int | None = None
    #: the tracked execution the call was made in (``llm_calls.execution_id``)
    execution_id: str | None = None
    #: where the caller's identity came from (``llm_calls.identity_source``)
    identity_source: str | None = None

    def stamp(self) -> dict[str, Any]:
        """The dict stamped into ``metadata["tidyllm"]`` (plain JSON-able values)."""
        return {**self.__dict__, "context": dict(self.context), "extra": dict(self.extra)}


class TokenCounter(Protocol):
    """How the governor counts tokens (LiteLLM's tokenizers, through :mod:`tidyllm.litellm_bridge.tokens`)."""

    def count(self, model: str, messages: Any = None, text: Any = None, tools: Any = None) -> int: ...


class Governor:
    """Admission and settlement of governed calls."""

    def __init__(self, mart: "TidyMart", *, settings: "GovernanceSettings", defaults: Mapping[str, str],
                 prices: "PriceBook", budgets: "BudgetLedger", policy: "AuthorizationPolicy",
                 audit: "AuditTrail", limiter: "RateLimiter", routes: Mapping[str, RouteFacts] | None = None,
                 gateway_api_bases: tuple[str, ...] = (), tokens: TokenCounter | None = None,
                 spool: "Spool | None" = None, identity: "IdentityResolver | None" = None) -> None:
        from tidyllm.governance.identity import IdentityResolver

        self.mart = mart
        self.settings = settings
        self.defaults = dict(defaults)
        self.prices = prices
        self.budgets = budgets
        self.policy = policy
        self.audit = audit
        self.limiter = limiter
        self.routes: dict[str, RouteFacts] = dict(routes or {})
        self.gateway_api_bases = tuple(b.rstrip("/") for b in gateway_api_bases)
        self._listeners: list[Callable[["CallRecord", Admission | None], None]] = []
        # call id -> set once the call's listeners (router credit, health) have run; see Platform.wait_for_call
        self.listeners_done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        #: open governed streams of this process, by call id (see tidyllm.litellm_bridge.streams)
        self._streams: dict[str, "StreamTally"] = {}
        #: finds the MLflow trace of a call on a tracking-server gateway (set with the server's Router)
        self.trace_lookup: "TraceLookup | None" = None
        #: this process's live admissions, by the token the gate sealed each with
        self.seals: Seals[Admission] = Seals(max_age=max(3600.0, 4 * settings.lease_ttl_seconds))
        self._tokens = tokens
        #: the settlement journal: failed writes are kept there and replayed (tidyllm.governance.spool)
        self.spool = spool
        #: the worst case of a request, with the per-route factor learned from what providers report
        self.estimator = WorstCaseEstimator(self._count_text, margin=settings.estimate_margin,
                                            default_max_tokens=settings.default_max_tokens)
        #: caller-chosen call ids seen by this process (a reused one is refused: calls never merge)
        self._names: "OrderedDict[str, None]" = OrderedDict()
        #: who is calling: identity sources, tokens, required context (tidyllm.governance.identity)
        self.identity = identity or IdentityResolver.from_settings(settings, defaults, budgets.has_department_budgets)

    @property
    def tokens(self) -> TokenCounter:
        """The token counter the governor was given."""
        if self._tokens is None:
            raise ConfigurationError("this Governor has no token counter: pass tokens=... (the platform passes "
                                     "LiteLLM's, tidyllm.litellm_bridge.tokens.LiteLLMTokens)")
        return self._tokens

    def worst_case(self, route: str, *, messages: Any = None, text: Any = None, tools: Any = None,
                   max_tokens: int | None = None, n: int | None = None, best_of: int | None = None,
                   embedding: bool = False, **billable: Any) -> WorstCase:
        """The most a request to ``route`` can be billed for, in tokens (:mod:`tidyllm.governance.estimate`:
        every billable part, the route's learned factor and the tokenizer margin)."""
        return self.estimator.estimate(route, messages=messages, text=text, tools=tools, max_tokens=max_tokens, n=n,
                                       best_of=best_of, embedding=embedding, **billable)

    def estimate_prompt(self, route: str, *, messages: Any = None, text: Any = None, tools: Any = None) -> int:
        """The input tokens a call's reservation assumes (:meth:`worst_case`'s ``prompt_tokens``)."""
        return self.worst_case(route, messages=messages, text=text, tools=tools,
                               embedding=messages is None and text is not None).prompt_tokens

    def _count_text(self, route: str, text: str) -> int:
        return self.tokens.count(route, text=text)

    # --- context ------------------------------------------------------------------------------

    def context(self, metadata: Any) -> CallContext:
        """The caller's resolved, validated and normalised context (:meth:`IdentityResolver.resolve`)."""
        return self.identity.resolve(metadata)

    def route_facts(self, route: str) -> RouteFacts:
        """Tags and sensitivity classes of a configured route (bare facts for anything else)."""
        return self.routes.get(route) or RouteFacts(route)

    def is_gateway_endpoint(self, model: str, api_base: str | None) -> bool:
        """Whether a LiteLLM deployment (``model``, ``api_base``) is a configured MLflow gateway endpoint."""
        if not model.startswith("openai/") or not api_base:
            return False
        return api_base.rstrip("/") in self.gateway_api_bases and model.split("/", 1)[1] in self.routes

    def add_listener(self, fn: Callable[["CallRecord", Admission | None], None]) -> None:
        """Call ``fn(record, admission)`` after each governed call is finished and recorded."""
        if fn not in self._listeners:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[["CallRecord", Admission | None], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # --- admission ----------------------------------------------------------------------------

    def check_authorized(self, ctx: CallContext, route: str) -> tuple[str, str] | None:
        """None, or ``(rule, explanation)`` why ``ctx`` may not use ``route``."""
        return self.policy.check(ctx, self.route_facts(route))

    def admit(self, *, ctx: CallContext, route: str, requested_model: str, call_type: str = "completion",
              messages: Any = None, text: Any = None, tools: Any = None, max_tokens: int | None = None,
              stream: bool = False, mock: bool = False, gateway: bool = True, call_id: str | None = None,
              extra: Mapping[str, Any] | None = None, prompt_tokens: int | None = None, choices: int = 1,
              forged: tuple[str, ...] = ()) -> Admission:
        """Authorise, rate-limit, price and reserve; raise a governance error (after auditing it) when refused.

        ``route`` is the endpoint/deployment that will serve the call; ``gateway`` says whether it
        resolves to a configured gateway endpoint (``governance.gateway_only``); ``prompt_tokens`` is
        the caller's own upper estimate, when it already made one; ``choices`` answers are generated
        and billed (``n``, ``best_of``); ``forged`` names tidyllm-owned metadata keys the caller wrote
        (dropped by the gate, recorded in the audit row). ``call_id`` is a caller-chosen id: it must be
        unused, else the call is refused (a reused id never merges two calls)."""
        from tidyllm.errors import RouteNotAuthorizedError

        named = call_id is not None
        call_id = call_id or str(uuid.uuid4())
        now = utcnow()
        is_embedding = "embed" in call_type
        extra = {**(extra or {}), **({"forged": list(forged)} if forged else {})}
        execution_id = current_execution()
        if execution_id:
            extra["execution_id"] = execution_id
        base = dict(call_id=call_id, ctx=ctx, route=route, requested_model=requested_model, call_type=call_type,
                    messages=messages if messages is not None else text, tools=tools, stream=stream, now=now,
                    forged=forged)

        if self.settings.gateway_only and not gateway and not (mock and self.settings.allow_mock):
            err = RouteNotAuthorizedError(
                f"governance.gateway_only is on: model {requested_model!r} does not resolve to a configured "
                "MLflow gateway endpoint; call a gateway route or model group instead", rule="gateway_only")
            self.refuse(err, **base)
        why = self.check_authorized(ctx, route)
        if why is not None:
            self.refuse(RouteNotAuthorizedError(f"not authorised: {why[1]}", rule=why[0]), **base)

        price = self.prices.lookup(route, now) or (self.prices.lookup(requested_model, now)
                                                   if requested_model != route else None)
        if prompt_tokens is None:
            worst = self.worst_case(route, messages=messages, text=text, tools=tools, embedding=is_embedding)
            prompt_tokens = worst.prompt_tokens
            extra["estimate"] = {"counted": worst.counted, "fixed": worst.fixed_tokens}
        choices = max(int(choices or 1), 1)
        out_tokens = 0 if is_embedding else int(max_tokens or self.settings.default_max_tokens)
        if mock and not is_embedding:
            out_tokens = max(out_tokens, MOCK_COMPLETION_TOKENS)
        #: answer tokens (per choice) the reservation pays for (a completion reserves at least one)
        reserve_tokens = out_tokens if is_embedding else max(out_tokens, 1)
        if price is not None and price.id is None:
            # a LiteLLM price used for the first time becomes a stored price version
            price = self._store_litellm_price(price)
        facts = _Facts(prompt_tokens=prompt_tokens, choices=choices, execution_id=execution_id, extra=extra)
        block_usd = 0.0
        credit = self.budgets.credit
        if named:
            self._claim_name(call_id, base)
        if price is not None and credit.enabled and not stream and not self.limiter.limits \
                and not extra.get("traced"):
            # a busy caller's call: admitted from this process's credit when it has some (no database
            # write before the provider is called), else maybe reserved with a new block of it
            worst = price.cost(prompt_tokens, reserve_tokens * choices)
            credit_key = (ctx.department, ctx.user_id, route, requested_model)
            day = self.budgets.day_start(now)
            block_id, block_usd = credit.take(credit_key, day, worst, call_id)
            if block_id is not None:
                admission = _credit_admission(block_id, call_id=call_id, route=route, requested_model=requested_model,
                                              call_type=call_type, ctx=ctx, now=now, max_tokens=reserve_tokens,
                                              worst=worst, price=price, facts=facts)
                self._journal_credit_call(admission)
                self.listeners_done[call_id] = threading.Event()
                return admission
        if credit.enabled:
            credit.give_back_retired()
        try:
            if price is not None and self.mart.store.dialect == "postgresql" and not self.limiter.limits \
                    and not self.budgets.expiry_due() and not block_usd:
                admission = self._admit_in_one_statement(
                    ctx=ctx, route=route, requested_model=requested_model, call_type=call_type, price=price,
                    out_tokens=out_tokens, reserve_tokens=reserve_tokens, stream=stream, call_id=call_id, now=now,
                    facts=facts)
                if admission is not None:
                    self.listeners_done[call_id] = threading.Event()
                    return admission
            try:
                admission, reservation = self._admit_in_transaction(
                    ctx=ctx, route=route, requested_model=requested_model, call_type=call_type, price=price,
                    out_tokens=out_tokens, reserve_tokens=reserve_tokens, stream=stream, call_id=call_id, now=now,
                    facts=facts, block_usd=block_usd, base=base)
            except BaseException:
                if block_usd:
                    credit.not_granted(credit_key)
                raise
        except Exception as exc:
            if named and _duplicate_key(exc):
                self.refuse(MetadataError(
                    f"tidyllm_call_id {call_id!r} is already used by another call: call ids must be unique "
                    "(leave it out and tidyllm names the call)", rule="metadata:duplicate-call-id"),
                    **{**base, "call_id": str(uuid.uuid4())})
            raise
        if block_usd:
            if reservation is not None and reservation.credit:
                credit.granted(credit_key, day, reservation.id, reservation.amount_usd, reservation.windows, call_id,
                               worst)
                self._journal_credit_call(admission)
            else:
                credit.not_granted(credit_key)
        if admission.clamped:
            log.info("call %s: max_tokens clamped to %d to fit the budget", call_id, admission.max_tokens)
        self.listeners_done[call_id] = threading.Event()
        return admission

    def _claim_name(self, call_id: str, base: dict[str, Any]) -> None:
        """A caller-chosen call id this process has seen before is refused before the provider is called
        (the database refuses one another process used: a pending row's key, or — for a call admitted
        from credit — the call is written under a derived id and flagged; two calls never merge)."""
        with self._lock:
            seen = call_id in self._names
            if not seen:
                self._names[call_id] = None
                if len(self._names) > 65_536:
                    self._names.popitem(last=False)
        if seen:
            self.refuse(MetadataError(
                f"tidyllm_call_id {call_id!r} is already used by another call: call ids must be unique "
                "(leave it out and tidyllm names the call)", rule="metadata:duplicate-call-id"),
                **{**base, "call_id": str(uuid.uuid4())})

    def _journal_credit_call(self, admission: Admission) -> None:
        """Write a credit call ahead to the journal: should this process die while the call is at the
        provider, whoever reclaims the block charges it (:meth:`BudgetLedger.reclaim`)."""
        if self.spool is not None:
            self.spool.admitted(admission.call_id, admission.credit_id or "", admission.reserved_usd,
                                _call_row_of(admission))

    def _admit_in_transaction(self, *, ctx: CallContext, route: str, requested_model: str, call_type: str,
                              price: "Price | None", out_tokens: int, reserve_tokens: int, stream: bool,
                              call_id: str, now: dt.datetime, facts: "_Facts", block_usd: float,
                              base: dict[str, Any]) -> "tuple[Admission, Reservation | None]":
        """The general admission: rate limit, price, reserve (or a credit block) and the pending call row in
        one write transaction; a refusal's records commit with it and its error is raised after it.
        Returns the admission and its reservation (None when no budget applies)."""
        from tidyllm.errors import BudgetExceededError, RateLimitedError

        from tidyllm.governance.budgets import Refusal, Reservation

        refusal: tuple[GovernanceError, str | None] | None = None
        with self.mart.store.tx() as tx:
            self.budgets.maybe_expire_leases(tx, now)
            prompt_tokens = facts.prompt_tokens
            limited = self.limiter.check_and_record(tx, ctx, route, prompt_tokens + out_tokens * facts.choices, now)
            reservation = None
            if limited is not None:
                refusal = (RateLimitedError(limited[0], retry_after=limited[1]), None)
            elif price is None:
                policy = self.settings.unpriced_by_department.get(ctx.department or "", self.settings.unpriced)
                if policy == "refuse" and self.budgets.count_enclosing(tx, ctx, route, requested_model):
                    refusal = (UnpricedModelError(
                        f"{route!r} has no price and {ctx.department or 'this call'} is under a budget; add "
                        f"one (prices: in tidyllm.yaml or platform.prices.set({route!r}, input_per_1m, "
                        "output_per_1m)) or set governance.unpriced: allow"), None)
            else:
                # every choice may run to max_tokens: the clamp applies per choice
                reservation = self.budgets.reserve(
                    tx, call_id=call_id, ctx=ctx, route=route, model=requested_model,
                    prompt_cost_usd=price.cost(prompt_tokens, 0),
                    output_cost_per_token=price.cost(0, facts.choices), max_tokens=reserve_tokens,
                    now=now, block_usd=block_usd)
                if isinstance(reservation, Refusal):
                    err = BudgetExceededError(reservation.message(), scope=reservation.scope,
                                              name=reservation.name, spent_usd=reservation.spent_usd,
                                              reserved_usd=reservation.reserved_usd, limit_usd=reservation.limit_usd)
                    err.rule = f"budget:{reservation.scope}:{reservation.name}:{reservation.period}"
                    refusal = (err, reservation.budget_id)
            if refusal is not None:
                # the refusal's records commit with this transaction; the error is raised after it
                self._write_refusal(tx, error=refusal[0], budget_id=refusal[1], **base)
            elif reservation is not None and reservation.credit:
                # the first call of a new credit block: like the calls after it, its row is written
                # when it finishes
                assert price is not None
                admission = _credit_admission(
                    reservation.id, call_id=call_id, route=route, requested_model=requested_model,
                    call_type=call_type, ctx=ctx, now=now, max_tokens=reservation.max_tokens,
                    worst=price.cost(prompt_tokens, reserve_tokens * facts.choices), price=price, facts=facts)
            else:
                admission = Admission(
                    call_id=call_id, route=route, requested_model=requested_model, call_type=call_type,
                    context=ctx.as_dict(), started_at=now.isoformat(),
                    max_tokens=reservation.max_tokens if reservation else out_tokens,
                    clamped=bool(reservation and reservation.clamped),
                    reservation_id=reservation.id if reservation else None,
                    reserved_usd=reservation.amount_usd if reservation else 0.0,
                    price_id=price.id if price else None,
                    input_per_1m=price.input_per_1m if price else None,
                    output_per_1m=price.output_per_1m if price else None,
                    extra=dict(facts.extra), prompt_tokens=prompt_tokens, execution_id=facts.execution_id,
                    identity_source=_identity_source(ctx))
                tx.run("llm_calls.insert", _q_insert_call,
                       id=call_id, started_at=now, call_type=call_type, user_id=ctx.user_id,
                       department=ctx.department, use_case=ctx.use_case, data_sensitivity=ctx.data_sensitivity,
                       requested_model=requested_model, route=route, status="pending", stream=bool(stream),
                       reserved_usd=admission.reserved_usd, price_id=admission.price_id,
                       execution_id=facts.execution_id, identity_source=_identity_source(ctx),
                       reserved_prompt_tokens=prompt_tokens)
        if refusal is not None:
            raise refusal[0]
        return admission, reservation if isinstance(reservation, Reservation) else None

    def _admit_in_one_statement(self, *, ctx: CallContext, route: str, requested_model: str, call_type: str,
                                price: "Price", out_tokens: int, reserve_tokens: int, stream: bool, call_id: str,
                                now: dt.datetime, facts: "_Facts") -> Admission | None:
        """The common case on PostgreSQL — priced, no rate limit, the whole worst case fits — in one
        round trip (:meth:`BudgetLedger.reserve_in_one_statement`); None when the general path must decide."""
        prompt_tokens = facts.prompt_tokens
        worst = price.cost(prompt_tokens, reserve_tokens * facts.choices)
        reservation_id = self.budgets.reserve_in_one_statement(
            call_id=call_id, ctx=ctx, route=route, model=requested_model, worst=worst, now=now,
            call_row={"call_type": call_type, "user_id": ctx.user_id, "use_case": ctx.use_case,
                      "data_sensitivity": ctx.data_sensitivity, "requested_model": requested_model,
                      "stream": bool(stream), "price_id": price.id, "execution_id": facts.execution_id,
                      "identity_source": _identity_source(ctx), "reserved_prompt_tokens": prompt_tokens})
        if reservation_id is None:
            return None
        return Admission(
            call_id=call_id, route=route, requested_model=requested_model, call_type=call_type,
            context=ctx.as_dict(), started_at=now.isoformat(),
            max_tokens=reserve_tokens if reservation_id else out_tokens, clamped=False,
            reservation_id=reservation_id or None, reserved_usd=worst if reservation_id else 0.0,
            price_id=price.id, input_per_1m=price.input_per_1m, output_per_1m=price.output_per_1m,
            extra=dict(facts.extra), prompt_tokens=prompt_tokens, execution_id=facts.execution_id,
            identity_source=_identity_source(ctx))

    def _store_litellm_price(self, price: "Price") -> "Price":
        """Store a LiteLLM price as a price version (once) and return it with its id."""
        import sqlalchemy as sa

        from tidyllm.mart.schema import prices

        with self.mart.store.begin(write=True) as conn:
            self.mart.store.lock_for_update(conn)
            row = conn.execute(sa.select(prices.c.id).where(prices.c.model == price.model,
                                                            prices.c.effective_from == price.effective_from)).first()
            price_id = row[0] if row else str(uuid.uuid4())
            if row is None:
                conn.execute(prices.insert().values(id=price_id, model=price.model, input_per_1m=price.input_per_1m,
                                                    output_per_1m=price.output_per_1m,
                                                    effective_from=price.effective_from, source="litellm",
                                                    created_at=utcnow()))
        self.prices.refresh()
        return replace(price, id=price_id)

    def refuse(self, error: GovernanceError, *, call_id: str, ctx: CallContext, route: str, requested_model: str,
               call_type: str, messages: Any, tools: Any = None, stream: bool = False, now: dt.datetime | None = None,
               forged: tuple[str, ...] = ()) -> None:
        """Record a refusal (its call row and audit row) in its own transaction and raise ``error``."""
        with self.mart.store.tx() as tx:
            self._write_refusal(tx, error=error, call_id=call_id, ctx=ctx, route=route,
                                requested_model=requested_model, call_type=call_type, messages=messages, tools=tools,
                                stream=stream, now=now or utcnow(), forged=forged)
        raise error

    def _write_refusal(self, tx: "Tx", *, error: GovernanceError, call_id: str, ctx: CallContext, route: str,
                       requested_model: str, call_type: str, messages: Any, tools: Any, stream: bool,
                       now: dt.datetime, budget_id: str | None = None, forged: tuple[str, ...] = ()) -> None:
        """The llm_calls row, the audit row and (for budgets) the event of a refused call."""
        tx.run("llm_calls.insert", _q_insert_call,
               id=call_id, started_at=now, ended_at=now, call_type=call_type, user_id=ctx.user_id,
               department=ctx.department, use_case=ctx.use_case, data_sensitivity=ctx.data_sensitivity,
               requested_model=requested_model, route=route, status="refused", stream=bool(stream),
               error_type=type(error).__name__, error_message=redact(str(error)), execution_id=current_execution(),
               identity_source=_identity_source(ctx))
        self.audit.append(tx, {
            "call_id": call_id, "recorded_at": now, "user_id": ctx.user_id, "department": ctx.department,
            "audit_reason": ctx.audit_reason, "use_case": ctx.use_case,
            "data_sensitivity": ctx.data_sensitivity, "requested_model": requested_model, "route": route,
            "decision": "refused", "rule": getattr(error, "rule", "governance"), "status": "refused",
            "error": f"{type(error).__name__}: {error}", **self.content_fields(messages, tools),
            "extra": {k: v for k, v in (("forged", list(forged) if forged else None),
                                        ("identity_source", _identity_source(ctx))) if v}})
        if budget_id is not None:
            self.budgets.record_event(tx, now, budget_id, "refused",
                                      {"call_id": call_id, "department": ctx.department, "user_id": ctx.user_id})

    def refuse_metadata(self, error: GovernanceError, *, metadata: Any, route: str, requested_model: str,
                        call_type: str, messages: Any, call_id: str | None = None,
                        forged: tuple[str, ...] = ()) -> None:
        """Audit a call refused for malformed metadata (best-effort context) and raise ``error``."""
        from tidyllm.governance.names import normalize_name

        md = metadata if isinstance(metadata, Mapping) else {}
        ctx = CallContext(**{k: (md.get(k) if isinstance(md.get(k), str) else None)
                             for k in ("audit_reason", "use_case")},
                          **{k: (normalize_name(md[k]) or None) if isinstance(md.get(k), str) else None
                             for k in ("user_id", "department")}, identity_source="declared")
        self.refuse(error, call_id=call_id or str(uuid.uuid4()), ctx=ctx, route=route,
                    requested_model=requested_model, call_type=call_type, messages=messages, forged=forged)

    # --- settlement ---------------------------------------------------------------------------

    def cost_of(self, admission: Admission | None, record: "CallRecord") -> float | None:
        """Exact cost at the admitted price version; LiteLLM's figure when tidyllm had no price.

        A failed call costs nothing, except a stream that broke midway: what it delivered is charged."""
        if not record.ok and not record.partial:
            return 0.0
        if admission is not None and admission.input_per_1m is not None:
            return ((record.prompt_tokens or 0) * admission.input_per_1m
                    + (record.completion_tokens or 0) * (admission.output_per_1m or 0.0)) / 1e6
        if not record.ok:
            return 0.0
        return record.litellm_cost if record.litellm_cost else None

    def content_fields(self, messages: Any, tools: Any,
                       tool_calls: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
        """Audit content columns: the capture policy's content, and tool names offered and called.

        Tool-call arguments are kept (in ``extra``) only under ``audit.capture: full``."""
        fields = self.audit.content_fields(messages, tools)
        offered = list(fields.get("tools") or [])
        called = [name for name, _ in tool_calls]
        fields["tools"] = {"offered": offered, "called": called} if offered or called else None
        return fields

    def track_stream(self, tally: "StreamTally") -> None:
        """Remember an open governed stream until it is settled."""
        with self._lock:
            self._streams[tally.call_id] = tally

    def settle_stream(self, tally: "StreamTally", outcome: str, error: BaseException | None = None) -> None:
        """Settle a governed stream for what it delivered: ``outcome`` is "abandoned", "failed", or
        "completed" (a completed stream whose LiteLLM success event never came).

        Tokens come from the usage chunk when the caller received it, else they are counted from
        the delivered text (and the request, for the prompt). A caller that stopped after the
        final chunk (finish reason seen) got the whole answer: that is "completed"."""
        from tidyllm.records import CallRecord

        admission = self.seals.claim(tally.token)
        if admission is None:
            return  # LiteLLM's event settled it first
        route = admission.route
        if tally.usage is not None:
            prompt, completion = tally.usage
        else:
            prompt = self.tokens.count(route, messages=tally.messages, tools=tally.tools) if tally.messages else 0
            produced = "".join(tally.text) + "".join(tally.tool_text)
            completion = self.tokens.count(route, text=produced) if produced else 0
        if outcome == "abandoned" and tally.finish_reason:
            outcome = "completed"
        failed = outcome == "failed"
        started = dt.datetime.fromisoformat(admission.started_at)
        ended = utcnow()
        record = CallRecord(
            ok=not failed, litellm_call_id=None, call_type=admission.call_type, stamp=tally.token, metadata={},
            model=route, model_id=None, model_group=None, provider=None, api_base=None, provider_model=None,
            stream=True, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=None,
            reasoning_tokens=None, litellm_cost=None, latency_ms=(ended - started).total_seconds() * 1000.0,
            started_at=started, ended_at=ended,
            error_type=type(error).__name__ if failed and error is not None else None,
            error_message=str(error) if failed and error is not None else None,
            exception=error if failed else None, messages=tally.messages, tools=tally.tools, mock=False,
            tool_calls=tuple((name, "") for name in tally.tool_names), partial=failed and completion > 0)
        self._finish(record, admission, outcome)

    def dispatch(self, record: "CallRecord") -> None:
        """A finished call attempt from LiteLLM's success/failure callbacks.

        A call the gate admitted carries its seal token: the first event claims the admission and
        settles the call; a second event for it (LiteLLM delivered it twice, or a governed stream
        settled itself) finds the token claimed and writes nothing. A token this process never
        issued reached a provider without admission: it is recorded as unenforced and audited as a
        forgery. Calls without a token are recorded as unenforced (a path tidyllm cannot stop)."""
        token = record.stamp
        if token is not None:
            admission = self.seals.peek(token)
            if admission is not None:
                tally = self._streams.get(admission.call_id)
                if record.stream and not record.ok and tally is not None and (tally.text or tally.tool_text):
                    # a governed stream broke after delivering content: the error reaches the caller through
                    # the GovernedStream, which settles the call for exactly what the caller received
                    return
                admission = self.seals.claim(token)
                if admission is not None:
                    self._finish(record, admission, None)
                return
            if self.seals.claimed(token) or self.seals.foreign(token):
                return
            if record.provider != "tidyllm":
                log.error("LLM call %s reached a provider carrying a tidyllm admission that tidyllm never issued "
                          "(forged or copied); recorded as unenforced", record.litellm_call_id)
                self.record_unenforced(record, forged=True)
            return
        if record.provider == "tidyllm":
            return  # an outer tidyllm/ call: its inner Router call was admitted (or refused and audited)
        if isinstance(record.exception, GovernanceError):
            return  # refused and audited by whoever refused it
        self.record_unenforced(record)

    def _finish(self, record: "CallRecord", admission: Admission, outcome: str | None) -> None:
        """Settle (or release) an admitted call's reservation and write its call row and audit row, atomically."""
        if record.exception is not None and isinstance(record.exception, GovernanceError):
            return  # the refuser already audited it
        cost = self.cost_of(admission, record)
        if record.stream:
            outcome = outcome or ("completed" if record.ok else "failed")
        estimate = admission.extra.get("estimate")
        if record.ok and record.prompt_tokens and isinstance(estimate, Mapping):
            # the route's factor never stays below what its provider reported (tidyllm.governance.estimate)
            self.estimator.observe(admission.route, int(estimate["counted"]), int(record.prompt_tokens),
                                   fixed_tokens=int(estimate["fixed"]))
        lookup = self.trace_lookup
        # a request the gateway turned away at its door (401/403) has no trace
        if lookup is not None and admission.extra.get("traced") \
                and record.error_type not in ("AuthenticationError", "PermissionDeniedError"):
            # The money settles now; the call row and its audit row are written once the gateway has
            # exported the call's trace (seconds later), on the lookup's thread, in one transaction.
            with self.mart.store.tx() as tx:
                self._settle_reservation(tx, admission, record, cost)
            first = lookup.submit(admission.call_id, admission.route,
                                  lambda trace: self._record(record, admission, outcome, cost, trace))
            self._forget_stream(admission.call_id)
            if first:
                self._notify(record, admission)
            return
        if self._record(record, admission, outcome, cost, None, settle=True):
            self._notify(record, admission)

    def _settle_reservation(self, tx: "Tx", admission: Admission, record: "CallRecord", cost: float | None) -> None:
        if admission.reservation_id:
            if _charged(record, cost):
                self.budgets.settle(tx, admission.reservation_id, cost or 0.0, utcnow())
            else:
                self.budgets.release(tx, admission.reservation_id, utcnow())

    def _record(self, record: "CallRecord", admission: Admission, outcome: str | None, cost: float | None,
                trace: "TraceRef | None", *, settle: bool = False) -> bool:
        """Write the finished call's row and audit row (and settle, when ``settle``) in one transaction.

        False when the call was already finished (LiteLLM delivered the event twice, or a stream
        settled itself). When the write fails (database locked, disk full, server restarting) the
        write is kept in the journal and replayed (:mod:`tidyllm.governance.spool`): the call counts
        as recorded."""
        now = utcnow()
        ctx = admission.context
        status = "success" if record.ok else "failure"
        called = [name for name, _ in record.tool_calls]
        overshoot = (cost or 0.0) - admission.reserved_usd if _charged(record, cost) and admission.input_per_1m \
            is not None else 0.0
        extra = {"price_id": admission.price_id, "outcome": outcome, "reserved_usd": admission.reserved_usd,
                 "litellm_call_id": record.litellm_call_id,
                 "trace_experiment_id": trace.experiment_id if trace else None,
                 "tool_calls": [{"name": n, "arguments": a} for n, a in record.tool_calls]
                 if called and self.audit.capture == "full" else None,
                 "forged": admission.extra.get("forged"), "execution_id": admission.execution_id,
                 "identity_source": admission.identity_source,
                 "overshoot_usd": overshoot if overshoot > 1e-12 else None}
        if overshoot > 1e-12:
            log.warning("call %s cost $%.6f, more than the $%.6f reserved for its worst case: the overshoot is "
                        "charged, and the route's estimate learns from it", admission.call_id, cost,
                        admission.reserved_usd)
        audit_row = {
            "call_id": admission.call_id, "recorded_at": now, "user_id": ctx.get("user_id"),
            "department": ctx.get("department"), "audit_reason": ctx.get("audit_reason"),
            "use_case": ctx.get("use_case"), "data_sensitivity": ctx.get("data_sensitivity"),
            "requested_model": admission.requested_model, "route": admission.route, "decision": "allowed",
            "rule": "clamped" if admission.clamped else None, "status": status,
            "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "cost_usd": cost, "latency_ms": record.latency_ms,
            "error": redact(f"{record.error_type}: {record.error_message}") if not record.ok else None,
            "trace_id": trace.trace_id if trace else None,
            "extra": {k: v for k, v in extra.items() if v is not None},
            **self.content_fields(record.messages, record.tools, record.tool_calls)}
        finish = dict(call_id=admission.call_id, ended=now, new_status=status, provider_model_=record.provider_model,
                      prompt_tokens_=record.prompt_tokens, completion_tokens_=record.completion_tokens,
                      cached_tokens_=record.cached_tokens, reasoning_tokens_=record.reasoning_tokens,
                      cost=cost, latency=record.latency_ms, error_type_=record.error_type,
                      error_message_=redact(record.error_message)[:4000] if record.error_message else None,
                      outcome_=outcome, stream_=bool(record.stream))
        if admission.credit_id is not None:
            done = self._record_credit_call(record, admission, outcome, cost, finish, audit_row)
            self._forget_stream(admission.call_id)
            return done
        op = {"kind": "finish", "admission": admission.stamp(), "finish": finish, "audit_row": audit_row,
              "settle": settle, "charged": _charged(record, cost), "cost": cost}
        done = self._write_or_keep(op)
        self._forget_stream(admission.call_id)
        return done

    def _write_or_keep(self, op: dict[str, Any]) -> bool:
        """Apply a settlement write; when the database refuses it, keep it in the journal (replayed with
        retries, and by the next process on this host should this one die) instead of dropping it."""
        try:
            return self.apply(op)
        except Exception as exc:  # noqa: BLE001 - the call was answered: its record must not be lost
            if self.spool is None:
                raise
            self.spool.keep(op)
            log.error("could not write the settlement of call %s (%s: %s); kept in the journal %s and retried",
                      op.get("admission", {}).get("call_id"), type(exc).__name__, redact(str(exc))[:200],
                      self.spool.path)
            self.spool.retry_soon(self.apply)
            return True

    def apply(self, op: Mapping[str, Any]) -> bool:
        """Write one settlement (``op`` as :meth:`_record` builds it, or as the journal kept it).
        Idempotent: a call already written is not written again. Returns whether it wrote."""
        if op["kind"] == "credit":
            return self._apply_credit(op)
        finish = op["finish"]
        admission = op["admission"]
        rid = admission.get("reservation_id")
        charge = (op.get("cost") or 0.0) if op.get("charged") else 0.0
        if self.mart.store.dialect == "postgresql" and self._record_in_one_statement(
                rid, finish, op["audit_row"], settle=op["settle"], charged=bool(op.get("charged")), charge=charge):
            return True
        with self.mart.store.tx() as tx:
            updated = tx.one("llm_calls.finish", _q_finish_call, **finish)
            finished = updated is not None
            if not finished:
                # a call whose owner was thought dead (or whose lease expired) was charged at its worst case
                # (its row is ``unsettled``): this is the evidence that corrects it; settle() below fixes the spend
                finished = tx.one("llm_calls.unsettled", _q_finish_unsettled, **finish) is not None
            if finished:
                if op["settle"] and rid:
                    if op.get("charged"):
                        self.budgets.settle(tx, rid, charge, utcnow())
                    else:
                        self.budgets.release(tx, rid, utcnow())
                self.audit.append(tx, op["audit_row"])
        return finished

    def _record_credit_call(self, record: "CallRecord", admission: Admission, outcome: str | None,
                            cost: float | None, finish: dict[str, Any], audit_row: dict[str, Any]) -> bool:
        """A call admitted from admission credit: its call row (it had no pending row), its spend, its share
        of the block returned and its audit row, in one transaction (:meth:`AdmissionCredit.settle`)."""
        ctx = admission.context
        charged = _charged(record, cost)
        charge = (cost or 0.0) if charged else 0.0
        call_row = dict(
            _call_row_of(admission), ended_at=finish["ended"], provider_model=record.provider_model,
            status=finish["new_status"], stream=bool(record.stream), prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, cached_tokens=record.cached_tokens,
            reasoning_tokens=record.reasoning_tokens, cost_usd=cost, latency_ms=record.latency_ms,
            error_type=record.error_type, error_message=finish["error_message_"], outcome=outcome)
        del ctx
        audit_row = {**audit_row, "extra": {**audit_row["extra"], "credit_id": admission.credit_id}}

        def persist(block_id: str, windows: tuple[tuple[str, str], ...], less: float, close: bool) -> None:
            op = {"kind": "credit", "admission": admission.stamp(), "block_id": block_id,
                  "windows": [list(w) for w in windows], "less": less, "close": close, "charge": charge,
                  "call_row": call_row, "audit_row": audit_row}
            self._write_or_keep(op)

        if self.budgets.credit.settle(admission.credit_id or "", admission.call_id, persist):
            if self.spool is not None:
                self.spool.finished(admission.call_id)
            return True
        log.debug("call %s: already written (admission credit %s)", admission.call_id, admission.credit_id)
        return False

    def _apply_credit(self, op: Mapping[str, Any]) -> bool:
        """Write a credit call (see :meth:`_record_credit_call`); nothing when its row exists already."""
        block_id, less, charge, close = op["block_id"], op["less"], op["charge"], op["close"]
        call_row, audit_row = op["call_row"], op["audit_row"]
        windows = tuple(tuple(w) for w in op["windows"])
        if self.mart.store.dialect == "postgresql" and not op.get("replayed") and \
                self._record_credit_in_one_statement(block_id, less, charge, close, call_row, audit_row):
            return True
        try:
            with self.mart.store.tx() as tx:
                if op.get("replayed") and tx.one("llm_calls.exists", _q_call_exists, call_id=call_row["id"]) is not None:
                    return False
                # lock order: the block's reservation, its windows, then the audit chain head
                self.budgets.credit_reduce(tx, block_id, windows, less=less, spent=charge, close=close,
                                           now=call_row["ended_at"])
                tx.run("llm_calls.insert", _q_insert_call, **call_row)
                self.audit.append(tx, audit_row)
        except Exception as exc:
            if op.get("replayed") or not _duplicate_key(exc):
                raise
            # a caller-chosen id another process used already: written under a derived id, flagged
            derived = f"{call_row['id']}~{uuid.uuid4().hex[:8]}"
            log.error("call id %r was used before: call written as %r", call_row["id"], derived)
            return self._apply_credit({**op, "call_row": {**call_row, "id": derived}, "audit_row": {
                **audit_row, "call_id": derived, "extra": {**audit_row["extra"], "duplicate_of": call_row["id"]}}})
        return True

    def _record_in_one_statement(self, rid: str | None, finish: Mapping[str, Any], audit_row: Mapping[str, Any], *,
                                 settle: bool, charged: bool, charge: float) -> bool | None:
        """PostgreSQL: :meth:`_record` in one autocommit statement — finish the call row, settle or release
        its reservation, append the audit row after the locked chain head and advance the head — instead of
        nine round trips, so the head row (which serialises every append) is held for one statement.

        None when the chain has no head yet (the first row ever): the general transaction creates it."""
        audit_sql, params = self.audit.append_sql(audit_row, when="EXISTS (SELECT 1 FROM fin)")
        params.update(finish, rid=rid if settle else None, charge=charge,
                      res_status="settled" if charged else "released")
        with self.mart.store.autocommit() as cursor:
            has_head, finished, _amount = cursor.execute(_PG_RECORD.replace("{audit}", audit_sql), params).fetchone()
        if not has_head:
            return None
        return bool(finished)

    def _record_credit_in_one_statement(self, block_id: str, less: float, charge: float, close: bool,
                                        call_row: dict[str, Any], audit_row: dict[str, Any]) -> bool:
        """PostgreSQL: a credit call's write (:meth:`_record_credit_call`) in one autocommit statement, taking
        its locks in the order every other transaction takes them (the block's reservation, its windows in
        budget-id order, the audit chain head). False, having written nothing, when the chain has no head
        yet: the general transaction creates it."""
        audit_sql, params = self.audit.append_sql(audit_row, when="EXISTS (SELECT 1 FROM ins)")
        params.update({f"c_{k}": v for k, v in call_row.items()}, rid=block_id, less=less, charge=charge,
                      close=close)
        with self.mart.store.autocommit() as cursor:
            (has_head,) = cursor.execute(_PG_RECORD_CREDIT.replace("{audit}", audit_sql), params).fetchone()
        return bool(has_head)

    # --- leases whose owner is gone, writes kept in the journal --------------------------------------

    def reclaim_charge(self, tx: "Tx", lease: "Lease", why: str, now: dt.datetime) -> float:
        """What a reclaimed lease is charged (:meth:`BudgetLedger.expire_leases`), with the rows that say so.

        Its calls may have reached a provider, so they are charged at their worst case and their call
        rows marked ``unsettled`` (with an audit row each) until evidence corrects them: a pending call's
        row; a dead process's admission-credit calls that its journal shows at the provider. A credit
        block whose calls cannot be known (its owner is on another host) is charged its whole remainder."""
        from tidyllm.governance.credit import CREDIT_PREFIX

        reason = f"lease-{why}"
        if lease.call_id.startswith(CREDIT_PREFIX):
            if why != "owner-dead" or self.spool is None or not lease.owner:
                return lease.amount
            charge = 0.0
            for call_id, (block_id, worst, row) in self.spool.in_flight_of(lease.owner).items():
                if block_id != lease.id or tx.one("llm_calls.exists", _q_call_exists, call_id=call_id) is not None:
                    continue
                row = {**row, "ended_at": now, "status": "unsettled", "cost_usd": worst}
                tx.run("llm_calls.insert", _q_insert_call, **row)
                self.audit.append(tx, _unsettled_audit(row, worst, reason, now))
                charge += worst
            return charge
        row = tx.one("llm_calls.unsettle", _q_unsettle_call, call_id=lease.call_id, ended=now, cost=lease.amount)
        if row is None:
            return 0.0  # no call is waiting on it: nothing can have reached a provider
        names = ("id", "user_id", "department", "use_case", "data_sensitivity", "requested_model", "route")
        self.audit.append(tx, _unsettled_audit(dict(zip(names, row)), lease.amount, reason, now))
        return lease.amount

    def recover(self) -> int:
        """Recover what dead tidyllm processes on this host left in their journals: replay the settlement
        writes they kept, then reclaim their leases (charging the calls they had at a provider). Run at
        start-up; returns how many kept writes were applied."""
        if self.spool is None:
            return 0
        applied = 0
        for owner, journal, remove in self.spool.orphans():
            left = 0
            for op in journal.kept:
                try:
                    self.apply({**op, "replayed": True})
                    applied += 1
                except Exception:  # noqa: BLE001 - still refused: the journal stays for the next start
                    log.exception("could not replay a settlement kept by %s", owner)
                    left += 1
            with self.mart.store.tx() as tx:
                self.budgets.expire_leases(tx, utcnow())
            if not left:
                remove()
        return applied

    def _forget_stream(self, call_id: str) -> None:
        """A governed stream's call is settled: stop tracking it, and tell the stream."""
        with self._lock:
            tally = self._streams.pop(call_id, None)
        if tally is not None:
            tally.settled.set()

    def record_unenforced(self, record: "CallRecord", *, forged: bool = False) -> None:
        """Record a call that reached a provider without admission (a path tidyllm cannot stop, or one
        that carried a forged admission): it is audited as ``unenforced`` and its cost counted against
        the budgets it belongs to."""
        if record.exception is not None and isinstance(record.exception, GovernanceError):
            return
        md = {k: v for k, v in record.metadata.items() if k != STAMP_KEY}
        try:
            ctx = self.context(md)
        except GovernanceError:
            # the call happened all the same: record it under the identity it declared
            from tidyllm.governance.names import normalize_name

            ctx = CallContext(**{k: (normalize_name(md[k]) or None) if isinstance(md.get(k), str) else None
                                 for k in ("user_id", "department")}, identity_source="declared")
        now = utcnow()
        model = record.model or "unknown"
        price = self.prices.lookup(model, now)
        if record.ok and price is not None:
            cost: float | None = price.cost(record.prompt_tokens or 0, record.completion_tokens or 0)
        else:
            cost = (record.litellm_cost or None) if record.ok else 0.0
        call_id = record.litellm_call_id or str(uuid.uuid4())
        # with gateway_only on, a direct call to a provider is the bypass the security team must see
        direct = self.settings.gateway_only and not (
            self.is_gateway_endpoint(f"openai/{model}", record.api_base) or model in self.routes)
        rule = "gateway_only:sync-sdk-call-bypassed-enforcement" if direct else "sync-sdk-call-bypassed-enforcement"
        if forged:
            rule = "forged-admission"
        try:
            self._write_unenforced(record, ctx, call_id, model, price, cost, rule, now)
        except Exception as exc:  # noqa: BLE001 - a caller-chosen litellm_call_id may be taken: never lose the row
            if not _duplicate_key(exc):
                raise
            call_id = str(uuid.uuid4())
            self._write_unenforced(record, ctx, call_id, model, price, cost, rule, now)
        if direct:
            log.error("LLM call %s went straight to %s although governance.gateway_only is on (plain sync "
                      "litellm.completion cannot be stopped); use model='tidyllm/<group>' or a governed Router",
                      call_id, model)
        elif not forged:
            log.warning("unenforced LLM call %s to %s (a path tidyllm cannot stop, e.g. plain sync "
                        "litellm.completion); use model='tidyllm/<group>' or a governed Router", call_id, model)
        self._notify(record, None)

    def _write_unenforced(self, record: "CallRecord", ctx: CallContext, call_id: str, model: str,
                          price: "Price | None", cost: float | None, rule: str, now: dt.datetime) -> None:
        with self.mart.store.tx() as tx:
            if cost:
                self.budgets.charge(tx, ctx, model, model, cost, now)
            tx.run("llm_calls.insert", _q_insert_call,
                   id=call_id, started_at=record.started_at, ended_at=record.ended_at, call_type=record.call_type,
                   user_id=ctx.user_id, department=ctx.department, use_case=ctx.use_case,
                   data_sensitivity=ctx.data_sensitivity, requested_model=model, route=model,
                   provider_model=record.provider_model, status="unenforced", stream=bool(record.stream),
                   prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens, cost_usd=cost,
                   price_id=price.id if price else None, latency_ms=record.latency_ms,
                   error_type=record.error_type, error_message=redact(record.error_message),
                   identity_source=_identity_source(ctx))
            self.audit.append(tx, {
                "call_id": call_id, "recorded_at": now, "user_id": ctx.user_id, "department": ctx.department,
                "audit_reason": ctx.audit_reason, "use_case": ctx.use_case, "data_sensitivity": ctx.data_sensitivity,
                "requested_model": model, "route": model, "decision": "unenforced", "rule": rule,
                "status": "success" if record.ok else "failure",
                "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
                "cost_usd": cost, "latency_ms": record.latency_ms,
                "error": redact(f"{record.error_type}: {record.error_message}") if not record.ok else None,
                "extra": {"litellm_call_id": record.litellm_call_id} if record.litellm_call_id else None,
                **self.content_fields(record.messages, record.tools, record.tool_calls)})

    def _notify(self, record: "CallRecord", admission: Admission | None) -> None:
        for fn in list(self._listeners):
            try:
                fn(record, admission)
            except Exception:  # noqa: BLE001 - observers must never break the caller's request
                log.exception("a tidyllm call listener failed")
        if admission is not None:
            done = self.listeners_done.pop(admission.call_id, None)
            if done is not None:
                done.set()



@dataclass(frozen=True)
class _Facts:
    """What an admission path needs besides the call's identity: the reserved prompt, the choices billed,
    the tracked execution, the decision and forgery notes for the audit."""

    prompt_tokens: int
    choices: int
    execution_id: str | None
    extra: Mapping[str, Any]


def current_execution() -> str | None:
    """The id of the tracked execution (``mart.track_execution``) the calling code runs in, if any."""
    from tidyllm.mart.tracking import current_execution_id

    return current_execution_id()


def _identity_source(ctx: CallContext) -> str | None:
    """Where the call's identity came from (``llm_calls.identity_source``)."""
    return getattr(ctx, "identity_source", None) or ("declared" if ctx.department or ctx.user_id else None)


def _duplicate_key(exc: BaseException) -> bool:
    """Whether a database error is a primary-key conflict (a reused call id)."""
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if name in ("IntegrityError", "UniqueViolation") or "UNIQUE constraint failed" in str(seen):
            return True
        seen = seen.__cause__ or getattr(seen, "orig", None)
    return False


def _credit_admission(block_id: str, *, call_id: str, route: str, requested_model: str, call_type: str,
                      ctx: CallContext, now: dt.datetime, max_tokens: int, worst: float, price: "Price",
                      facts: _Facts) -> Admission:
    """The admission of a call admitted from admission-credit block ``block_id``."""
    return Admission(call_id=call_id, route=route, requested_model=requested_model, call_type=call_type,
                     context=ctx.as_dict(), identity_source=_identity_source(ctx), started_at=now.isoformat(),
                     max_tokens=max_tokens, clamped=False,
                     reserved_usd=worst, price_id=price.id, input_per_1m=price.input_per_1m,
                     output_per_1m=price.output_per_1m, extra=dict(facts.extra), credit_id=block_id,
                     prompt_tokens=facts.prompt_tokens, execution_id=facts.execution_id)


def _unsettled_audit(row: Mapping[str, Any], charged: float, rule: str, now: dt.datetime) -> dict[str, Any]:
    """The audit row of a call charged at its worst case because its lease was reclaimed."""
    return {"call_id": row.get("id"), "recorded_at": now, "user_id": row.get("user_id"),
            "department": row.get("department"), "use_case": row.get("use_case"),
            "data_sensitivity": row.get("data_sensitivity"), "requested_model": row.get("requested_model"),
            "route": row.get("route"), "decision": "allowed", "rule": rule, "status": "unsettled",
            "cost_usd": charged, "extra": {"charged_at_worst_case": True}}


def _call_row_of(admission: Admission) -> dict[str, Any]:
    """A credit call's ``llm_calls`` row as it stands at admission (``unsettled``, charged at its worst
    case): what a reclaim writes for it should its process die while it is at the provider."""
    ctx = admission.context
    return dict(
        id=admission.call_id, started_at=dt.datetime.fromisoformat(admission.started_at), ended_at=None,
        call_type=admission.call_type, user_id=ctx.get("user_id"), department=ctx.get("department"),
        use_case=ctx.get("use_case"), data_sensitivity=ctx.get("data_sensitivity"),
        requested_model=admission.requested_model, route=admission.route, provider_model=None,
        status="unsettled", stream=False, prompt_tokens=None, completion_tokens=None, cached_tokens=None,
        reasoning_tokens=None, cost_usd=admission.reserved_usd, reserved_usd=admission.reserved_usd,
        price_id=admission.price_id, latency_ms=None, error_type=None, error_message=None, outcome=None,
        execution_id=admission.execution_id, identity_source=admission.identity_source,
        reserved_prompt_tokens=admission.prompt_tokens)


def _charged(record: "CallRecord", cost: float | None) -> bool:
    """Whether a finished call's reservation settles to a charge (else it is released unused)."""
    return record.ok or (cost or 0) > 0


# --- prepared statements (see tidyllm.mart.fastsql) ---------------------------------------------


def _q_insert_call() -> Any:
    return llm_calls.insert(), [c.name for c in llm_calls.c]


def _q_finish_call(status: str = "pending") -> Any:
    import sqlalchemy as sa

    c = llm_calls.c
    p = sa.bindparam

    def typed(name: str, column: Any) -> Any:
        return p(name, type_=column.type)

    return llm_calls.update().where(c.id == p("call_id"), c.status == status).values(
        ended_at=typed("ended", c.ended_at), status=typed("new_status", c.status),
        provider_model=typed("provider_model_", c.provider_model),
        prompt_tokens=typed("prompt_tokens_", c.prompt_tokens),
        completion_tokens=typed("completion_tokens_", c.completion_tokens),
        cached_tokens=typed("cached_tokens_", c.cached_tokens),
        reasoning_tokens=typed("reasoning_tokens_", c.reasoning_tokens), cost_usd=typed("cost", c.cost_usd),
        latency_ms=typed("latency", c.latency_ms), error_type=typed("error_type_", c.error_type),
        error_message=typed("error_message_", c.error_message), outcome=typed("outcome_", c.outcome),
        stream=typed("stream_", c.stream)).returning(c.id)


def _q_finish_unsettled() -> Any:
    """A call row left ``unsettled`` by a reclaimed lease gets the outcome that finally came in."""
    return _q_finish_call("unsettled")


def _q_unsettle_call() -> Any:
    """A pending call whose lease is reclaimed: charged at its worst case until evidence corrects it."""
    import sqlalchemy as sa

    c = llm_calls.c
    return (llm_calls.update().where(c.id == sa.bindparam("call_id"), c.status == "pending")
            .values(status="unsettled", ended_at=sa.bindparam("ended", type_=c.ended_at.type),
                    cost_usd=sa.bindparam("cost", type_=c.cost_usd.type))
            .returning(c.id, c.user_id, c.department, c.use_case, c.data_sensitivity, c.requested_model, c.route))


def _q_call_exists() -> Any:
    import sqlalchemy as sa

    return sa.select(llm_calls.c.id).where(llm_calls.c.id == sa.bindparam("call_id"))


#: the budget windows the reservation in CTE ``res`` is held against, locked in budget-id order
_PG_WLOCK = """wlock AS (
    SELECT w.budget_id, w.window_start
    FROM budget_windows w JOIN (SELECT e.pair->>0 AS budget_id, (e.pair->>1)::timestamptz AS window_start
                                FROM res CROSS JOIN LATERAL json_array_elements(res.windows) AS e(pair)) k
         ON w.budget_id = k.budget_id AND w.window_start = k.window_start
    ORDER BY w.budget_id
    FOR UPDATE OF w
)"""

#: see Governor._record_in_one_statement. Locks are taken in the order every other transaction takes them
#: (the call row, its reservation, the budget windows in budget-id order, then the audit chain head), so
#: settlements, admissions and refusals cannot deadlock: ``head`` reads ``win`` first, and ``fin`` — on
#: which everything else depends — writes only when the chain has a head, so without one nothing is
#: written and the general transaction creates it. In READ COMMITTED, FOR UPDATE returns the newest
#: version of a row another transaction just changed, so concurrent appends chain in lock order.
#: {audit} is AuditTrail.append_sql's ``aud`` and ``adv``.
_PG_RECORD = """
WITH fin AS (
    UPDATE llm_calls SET ended_at = %(ended)s, status = %(new_status)s, provider_model = %(provider_model_)s,
        prompt_tokens = %(prompt_tokens_)s, completion_tokens = %(completion_tokens_)s,
        cached_tokens = %(cached_tokens_)s, reasoning_tokens = %(reasoning_tokens_)s, cost_usd = %(cost)s,
        latency_ms = %(latency)s, error_type = %(error_type_)s, error_message = %(error_message_)s,
        outcome = %(outcome_)s, stream = %(stream_)s
    WHERE id = %(call_id)s AND status = 'pending' AND EXISTS (SELECT 1 FROM audit_head WHERE id = 1)
    RETURNING id
), res AS (
    SELECT r.id, r.amount_usd, r.windows, r.status FROM reservations r
    WHERE r.id = %(rid)s AND r.status NOT IN ('settled', 'released') AND EXISTS (SELECT 1 FROM fin)
    FOR UPDATE
), {wlock}, win AS (
    UPDATE budget_windows w SET spent_usd = w.spent_usd + %(charge)s,
        reserved_usd = w.reserved_usd - CASE WHEN res.status = 'open' THEN res.amount_usd ELSE 0 END
    FROM wlock, res WHERE w.budget_id = wlock.budget_id AND w.window_start = wlock.window_start
    RETURNING 1
), closed AS (
    UPDATE reservations r SET status = %(res_status)s, settled_usd = %(charge)s, closed_at = %(ended)s
    FROM res WHERE r.id = res.id
), head AS (
    SELECT digest FROM audit_head WHERE id = 1 AND (SELECT count(*) FROM win) >= 0 FOR UPDATE
), {audit}
SELECT (SELECT count(*) FROM fin) = 1 OR EXISTS (SELECT 1 FROM audit_head WHERE id = 1),
       (SELECT count(*) FROM fin) = 1 AND (SELECT count(*) FROM aud) = 1, (SELECT amount_usd FROM res)
""".replace("{wlock}", _PG_WLOCK)


#: see Governor._record_credit_in_one_statement: the block's reservation row, then its windows in budget-id
#: order, then the audit chain head (``head`` reads ``win`` first), as in _PG_RECORD. Nothing is written
#: when the chain has no head: ``res`` is empty, and ``ins`` — on which the audit row depends — too.
_PG_RECORD_CREDIT = """
WITH res AS (
    SELECT r.id, r.windows, r.status, LEAST(%(less)s, r.amount_usd) AS held FROM reservations r
    WHERE r.id = %(rid)s AND EXISTS (SELECT 1 FROM audit_head WHERE id = 1)
    FOR UPDATE
), {wlock}, win AS (
    UPDATE budget_windows w SET
        spent_usd = w.spent_usd + %(charge)s - CASE WHEN res.status = 'unsettled' THEN %(less)s ELSE 0 END,
        reserved_usd = w.reserved_usd - CASE WHEN res.status IN ('open', 'settled') THEN res.held ELSE 0 END
    FROM wlock, res WHERE w.budget_id = wlock.budget_id AND w.window_start = wlock.window_start
    RETURNING 1
), blk AS (
    UPDATE reservations r SET
        amount_usd = r.amount_usd - CASE WHEN res.status IN ('open', 'settled') THEN res.held ELSE 0 END,
        settled_usd = COALESCE(r.settled_usd, 0) + %(charge)s
            - CASE WHEN res.status = 'unsettled' THEN %(less)s ELSE 0 END,
        status = CASE WHEN res.status = 'open' AND %(close)s THEN 'settled' ELSE r.status END,
        closed_at = CASE WHEN %(close)s THEN %(c_ended_at)s ELSE r.closed_at END
    FROM res WHERE r.id = res.id
), ins AS (
    INSERT INTO llm_calls (id, started_at, ended_at, call_type, user_id, department, use_case, data_sensitivity,
                           requested_model, route, provider_model, status, stream, prompt_tokens, completion_tokens,
                           cached_tokens, reasoning_tokens, cost_usd, reserved_usd, price_id, latency_ms, error_type,
                           error_message, outcome, execution_id, identity_source, reserved_prompt_tokens)
    SELECT %(c_id)s, %(c_started_at)s, %(c_ended_at)s, %(c_call_type)s, %(c_user_id)s, %(c_department)s,
           %(c_use_case)s, %(c_data_sensitivity)s, %(c_requested_model)s, %(c_route)s, %(c_provider_model)s,
           %(c_status)s, %(c_stream)s, %(c_prompt_tokens)s, %(c_completion_tokens)s, %(c_cached_tokens)s,
           %(c_reasoning_tokens)s, %(c_cost_usd)s, %(c_reserved_usd)s, %(c_price_id)s, %(c_latency_ms)s,
           %(c_error_type)s, %(c_error_message)s, %(c_outcome)s, %(c_execution_id)s, %(c_identity_source)s,
           %(c_reserved_prompt_tokens)s
    WHERE EXISTS (SELECT 1 FROM audit_head WHERE id = 1)
    RETURNING id
), head AS (
    SELECT digest FROM audit_head WHERE id = 1 AND (SELECT count(*) FROM win) >= 0 FOR UPDATE
), {audit}
SELECT EXISTS (SELECT 1 FROM ins)
""".replace("{wlock}", _PG_WLOCK)

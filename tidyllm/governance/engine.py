"""The governor: admit a call (authorise, rate-limit, price, reserve) and finish it (settle, record, audit).

Every LiteLLM entry point — the Router strategy, the ``async_pre_call_deployment_hook``, the
``tidyllm/`` provider — calls :meth:`Governor.admit` before the provider is contacted and
stamps the returned :class:`Admission` into the request's metadata; the success and failure
callbacks hand the finished call to :meth:`Governor.finish`. Whoever refuses writes the audit
row of the refusal (callbacks ignore governance refusals), so every attempt has exactly one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tidyllm.errors import GovernanceError, MetadataError, UnpricedModelError
from tidyllm.governance.context import CallContext
from tidyllm.governance.policy import RouteFacts
from tidyllm.mart.schema import llm_calls
from tidyllm.mart.store import utcnow
from tidyllm.redact import redact

if TYPE_CHECKING:
    from tidyllm.governance.audit import AuditTrail
    from tidyllm.gateway.traces import TraceLookup, TraceRef
    from tidyllm.governance.budgets import BudgetLedger, Reservation
    from tidyllm.governance.identity import IdentityResolver
    from tidyllm.governance.policy import AuthorizationPolicy
    from tidyllm.governance.streams import StreamTally
    from tidyllm.mart.fastsql import Tx
    from tidyllm.governance.ratelimit import RateLimiter
    from tidyllm.mart import TidyMart
    from tidyllm.pricing import Price, PriceBook
    from tidyllm.records import CallRecord
    from tidyllm.settings import GovernanceSettings

__all__ = ["Governor", "Admission", "count_tokens", "estimate_prompt_tokens"]

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

    def stamp(self) -> dict[str, Any]:
        """The dict stamped into ``metadata["tidyllm"]`` (plain JSON-able values)."""
        return {**self.__dict__, "context": dict(self.context), "extra": dict(self.extra)}


def count_tokens(model: str, messages: Any = None, text: Any = None, tools: Any = None) -> int:
    """LiteLLM's token count of a request's messages (and tools), or of a text or list of texts."""
    from tidyllm._litellm import import_litellm

    litellm = import_litellm()
    try:
        if messages is not None:
            return litellm.token_counter(model=model, messages=messages, tools=tools) if tools else \
                litellm.token_counter(model=model, messages=messages)
        items = text if isinstance(text, list) else [text or ""]
        return sum(litellm.token_counter(model=model, text=str(t)) for t in items if t != "")
    except Exception:  # noqa: BLE001 - an unknown tokenizer must not block; fall back to characters
        blob = str(messages if messages is not None else text)
        return len(blob) // 3 + 1


#: input tokens reserved per image in a request: above the most any provider charges for one image
#: (OpenAI high detail tops out at 1,445, Anthropic at about 1,600, Gemini at 258)
IMAGE_TOKENS = 2_000


def estimate_prompt_tokens(model: str, messages: Any = None, text: Any = None, tools: Any = None) -> int:
    """An upper estimate of the input tokens a provider will count for a request.

    tidyllm cannot know every provider's tokenizer, and the reservation must be a true worst case:
    it takes the larger of a token count of the request's JSON (its content plus the JSON syntax
    around it, which is more than the few tokens of framing a chat format adds per message) and one
    token per two characters (tokenizers split long words, numbers and punctuation finely), adds
    15 % and 16 tokens of framing, and :data:`IMAGE_TOKENS` per image (an image's base64 text says
    nothing about its token cost, which providers compute from its size). Reserving more than is
    spent only holds headroom until the call settles; reserving less could overspend."""
    images = 0
    if messages is not None:
        messages, images = _without_images(messages)
    blob = json.dumps(messages if messages is not None else text, default=str) + (
        json.dumps(tools, default=str) if tools else "")
    encode = _ordinary_encoder(model)
    if encode is not None:
        n = len(encode(blob))
    else:
        n = count_tokens(model, messages=messages, text=text, tools=tools)
    return int(math.ceil(max(n, len(blob) / 2.0) * 1.15)) + 16 + images * IMAGE_TOKENS


def _without_images(messages: Any) -> tuple[Any, int]:
    """``messages`` with each ``image_url`` content part replaced by a placeholder, and how many there were."""
    if not isinstance(messages, list):
        return messages, 0
    count = 0
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(isinstance(p, Mapping) and p.get("type") == "image_url" for p in content):
            parts = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image_url":
                    count += 1
                    parts.append({"type": "image_url"})
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out, count


_ENCODERS: dict[str, Any] = {}


def _ordinary_encoder(model: str) -> Callable[[str], list[int]] | None:
    """The ``encode_ordinary`` of the tiktoken encoding LiteLLM uses for ``model``, or None when LiteLLM
    picks another kind of tokenizer (a HuggingFace one) for it. Cached per model."""
    if model not in _ENCODERS:
        encode = None
        try:
            from tidyllm._litellm import import_litellm

            import_litellm()
            from litellm.utils import select_tokenizer

            chosen = select_tokenizer(model)
            if chosen.get("type") == "openai_tokenizer":
                encode = getattr(chosen.get("tokenizer"), "encode_ordinary", None)
        except Exception:  # noqa: BLE001 - unknown models fall back to LiteLLM's token_counter
            encode = None
        if len(_ENCODERS) > 4096:
            _ENCODERS.clear()
        _ENCODERS[model] = encode
    return _ENCODERS[model]


class Governor:
    """Admission and settlement of governed calls."""

    def __init__(self, mart: "TidyMart", *, settings: "GovernanceSettings", defaults: Mapping[str, str],
                 prices: "PriceBook", budgets: "BudgetLedger", policy: "AuthorizationPolicy",
                 audit: "AuditTrail", limiter: "RateLimiter", routes: Mapping[str, RouteFacts] | None = None,
                 gateway_api_bases: tuple[str, ...] = (), identity: "IdentityResolver | None" = None) -> None:
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
        #: open governed streams of this process, by call id (see tidyllm.governance.streams)
        self._streams: dict[str, "StreamTally"] = {}
        #: finds the MLflow trace of a call on a tracking-server gateway (set with the server's Router)
        self.trace_lookup: "TraceLookup | None" = None
        #: who is calling: identity sources, tokens, required context (tidyllm.governance.identity)
        self.identity = identity or IdentityResolver.from_settings(settings, defaults, budgets.has_department_budgets)

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
              extra: Mapping[str, Any] | None = None, prompt_tokens: int | None = None) -> Admission:
        """Authorise, rate-limit, price and reserve; raise a governance error (after auditing it) when refused.

        ``route`` is the endpoint/deployment that will serve the call; ``gateway`` says whether it
        resolves to a configured gateway endpoint (``governance.gateway_only``); ``prompt_tokens`` is
        the caller's own upper estimate, when it already made one."""
        from tidyllm.errors import RouteNotAuthorizedError

        call_id = call_id or str(uuid.uuid4())
        now = utcnow()
        is_embedding = "embed" in call_type
        base = dict(call_id=call_id, ctx=ctx, route=route, requested_model=requested_model, call_type=call_type,
                    messages=messages if messages is not None else text, tools=tools, stream=stream, now=now)

        if self.settings.gateway_only and not gateway and not (mock and self.settings.allow_mock):
            err = RouteNotAuthorizedError(
                f"governance.gateway_only is on: model {requested_model!r} does not resolve to a configured "
                "MLflow gateway endpoint; call a gateway route or model group instead", rule="gateway_only")
            self._refuse(error=err, **base)
        why = self.check_authorized(ctx, route)
        if why is not None:
            self._refuse(error=RouteNotAuthorizedError(f"not authorised: {why[1]}", rule=why[0]), **base)

        price = self.prices.lookup(route, now) or (self.prices.lookup(requested_model, now)
                                                   if requested_model != route else None)
        if prompt_tokens is None:
            prompt_tokens = estimate_prompt_tokens(route, messages=messages, text=text, tools=tools)
        out_tokens = 0 if is_embedding else int(max_tokens or self.settings.default_max_tokens)
        if mock and not is_embedding:
            out_tokens = max(out_tokens, MOCK_COMPLETION_TOKENS)
        #: answer tokens the reservation pays for (a completion reserves at least one)
        reserve_tokens = out_tokens if is_embedding else max(out_tokens, 1)
        if price is not None and price.id is None:
            # a LiteLLM price used for the first time becomes a stored price version
            price = self._store_litellm_price(price)
        block_usd = 0.0
        credit = self.budgets.credit
        if price is not None and credit.enabled and not stream and not self.limiter.limits \
                and not (extra and extra.get("traced")):
            # a busy caller's call: admitted from this process's credit when it has some (no database
            # write before the provider is called), else maybe reserved with a new block of it
            worst = _worst(price, prompt_tokens, reserve_tokens)
            credit_key = (ctx.department, ctx.user_id, route, requested_model)
            day = self.budgets.day_start(now)
            block_id, block_usd = credit.take(credit_key, day, worst, call_id)
            if block_id is not None:
                self.listeners_done[call_id] = threading.Event()
                return _credit_admission(block_id, call_id=call_id, route=route, requested_model=requested_model,
                                         call_type=call_type, ctx=ctx, now=now, max_tokens=reserve_tokens,
                                         worst=worst, price=price, extra=extra)
        if credit.enabled:
            credit.give_back_retired()
        if price is not None and self.mart.store.dialect == "postgresql" and not self.limiter.limits \
                and not self.budgets.expiry_due() and not block_usd:
            admission = self._admit_in_one_statement(
                ctx=ctx, route=route, requested_model=requested_model, call_type=call_type, price=price,
                prompt_tokens=prompt_tokens, out_tokens=out_tokens, reserve_tokens=reserve_tokens, stream=stream,
                call_id=call_id, now=now, extra=extra)
            if admission is not None:
                self.listeners_done[call_id] = threading.Event()
                return admission
        try:
            admission, reservation = self._admit_in_transaction(
                ctx=ctx, route=route, requested_model=requested_model, call_type=call_type, price=price,
                prompt_tokens=prompt_tokens, out_tokens=out_tokens, reserve_tokens=reserve_tokens, stream=stream,
                call_id=call_id, now=now, extra=extra, block_usd=block_usd, base=base)
        except BaseException:
            if block_usd:
                credit.not_granted(credit_key)
            raise
        if block_usd:
            if reservation is not None and reservation.credit:
                credit.granted(credit_key, day, reservation.id, reservation.amount_usd, reservation.windows, call_id,
                               worst)
            else:
                credit.not_granted(credit_key)
        if admission.clamped:
            log.info("call %s: max_tokens clamped to %d to fit the budget", call_id, admission.max_tokens)
        self.listeners_done[call_id] = threading.Event()
        return admission

    def _admit_in_transaction(self, *, ctx: CallContext, route: str, requested_model: str, call_type: str,
                              price: "Price | None", prompt_tokens: int, out_tokens: int, reserve_tokens: int,
                              stream: bool, call_id: str, now: dt.datetime, extra: Mapping[str, Any] | None,
                              block_usd: float, base: dict[str, Any]) -> "tuple[Admission, Reservation | None]":
        """The general admission: rate limit, price, reserve (or a credit block) and the pending call row in
        one write transaction; a refusal's records commit with it and its error is raised after it.
        Returns the admission and its reservation (None when no budget applies)."""
        from tidyllm.errors import BudgetExceededError, RateLimitedError

        from tidyllm.governance.budgets import Refusal, Reservation

        refusal: tuple[GovernanceError, str | None] | None = None
        with self.mart.store.tx() as tx:
            self.budgets.maybe_expire_leases(tx, now)
            limited = self.limiter.check_and_record(tx, ctx, route, prompt_tokens + out_tokens, now)
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
                per_token_out = price.output_per_1m / 1e6
                reservation = self.budgets.reserve(
                    tx, call_id=call_id, ctx=ctx, route=route, model=requested_model,
                    prompt_cost_usd=prompt_tokens * price.input_per_1m / 1e6,
                    output_cost_per_token=per_token_out, max_tokens=reserve_tokens,
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
                    worst=_worst(price, prompt_tokens, reserve_tokens), price=price, extra=extra)
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
                    extra=dict(extra or {}))
                tx.run("llm_calls.insert", _q_insert_call,
                       id=call_id, started_at=now, call_type=call_type, user_id=ctx.user_id,
                       department=ctx.department, use_case=ctx.use_case, data_sensitivity=ctx.data_sensitivity,
                       requested_model=requested_model, route=route, status="pending", stream=bool(stream),
                       reserved_usd=admission.reserved_usd, price_id=admission.price_id)
        if refusal is not None:
            raise refusal[0]
        return admission, reservation if isinstance(reservation, Reservation) else None

    def _admit_in_one_statement(self, *, ctx: CallContext, route: str, requested_model: str, call_type: str,
                                price: "Price", prompt_tokens: int, out_tokens: int, reserve_tokens: int,
                                stream: bool, call_id: str, now: dt.datetime,
                                extra: Mapping[str, Any] | None) -> Admission | None:
        """The common case on PostgreSQL — priced, no rate limit, the whole worst case fits — in one
        round trip (:meth:`BudgetLedger.reserve_in_one_statement`); None when the general path must decide."""
        worst = prompt_tokens * price.input_per_1m / 1e6 + reserve_tokens * price.output_per_1m / 1e6
        reservation_id = self.budgets.reserve_in_one_statement(
            call_id=call_id, ctx=ctx, route=route, model=requested_model, worst=worst, now=now,
            call_row={"call_type": call_type, "user_id": ctx.user_id, "use_case": ctx.use_case,
                      "data_sensitivity": ctx.data_sensitivity, "requested_model": requested_model,
                      "stream": bool(stream), "price_id": price.id})
        if reservation_id is None:
            return None
        return Admission(
            call_id=call_id, route=route, requested_model=requested_model, call_type=call_type,
            context=ctx.as_dict(), started_at=now.isoformat(),
            max_tokens=reserve_tokens if reservation_id else out_tokens, clamped=False,
            reservation_id=reservation_id or None, reserved_usd=worst if reservation_id else 0.0,
            price_id=price.id, input_per_1m=price.input_per_1m, output_per_1m=price.output_per_1m,
            extra=dict(extra or {}))

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

    def _refuse(self, *, error: GovernanceError, **fields: Any) -> None:
        """Record a refusal in its own transaction and raise ``error``."""
        with self.mart.store.tx() as tx:
            self._write_refusal(tx, error=error, **fields)
        raise error

    def _write_refusal(self, tx: "Tx", *, error: GovernanceError, call_id: str, ctx: CallContext, route: str,
                       requested_model: str, call_type: str, messages: Any, tools: Any, stream: bool,
                       now: dt.datetime, budget_id: str | None = None) -> None:
        """The llm_calls row, the audit row and (for budgets) the event of a refused call."""
        tx.run("llm_calls.insert", _q_insert_call,
               id=call_id, started_at=now, ended_at=now, call_type=call_type, user_id=ctx.user_id,
               department=ctx.department, use_case=ctx.use_case, data_sensitivity=ctx.data_sensitivity,
               requested_model=requested_model, route=route, status="refused", stream=bool(stream),
               error_type=type(error).__name__, error_message=redact(str(error)))
        self.audit.append(tx, {
            "call_id": call_id, "recorded_at": now, "user_id": ctx.user_id, "department": ctx.department,
            "audit_reason": ctx.audit_reason, "use_case": ctx.use_case,
            "data_sensitivity": ctx.data_sensitivity, "requested_model": requested_model, "route": route,
            "decision": "refused", "rule": getattr(error, "rule", "governance"), "status": "refused",
            "error": f"{type(error).__name__}: {error}", **self.content_fields(messages, tools)})
        if budget_id is not None:
            self.budgets.record_event(tx, now, budget_id, "refused",
                                      {"call_id": call_id, "department": ctx.department, "user_id": ctx.user_id})

    def refuse_metadata(self, error: MetadataError, *, metadata: Any, route: str, requested_model: str,
                        call_type: str, messages: Any, call_id: str | None = None) -> None:
        """Audit a call refused for malformed metadata (best-effort context) and raise ``error``."""
        md = metadata if isinstance(metadata, Mapping) else {}
        ctx = CallContext(**{k: (md.get(k) if isinstance(md.get(k), str) else None)
                             for k in ("user_id", "department", "audit_reason", "use_case")})
        self._refuse(error=error, call_id=call_id or str(uuid.uuid4()), ctx=ctx, route=route,
                     requested_model=requested_model, call_type=call_type, messages=messages, tools=None,
                     stream=False, now=utcnow())

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

        route = str(tally.stamp.get("route") or "")
        if tally.usage is not None:
            prompt, completion = tally.usage
        else:
            prompt = count_tokens(route, messages=tally.messages, tools=tally.tools) if tally.messages else 0
            produced = "".join(tally.text) + "".join(tally.tool_text)
            completion = count_tokens(route, text=produced) if produced else 0
        if outcome == "abandoned" and tally.finish_reason:
            outcome = "completed"
        failed = outcome == "failed"
        started = dt.datetime.fromisoformat(str(tally.stamp.get("started_at"))) if tally.stamp.get("started_at") \
            else utcnow()
        ended = utcnow()
        record = CallRecord(
            ok=not failed, litellm_call_id=None, call_type=str(tally.stamp.get("call_type") or "completion"),
            stamp=tally.stamp, metadata={}, model=route, model_id=None, model_group=None, provider=None,
            api_base=None, provider_model=None, stream=True, prompt_tokens=prompt, completion_tokens=completion,
            cached_tokens=None, reasoning_tokens=None, litellm_cost=None,
            latency_ms=(ended - started).total_seconds() * 1000.0, started_at=started, ended_at=ended,
            error_type=type(error).__name__ if failed and error is not None else None,
            error_message=str(error) if failed and error is not None else None,
            exception=error if failed else None, messages=tally.messages, tools=tally.tools, mock=False,
            tool_calls=tuple((name, "") for name in tally.tool_names), partial=failed and completion > 0)
        self._finish(record, outcome)

    def finish(self, record: "CallRecord") -> None:
        """Settle (or release) the call's reservation and write its call row and audit row, atomically."""
        tally = self._streams.get(str((record.stamp or {}).get("call_id")))
        if record.stream and not record.ok and tally is not None and (tally.text or tally.tool_text):
            # a governed stream broke after delivering content: the error reaches the caller through
            # the GovernedStream, which settles the call for exactly what the caller received
            return
        self._finish(record, None)

    def _finish(self, record: "CallRecord", outcome: str | None) -> None:
        stamp = record.stamp or {}
        try:
            admission = Admission(**{k: stamp[k] for k in Admission.__dataclass_fields__ if k in stamp})
        except TypeError:
            log.error("call %s carries a malformed tidyllm stamp; recorded as unenforced", record.litellm_call_id)
            return self.record_unenforced(record)
        if record.exception is not None and isinstance(record.exception, GovernanceError):
            return  # the refuser already audited it
        cost = self.cost_of(admission, record)
        if record.stream:
            outcome = outcome or ("completed" if record.ok else "failed")
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
        settled itself)."""
        now = utcnow()
        ctx = admission.context
        status = "success" if record.ok else "failure"
        called = [name for name, _ in record.tool_calls]
        extra = {"price_id": admission.price_id, "outcome": outcome, "reserved_usd": admission.reserved_usd,
                 "litellm_call_id": record.litellm_call_id,
                 "trace_experiment_id": trace.experiment_id if trace else None,
                 "tool_calls": [{"name": n, "arguments": a} for n, a in record.tool_calls]
                 if called and self.audit.capture == "full" else None}
        audit_row = {
            "call_id": admission.call_id, "recorded_at": now, "user_id": ctx.get("user_id"),
            "department": ctx.get("department"), "audit_reason": ctx.get("audit_reason"),
            "use_case": ctx.get("use_case"), "data_sensitivity": ctx.get("data_sensitivity"),
            "requested_model": admission.requested_model, "route": admission.route, "decision": "allowed",
            "rule": "clamped" if admission.clamped else None, "status": status,
            "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "cost_usd": cost, "latency_ms": record.latency_ms,
            "error": f"{record.error_type}: {record.error_message}" if not record.ok else None,
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
        if self.mart.store.dialect == "postgresql":
            done = self._record_in_one_statement(admission, record, cost, finish, audit_row, settle=settle)
            if done is not None:
                self._forget_stream(admission.call_id)
                return done
        with self.mart.store.tx() as tx:
            updated = tx.one("llm_calls.finish", _q_finish_call, **finish)
            finished = updated is not None
            if finished:
                if settle:
                    self._settle_reservation(tx, admission, record, cost)
                self.audit.append(tx, audit_row)
        self._forget_stream(admission.call_id)
        return finished

    def _record_credit_call(self, record: "CallRecord", admission: Admission, outcome: str | None,
                            cost: float | None, finish: dict[str, Any], audit_row: dict[str, Any]) -> bool:
        """A call admitted from admission credit: its call row (it had no pending row), its spend, its share
        of the block returned and its audit row, in one transaction (:meth:`AdmissionCredit.settle`)."""
        ctx = admission.context
        charged = _charged(record, cost)
        if charged and cost is not None and cost > admission.reserved_usd + 1e-12:
            log.warning("call %s cost $%.6f, more than the $%.6f reserved for its worst case",
                        admission.call_id, cost, admission.reserved_usd)

        charge = (cost or 0.0) if charged else 0.0
        call_row = dict(
            id=admission.call_id, started_at=dt.datetime.fromisoformat(admission.started_at), ended_at=finish["ended"],
            call_type=admission.call_type, user_id=ctx.get("user_id"), department=ctx.get("department"),
            use_case=ctx.get("use_case"), data_sensitivity=ctx.get("data_sensitivity"),
            requested_model=admission.requested_model, route=admission.route, provider_model=record.provider_model,
            status=finish["new_status"], stream=bool(record.stream), prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, cached_tokens=record.cached_tokens,
            reasoning_tokens=record.reasoning_tokens, cost_usd=cost, reserved_usd=admission.reserved_usd,
            price_id=admission.price_id, latency_ms=record.latency_ms, error_type=record.error_type,
            error_message=finish["error_message_"], outcome=outcome)
        audit_row = {**audit_row, "extra": {**audit_row["extra"], "credit_id": admission.credit_id}}

        def persist(block_id: str, windows: tuple[tuple[str, str], ...], less: float, close: bool) -> None:
            if self.mart.store.dialect == "postgresql" and self._record_credit_in_one_statement(
                    block_id, less, charge, close, call_row, audit_row):
                return
            with self.mart.store.tx() as tx:
                # lock order: the block's reservation, its windows, then the audit chain head
                self.budgets.credit_reduce(tx, block_id, windows, less=less, spent=charge, close=close,
                                           now=call_row["ended_at"])
                tx.run("llm_calls.insert", _q_insert_call, **call_row)
                self.audit.append(tx, audit_row)

        if self.budgets.credit.settle(admission.credit_id or "", admission.call_id, persist):
            return True
        log.debug("call %s: already written (admission credit %s)", admission.call_id, admission.credit_id)
        return False

    def _record_in_one_statement(self, admission: Admission, record: "CallRecord", cost: float | None,
                                 finish: dict[str, Any], audit_row: dict[str, Any], *, settle: bool) -> bool | None:
        """PostgreSQL: :meth:`_record` in one autocommit statement — finish the call row, settle or release
        its reservation, append the audit row after the locked chain head and advance the head — instead of
        nine round trips, so the head row (which serialises every append) is held for one statement.

        None when the chain has no head yet (the first row ever): the general transaction creates it."""
        audit_sql, params = self.audit.append_sql(audit_row, when="EXISTS (SELECT 1 FROM fin)")
        charged = _charged(record, cost)
        params.update(finish, rid=admission.reservation_id if settle else None,
                      charge=(cost or 0.0) if charged else 0.0, res_status="settled" if charged else "released")
        with self.mart.store.autocommit() as cursor:
            has_head, finished, amount = cursor.execute(_PG_RECORD.replace("{audit}", audit_sql), params).fetchone()
        if not has_head:
            return None
        if finished and amount is not None and (cost or 0) > amount + 1e-12:
            log.warning("call %s cost $%.6f, more than the $%.6f reserved for its worst case",
                        admission.call_id, cost, amount)
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

    def _forget_stream(self, call_id: str) -> None:
        """A governed stream's call is settled: stop tracking it, and tell the stream."""
        with self._lock:
            tally = self._streams.pop(call_id, None)
        if tally is not None:
            tally.settled.set()

    def record_unenforced(self, record: "CallRecord") -> None:
        """Record a call that reached a provider without admission (plain sync ``litellm.completion``):
        it is audited as ``unenforced`` and its cost counted against the budgets it belongs to."""
        if record.exception is not None and isinstance(record.exception, GovernanceError):
            return
        try:
            ctx = self.context(dict(record.metadata))
        except MetadataError:
            ctx = CallContext()
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
                   error_type=record.error_type, error_message=redact(record.error_message))
            self.audit.append(tx, {
                "call_id": call_id, "recorded_at": now, "user_id": ctx.user_id, "department": ctx.department,
                "audit_reason": ctx.audit_reason, "use_case": ctx.use_case, "data_sensitivity": ctx.data_sensitivity,
                "requested_model": model, "route": model, "decision": "unenforced", "rule": rule,
                "status": "success" if record.ok else "failure",
                "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
                "cost_usd": cost, "latency_ms": record.latency_ms,
                "error": f"{record.error_type}: {record.error_message}" if not record.ok else None,
                **self.content_fields(record.messages, record.tools, record.tool_calls)})
        if direct:
            log.error("LLM call %s went straight to %s although governance.gateway_only is on (plain sync "
                      "litellm.completion cannot be stopped); use model='tidyllm/<group>' or a governed Router",
                      call_id, model)
        else:
            log.warning("unenforced LLM call %s to %s (a path tidyllm cannot stop, e.g. plain sync "
                        "litellm.completion); use model='tidyllm/<group>' or a governed Router", call_id, model)
        self._notify(record, None)

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



def _worst(price: "Price", prompt_tokens: int, answer_tokens: int) -> float:
    """A call's worst-case cost, computed as BudgetLedger.reserve computes it."""
    return prompt_tokens * price.input_per_1m / 1e6 + answer_tokens * (price.output_per_1m / 1e6)


def _credit_admission(block_id: str, *, call_id: str, route: str, requested_model: str, call_type: str,
                      ctx: CallContext, now: dt.datetime, max_tokens: int, worst: float, price: "Price",
                      extra: Mapping[str, Any] | None) -> Admission:
    """The admission of a call admitted from admission-credit block ``block_id``."""
    return Admission(call_id=call_id, route=route, requested_model=requested_model, call_type=call_type,
                     context=ctx.as_dict(), started_at=now.isoformat(), max_tokens=max_tokens, clamped=False,
                     reserved_usd=worst, price_id=price.id, input_per_1m=price.input_per_1m,
                     output_per_1m=price.output_per_1m, extra=dict(extra or {}), credit_id=block_id)


def _charged(record: "CallRecord", cost: float | None) -> bool:
    """Whether a finished call's reservation settles to a charge (else it is released unused)."""
    return record.ok or (cost or 0) > 0


# --- prepared statements (see tidyllm.mart.fastsql) ---------------------------------------------


def _q_insert_call() -> Any:
    return llm_calls.insert(), [c.name for c in llm_calls.c]


def _q_finish_call() -> Any:
    import sqlalchemy as sa

    c = llm_calls.c
    p = sa.bindparam

    def typed(name: str, column: Any) -> Any:
        return p(name, type_=column.type)

    return llm_calls.update().where(c.id == p("call_id"), c.status == "pending").values(
        ended_at=typed("ended", c.ended_at), status=typed("new_status", c.status),
        provider_model=typed("provider_model_", c.provider_model),
        prompt_tokens=typed("prompt_tokens_", c.prompt_tokens),
        completion_tokens=typed("completion_tokens_", c.completion_tokens),
        cached_tokens=typed("cached_tokens_", c.cached_tokens),
        reasoning_tokens=typed("reasoning_tokens_", c.reasoning_tokens), cost_usd=typed("cost", c.cost_usd),
        latency_ms=typed("latency", c.latency_ms), error_type=typed("error_type_", c.error_type),
        error_message=typed("error_message_", c.error_message), outcome=typed("outcome_", c.outcome),
        stream=typed("stream_", c.stream)).returning(c.id)


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
    SELECT r.id, r.windows, r.status FROM reservations r
    WHERE r.id = %(rid)s AND EXISTS (SELECT 1 FROM audit_head WHERE id = 1)
    FOR UPDATE
), {wlock}, win AS (
    UPDATE budget_windows w SET spent_usd = w.spent_usd + %(charge)s,
        reserved_usd = w.reserved_usd - CASE WHEN res.status = 'open' THEN %(less)s ELSE 0 END
    FROM wlock, res WHERE w.budget_id = wlock.budget_id AND w.window_start = wlock.window_start
    RETURNING 1
), blk AS (
    UPDATE reservations r SET
        amount_usd = r.amount_usd - CASE WHEN res.status = 'open' THEN %(less)s ELSE 0 END,
        settled_usd = COALESCE(r.settled_usd, 0) + %(charge)s,
        status = CASE WHEN res.status = 'open' AND %(close)s THEN 'settled' ELSE r.status END,
        closed_at = CASE WHEN %(close)s THEN %(c_ended_at)s ELSE r.closed_at END
    FROM res WHERE r.id = res.id
), ins AS (
    INSERT INTO llm_calls (id, started_at, ended_at, call_type, user_id, department, use_case, data_sensitivity,
                           requested_model, route, provider_model, status, stream, prompt_tokens, completion_tokens,
                           cached_tokens, reasoning_tokens, cost_usd, reserved_usd, price_id, latency_ms, error_type,
                           error_message, outcome)
    SELECT %(c_id)s, %(c_started_at)s, %(c_ended_at)s, %(c_call_type)s, %(c_user_id)s, %(c_department)s,
           %(c_use_case)s, %(c_data_sensitivity)s, %(c_requested_model)s, %(c_route)s, %(c_provider_model)s,
           %(c_status)s, %(c_stream)s, %(c_prompt_tokens)s, %(c_completion_tokens)s, %(c_cached_tokens)s,
           %(c_reasoning_tokens)s, %(c_cost_usd)s, %(c_reserved_usd)s, %(c_price_id)s, %(c_latency_ms)s,
           %(c_error_type)s, %(c_error_message)s, %(c_outcome)s
    WHERE EXISTS (SELECT 1 FROM audit_head WHERE id = 1)
    RETURNING id
), head AS (
    SELECT digest FROM audit_head WHERE id = 1 AND (SELECT count(*) FROM win) >= 0 FOR UPDATE
), {audit}
SELECT EXISTS (SELECT 1 FROM ins)
""".replace("{wlock}", _PG_WLOCK)

"""tidyllm's LiteLLM callbacks: the async pre-call gate and the settlement events.

One :class:`GovernanceCallbacks` instance is registered per installed platform. It

- gates plain ``litellm.acompletion`` / ``aembedding`` calls in ``async_pre_call_deployment_hook``
  (the only hook that can stop a plain async SDK call) through the one admission
  :class:`~tidyllm.governance.gate.Gate`. A request the Router strategy admitted arrives with the
  token of its seal, which passes this hook once; any other ``tidyllm`` value — forged, copied from
  another call — is stripped and the call governed normally (and audited as a forgery).
  ``tidyllm/`` calls pass: the provider sends them through the governed Router. A call to a
  tracking-server endpoint gets the header that links it to its MLflow trace;
- hands every finished call to :meth:`Governor.finish <tidyllm.governance.engine.Governor.finish>`
  (sync variants run on LiteLLM's logging threads, async ones on the event loop — exactly one of
  each pair runs per call), which claims the seal: a call settles exactly once;
- keeps working at interpreter exit, when LiteLLM flushes queued events on a fresh event loop and
  no thread pool takes new work: the settlement then runs inline (:func:`run_blocking`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from litellm.integrations.custom_logger import CustomLogger

from tidyllm.governance.context import STAMP_KEY
from tidyllm.governance.gate import TRIED_KEY, Candidate
from tidyllm.litellm_bridge.exit import late_settlement
from tidyllm.litellm_bridge.records import from_callback
from tidyllm.litellm_bridge.strategy import request_facts
from tidyllm.litellm_bridge.streams import run_blocking

if TYPE_CHECKING:
    from tidyllm.governance.gate import Gate

__all__ = ["GovernanceCallbacks", "run_blocking"]

log = logging.getLogger("tidyllm.governance")


class GovernanceCallbacks(CustomLogger):
    """tidyllm governance for LiteLLM (see :mod:`tidyllm.litellm_bridge.callbacks`).

    ``resolve(model, api_base) -> (route, is_gateway_endpoint)`` names the route of a plain SDK call."""

    def __init__(self, gate: "Gate", name: str, resolve: Callable[[str, str | None], tuple[str, bool]]) -> None:
        super().__init__()
        # a public string attribute makes LiteLLM's de-duplication key unique per platform
        self.tidyllm_platform = name
        self.gate = gate
        self.governor = gate.governor
        self.resolve = resolve

    # --- the gate for plain async SDK calls ------------------------------------------------------
    async def async_pre_call_deployment_hook(self, kwargs: dict, call_type: Any) -> dict | None:
        md = kwargs.get("metadata")
        if isinstance(md, dict) and self.gate.seals.pass_hook(md.get(STAMP_KEY)):
            return None  # admitted (and sealed) by the Router strategy for this very request
        model = str(kwargs.get("model") or "")
        if model.startswith("tidyllm/"):
            return None  # the tidyllm/ provider sends it through the governed Router, which admits it
        kind = getattr(call_type, "value", str(call_type or "acompletion"))
        route, is_gateway = self.resolve(model, kwargs.get("api_base"))
        is_embedding = "embed" in kind
        facts, clean = request_facts(self.gate, model, None if is_embedding else kwargs.get("messages"),
                                     kwargs.get("input") if is_embedding else None, kwargs,
                                     entry="acompletion-hook", call_type=kind)
        lookup = self.governor.trace_lookup if is_gateway else None
        candidate = Candidate(route, is_gateway, bool(kwargs.get("mock_response")), traced=lookup is not None)
        sealed = await run_blocking(self.gate.admit, facts, [candidate])
        new = dict(kwargs)
        new["metadata"] = {**clean, STAMP_KEY: sealed.token, TRIED_KEY: [*facts.tried, sealed.route]}
        self.gate.seals.pass_hook(sealed.token)
        if not is_embedding:
            new["max_tokens"] = sealed.admission.max_tokens
        if lookup is not None:
            # tags the tracking server's trace of this request with the call id (tidyllm.gateway.traces)
            new["extra_headers"] = {**(kwargs.get("extra_headers") or {}), **lookup.headers(sealed.admission.call_id)}
        return new

    # --- what came back, before the settlement event ----------------------------------------------
    # An async call's settlement event runs later, on LiteLLM's logging worker; when the caller's event
    # loop closes first (``asyncio.run`` returning, a script exiting) that task is cancelled and the event
    # is lost. These hooks run on the caller's path as the response (or error) comes back and only
    # remember it (no I/O): a call still unsettled a few seconds later, or at exit, is settled from it
    # (tidyllm.litellm_bridge.exit).
    async def async_post_call_success_deployment_hook(self, request_data: dict, response: Any,
                                                      call_type: Any) -> Any:
        md = request_data.get("metadata") if isinstance(request_data, dict) else None
        if isinstance(md, dict) and self.gate.seals.note_returned(
                md.get(STAMP_KEY), response, True, request_data.get("messages") or request_data.get("input"),
                request_data.get("tools")):
            late_settlement(self.governor)
        return None

    async def async_post_call_failure_deployment_hook(self, request_data: Any, exception: Exception,
                                                      call_type: Any, fallback_depth: int | None = None) -> None:
        md = request_data.get("metadata") if isinstance(request_data, dict) else None
        if isinstance(md, dict) and self.gate.seals.note_returned(
                md.get(STAMP_KEY), exception, False, request_data.get("messages") or request_data.get("input"),
                request_data.get("tools")):
            late_settlement(self.governor)

    # --- settlement --------------------------------------------------------------------------------
    def _safe(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any, ok: bool) -> None:
        try:
            self.governor.dispatch(from_callback(kwargs, response_obj, start_time, end_time, ok=ok))
        except Exception:  # noqa: BLE001 - callbacks must never break the caller; log loudly
            log.exception("tidyllm could not record LLM call %s", kwargs.get("litellm_call_id"))

    def log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._safe(kwargs, response_obj, start_time, end_time, True)

    def log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._safe(kwargs, response_obj, start_time, end_time, False)

    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await run_blocking(self._safe, kwargs, response_obj, start_time, end_time, True)

    async def async_log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await run_blocking(self._safe, kwargs, response_obj, start_time, end_time, False)

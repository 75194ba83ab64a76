"""tidyllm's LiteLLM callbacks: the async pre-call gate and the settlement callbacks.

One :class:`GovernanceCallbacks` instance is registered per installed platform. It

- gates plain ``litellm.acompletion`` / ``aembedding`` calls in ``async_pre_call_deployment_hook``
  (the only hook that can stop a plain SDK call), skipping calls the Router strategy already admitted
  and ``tidyllm/`` calls (the provider sends those through the governed Router); a call to a
  tracking-server endpoint gets the header that links it to its MLflow trace;
- settles every admitted call from the success/failure callbacks (sync variants run on LiteLLM's
  logging threads, async ones on the event loop — exactly one of each pair runs per call);
- records plain sync ``litellm.completion`` calls, which no callback can stop, as ``unenforced``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

from tidyllm._litellm import import_litellm
from tidyllm.errors import GovernanceError, MetadataError
from tidyllm.governance.context import STAMP_KEY
from tidyllm.records import from_callback

if TYPE_CHECKING:
    from tidyllm.governance.engine import Governor
    from tidyllm.records import CallRecord

__all__ = ["make_callbacks"]

log = logging.getLogger("tidyllm.governance")

#: call types that produce text (max_tokens applies); everything else is priced on input only
_EMBEDDING_TYPES = ("embedding", "aembedding")


def make_callbacks(governor: "Governor", name: str,
                   resolve: Callable[[str, str | None], tuple[str, bool]]) -> Any:
    """A ``CustomLogger`` for ``governor``. ``resolve(model, api_base) -> (route, is_gateway_endpoint)``."""
    import_litellm()
    from litellm.integrations.custom_logger import CustomLogger

    class GovernanceCallbacks(CustomLogger):
        """tidyllm governance for LiteLLM (see :mod:`tidyllm.governance.hooks`)."""

        def __init__(self) -> None:
            super().__init__()
            # a public string attribute makes LiteLLM's de-duplication key unique per platform
            self.tidyllm_platform = name
            self.governor = governor

        # --- the gate for plain async SDK calls --------------------------------------------------
        async def async_pre_call_deployment_hook(self, kwargs: dict, call_type: Any) -> dict | None:
            md = kwargs.get("metadata") or {}
            if isinstance(md, dict) and isinstance(md.get(STAMP_KEY), dict):
                return None  # admitted by the Router strategy
            kind = getattr(call_type, "value", str(call_type or "acompletion"))
            model = str(kwargs.get("model") or "")
            if model.startswith("tidyllm/"):
                return None  # the tidyllm/ provider sends it through the governed Router, which admits it
            route, is_gateway = resolve(model, kwargs.get("api_base"))
            is_embedding = kind in _EMBEDDING_TYPES
            messages = kwargs.get("messages")
            text = kwargs.get("input")
            try:
                ctx = governor.context(md)
            except MetadataError as err:
                await asyncio.to_thread(governor.refuse_metadata, err, metadata=md, route=route,
                                        requested_model=model, call_type=kind, messages=messages or text,
                                        call_id=kwargs.get("litellm_call_id"))
                raise
            lookup = governor.trace_lookup if is_gateway else None
            admission = await asyncio.to_thread(
                governor.admit, ctx=ctx, route=route, requested_model=model, call_type=kind,
                messages=None if is_embedding else messages, text=text if is_embedding else None,
                tools=kwargs.get("tools"), max_tokens=kwargs.get("max_tokens"), stream=bool(kwargs.get("stream")),
                mock=bool(kwargs.get("mock_response")), gateway=is_gateway,
                call_id=(md.get("tidyllm_call_id") if isinstance(md, dict) else None) or kwargs.get("litellm_call_id"),
                extra={"traced": True} if lookup is not None else None)
            new = dict(kwargs)
            new["metadata"] = {**(md if isinstance(md, dict) else {}), STAMP_KEY: admission.stamp()}
            if not is_embedding:
                new["max_tokens"] = admission.max_tokens
            if lookup is not None:
                # tags the tracking server's trace of this request with the call id (tidyllm.gateway.traces)
                new["extra_headers"] = {**(kwargs.get("extra_headers") or {}), **lookup.headers(admission.call_id)}
            return new

        # --- settlement -------------------------------------------------------------------------
        def _dispatch(self, record: "CallRecord") -> None:
            if record.stamp is not None:
                # for tidyllm/ calls both the outer and the inner event carry the stamp; finish() is idempotent
                governor.finish(record)
            elif record.provider == "tidyllm":
                return  # an outer tidyllm/ call whose inner Router call was refused (and audited) before routing
            elif isinstance(record.exception, GovernanceError):
                return  # refused and audited by whoever refused it
            else:
                governor.record_unenforced(record)

        def _safe(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any, ok: bool) -> None:
            try:
                self._dispatch(from_callback(kwargs, response_obj, start_time, end_time, ok=ok))
            except Exception:  # noqa: BLE001 - callbacks must never break the caller; log loudly
                log.exception("tidyllm could not record LLM call %s", kwargs.get("litellm_call_id"))

        def log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
            self._safe(kwargs, response_obj, start_time, end_time, True)

        def log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
            self._safe(kwargs, response_obj, start_time, end_time, False)

        async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any,
                                          end_time: Any) -> None:
            await asyncio.to_thread(self._safe, kwargs, response_obj, start_time, end_time, True)

        async def async_log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any,
                                          end_time: Any) -> None:
            await asyncio.to_thread(self._safe, kwargs, response_obj, start_time, end_time, False)

    return GovernanceCallbacks()

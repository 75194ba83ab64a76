"""The LiteLLM success callback that hands each governed answer to the signal hub's checks and judges.

Only the answer text is read here (the first choice's message content); everything else about the call
comes from :func:`tidyllm.records.from_callback`, the one reader of LiteLLM's callback dictionaries.
It only queues work (:meth:`SignalHub.observe <tidyllm.signals.hub.SignalHub.observe>`), so it adds
microseconds to LiteLLM's logging thread and nothing to the caller.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

from litellm.integrations.custom_logger import CustomLogger

if TYPE_CHECKING:
    from tidyllm.signals.hub import SignalHub

__all__ = ["AnswerObserver", "answer_text"]

log = logging.getLogger("tidyllm.signals")


def answer_text(response: Any) -> str | None:
    """The text of the first choice of a chat completion response, if it has one."""
    choices = getattr(response, "choices", None)
    if not choices:
        return None
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else None


class AnswerObserver(CustomLogger):
    """Queues each governed answer for the hub (sync and async success events; exactly one runs per call)."""

    def __init__(self, hub: "SignalHub") -> None:
        super().__init__()
        self.hub = hub

    def _observe(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        from tidyllm.records import from_callback

        try:
            record = from_callback(kwargs, response_obj, start_time, end_time, ok=True)
            stamp = record.stamp
            if not isinstance(stamp, Mapping) or not stamp.get("call_id"):
                return
            context = stamp.get("context") if isinstance(stamp.get("context"), Mapping) else {}
            if not self.hub.wants(context.get("department"), context.get("use_case")):
                return
            text = answer_text(response_obj)
            if text is None:
                return
            self.hub.observe(str(stamp["call_id"]), stamp.get("route"), context, record.messages, text)
        except Exception:  # noqa: BLE001 - observe-only: never break LiteLLM's logging
            log.exception("could not queue an answer for its quality signals")

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._observe(kwargs, response_obj, start_time, end_time)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._observe(kwargs, response_obj, start_time, end_time)

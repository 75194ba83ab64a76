"""The governor listener that hands each governed answer to the signal hub's checks and judges.

It runs after a call is settled (:meth:`Governor.add_listener <tidyllm.governance.engine.Governor.add_listener>`),
reads the answer from the :class:`~tidyllm.records.CallRecord` (the LiteLLM bridge read it from LiteLLM's
response) and the route and caller context from the admission, and only queues work
(:meth:`SignalHub.observe <tidyllm.signals.hub.SignalHub.observe>`): it adds microseconds to the
settling thread and nothing to the caller.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidyllm.governance.engine import Admission
    from tidyllm.records import CallRecord
    from tidyllm.signals.hub import SignalHub

__all__ = ["AnswerObserver"]

log = logging.getLogger("tidyllm.signals")


class AnswerObserver:
    """Queues each governed, answered call for the hub."""

    def __init__(self, hub: "SignalHub") -> None:
        self.hub = hub

    def __call__(self, record: "CallRecord", admission: "Admission | None") -> None:
        if admission is None or not record.ok or record.answer is None:
            return
        try:
            context: dict[str, Any] = dict(admission.context)
            if not self.hub.wants(context.get("department"), context.get("use_case")):
                return
            self.hub.observe(admission.call_id, admission.route, context, record.messages, record.answer)
        except Exception:  # noqa: BLE001 - observe-only: never break a settlement
            log.exception("could not queue an answer for its quality signals")

"""The frozen records tidyllm works on instead of LiteLLM's callback dictionaries and stream chunks.

:mod:`tidyllm.litellm_bridge.records` is the one place that reads LiteLLM's ``kwargs`` /
``standard_logging_object`` shapes (they change between releases) into these; everything else
reads only the records.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["CallRecord", "ChunkFacts"]


@dataclass(frozen=True)
class CallRecord:
    """What tidyllm needs to know about one finished LLM call attempt."""

    ok: bool
    litellm_call_id: str | None
    call_type: str
    #: what the request carried under ``metadata["tidyllm"]``: the gate's seal token when governance
    #: admitted the call (resolved with :meth:`Governor.seals <tidyllm.governance.engine.Governor>`); any
    #: other value is a forgery
    stamp: Any
    metadata: Mapping[str, Any]
    model: str | None
    model_id: str | None
    model_group: str | None
    provider: str | None
    api_base: str | None
    provider_model: str | None
    stream: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    litellm_cost: float | None
    latency_ms: float | None
    started_at: dt.datetime
    ended_at: dt.datetime
    error_type: str | None
    error_message: str | None
    exception: BaseException | None
    messages: Any
    tools: Any
    mock: bool
    #: quality in [0, 1] the provider reported with the answer (the provider simulator does; real providers don't)
    reported_quality: float | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    #: the tool calls the answer made, as ``(name, arguments JSON)`` pairs (arguments are audited only
    #: under ``audit.capture: full``)
    tool_calls: tuple[tuple[str, str], ...] = ()
    #: the tokens are what a stream delivered before it broke (LiteLLM's recovered partial usage)
    partial: bool = False
    #: the text of the answer's first choice (for quality checks and judges), when it has one
    answer: str | None = None


@dataclass(frozen=True)
class ChunkFacts:
    """What one streamed chunk carried, as far as cost and audit are concerned."""

    #: answer text in the chunk's delta (all choices)
    text: str = ""
    #: names of tool calls the chunk started
    tool_names: tuple[str, ...] = ()
    #: tool-call argument text the chunk carried (counted as output tokens, never audited)
    tool_text: str = ""
    finish_reason: str | None = None
    #: ``(prompt_tokens, completion_tokens)`` when the chunk carried the provider's usage
    usage: tuple[int, int] | None = None

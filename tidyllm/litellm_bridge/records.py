"""The one place that reads LiteLLM's callback dictionaries and stream objects.

LiteLLM's ``kwargs`` / ``standard_logging_object`` shapes change between releases; everything
else in tidyllm works on the frozen :class:`~tidyllm.records.CallRecord` (and, for streams,
:class:`~tidyllm.records.ChunkFacts` and :func:`stream_token`) built here. The governance,
streaming, embedding and tool-call tests exercise these readers end to end against litellm
1.110.2: a changed shape fails them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from tidyllm.governance.context import STAMP_KEY
from tidyllm.records import CallRecord, ChunkFacts

__all__ = ["answer_text", "assembled", "chunk_facts", "chunk_text", "from_callback", "from_returned", "metadata_of",
           "stream_token", "tool_calls_of", "usage_of"]


def metadata_of(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The caller's metadata as LiteLLM hands it to callbacks."""
    params = kwargs.get("litellm_params") or {}
    return params.get("metadata") or kwargs.get("metadata") or {}


def _as_dt(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc) if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    return dt.datetime.now(dt.timezone.utc)


def _usage(response_obj: Any) -> Mapping[str, Any]:
    usage = getattr(response_obj, "usage", None)
    if usage is None and isinstance(response_obj, Mapping):
        usage = response_obj.get("usage")
    if usage is None:
        return {}
    if hasattr(usage, "model_dump"):
        return usage.model_dump()
    return dict(usage) if isinstance(usage, Mapping) else {}


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def tool_calls_of(response_obj: Any) -> tuple[tuple[str, str], ...]:
    """The tool calls of a (non-streamed or assembled) chat response: ``(name, arguments)`` pairs."""
    out = []
    for choice in _get(response_obj, "choices") or ():
        message = _get(choice, "message")
        for call in _get(message, "tool_calls") or ():
            fn = _get(call, "function")
            name = _get(fn, "name")
            if isinstance(name, str) and name:
                args = _get(fn, "arguments")
                out.append((name, args if isinstance(args, str) else ""))
    return tuple(out)


def chunk_facts(chunk: Any) -> ChunkFacts:
    """Read one chunk of a LiteLLM stream (``ModelResponseStream``) into :class:`ChunkFacts`."""
    text, tool_text, names, finish = [], [], [], None
    for choice in _get(chunk, "choices") or ():
        delta = _get(choice, "delta")
        content = _get(delta, "content")
        if isinstance(content, str):
            text.append(content)
        for call in _get(delta, "tool_calls") or ():
            fn = _get(call, "function")
            name, args = _get(fn, "name"), _get(fn, "arguments")
            if isinstance(name, str) and name:
                names.append(name)
                tool_text.append(name)
            if isinstance(args, str):
                tool_text.append(args)
        finish = _get(choice, "finish_reason") or finish
    usage = _get(chunk, "usage")
    prompt, completion = _get(usage, "prompt_tokens"), _get(usage, "completion_tokens")
    counted = (int(prompt), int(completion)) if isinstance(prompt, int) and isinstance(completion, int) else None
    return ChunkFacts("".join(text), tuple(names), "".join(tool_text), finish, counted)


def stream_token(stream: Any) -> Any:
    """The gate's seal token on the call a LiteLLM stream object (``CustomStreamWrapper``) belongs to."""
    logging_obj = getattr(stream, "logging_obj", None)
    params = getattr(logging_obj, "litellm_params", None)
    md = params.get("metadata") if isinstance(params, Mapping) else None
    return md.get(STAMP_KEY) if isinstance(md, Mapping) else None


def _quality(usage: Mapping[str, Any]) -> float | None:
    value = usage.get("tidyllm_sim_quality")
    return float(value) if isinstance(value, (int, float)) and 0.0 <= value <= 1.0 else None


def from_callback(kwargs: Mapping[str, Any], response_obj: Any, start_time: Any, end_time: Any, *,
                  ok: bool) -> CallRecord:
    """Build a :class:`CallRecord` from a success or failure callback's arguments."""
    slo = kwargs.get("standard_logging_object") or {}
    md = metadata_of(kwargs)
    usage = _usage(response_obj) if ok else {}
    # a stream that broke midway: LiteLLM recovers the usage of the chunks already delivered
    recovered = kwargs.get("combined_usage_object") if not ok else None
    partial = recovered is not None and bool(_usage({"usage": recovered}).get("completion_tokens"))
    if partial:
        usage = _usage({"usage": recovered})
    prompt = usage.get("prompt_tokens", slo.get("prompt_tokens"))
    completion = usage.get("completion_tokens", slo.get("completion_tokens"))
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    exception = kwargs.get("exception")
    error_info = slo.get("error_information") or {}
    started, ended = _as_dt(start_time), _as_dt(end_time)
    latency = slo.get("response_time")
    latency_ms = float(latency) * 1000.0 if isinstance(latency, (int, float)) else (ended - started).total_seconds() * 1000.0
    provider_model = getattr(response_obj, "model", None) if ok else None
    hidden = getattr(response_obj, "_hidden_params", None) or {}
    headers = (hidden.get("additional_headers") or {}) if isinstance(hidden, Mapping) else {}
    litellm_params = kwargs.get("litellm_params") or {}
    optional = kwargs.get("optional_params") or {}
    return CallRecord(
        ok=ok,
        litellm_call_id=kwargs.get("litellm_call_id") or slo.get("litellm_call_id"),
        call_type=str(slo.get("call_type") or kwargs.get("call_type") or "completion"),
        stamp=md.get(STAMP_KEY) if isinstance(md, Mapping) else None,
        metadata=md,
        model=slo.get("model") or kwargs.get("model"),
        model_id=slo.get("model_id") or None,
        model_group=slo.get("model_group") or None,
        provider=kwargs.get("custom_llm_provider") or slo.get("custom_llm_provider"),
        api_base=slo.get("api_base") or litellm_params.get("api_base"),
        provider_model=provider_model if isinstance(provider_model, str) else None,
        stream=bool(kwargs.get("stream") or slo.get("stream")),
        prompt_tokens=int(prompt) if isinstance(prompt, (int, float)) and (ok or prompt) else None,
        completion_tokens=int(completion) if isinstance(completion, (int, float)) and (ok or completion) else None,
        cached_tokens=(details_in.get("cached_tokens") if isinstance(details_in, Mapping) else None) or None,
        reasoning_tokens=(details_out.get("reasoning_tokens") if isinstance(details_out, Mapping) else None) or None,
        litellm_cost=slo.get("response_cost") if ok else None,
        latency_ms=latency_ms,
        started_at=started,
        ended_at=ended,
        error_type=(type(exception).__name__ if exception is not None else error_info.get("error_class")) if not ok else None,
        error_message=(str(exception) if exception is not None else slo.get("error_str")) if not ok else None,
        exception=exception if isinstance(exception, BaseException) else None,
        messages=kwargs.get("messages") if kwargs.get("messages") is not None else kwargs.get("input"),
        tools=optional.get("tools") or kwargs.get("tools"),
        mock=bool(litellm_params.get("mock_response") or kwargs.get("mock_response")),
        reported_quality=_quality(usage),
        headers=headers,
        tool_calls=tool_calls_of(response_obj) if ok else (),
        partial=partial,
        answer=(answer_text(response_obj) or None) if ok else None,
    )


def from_returned(token: str, call_type: str, started: dt.datetime, outcome: Any, ok: bool, *,
                  messages: Any = None, tools: Any = None) -> CallRecord:
    """A :class:`CallRecord` from what a call returned to its caller (a response, or the exception), for a
    call whose settlement event never ran (the process exited first)."""
    usage = _usage(outcome) if ok else {}
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    ended = dt.datetime.now(dt.timezone.utc)
    provider_model = getattr(outcome, "model", None) if ok else None
    return CallRecord(
        ok=ok, litellm_call_id=None, call_type=call_type, stamp=token, metadata={}, model=None, model_id=None,
        model_group=None, provider=None, api_base=None,
        provider_model=provider_model if isinstance(provider_model, str) else None, stream=False,
        prompt_tokens=usage.get("prompt_tokens") if ok else None,
        completion_tokens=usage.get("completion_tokens") if ok else None,
        cached_tokens=(details_in.get("cached_tokens") if isinstance(details_in, Mapping) else None) or None,
        reasoning_tokens=(details_out.get("reasoning_tokens") if isinstance(details_out, Mapping) else None) or None,
        litellm_cost=None, latency_ms=(ended - started).total_seconds() * 1000.0, started_at=started, ended_at=ended,
        error_type=None if ok else type(outcome).__name__, error_message=None if ok else str(outcome),
        exception=None if ok or not isinstance(outcome, BaseException) else outcome, messages=messages, tools=tools,
        mock=False, tool_calls=tool_calls_of(outcome) if ok else (), answer=(answer_text(outcome) or None) if ok else None)


def answer_text(response: Any) -> str:
    """The text of a chat response's first choice ("" when it has none, e.g. a tool call)."""
    choices = _get(response, "choices") or ()
    message = _get(choices[0], "message") if choices else None
    content = _get(message, "content")
    return content if isinstance(content, str) else ""


def chunk_text(chunk: Any) -> str:
    """The text a streamed chunk's first choice carries."""
    choices = _get(chunk, "choices") or ()
    content = _get(_get(choices[0], "delta"), "content") if choices else None
    return content if isinstance(content, str) else ""


def usage_of(response: Any) -> dict[str, Any]:
    """A response's token usage as a plain dict (prompt, completion and total tokens; {} when absent)."""
    return dict(_usage(response))


def assembled(chunks: list[Any], messages: Any) -> Any:
    """The response LiteLLM rebuilds from a stream's chunks."""
    import litellm

    return litellm.stream_chunk_builder(chunks, messages=messages)

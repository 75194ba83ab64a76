"""The ``tidyllm/`` provider prefix: the governed path for plain *sync* ``litellm.completion``.

LiteLLM 1.110 gives callbacks no way to stop a sync SDK call, but it does let a custom provider
handle a model prefix. ``litellm.completion(model="tidyllm/chat", ...)`` lands here and is sent
through the platform's governed Router (model group or endpoint ``chat``), so budgets,
authorisation, routing and audit apply exactly as for Router calls. LiteLLM re-wraps exceptions
raised by a custom provider as ``litellm.BadRequestError``; the original tidyllm error (for
example :class:`tidyllm.BudgetExceededError`) is kept as its ``__cause__`` and its message is
carried through unchanged (other errors are wrapped as ``litellm.APIConnectionError``, message kept).

``litellm.embedding(model="tidyllm/embed", input=[...])`` is governed the same way (the Router's
embedding call). Streams come back from the Router as governed streams
(:mod:`tidyllm.litellm_bridge.streams`): when the caller closes or drops the outer stream LiteLLM made
of this provider's generator, the generator closes the inner one, which settles the call for what
it delivered. A gateway that refuses the MLflow credential (HTTP 401/403) is reported as a
:class:`tidyllm.GatewayError` naming the variables to set.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator

import litellm
from litellm import CustomLLM

__all__ = ["TidyLLMProvider", "PROVIDER"]

PROVIDER = "tidyllm"
# LiteLLM-internal keys of litellm_params["metadata"] that must not be forwarded as caller context
_INTERNAL = {"hidden_params", "llm_api_timing_windows", "model_info", "deployment", "api_base", "model_group",
             "original_model_group", "model_group_size", "attempted_retries", "attempted_fallbacks", "max_retries"}
_FORWARD = ("max_tokens", "max_completion_tokens", "best_of", "temperature", "top_p", "stop", "tools", "tool_choice", "response_format", "seed", "n",
            "presence_penalty", "frequency_penalty", "user", "stream_options", "parallel_tool_calls", "logprobs")


def _request(model: str, messages: list, optional_params: dict, litellm_params: dict | None) -> dict[str, Any]:
    """The governed Router request for an outer ``tidyllm/`` call: the caller's context (a copy, without
    LiteLLM's own keys: tidyllm never writes into the caller's dict) and the forwarded parameters."""
    params = litellm_params if litellm_params is not None else {}
    md = params.get("metadata")
    md = {k: v for k, v in md.items() if k not in _INTERNAL} if isinstance(md, dict) else {}
    req: dict[str, Any] = {"model": model, "messages": messages, "metadata": md}
    for key in _FORWARD:
        if optional_params.get(key) is not None:
            req[key] = optional_params[key]
    mock = (litellm_params or {}).get("mock_response")
    if mock is not None:
        req["mock_response"] = mock
    return req

def _translated(exc: Exception) -> Exception:
    """A 401/403 from the MLflow gateway becomes a GatewayError saying what to set."""
    if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)):
        from tidyllm.errors import GatewayError

        said = str(exc.message).strip().splitlines()[0] if str(exc.message).strip() else type(exc).__name__
        if isinstance(exc, litellm.PermissionDeniedError):
            return GatewayError(f"the MLflow gateway refused the call (HTTP 403): the MLflow user lacks "
                                f"permission for this endpoint; ask an MLflow admin. Gateway said: {said}")
        return GatewayError(f"the MLflow gateway rejected the credential (HTTP 401): set MLFLOW_TRACKING_USERNAME "
                            f"and MLFLOW_TRACKING_PASSWORD (or mlflow_username / mlflow_password in tidyllm.yaml) "
                            f"to an MLflow user of that server. Gateway said: {said}")
    return exc

def _call(fn: Callable[..., Any], req: dict[str, Any]) -> Any:
    try:
        return fn(**req)
    except Exception as exc:  # noqa: BLE001 - translated once, here, where it enters
        translated = _translated(exc)
        if translated is exc:
            raise
        raise translated from exc

async def _acall(fn: Callable[..., Any], req: dict[str, Any]) -> Any:
    try:
        return await fn(**req)
    except Exception as exc:  # noqa: BLE001 - translated once, here, where it enters
        translated = _translated(exc)
        if translated is exc:
            raise
        raise translated from exc

def _embedding_request(model: str, input: list, optional_params: dict, litellm_params: Any) -> dict[str, Any]:
    req = _request(model, [], optional_params, litellm_params)
    req.pop("messages")
    req["input"] = input
    for key in ("encoding_format", "dimensions"):
        if optional_params.get(key) is not None:
            req[key] = optional_params[key]
    return req

class TidyLLMProvider(CustomLLM):
    """Handles ``tidyllm/<model group or endpoint>`` by calling the governed Router ``get_router()`` returns."""

    def __init__(self, get_router: Callable[[], Any]) -> None:
        super().__init__()
        self.get_router = get_router

    def completion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                   model_response: Any, print_verbose: Any, encoding: Any, api_key: Any, logging_obj: Any,
                   optional_params: dict, acompletion: Any = None, litellm_params: Any = None,
                   logger_fn: Any = None, headers: Any = None, timeout: Any = None, client: Any = None) -> Any:
        return _call(self.get_router().completion, _request(model, messages, optional_params, litellm_params))

    async def acompletion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                          model_response: Any, print_verbose: Any, encoding: Any, api_key: Any,
                          logging_obj: Any, optional_params: dict, acompletion: Any = None,
                          litellm_params: Any = None, logger_fn: Any = None, headers: Any = None,
                          timeout: Any = None, client: Any = None) -> Any:
        return await _acall(self.get_router().acompletion, _request(model, messages, optional_params, litellm_params))

    def streaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                  model_response: Any, print_verbose: Any, encoding: Any, api_key: Any, logging_obj: Any,
                  optional_params: dict, acompletion: Any = None, litellm_params: Any = None,
                  logger_fn: Any = None, headers: Any = None, timeout: Any = None,
                  client: Any = None) -> Iterator[Any]:
        req = _request(model, messages, optional_params, litellm_params)
        req["stream"] = True
        req.setdefault("stream_options", {"include_usage": True})
        inner = _call(self.get_router().completion, req)
        try:
            for chunk in inner:
                yield _generic_chunk(chunk)
        finally:
            inner.close()  # the caller closed or dropped the outer stream: settle what it got

    async def astreaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                         model_response: Any, print_verbose: Any, encoding: Any, api_key: Any,
                         logging_obj: Any, optional_params: dict, acompletion: Any = None,
                         litellm_params: Any = None, logger_fn: Any = None, headers: Any = None,
                         timeout: Any = None, client: Any = None) -> AsyncIterator[Any]:
        req = _request(model, messages, optional_params, litellm_params)
        req["stream"] = True
        req.setdefault("stream_options", {"include_usage": True})
        inner = await _acall(self.get_router().acompletion, req)
        try:
            async for chunk in inner:
                yield _generic_chunk(chunk)
        finally:
            await inner.aclose()  # the caller closed or dropped the outer stream: settle what it got

    def embedding(self, model: str, input: list, model_response: Any, print_verbose: Any, logging_obj: Any,
                  optional_params: dict, api_key: Any = None, api_base: Any = None, timeout: Any = None,
                  litellm_params: Any = None) -> Any:
        return _call(self.get_router().embedding, _embedding_request(model, input, optional_params, litellm_params))

    async def aembedding(self, model: str, input: list, model_response: Any, print_verbose: Any,
                         logging_obj: Any, optional_params: dict, api_key: Any = None, api_base: Any = None,
                         timeout: Any = None, litellm_params: Any = None) -> Any:
        return await _acall(self.get_router().aembedding,
                            _embedding_request(model, input, optional_params, litellm_params))



def _tool_use(delta: Any) -> dict[str, Any] | None:
    """The first tool-call delta of a chunk, as LiteLLM's ``ChatCompletionToolCallChunk``."""
    calls = getattr(delta, "tool_calls", None) if delta is not None else None
    if not calls:
        return None
    call = calls[0]
    fn = getattr(call, "function", None)
    return {"id": getattr(call, "id", None), "type": "function", "index": getattr(call, "index", 0) or 0,
            "function": {"name": getattr(fn, "name", None), "arguments": getattr(fn, "arguments", None) or ""}}


def _generic_chunk(chunk: Any) -> dict[str, Any]:
    """A Router stream chunk as the ``GenericStreamingChunk`` LiteLLM expects from a custom provider."""
    choice = chunk.choices[0] if getattr(chunk, "choices", None) else None
    delta = getattr(choice, "delta", None)
    usage = getattr(chunk, "usage", None)
    return {
        "text": (getattr(delta, "content", None) or "") if delta is not None else "",
        "tool_use": _tool_use(delta),
        "is_finished": bool(getattr(choice, "finish_reason", None)) if choice is not None else usage is not None,
        "finish_reason": (getattr(choice, "finish_reason", None) or "") if choice is not None else "stop",
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.total_tokens} if usage is not None else None,
        "index": 0,
    }

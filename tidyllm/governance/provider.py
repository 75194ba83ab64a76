"""The ``tidyllm/`` provider prefix: the governed path for plain *sync* ``litellm.completion``.

LiteLLM 1.110 gives callbacks no way to stop a sync SDK call, but it does let a custom provider
handle a model prefix. ``litellm.completion(model="tidyllm/chat", ...)`` lands here and is sent
through the platform's governed Router (model group or endpoint ``chat``), so budgets,
authorisation, routing and audit apply exactly as for Router calls. LiteLLM re-wraps exceptions
raised by a custom provider as ``litellm.BadRequestError``; the original tidyllm error (for
example :class:`tidyllm.BudgetExceededError`) is kept as its ``__cause__`` and its message is
carried through unchanged.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator

from tidyllm._litellm import import_litellm

__all__ = ["make_provider", "PROVIDER"]

PROVIDER = "tidyllm"
# LiteLLM-internal keys of litellm_params["metadata"] that must not be forwarded as caller context
_INTERNAL = {"hidden_params", "llm_api_timing_windows", "model_info", "deployment", "api_base", "model_group",
             "original_model_group", "model_group_size", "attempted_retries", "attempted_fallbacks", "max_retries"}
_FORWARD = ("max_tokens", "temperature", "top_p", "stop", "tools", "tool_choice", "response_format", "seed", "n",
            "presence_penalty", "frequency_penalty", "user", "stream_options", "parallel_tool_calls", "logprobs")


def make_provider(get_router: Callable[[], Any]) -> Any:
    """A ``CustomLLM`` forwarding ``tidyllm/<group>`` calls to the router ``get_router()`` returns."""
    import_litellm()
    from litellm import CustomLLM

    def _request(model: str, messages: list, optional_params: dict, litellm_params: dict | None) -> dict[str, Any]:
        # The inner Router call shares the outer call's metadata dict on purpose: the strategy's stamp
        # then reaches whichever of the two success events LiteLLM delivers (it may suppress one as a
        # duplicate of the other), and settlement is idempotent.
        params = litellm_params if litellm_params is not None else {}
        md = params.get("metadata")
        if not isinstance(md, dict):
            md = params["metadata"] = {}
        for key in _INTERNAL & set(md):
            md.pop(key)
        req: dict[str, Any] = {"model": model, "messages": messages, "metadata": md}
        for key in _FORWARD:
            if optional_params.get(key) is not None:
                req[key] = optional_params[key]
        mock = (litellm_params or {}).get("mock_response")
        if mock is not None:
            req["mock_response"] = mock
        return req

    class TidyLLMProvider(CustomLLM):
        """Handles ``tidyllm/<model group or endpoint>`` by calling the governed Router."""

        def completion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                       model_response: Any, print_verbose: Any, encoding: Any, api_key: Any, logging_obj: Any,
                       optional_params: dict, acompletion: Any = None, litellm_params: Any = None,
                       logger_fn: Any = None, headers: Any = None, timeout: Any = None, client: Any = None) -> Any:
            return get_router().completion(**_request(model, messages, optional_params, litellm_params))

        async def acompletion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                              model_response: Any, print_verbose: Any, encoding: Any, api_key: Any,
                              logging_obj: Any, optional_params: dict, acompletion: Any = None,
                              litellm_params: Any = None, logger_fn: Any = None, headers: Any = None,
                              timeout: Any = None, client: Any = None) -> Any:
            return await get_router().acompletion(**_request(model, messages, optional_params, litellm_params))

        def streaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                      model_response: Any, print_verbose: Any, encoding: Any, api_key: Any, logging_obj: Any,
                      optional_params: dict, acompletion: Any = None, litellm_params: Any = None,
                      logger_fn: Any = None, headers: Any = None, timeout: Any = None,
                      client: Any = None) -> Iterator[Any]:
            req = _request(model, messages, optional_params, litellm_params)
            req["stream"] = True
            req.setdefault("stream_options", {"include_usage": True})
            for chunk in get_router().completion(**req):
                yield _generic_chunk(chunk)

        async def astreaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                             model_response: Any, print_verbose: Any, encoding: Any, api_key: Any,
                             logging_obj: Any, optional_params: dict, acompletion: Any = None,
                             litellm_params: Any = None, logger_fn: Any = None, headers: Any = None,
                             timeout: Any = None, client: Any = None) -> AsyncIterator[Any]:
            req = _request(model, messages, optional_params, litellm_params)
            req["stream"] = True
            req.setdefault("stream_options", {"include_usage": True})
            async for chunk in await get_router().acompletion(**req):
                yield _generic_chunk(chunk)

    return TidyLLMProvider()


def _generic_chunk(chunk: Any) -> dict[str, Any]:
    """A Router stream chunk as the ``GenericStreamingChunk`` LiteLLM expects from a custom provider."""
    choice = chunk.choices[0] if getattr(chunk, "choices", None) else None
    delta = getattr(choice, "delta", None)
    usage = getattr(chunk, "usage", None)
    return {
        "text": (getattr(delta, "content", None) or "") if delta is not None else "",
        "tool_use": None,
        "is_finished": bool(getattr(choice, "finish_reason", None)) if choice is not None else usage is not None,
        "finish_reason": (getattr(choice, "finish_reason", None) or "") if choice is not None else "stop",
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.total_tokens} if usage is not None else None,
        "index": 0,
    }

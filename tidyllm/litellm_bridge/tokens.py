"""Token counts with LiteLLM's tokenizers: what the worst-case estimator (tidyllm.governance.estimate) counts
with, and a stream's delivered text. :func:`estimate_prompt_tokens` is the estimate of earlier releases, kept as
the baseline ``bench/estimate_bench.py`` compares the estimator with."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

from tidyllm._litellm import import_litellm

__all__ = ["LiteLLMTokens", "count_tokens", "estimate_prompt_tokens", "IMAGE_TOKENS"]

litellm = import_litellm()
from litellm.utils import select_tokenizer  # noqa: E402 - after import_litellm sets the offline price map

#: input tokens reserved per image in a request: above the most any provider charges for one image
#: (OpenAI high detail tops out at 1,445, Anthropic at about 1,600, Gemini at 258)
IMAGE_TOKENS = 2_000


def count_tokens(model: str, messages: Any = None, text: Any = None, tools: Any = None) -> int:
    """LiteLLM's token count of a request's messages (and tools), or of a text or list of texts."""
    try:
        if messages is not None:
            return litellm.token_counter(model=model, messages=messages, tools=tools) if tools else \
                litellm.token_counter(model=model, messages=messages)
        items = text if isinstance(text, list) else [text or ""]
        return sum(litellm.token_counter(model=model, text=str(t)) for t in items if t != "")
    except Exception:  # noqa: BLE001 - an unknown tokenizer must not block; fall back to characters
        blob = str(messages if messages is not None else text)
        return len(blob) // 3 + 1


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
    encode = ordinary_encoder(model)
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


def ordinary_encoder(model: str) -> Callable[[str], list[int]] | None:
    """The ``encode_ordinary`` of the tiktoken encoding LiteLLM uses for ``model``, or None when LiteLLM
    picks another kind of tokenizer (a HuggingFace one) for it. Cached per model."""
    if model not in _ENCODERS:
        encode = None
        try:
            chosen = select_tokenizer(model)
            if chosen.get("type") == "openai_tokenizer":
                encode = getattr(chosen.get("tokenizer"), "encode_ordinary", None)
        except Exception:  # noqa: BLE001 - unknown models fall back to LiteLLM's token_counter
            encode = None
        if len(_ENCODERS) > 4096:
            _ENCODERS.clear()
        _ENCODERS[model] = encode
    return _ENCODERS[model]


class LiteLLMTokens:
    """The token counter the governor is given: LiteLLM's tokenizer for each route."""

    def count(self, model: str, messages: Any = None, text: Any = None, tools: Any = None) -> int:
        if messages is None and tools is None and isinstance(text, str):
            encode = ordinary_encoder(model)
            if encode is not None:
                return len(encode(text))
        return count_tokens(model, messages=messages, text=text, tools=tools)

"""The worst case a call can be billed for, in tokens, decided in one place.

A budget reservation is only a cap if it covers everything a provider can bill, and only useful if it
is not much larger than that. :class:`WorstCaseEstimator` turns a request into a :class:`WorstCase`:

**Input** (``prompt_tokens``) = ``ceil(counted x factor x (1 + margin)) + fixed``, where

- ``counted`` is the tokenizer's count of every text the provider reads: message contents (text parts),
  names, tool calls (function name and arguments), the JSON of tool definitions (``tools`` and the legacy
  ``functions``), plus OpenAI's chat framing (3 tokens a message, 1 for its role, 1 more for a ``name``,
  4 a tool call, 3 to prime the reply). The tokenizer is injected: ``count(route, text) -> int`` (LiteLLM's
  tokenizer for the route, passed by the LiteLLM bridge); without one, tiktoken's ``cl100k_base`` (from the
  copy LiteLLM bundles, never downloaded) or, when that is missing, :func:`char_count`;
- ``factor`` is learned per route from what providers report (:meth:`WorstCaseEstimator.observe`): the
  largest ``(reported - fixed) / counted`` seen, so the reserve is never below an observed bill of the
  same shape; ``margin`` (default 5 %) covers the tokenizer's uncertainty on prompts not seen yet;
- ``fixed`` is what no tokenizer can count, reserved at an upper bound and never scaled:
  ``image_tokens`` (2,000) per image — above the most any provider bills for one image (OpenAI high
  detail tops out at 1,445, Anthropic at about 1,600, Gemini at 258); audio at ``audio_tokens_per_second``
  (32, Gemini's rate; OpenAI's is about 10) for the longest the clip can play, from its decoded size at the
  lowest plausible bitrate (8,000 bytes/s for WAV/PCM, 750 bytes/s = 6 kbit/s for compressed formats);
  files at ``file_page_tokens`` (5,000: about 3,000 text tokens and 2,000 image tokens) per PDF page,
  or one token per byte for other inline files (a byte-level tokenizer never makes more); and
  ``unknown_media_tokens`` per audio or file part sent by reference (a URL or file id: size unknown).
  Token-id inputs to an embedding count exactly (one token per id). ``max_input_tokens`` (the route's
  context window), when given, caps the input: a provider refuses, unbilled, a longer prompt.

**Output** (``output_tokens``) = per-choice bound x ``choices``. The per-choice bound is the larger of
``max_tokens`` and its alias ``max_completion_tokens``, else ``default_max_tokens``. Reasoning ("thinking")
tokens are billed as output and are bounded by the same number: OpenAI's ``max_completion_tokens`` counts
reasoning tokens, Anthropic requires ``max_tokens`` above the thinking ``budget_tokens``, Gemini's
``max_output_tokens`` includes thinking. A request that turns reasoning on (``reasoning_effort`` other than
``"none"``, or ``thinking``) without a bound reserves ``default_reasoning_max_tokens`` instead (and never
less than the thinking budget). A request without a bound must be sent with the reserved one
(:attr:`WorstCase.max_tokens`). ``choices`` is ``best_of`` when given (the provider generates and bills
``best_of`` candidates and returns ``n``), else ``n`` (default 1). The prompt is billed once whatever ``n``
is. Embeddings have no output.

The module is pure Python and imports no LiteLLM; it is thread-safe. See ``bench/estimate_bench.py`` for
the tightness and the cost per call.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import importlib.util
import json
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidyllm.errors import ConfigurationError

__all__ = ["WorstCase", "WorstCaseEstimator", "Counter", "fallback_counter", "routed_counter", "simulator_counter",
           "char_count"]

#: ``count(route, text) -> int``: a tokenizer's count of ``text`` for ``route``
Counter = Callable[[str, str], int]

#: OpenAI's chat framing: tokens per message, for its role, extra for a ``name``, to prime the reply
PER_MESSAGE, PER_ROLE, PER_NAME, REPLY = 3, 1, 1, 3
#: delimiters around one tool call in an assistant message
PER_TOOL_CALL = 4
_ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})
_AUDIO_PARTS = frozenset({"input_audio", "audio", "audio_url"})
_FILE_PARTS = frozenset({"file", "input_file", "document"})
#: lowest plausible bytes per second of audio: uncompressed (8 kHz, 8 bit, mono) and compressed (6 kbit/s)
_WAV_BYTES_PER_SECOND, _COMPRESSED_BYTES_PER_SECOND = 8_000, 750
#: texts at least this long are counted one by one and their counts cached
_CACHE_MIN_CHARS = 256
#: ASCII digits and punctuation marks
_DENSE = re.compile(r"[0-9!-/:-@\[-`{-~]")
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
_DATA_URL = re.compile(r"^data:([^;,]*)(?:;[^,]*)?,", re.ASCII)


@dataclass(frozen=True)
class WorstCase:
    """The most a request can be billed for, in tokens, with the pieces it was made of.

    ``prompt_tokens`` and ``output_tokens`` are what to reserve; the rest says why (for the audit row
    and for :meth:`WorstCaseEstimator.observe`, which takes ``counted`` and ``fixed_tokens``)."""

    route: str
    #: input tokens to reserve: ``ceil(counted * factor * (1 + margin)) + fixed_tokens`` (capped by the context)
    prompt_tokens: int
    #: output tokens to reserve: ``max_tokens * choices`` (0 for an embedding)
    output_tokens: int
    #: the tokenizer's count of the request's text, chat framing included
    counted: int
    #: the route's learned safety factor applied to ``counted``
    factor: float
    #: the tokenizer-uncertainty margin applied on top of the factor
    margin: float
    image_tokens: int = 0
    audio_tokens: int = 0
    file_tokens: int = 0
    #: token ids given as embedding input, counted exactly
    id_tokens: int = 0
    #: completions billed: ``best_of`` when given, else ``n``
    choices: int = 1
    #: output bound of one choice (``max_tokens``/``max_completion_tokens`` or the default); 0 for embeddings.
    #: When the request set no bound, the caller must send this one to the provider: nothing else bounds
    #: the answer (or a reasoning model's thinking), so without it ``output_tokens`` is no worst case
    max_tokens: int = 0
    embedding: bool = False

    @property
    def fixed_tokens(self) -> int:
        """Input reserved at an upper bound, outside the factor: images, audio, files and token ids."""
        return self.image_tokens + self.audio_tokens + self.file_tokens + self.id_tokens

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens reserved."""
        return self.prompt_tokens + self.output_tokens


class WorstCaseEstimator:
    """Turns requests into :class:`WorstCase` reservations and learns a safety factor per route.

    ``count(route, text)`` is the tokenizer (None: :func:`fallback_counter`). A route starts at
    ``initial_factor``; during its first ``warmup`` observations the factor is the larger of that and the
    largest ratio seen; from then on it is the largest ratio seen (``reported / counted`` with the fixed
    input taken off), and only grows. :meth:`seed` starts a route from history. ``margin`` is added on
    top of the factor for the tokenizer's uncertainty on prompts not observed yet. Counts of texts of
    256 characters or more are cached (``cache_size`` entries, keyed by route, hash and length of the
    text, never the text itself): a chat re-sends its history on every turn."""

    def __init__(self, count: Counter | None = None, *, margin: float = 0.05, default_max_tokens: int = 1024,
                 default_reasoning_max_tokens: int = 32_768, initial_factor: float = 1.25, warmup: int = 5,
                 image_tokens: int = 2_000, audio_tokens_per_second: float = 32.0, file_page_tokens: int = 5_000,
                 unknown_media_tokens: int = 32_000, cache_size: int = 4096) -> None:
        self.count = count if count is not None else fallback_counter()
        self.margin = _number("margin", margin, 0.0)
        self.default_max_tokens = _positive_int("default_max_tokens", default_max_tokens)
        self.default_reasoning_max_tokens = _positive_int("default_reasoning_max_tokens", default_reasoning_max_tokens)
        self.initial_factor = _number("initial_factor", initial_factor, 0.0, strict=True)
        self.warmup = _positive_int("warmup", warmup, lo=0)
        self.image_tokens = _positive_int("image_tokens", image_tokens, lo=0)
        self.audio_tokens_per_second = _number("audio_tokens_per_second", audio_tokens_per_second, 0.0)
        self.file_page_tokens = _positive_int("file_page_tokens", file_page_tokens, lo=0)
        self.unknown_media_tokens = _positive_int("unknown_media_tokens", unknown_media_tokens, lo=0)
        self.cache_size = _positive_int("cache_size", cache_size, lo=0)
        self._cache: dict[tuple[str, int, int], int] = {}
        self._lock = threading.Lock()
        #: route -> (largest ratio observed or seeded, observations)
        self._learned: dict[str, tuple[float, int]] = {}

    # --- the learned factor -------------------------------------------------------------------

    def factor(self, route: str) -> float:
        """The safety factor applied to ``route``'s counted tokens now."""
        seen = self._learned.get(route)  # one dict read: atomic, no lock on the hot path
        if seen is None:
            return self.initial_factor
        ratio, observations = seen
        return ratio if observations >= self.warmup else max(ratio, self.initial_factor)

    def observe(self, route: str, counted: int, reported: int, *, fixed_tokens: int = 0) -> float:
        """Learn from a settled call: ``counted`` is :attr:`WorstCase.counted`, ``reported`` the prompt
        tokens the provider billed, ``fixed_tokens`` :attr:`WorstCase.fixed_tokens`. Returns the new factor.

        The ratio ``(reported - fixed_tokens) / counted`` raises the route's factor when it is larger
        than every ratio seen before; a call whose text counted nothing teaches nothing."""
        counted = _count_arg("counted", counted)
        reported = _count_arg("reported", reported)
        fixed_tokens = _count_arg("fixed_tokens", fixed_tokens)
        with self._lock:
            ratio, observations = self._learned.get(route, (0.0, 0))
            if counted > 0:
                ratio, observations = max(ratio, (reported - fixed_tokens) / counted), observations + 1
                self._learned[route] = (ratio, observations)
        return self.factor(route)

    def seed(self, route: str, factor: float) -> float:
        """Start ``route`` from history: its factor becomes at least ``factor`` (the largest ratio its
        past calls reported), with the warm-up done. Returns the new factor."""
        factor = _number("factor", factor, 0.0, strict=True)
        with self._lock:
            ratio, observations = self._learned.get(route, (0.0, 0))
            self._learned[route] = (max(ratio, factor), max(observations, self.warmup))
        return self.factor(route)

    def factors(self) -> dict[str, float]:
        """Every route's current factor (routes observed or seeded)."""
        with self._lock:
            routes = list(self._learned)
        return {route: self.factor(route) for route in routes}

    # --- the estimate ---------------------------------------------------------------------------

    def estimate(self, route: str, *, messages: Any = None, text: Any = None, tools: Any = None,
                 max_tokens: Any = None, n: Any = None, best_of: Any = None, embedding: bool = False,
                 max_input_tokens: int | None = None, **billable: Any) -> WorstCase:
        """The worst case of one request to ``route``.

        ``messages`` (chat) or ``text`` (a prompt, or an embedding's input: a string, a list of strings,
        a list of token ids or a list of such lists); ``tools`` the tool definitions; ``billable`` the
        other request fields that change the bill (``max_completion_tokens``, ``functions``,
        ``reasoning_effort``, ``thinking``); any other field is ignored. Raises
        :class:`~tidyllm.errors.ConfigurationError` naming the bad field."""
        if not isinstance(route, str) or not route:
            raise ConfigurationError(f"route must be a non-empty string, got {route!r}")
        if messages is not None and text is not None:
            raise ConfigurationError("give messages (a chat) or text (a prompt or embedding input), not both")
        pieces: list[str] = []
        media = _Media()
        counted = 0
        if messages is not None:
            counted += self._walk_messages(messages, pieces, media)
        id_tokens = 0
        if text is not None:
            id_tokens = _walk_text(text, pieces)
        for name, defs in (("tools", tools), ("functions", billable.get("functions"))):
            if defs:
                try:
                    pieces.append(json.dumps(defs))
                except (TypeError, ValueError) as exc:
                    raise ConfigurationError(f"{name} must be JSON (a list of tool definitions): {exc}") from None
        counted += self._count(route, pieces)
        factor = self.factor(route)
        images, audio, files = media.images * self.image_tokens, self._audio_tokens(media), self._file_tokens(media)
        prompt = math.ceil(counted * factor * (1.0 + self.margin)) + images + audio + files + id_tokens
        if max_input_tokens is not None:
            prompt = min(prompt, _positive_int("max_input_tokens", max_input_tokens))
        if embedding:
            per_choice, choices = 0, 1
        else:
            per_choice, choices = self._output_bound(max_tokens, n, best_of, billable)
        return WorstCase(route=route, prompt_tokens=prompt, output_tokens=per_choice * choices, counted=counted,
                         factor=factor, margin=self.margin, image_tokens=images, audio_tokens=audio, file_tokens=files,
                         id_tokens=id_tokens, choices=choices, max_tokens=per_choice, embedding=embedding)

    def _count(self, route: str, pieces: list[str]) -> int:
        """The tokens of ``pieces``: the short ones joined and counted at once, each long one from the
        cache (a chat re-sends its history and system prompt on every turn)."""
        short = [p for p in pieces if len(p) < _CACHE_MIN_CHARS]
        total = self.count(route, "\n".join(short)) if short else 0
        if len(short) == len(pieces):
            return total
        cache = self._cache
        for piece in pieces:
            if len(piece) < _CACHE_MIN_CHARS:
                continue
            # the hash, not the text, is kept: a cache must not hold the callers' prompts in memory
            key = (route, hash(piece), len(piece))
            tokens = cache.get(key)
            if tokens is None:
                tokens = self.count(route, piece)
                if self.cache_size:
                    if len(cache) >= self.cache_size:
                        cache.clear()
                    cache[key] = tokens
            total += tokens
        return total

    def _output_bound(self, max_tokens: Any, n: Any, best_of: Any, billable: Mapping[str, Any]) -> tuple[int, int]:
        bounds = [_positive_int(name, value) for name, value in
                  (("max_tokens", max_tokens), ("max_completion_tokens", billable.get("max_completion_tokens")))
                  if value is not None]
        thinking = billable.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, Mapping) else None
        budget = _positive_int("thinking.budget_tokens", budget) if budget is not None else 0
        reasoning = (billable.get("reasoning_effort") not in (None, "none")
                     or (isinstance(thinking, Mapping) and thinking.get("type") != "disabled"))
        if bounds:
            per_choice = max(*bounds, budget)
        else:
            per_choice = max(self.default_reasoning_max_tokens if reasoning else self.default_max_tokens, budget)
        choices = 1 if n is None else _positive_int("n", n)
        if best_of is not None:
            best_of = _positive_int("best_of", best_of)
            if best_of < choices:
                raise ConfigurationError(f"best_of ({best_of}) must be at least n ({choices}): the provider "
                                         "generates best_of completions and returns the best n")
            choices = best_of
        return per_choice, choices

    def _walk_messages(self, messages: Any, pieces: list[str], media: "_Media") -> int:
        """Append every text of a chat to ``pieces``, count its media, return its framing tokens."""
        if not isinstance(messages, (list, tuple)):
            raise ConfigurationError(f"messages must be a list of message dicts, got {type(messages).__name__}")
        framing = REPLY
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                dump = getattr(message, "model_dump", None)  # a pydantic message object
                message = dump() if callable(dump) else None
                if not isinstance(message, Mapping):
                    raise ConfigurationError(f"messages[{i}] must be a dict with 'role' and 'content'")
            framing += PER_MESSAGE
            for key, value in message.items():
                if value is None:
                    continue
                if key == "content":
                    _walk_content(value, pieces, media, f"messages[{i}].content")
                elif key == "role":
                    framing += PER_ROLE
                    if value not in _ROLES:
                        pieces.append(str(value))
                elif key in ("tool_calls", "function_call"):
                    calls = value if isinstance(value, (list, tuple)) else [value]
                    for call in calls:
                        fn = call.get("function", call) if isinstance(call, Mapping) else {}
                        framing += PER_TOOL_CALL
                        pieces.append(f"{fn.get('name') or ''} {fn.get('arguments') or ''}")
                elif key == "name":
                    framing += PER_NAME
                    pieces.append(str(value))
                elif isinstance(value, str):  # tool_call_id and provider-specific text fields
                    pieces.append(value)
        return framing

    def _audio_tokens(self, media: "_Media") -> int:
        return math.ceil(media.audio_seconds * self.audio_tokens_per_second) + \
            media.unknown_audio * self.unknown_media_tokens

    def _file_tokens(self, media: "_Media") -> int:
        return (media.pdf_pages * self.file_page_tokens + media.file_bytes
                + media.unknown * self.unknown_media_tokens)


class _Media:
    """What a request's media parts weigh, before converting to tokens."""

    __slots__ = ("images", "audio_seconds", "unknown_audio", "pdf_pages", "file_bytes", "unknown")

    def __init__(self) -> None:
        self.images = self.unknown_audio = self.pdf_pages = self.file_bytes = self.unknown = 0
        self.audio_seconds = 0.0


def _walk_content(content: Any, pieces: list[str], media: _Media, where: str) -> None:
    if isinstance(content, str):
        pieces.append(content)
        return
    if not isinstance(content, (list, tuple)):
        raise ConfigurationError(f"{where} must be a string or a list of content parts, got {type(content).__name__}")
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ConfigurationError(f"{where}: a content part must be a dict with a 'type', got {part!r}")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text", "refusal"):
            pieces.append(str(part.get(kind if kind == "refusal" else "text") or ""))
        elif kind in _IMAGE_PARTS:
            media.images += 1
        elif kind in _AUDIO_PARTS:
            _audio(part.get(kind) if isinstance(part.get(kind), Mapping) else part, media)
        elif kind in _FILE_PARTS:
            _file(part.get(kind) if isinstance(part.get(kind), Mapping) else part, media)
        else:  # an unknown part: its JSON is more than any provider reads of it
            pieces.append(json.dumps(part, default=str))


def _audio(spec: Mapping[str, Any], media: _Media) -> None:
    data = spec.get("data")
    size = _decoded_size(data) if isinstance(data, str) else None
    if size is None:
        media.unknown_audio += 1
        return
    fmt = str(spec.get("format") or "").lower()
    rate = _WAV_BYTES_PER_SECOND if fmt in ("wav", "pcm16", "pcm", "l16") else _COMPRESSED_BYTES_PER_SECOND
    media.audio_seconds += size / rate


def _file(spec: Mapping[str, Any], media: _Media) -> None:
    data = spec.get("file_data") or spec.get("data")
    if not isinstance(data, str):
        source = spec.get("source")
        data = source.get("data") if isinstance(source, Mapping) else None
    if not isinstance(data, str) or not data:
        media.unknown += 1  # a file id or URL: its size is not in the request
        return
    header = _DATA_URL.match(data)
    payload = data[header.end():] if header else data
    try:
        raw = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raw = payload.encode()  # plain text sent inline
    if raw[:5] == b"%PDF-" or (header and header.group(1) == "application/pdf"):
        pages = len(_PDF_PAGE.findall(raw))
        if pages:
            media.pdf_pages += pages
            return
    media.file_bytes += len(raw)


def _decoded_size(data: str) -> int | None:
    header = _DATA_URL.match(data)
    payload = data[header.end():] if header else data
    if not payload:
        return None
    return len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))  # base64 without its padding


def _walk_text(text: Any, pieces: list[str]) -> int:
    """Append the strings of a prompt or embedding input to ``pieces``; return its token-id count."""
    if isinstance(text, str):
        pieces.append(text)
        return 0
    if not isinstance(text, (list, tuple)):
        raise ConfigurationError(f"text must be a string, a list of strings or of token ids, got {type(text).__name__}")
    ids = 0
    for i, item in enumerate(text):
        if isinstance(item, str):
            pieces.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            ids += 1
        elif isinstance(item, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids += len(item)
        else:
            raise ConfigurationError(f"text[{i}] must be a string, a token id or a list of token ids, got {item!r}")
    return ids


# --- the fallback tokenizer ---------------------------------------------------------------------

#: tiktoken's split pattern of cl100k_base (tiktoken_ext/openai_public.py)
_CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                   r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
#: the name LiteLLM's bundled copy of cl100k_base has (tiktoken's cache key: sha1 of its URL)
_CL100K_FILE = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
_fallback: list[Counter] = []
_fallback_lock = threading.Lock()


def fallback_counter() -> Counter:
    """The tokenizer used when none is injected, built once per process.

    tiktoken's ``cl100k_base`` when tiktoken is installed and its vocabulary is available offline (already
    loaded, or the copy bundled in the LiteLLM package, read without importing LiteLLM); otherwise
    :func:`char_count`, which counts more than any byte-pair tokenizer on ordinary text."""
    with _fallback_lock:
        if not _fallback:
            _fallback.append(_cl100k_counter() or (lambda route, text: char_count(text)))
        return _fallback[0]


def routed_counter(default: Counter, by_route: Mapping[str, Counter]) -> Counter:
    """A tokenizer that counts with ``by_route[pattern]`` for routes matching a pattern (``fnmatch``
    syntax, first match wins in the mapping's order) and with ``default`` for the others.

    The estimate is only tight with the route's own tokenizer: give the routes served by a provider
    whose tokenizer tidyllm knows (the provider simulator: :func:`simulator_counter`) their own."""
    patterns = list(by_route.items())
    chosen: dict[str, Counter] = {}

    def count(route: str, text: str) -> int:
        fn = chosen.get(route)
        if fn is None:
            fn = next((c for pattern, c in patterns if fnmatch.fnmatchcase(route, pattern)), default)
            if len(chosen) >= 4096:
                chosen.clear()
            chosen[route] = fn
        return fn(route, text)

    return count


def simulator_counter(route: str, text: str) -> int:
    """The provider simulator's own tokenizer (:func:`tidyllm.gateway.simulator.count_tokens`)."""
    from tidyllm.gateway.simulator import count_tokens

    return count_tokens(text)


def char_count(text: str) -> int:
    """An upper count without a vocabulary: one token per two ASCII letters or spaces, one per ASCII
    digit or punctuation mark (byte-pair tokenizers split numbers into groups of at most three digits
    and keep most marks apart), two per other character; rounded up."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    dense = len(_DENSE.findall(text))
    return (ascii_chars - dense + 1) // 2 + dense + 2 * (len(text) - ascii_chars)


def _cl100k_counter() -> Counter | None:
    try:
        import tiktoken
        import tiktoken.registry
    except ImportError:
        return None
    encoding = tiktoken.registry.ENCODINGS.get("cl100k_base")
    if encoding is None:
        spec = importlib.util.find_spec("litellm")
        locations = list(spec.submodule_search_locations or ()) if spec is not None else []
        path = next((Path(p) / "litellm_core_utils" / "tokenizers" / _CL100K_FILE for p in locations), None)
        if path is None or not path.is_file():
            return None
        ranks = {}
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        encoding = tiktoken.Encoding("cl100k_base", pat_str=_CL100K_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                                                     "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                                     "<|endofprompt|>": 100276})
    encode = encoding.encode_ordinary
    return lambda route, text: len(encode(text))


# --- argument checks ----------------------------------------------------------------------------


def _positive_int(name: str, value: Any, *, lo: int = 1) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigurationError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _number(name: str, value: Any, lo: float, *, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > lo if strict else value >= lo)
    if not ok:
        raise ConfigurationError(f"{name} must be a finite number {'>' if strict else '>='} {lo:g}, got {value!r}")
    return float(value)


def _count_arg(name: str, value: Any) -> int:
    return _positive_int(name, value, lo=0)

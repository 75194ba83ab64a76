"""The provider simulator: an OpenAI-compatible HTTP server that stands in for real LLM providers.

No machine tidyllm is developed or tested on reaches a real provider, so the demo, the tests and the
benchmarks point MLflow gateway endpoints (``provider: openai``, ``openai_api_base: <sim.url>``) or
LiteLLM (``model="openai/<name>", api_base=sim.url``) at this **simulator**. Every response says so:
header ``x-tidyllm-simulator: 1``, ``system_fingerprint: "tidyllm-simulator"`` and ids starting
``chatcmpl-sim-``. A real deployment swaps the endpoint config, nothing else::

    from tidyllm.gateway.simulator import Simulator, load_profiles
    with Simulator(load_profiles("profiles.yaml"), seed=0, latency_scale=0) as sim:
        litellm.completion(model="openai/sim-gpt-small", api_base=sim.url, api_key="x", messages=...)
        assert sim.hits("sim-gpt-small") == 1

HTTP API
--------
``POST /v1/chat/completions``  ``model``, ``messages``, ``n``, ``max_tokens`` / ``max_completion_tokens``,
``stream``, ``stream_options.include_usage``, ``tools``, ``tool_choice``, ``user``; other OpenAI fields
(``temperature``, ``stop``, ``response_format``, ...) are accepted and do not change the answer.
``POST /v1/embeddings`` (``input`` a string, a list of strings or token ids; ``encoding_format`` float or
base64), ``GET /v1/models``, ``GET /v1/models/{name}``, ``GET /health``. Admin, for a simulator in another
process: ``GET /_sim/stats``, ``POST /_sim/outage {"model": ..., "down": true}``, ``POST /_sim/reset``. ``stats()["billed"]`` counts the
prompt and completion tokens each model answered with, as a provider would bill them (the red-team tests
compare it with what tidyllm charged).

Behaviour of one request, in this order: a model that is down (``set_outage`` or a scheduled ``outages``
window) answers **503**; a ``rate_limits`` window or the ``rpm`` limit answers **429** with ``retry-after``
and ``retry-after-ms`` headers; with probability ``error_rate`` it answers **500** (after the base latency); otherwise 200 after
the profile's latency times ``latency_scale``. Every request that names a model counts as a hit, whatever
its outcome. Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

Determinism: request *k* (0-based, counted per model since start or :meth:`Simulator.reset_stats`) draws
its error, jitter, output length, quality noise, stream failure and words from
``random.Random(f"{seed}:{model}:{k}")``. The same seed and the same request sequence give the same
outputs, latencies and errors; concurrent clients change only which request gets which *k*.

Tokens: a deterministic heuristic, no tokenizer download. :func:`count_tokens` splits text into words and
punctuation marks; a word costs ``1 + (len - 1) // 6`` tokens (about 1.3 per English word), a mark one.
A chat prompt costs the tokens of every text part and tool-call argument, plus 3 per message and 3 for the
reply, plus the tokens of the JSON of ``tools``. Answers are made of words of at most six letters, so the
reported ``completion_tokens`` equals :func:`count_tokens` of the content. ``completion_tokens`` never
exceeds ``max_tokens``; a cut answer has ``finish_reason: "length"``.

Quality: each chat response reports the model's quality for the request's use case, a number in [0, 1]
for computing a reward, in three places: header ``x-tidyllm-sim-quality``, top-level field
``tidyllm_simulator: {"quality", "use_case", "model"}``, and ``usage.tidyllm_sim_quality`` -- the last one
because MLflow's gateway drops unknown top-level fields and provider headers but keeps extra ``usage`` keys.
The use case is read from, first to last: header ``x-tidyllm-use-case``; body ``metadata.use_case``
(LiteLLM's ``extra_body``); the ``user`` field, either containing ``use_case=NAME`` (pairs separated by
``;``, ``,``, ``|``, ``&`` or spaces) or equal to a use-case name some profile lists. MLflow's gateway
forwards body fields but not client headers, so behind it use ``metadata`` or ``user``; and LiteLLM 1.110
drops ``user=`` for ``openai/`` model names it has no price for, so send
``extra_body={"metadata": {"use_case": "qa"}}`` (or ``extra_body={"user": ...}``).

Streaming: SSE ``data: {...}`` chunks (a role chunk, content chunks of up to four tokens, a chunk with the
``finish_reason``), then a chunk with ``usage`` and empty ``choices`` unless
``stream_options.include_usage`` is false (that chunk also carries ``tidyllm_simulator``), then
``data: [DONE]``. A streamed answer picked by ``stream_failure_rate`` stops halfway through its chunks and
the connection is cut, without ``[DONE]``.

Tool calls: with ``tools`` and ``tool_choice`` not ``"none"``, and the last message not a ``tool`` result,
the answer is an assistant message with one ``tool_calls`` entry for the chosen function (the named one,
else the first) and ``finish_reason: "tool_calls"``; its arguments are made from the function's JSON
schema (``enum`` -> first value, string -> ``"sim-<name>"``, integer -> 1, number -> 1.0, boolean -> true,
array -> [], object -> {}).

Profiles file (YAML; every key optional except ``models``)::

    models:
      sim-gpt-small:                     # the upstream model name clients send as "model"
        description: cheap and fast      # free text, shown by GET /v1/models
        kind: chat                       # chat | embedding (embedding models only serve /v1/embeddings)
        latency:
          base_ms: 120                   # time to first token / to answer, milliseconds
          per_output_token_ms: 8         # added per completion token (the gap between streamed tokens)
          per_input_token_ms: 0          # added per prompt / embedding input token
          jitter: 0.2                    # latency times a uniform factor in [1 - jitter, 1 + jitter]
        output_tokens: {min: 40, max: 200}   # answer length per choice, uniform; or {mean: 120}
                                         # (uniform in [mean/2, 3*mean/2]) or a bare number (= mean)
        error_rate: 0.01                 # probability of a 500, in [0, 1]
        rpm: 600                         # requests per trailing 60 s served before 429 (omit = no limit)
        rate_limits:                     # 429 bursts; a window is [start_s, end_s] (seconds since start),
          - {requests: [50, 55], retry_after_s: 2}    # or {seconds: [a, b]} / {requests: [a, b]} (per-model
          - {seconds: [30, 40], every: 300}           # request numbers, half-open), repeating with `every`
        outages:                         # 503 windows, same window forms
          - [600, 660]
          - {requests: [100, 120]}
        quality: {default: 0.7, qa: 0.8, summarise: 0.75, code: 0.6, analysis: 0.5, extraction: 0.7}
                                         # or one number for every use case; no default = mean of the others
        quality_noise: 0.05              # std dev of Gaussian noise on the reported quality (clamped to [0, 1])
        judge: {noise: 0.15, bias: {sim-gpt-small: 0.1}}   # makes this a simulated LLM JUDGE (see below)
        stream_failure_rate: 0.0         # probability a streamed answer is cut midway
        embedding_dim: 256               # length of embedding vectors
        answers:                         # scripted answers instead of filler words (first match wins)
          - match: 'capital ratio'       # a regular expression searched in the messages' text
            reply: 'Answer: 12.5%'       # the answer; ${name} is the regex's named group (escape: json
          - match: '(?s)quote: (?P<q>[^\n]+)'  # puts it inside a JSON string); a list of replies is
            reply: ['{"evidence": "${q}"}', 'no idea']   # served in turn (request k gets reply k mod n)
            escape: json

Scripted answers stand in for what a real model would say, so applications can be tested end to end:
an answer is still cut at ``max_tokens`` (``finish_reason: "length"``) and costs its :func:`count_tokens`.

Judges: a model with ``judge`` is a simulated LLM judge. Asked to score an answer (the text between
``[ANSWER]`` and ``[SCORE]`` in its prompt, as :func:`tidyllm.signals.hub.judge_messages` writes it, or a
whole message), it answers one number: the quality the simulator gave that answer when it produced it,
plus the judge's ``bias`` for the model that produced it (``default`` for the others), plus Gaussian noise
of standard deviation ``noise``, clamped to [0, 1]. :meth:`Simulator.true_quality` returns the quality of
a recent answer (what a simulated human rater knows). ``Simulator(report_quality=False)`` stops reporting
the quality with each answer, so the router must learn from judges, checks and feedback, as with real
providers.

A 429 from a ``seconds`` window carries retry-after = the seconds left in the window, from a ``requests``
window or ``rpm`` = ``retry_after_s`` (default 1 s). Embeddings are deterministic in the text (same text,
same unit vector; texts sharing words point in similar directions), independent of the seed.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import math
import random
import re
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tidyllm.errors import ConfigurationError, GatewayError
from tidyllm.gateway._checks import is_number

__all__ = [
    "Simulator",
    "SimulatorClient",
    "ModelProfile",
    "Latency",
    "OutputTokens",
    "Window",
    "AnswerRule",
    "load_profiles",
    "parse_profiles",
    "bundled_profiles_path",
    "count_tokens",
]

logger = logging.getLogger("tidyllm.simulator")

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
#: the answer inside a judge prompt (tidyllm.signals.hub.judge_messages)
_JUDGED = re.compile(r"\[ANSWER\]\n(.*?)\n\n\[SCORE\]", re.S)
_ANSWERS_KEPT = 100_000
_STREAM_CHUNK_TOKENS = 4
# Answer words have at most six letters, so each is exactly one token under count_tokens.
_VOCAB = (
    "the model reads your input and gives a short answer based on data from the source text with care "
    "about risk rules terms review notes costs loans rates policy check result key point first then "
    "next last so it may need more work here we see one two three items clear plan steps"
).split()


def count_tokens(text: str) -> int:
    """Count tokens with the simulator's deterministic heuristic (about 1.3 per English word)."""
    return sum(1 + (len(t) - 1) // 6 for t in _TOKEN_RE.findall(text))


def bundled_profiles_path() -> Path:
    """Path of the example profiles shipped with tidyllm (``tidyllm/examples_data/profiles.yaml``)."""
    return Path(str(resources.files("tidyllm").joinpath("examples_data/profiles.yaml")))


# --- profiles --------------------------------------------------------------------------------


def _number(owner: str, name: str, value: Any, lo: float = 0.0, hi: float = math.inf) -> float:
    if not is_number(value, lo, hi):
        bound = f"in [{lo:g}, {hi:g}]" if hi != math.inf else f">= {lo:g}"
        raise ConfigurationError(f"{owner}: field {name!r} must be a number {bound}, got {value!r}")
    return float(value)


def _integer(owner: str, name: str, value: Any) -> int:
    if not is_number(value, 1, integer=True):
        raise ConfigurationError(f"{owner}: field {name!r} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class Latency:
    """How long an answer takes: ``base_ms`` + tokens x per-token ms, times a jitter factor."""

    base_ms: float = 0.0
    per_output_token_ms: float = 0.0
    per_input_token_ms: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _number("latency", f.name, getattr(self, f.name), hi=1.0 if f.name == "jitter" else math.inf)


@dataclass(frozen=True)
class OutputTokens:
    """Length of one answer in tokens, drawn uniformly from ``[min, max]``."""

    min: int = 20
    max: int = 200

    def __post_init__(self) -> None:
        for f in fields(self):
            _integer("output_tokens", f.name, getattr(self, f.name))
        if self.min > self.max:
            raise ConfigurationError(f"output_tokens: min ({self.min}) is larger than max ({self.max})")


@dataclass(frozen=True)
class Window:
    """A half-open window ``[start, end)`` in seconds since start or in per-model request numbers.

    With ``every`` it repeats with that period. ``retry_after_s`` is what a 429 from a request window
    tells the client to wait.
    """

    start: float
    end: float
    unit: str = "seconds"
    every: float | None = None
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.unit not in ("seconds", "requests"):
            raise ConfigurationError(f"window: unit must be 'seconds' or 'requests', got {self.unit!r}")
        _number("window", "start", self.start)
        _number("window", "end", self.end)
        if self.end <= self.start:
            raise ConfigurationError(f"window: end ({self.end:g}) must be after start ({self.start:g})")
        if self.every is not None and _number("window", "every", self.every) < self.end:
            raise ConfigurationError(f"window: every ({self.every:g}) must be at least its end ({self.end:g})")
        if self.retry_after_s is not None:
            _number("window", "retry_after_s", self.retry_after_s)

    def _position(self, elapsed_s: float, index: int) -> float:
        x = elapsed_s if self.unit == "seconds" else float(index)
        return x % self.every if self.every else x

    def contains(self, elapsed_s: float, index: int) -> bool:
        """Whether the request numbered ``index``, arriving ``elapsed_s`` after start, falls inside."""
        return self.start <= self._position(elapsed_s, index) < self.end

    def retry_after(self, elapsed_s: float, index: int) -> float:
        """Seconds a client should wait: the rest of a time window, else ``retry_after_s`` (default 1)."""
        if self.retry_after_s is not None:
            return self.retry_after_s
        if self.unit == "seconds":
            return max(self.end - self._position(elapsed_s, index), 0.001)
        return 1.0


@dataclass(frozen=True)
class AnswerRule:
    """A scripted answer: when ``match`` (a regular expression) is found in a request's messages, answer
    ``replies[k % len(replies)]`` for the model's request number ``k``, with ``${name}`` replaced by the
    match's named groups (JSON-string-escaped when ``escape == "json"``)."""

    match: str
    replies: tuple[str, ...]
    escape: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise ConfigurationError(f"answers: 'match' must be a non-empty regular expression, got {self.match!r}")
        try:
            re.compile(self.match)
        except re.error as exc:
            raise ConfigurationError(f"answers: 'match' {self.match!r} is not a valid regular expression: {exc}") from None
        if not self.replies or not all(isinstance(r, str) for r in self.replies):
            raise ConfigurationError(f"answers: 'reply' must be a string or a non-empty list of strings, "
                                     f"got {self.replies!r}")
        if self.escape not in (None, "json"):
            raise ConfigurationError(f"answers: 'escape' must be 'json' or absent, got {self.escape!r}")

    def answer(self, text: str, index: int) -> str | None:
        """The reply for request ``index`` when the rule matches ``text``, else None."""
        from string import Template

        m = re.search(self.match, text)
        if m is None:
            return None
        groups = {k: (v or "") for k, v in m.groupdict().items()}
        if self.escape == "json":
            groups = {k: json.dumps(v)[1:-1] for k, v in groups.items()}
        return Template(self.replies[index % len(self.replies)]).safe_substitute(groups)


def _answer_rule(spec: Any) -> AnswerRule:
    if not isinstance(spec, Mapping) or "match" not in spec or "reply" not in spec or \
            set(spec) - {"match", "reply", "escape"}:
        raise ConfigurationError(f"answers: each entry needs 'match' and 'reply' (optional: escape), got {spec!r}")
    reply = spec["reply"]
    return AnswerRule(spec["match"], (reply,) if isinstance(reply, str) else tuple(reply or ()), spec.get("escape"))


def _cut(text: str, limit: int) -> str:
    """``text`` up to the last whole token that keeps it within ``limit`` tokens."""
    used, end = 0, 0
    for m in _TOKEN_RE.finditer(text):
        cost = 1 + (len(m.group()) - 1) // 6
        if used + cost > limit:
            break
        used, end = used + cost, m.end()
    return text[:end]


@dataclass(frozen=True)
class ModelProfile:
    """How one simulated model behaves; see the module docstring for every field's meaning."""

    name: str
    kind: str = "chat"
    description: str = ""
    latency: Latency = Latency()
    output_tokens: OutputTokens = OutputTokens()
    error_rate: float = 0.0
    rpm: int | None = None
    rate_limits: tuple[Window, ...] = ()
    outages: tuple[Window, ...] = ()
    quality: Mapping[str, float] = field(default_factory=lambda: {"default": 0.5})
    quality_noise: float = 0.0
    stream_failure_rate: float = 0.0
    embedding_dim: int = 256
    #: a simulated LLM judge: {noise: σ, bias: {model: b, default: b}} (None: an ordinary model)
    judge: Mapping[str, Any] | None = None
    answers: tuple[AnswerRule, ...] = ()

    def __post_init__(self) -> None:
        owner = f"model {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"a model needs a non-empty string name, got {self.name!r}")
        if self.kind not in ("chat", "embedding"):
            raise ConfigurationError(f"{owner}: field 'kind' must be 'chat' or 'embedding', got {self.kind!r}")
        for name in ("error_rate", "quality_noise", "stream_failure_rate"):
            _number(owner, name, getattr(self, name), hi=1.0)
        if self.rpm is not None:
            _integer(owner, "rpm", self.rpm)
        _integer(owner, "embedding_dim", self.embedding_dim)
        if not isinstance(self.description, str):
            raise ConfigurationError(f"{owner}: field 'description' must be a string, got {self.description!r}")
        if not isinstance(self.quality, Mapping) or not self.quality:
            raise ConfigurationError(f"{owner}: field 'quality' must be a number or a non-empty mapping")
        for use_case, q in self.quality.items():
            _number(owner, f"quality.{use_case}", q, hi=1.0)
        if self.judge is not None:
            if not isinstance(self.judge, Mapping) or not set(self.judge) <= {"noise", "bias"}:
                raise ConfigurationError(f"{owner}: field 'judge' must be {{noise: σ, bias: {{model: b}}}}")
            _number(owner, "judge.noise", self.judge.get("noise", 0.0), hi=1.0)
            bias = self.judge.get("bias", {})
            bias = {"default": bias} if is_number(bias) else bias
            if not isinstance(bias, Mapping):
                raise ConfigurationError(f"{owner}: judge.bias must be a number or {{model: bias}}")
            for model, b in bias.items():
                _number(owner, f"judge.bias.{model}", b, lo=-1.0, hi=1.0)
            object.__setattr__(self, "judge", MappingProxyType({"noise": float(self.judge.get("noise", 0.0)),
                                                               "bias": MappingProxyType(dict(bias))}))
        # frozen means frozen: copy the caller's containers into immutable ones
        object.__setattr__(self, "quality", MappingProxyType(dict(self.quality)))
        object.__setattr__(self, "rate_limits", tuple(self.rate_limits))
        object.__setattr__(self, "outages", tuple(self.outages))
        object.__setattr__(self, "answers", tuple(self.answers))

    def quality_for(self, use_case: str | None) -> float:
        """The profile's quality for ``use_case``: its own entry, else ``default``, else the mean."""
        if use_case in self.quality:
            return float(self.quality[use_case])
        if "default" in self.quality:
            return float(self.quality["default"])
        return sum(self.quality.values()) / len(self.quality)


_PROFILE_KEYS = {f.name for f in fields(ModelProfile)} - {"name"}


def _window(owner: str, spec: Any) -> Window:
    if isinstance(spec, (list, tuple)):
        spec = {"seconds": spec}
    if not isinstance(spec, Mapping):
        raise ConfigurationError(f"{owner}: a window is [start_s, end_s] or a mapping, got {spec!r}")
    units = [u for u in ("seconds", "requests") if u in spec]
    unknown = set(spec) - {"seconds", "requests", "every", "retry_after_s"}
    if len(units) != 1 or unknown:
        raise ConfigurationError(
            f"{owner}: a window needs exactly one of 'seconds' or 'requests' (optional: every, retry_after_s), "
            f"got {dict(spec)!r}")
    bounds = spec[units[0]]
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        raise ConfigurationError(f"{owner}: '{units[0]}' must be [start, end], got {bounds!r}")
    try:
        return Window(bounds[0], bounds[1], units[0], spec.get("every"), spec.get("retry_after_s"))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{owner}: {exc}") from None


def _profile(name: str, spec: Any) -> ModelProfile:
    owner = f"model {name!r}"
    spec = {} if spec is None else spec
    if not isinstance(spec, Mapping):
        raise ConfigurationError(f"{owner}: expected a mapping of profile fields, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _PROFILE_KEYS)
    if unknown:
        raise ConfigurationError(f"{owner}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_PROFILE_KEYS))}")
    kw: dict[str, Any] = dict(spec)
    try:
        if "latency" in kw:
            if not isinstance(kw["latency"], Mapping):
                raise ConfigurationError(f"field 'latency' must be a mapping, got {kw['latency']!r}")
            kw["latency"] = Latency(**kw["latency"])
        if "output_tokens" in kw:
            ot = kw["output_tokens"]
            ot = {"mean": ot} if is_number(ot) else ot
            if isinstance(ot, Mapping) and set(ot) == {"mean"}:
                mean = _number("output_tokens", "mean", ot["mean"], lo=1)
                ot = {"min": max(1, round(mean / 2)), "max": max(1, round(mean * 1.5))}
            if not isinstance(ot, Mapping):
                raise ConfigurationError(f"field 'output_tokens' must be {{min, max}}, {{mean}} or a number, got {ot!r}")
            kw["output_tokens"] = OutputTokens(**ot)
        for key in ("rate_limits", "outages"):
            if key in kw:
                if not isinstance(kw[key], list):
                    raise ConfigurationError(f"field {key!r} must be a list of windows, got {kw[key]!r}")
                kw[key] = tuple(_window(f"field {key!r}", w) for w in kw[key])
        if "answers" in kw:
            if not isinstance(kw["answers"], list):
                raise ConfigurationError(f"field 'answers' must be a list of {{match, reply}}, got {kw['answers']!r}")
            kw["answers"] = tuple(_answer_rule(a) for a in kw["answers"])
        if "quality" in kw and is_number(kw["quality"]):
            kw["quality"] = {"default": kw["quality"]}
        return ModelProfile(name=name, **kw)
    except TypeError as exc:  # an unknown key inside latency/output_tokens
        raise ConfigurationError(f"{owner}: {exc}") from None
    except ConfigurationError as exc:
        msg = str(exc)
        raise ConfigurationError(msg if msg.startswith(owner) else f"{owner}: {msg}") from None


def parse_profiles(data: Any, source: str = "<profiles>") -> dict[str, ModelProfile]:
    """Build profiles from already-parsed data ``{"models": {name: {field: value}}}``."""
    try:
        if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping) or not data["models"]:
            raise ConfigurationError("expected a top-level 'models:' mapping of model name -> profile")
        extra = sorted(set(data) - {"models"})
        if extra:
            raise ConfigurationError(f"unknown top-level key {extra[0]!r}; only 'models' is allowed")
        return {str(name): _profile(str(name), spec) for name, spec in data["models"].items()}
    except ConfigurationError as exc:
        raise ConfigurationError(f"{source}: {exc}") from None


def load_profiles(path: str | Path | None = None) -> dict[str, ModelProfile]:
    """Read a profiles YAML file (default: the bundled example) into ``{model name: ModelProfile}``.

    Raises :class:`~tidyllm.errors.ConfigurationError` naming the file, the model and the field.
    """
    import yaml

    path = Path(path) if path is not None else bundled_profiles_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read simulator profiles ({exc.strerror}); check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from None
    return parse_profiles(data, source=str(path))


# --- answers ---------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts cost tokens here
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def _prompt_tokens(messages: list[Any], tools: Any) -> int:
    total = 3
    for m in messages:
        if not isinstance(m, Mapping):
            continue
        total += 3 + count_tokens(_text_of(m.get("content")))
        for call in m.get("tool_calls") or ():
            fn = call.get("function", {}) if isinstance(call, Mapping) else {}
            total += count_tokens(f"{fn.get('name', '')} {fn.get('arguments', '')}")
    if tools:
        total += count_tokens(json.dumps(tools, sort_keys=True))
    return total


def _example_value(name: str, schema: Any) -> Any:
    schema = schema if isinstance(schema, Mapping) else {}
    if schema.get("enum"):
        return schema["enum"][0]
    return {"integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}.get(
        schema.get("type"), f"sim-{name}")


def _tool_call(tools: list[Any], tool_choice: Any, call_id: str) -> dict[str, Any]:
    functions = [t.get("function", {}) for t in tools if isinstance(t, Mapping)]
    chosen = functions[0] if functions else {}
    if isinstance(tool_choice, Mapping):
        wanted = (tool_choice.get("function") or {}).get("name")
        chosen = next((f for f in functions if f.get("name") == wanted), chosen)
    props = (chosen.get("parameters") or {}).get("properties") or {}
    args = {k: _example_value(k, v) for k, v in props.items()}
    return {"id": call_id, "type": "function",
            "function": {"name": chosen.get("name", "tool"), "arguments": json.dumps(args, sort_keys=True)}}


@lru_cache(maxsize=65536)
def _word_vector(word: str, dim: int) -> Any:
    import numpy as np  # only embedding requests pay for it

    seed = int.from_bytes(hashlib.sha256(f"{dim}:{word}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim)


def _embed(text: str, dim: int) -> list[float]:
    """A hashing-trick embedding: the normalised sum of one pseudo-random vector per word."""
    import numpy as np

    vec = np.sum([_word_vector(w, dim) for w in _TOKEN_RE.findall(text.lower()) or [""]], axis=0)
    norm = float(np.linalg.norm(vec)) or 1.0
    return np.round(vec / norm, 6).tolist()


_USE_CASE_PAIR = re.compile(r"(?:^|[;,|&\s])use_case=([^;,|&\s]+)")


@dataclass
class _Draw:
    """Everything one request decides up front, from its own seeded generator."""

    index: int
    rng: random.Random
    jitter: float
    quality_noise: float
    stream_fails: bool


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable"}


# --- the simulator ---------------------------------------------------------------------------


class Simulator:
    """An OpenAI-compatible provider simulator serving ``profiles`` on a background thread.

    ``profiles`` is a ``{name: ModelProfile}`` mapping, a path to a profiles YAML file, or ``None`` for
    the bundled example. ``port=0`` picks a free port. ``latency_scale`` multiplies every simulated
    delay (0 = answer at once, for tests). Use :meth:`start` / :meth:`stop` or ``with Simulator(...) as sim``.
    """

    def __init__(self, profiles: Mapping[str, ModelProfile] | str | Path | None = None, *, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0, latency_scale: float = 1.0,
                 report_quality: bool = True) -> None:
        if profiles is None or isinstance(profiles, (str, Path)):
            profiles = load_profiles(profiles)
        if not profiles or not all(isinstance(p, ModelProfile) for p in profiles.values()):
            raise ConfigurationError("Simulator needs a non-empty {name: ModelProfile} mapping; use load_profiles(path)")
        self.profiles: dict[str, ModelProfile] = dict(profiles)
        self.seed = seed
        self.host = host
        self.latency_scale = _number("Simulator", "latency_scale", latency_scale)
        #: report each answer's quality with it (``usage.tidyllm_sim_quality``, header, top-level field)
        self.report_quality = bool(report_quality)
        # answer text -> (model, quality) of recent answers: what a simulated judge and human "know"
        self._answers: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._requested_port = port
        self._lock = threading.Lock()
        self._hits: Counter[str] = Counter()
        self._outcomes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        #: tokens each model answered with, as a provider bills them (prompt and completion)
        self._billed: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._down: set[str] = set()
        self._served: dict[str, deque[float]] = defaultdict(deque)  # admission times, for rpm
        self._use_cases = {uc for p in self.profiles.values() for uc in p.quality if uc != "default"}
        self._ids = itertools.count()
        self._started_at = time.monotonic()
        self._server: _Server | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> Simulator:
        """Bind and serve on a daemon thread; returns ``self``. Raises GatewayError if the port is taken."""
        if self._server is not None:
            return self
        try:
            server = _Server((self.host, self._requested_port), _Handler)
        except OSError as exc:
            raise GatewayError(f"provider simulator cannot listen on {self.host}:{self._requested_port} "
                               f"({exc.strerror}); choose another --port or 0 for a free one") from None
        server.sim = self
        self._server = server
        self._port = server.server_address[1]
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"tidyllm-simulator-{self.port}", daemon=True)
        self._thread.start()
        logger.info("provider simulator serving %d models at %s", len(self.profiles), self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close open connections (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        logger.info("provider simulator stopped")

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (from :meth:`start` on; kept after :meth:`stop`)."""
        if self._port is None:
            raise GatewayError("the provider simulator has not been started; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1`` (use as ``api_base``/``openai_api_base``)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/v1"

    # control
    def hits(self, model: str | None = None) -> int:
        """Requests received for ``model`` (upstream model name), or in total, whatever their outcome."""
        with self._lock:
            return self._hits[model] if model is not None else sum(self._hits.values())

    def set_outage(self, model: str, down: bool = True) -> None:
        """Take ``model`` down (its requests get 503) or bring it back."""
        if model not in self.profiles:
            raise ConfigurationError(f"the simulator has no model {model!r}; known: {', '.join(sorted(self.profiles))}")
        with self._lock:
            (self._down.add if down else self._down.discard)(model)
        logger.info("provider simulator: %s is %s", model, "down" if down else "up")

    def reset_stats(self) -> None:
        """Zero hits and outcome counts and restart every model's request numbering (manual outages stay)."""
        with self._lock:
            self._hits.clear()
            self._outcomes.clear()
            self._billed.clear()
            self._served.clear()

    def stats(self) -> dict[str, Any]:
        """Hits and outcomes per model, models down, seconds since start (also ``GET /_sim/stats``)."""
        with self._lock:
            return {"simulator": True, "total": sum(self._hits.values()), "hits": dict(self._hits),
                    "outcomes": {m: dict(c) for m, c in self._outcomes.items()},
                    "billed": {m: dict(c) for m, c in self._billed.items()},
                    "down": sorted(self._down), "uptime_s": round(time.monotonic() - self._started_at, 3)}

    def true_quality(self, answer: str) -> float | None:
        """The quality the simulator gave ``answer`` (one of its recent answers), or None if unknown."""
        with self._lock:
            known = self._answers.get(answer)
        return known[1] if known is not None else None

    def _remember(self, answer: str, model: str, quality: float) -> None:
        with self._lock:
            self._answers[answer] = (model, quality)
            self._answers.move_to_end(answer)
            while len(self._answers) > _ANSWERS_KEPT:
                self._answers.popitem(last=False)

    def _judge_score(self, profile: ModelProfile, messages: list[Any], draw: "_Draw") -> str:
        """A simulated judge's answer: the judged answer's true quality plus the judge's bias and noise."""
        text = " ".join(_text_of(m.get("content")) for m in messages if isinstance(m, Mapping))
        match = _JUDGED.search(text)
        answer = match.group(1) if match else text
        with self._lock:
            known = self._answers.get(answer)
        judge = profile.judge or {}
        bias_of = judge.get("bias", {})
        if known is None:
            quality, bias = profile.quality_for(None), 0.0
        else:
            quality, bias = known[1], float(bias_of.get(known[0], bias_of.get("default", 0.0)))
        score = min(1.0, max(0.0, quality + bias + float(judge.get("noise", 0.0)) * draw.quality_noise))
        return f"{score:.3f}"

    # request handling (called from handler threads)
    def _admit(self, model: str, kind: str) -> tuple[ModelProfile, _Draw]:
        """Count the hit, draw the request's randomness, and raise the error response it gets, if any."""
        with self._lock:
            index = self._hits[model]
            self._hits[model] += 1
            profile = self.profiles.get(model)
            if profile is None:
                self._outcomes[model]["not_found"] += 1
                raise _HTTPError(404, f"The model {model!r} does not exist in this provider simulator; known: "
                                 f"{', '.join(sorted(self.profiles))}", "model_not_found")
            if profile.kind != kind:
                self._outcomes[model]["bad_request"] += 1
                raise _HTTPError(400, f"simulated model {model!r} is a {profile.kind} model; it does not serve "
                                 f"{kind} requests", "model_kind_mismatch")
            rng = random.Random(f"{self.seed}:{model}:{index}")
            draw = _Draw(index, rng, jitter=rng.uniform(-1.0, 1.0), quality_noise=rng.gauss(0.0, 1.0),
                         stream_fails=rng.random() < profile.stream_failure_rate)
            error_u = rng.random()
            now = time.monotonic()
            elapsed = now - self._started_at
            outcome, error = self._decide(profile, model, draw.index, elapsed, now, error_u)
            self._outcomes[model][outcome] += 1
        if error is not None:
            if error.status == 500:
                self._sleep(profile.latency.base_ms, draw.jitter, profile.latency.jitter)
            raise error
        return profile, draw

    def _decide(self, profile: ModelProfile, model: str, index: int, elapsed: float, now: float,
                error_u: float) -> tuple[str, _HTTPError | None]:
        if model in self._down:
            return "outage", _HTTPError(503, f"simulated outage: {model} was taken down", "simulated_outage")
        for w in profile.outages:
            if w.contains(elapsed, index):
                return "outage", _HTTPError(503, f"simulated scheduled outage of {model}", "simulated_outage",
                                            _retry_headers(w.retry_after(elapsed, index)) if w.unit == "seconds" else {})
        for w in profile.rate_limits:
            if w.contains(elapsed, index):
                return "rate_limited", _HTTPError(429, f"simulated rate-limit burst on {model}", "rate_limit_exceeded",
                                                  _retry_headers(w.retry_after(elapsed, index)))
        if profile.rpm is not None:
            served = self._served[model]
            while served and served[0] <= now - 60.0:
                served.popleft()
            if len(served) >= profile.rpm:
                return "rate_limited", _HTTPError(429, f"simulated rate limit: {model} serves {profile.rpm} requests "
                                                  "per minute", "rate_limit_exceeded",
                                                  _retry_headers(max(served[0] + 60.0 - now, 0.001)))
            served.append(now)
        if error_u < profile.error_rate:
            return "error", _HTTPError(500, f"simulated server error of {model} (error_rate {profile.error_rate:g})",
                                       "simulated_error")
        return "ok", None

    def _sleep(self, ms: float, jitter_u: float, jitter: float) -> None:
        delay = ms * (1.0 + jitter * jitter_u) * self.latency_scale / 1000.0
        if delay > 0:
            time.sleep(delay)

    def _use_case(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
        if headers.get("x-tidyllm-use-case"):
            return headers["x-tidyllm-use-case"]
        meta = body.get("metadata")
        if isinstance(meta, Mapping) and isinstance(meta.get("use_case"), str):
            return meta["use_case"]
        user = body.get("user")
        if isinstance(user, str):
            match = _USE_CASE_PAIR.search(user)
            if match:
                return match.group(1)
            if user in self._use_cases:
                return user
        return None

    def _chat(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str],
                                                                                  list[dict[str, Any]], bool]:
        """Plan one chat completion: (response body, headers, stream chunks, stream cut midway)."""
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "a chat completion needs 'model' (string) and 'messages' (non-empty list)",
                             "invalid_request")
        n = body.get("n") or 1
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(n, int) or n < 1 or (limit is not None and (not isinstance(limit, int) or limit < 1)):
            raise _HTTPError(400, "'n' and 'max_tokens' must be positive integers", "invalid_request")
        profile, draw = self._admit(model, "chat")
        rng = draw.rng
        use_case = self._use_case(body, headers)
        quality = min(1.0, max(0.0, profile.quality_for(use_case) + profile.quality_noise * draw.quality_noise))
        quality = round(quality, 4)
        tools, tool_choice = body.get("tools"), body.get("tool_choice")
        last_role = messages[-1].get("role") if isinstance(messages[-1], Mapping) else None
        wants_tool = bool(tools) and tool_choice != "none" and last_role != "tool"
        prompt_tokens = _prompt_tokens(messages, tools)
        rid = f"chatcmpl-sim-{self.seed}-{draw.index}-{next(self._ids)}"
        choices, completion_tokens = [], 0
        scripted = None
        if profile.answers and not wants_tool:
            prompt_text = "\n\n".join(_text_of(m.get("content")) for m in messages if isinstance(m, Mapping))
            scripted = next((a for a in (r.answer(prompt_text, draw.index) for r in profile.answers)
                             if a is not None), None)
        for i in range(n):
            if wants_tool:
                call = _tool_call(tools, tool_choice, f"call_sim_{draw.index}_{i}")
                want = count_tokens(call["function"]["name"] + " " + call["function"]["arguments"])
                tokens = min(want, limit) if limit else want
                message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
                finish = "length" if tokens < want else "tool_calls"
            elif profile.judge is not None:
                content = self._judge_score(profile, messages, draw)
                tokens = count_tokens(content)
                message = {"role": "assistant", "content": content}
                finish = "stop"
            elif scripted is not None:
                want = count_tokens(scripted)
                content = _cut(scripted, limit) if limit and want > limit else scripted
                tokens = count_tokens(content)
                message = {"role": "assistant", "content": content}
                finish = "length" if tokens < want else "stop"
            else:
                want = rng.randint(profile.output_tokens.min, profile.output_tokens.max)
                tokens = min(want, limit) if limit else want
                message = {"role": "assistant", "content": " ".join(rng.choice(_VOCAB) for _ in range(tokens))}
                finish = "length" if tokens < want else "stop"
                self._remember(message["content"], model, quality)
            completion_tokens += tokens
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
        lat = profile.latency
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}
        response = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                    "system_fingerprint": "tidyllm-simulator", "choices": choices, "usage": usage,
                    "tidyllm_simulator": {"use_case": use_case, "model": model}}
        out_headers = {"x-tidyllm-sim-use-case": (use_case or "").encode("ascii", "backslashreplace").decode()}
        if self.report_quality:  # headers are latin-1: the use case above is escaped
            usage["tidyllm_sim_quality"] = quality
            response["tidyllm_simulator"]["quality"] = quality
            out_headers["x-tidyllm-sim-quality"] = f"{quality:.4f}"
        first_ms = lat.base_ms + lat.per_input_token_ms * prompt_tokens
        with self._lock:
            self._billed[model]["prompt_tokens"] += prompt_tokens
            self._billed[model]["completion_tokens"] += completion_tokens
        if not body.get("stream"):
            self._sleep(first_ms + lat.per_output_token_ms * completion_tokens, draw.jitter, lat.jitter)
            return response, out_headers, [], False
        self._sleep(first_ms, draw.jitter, lat.jitter)
        opts = body.get("stream_options")
        include_usage = not (isinstance(opts, Mapping) and opts.get("include_usage") is False)
        return response, out_headers, _stream_chunks(response, include_usage), draw.stream_fails

    def _embeddings(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one embeddings request (vectors depend only on the text and ``embedding_dim``)."""
        model, inputs = body.get("model"), body.get("input")
        if not isinstance(model, str) or inputs is None or inputs == [] or inputs == "":
            raise _HTTPError(400, "an embeddings request needs 'model' and a non-empty 'input'", "invalid_request")
        if isinstance(inputs, str) or (isinstance(inputs, list) and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(
                isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) for t in x)) for x in inputs):
            raise _HTTPError(400, "'input' must be a string, a list of strings or of token ids", "invalid_request")
        profile, draw = self._admit(model, "embedding")
        texts = [x if isinstance(x, str) else " ".join(map(str, x)) for x in inputs]
        tokens = sum(count_tokens(x) if isinstance(x, str) else len(x) for x in inputs)
        with self._lock:
            self._billed[model]["prompt_tokens"] += tokens
        base64_out = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = _embed(text, profile.embedding_dim)
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if base64_out else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self._sleep(profile.latency.base_ms + profile.latency.per_input_token_ms * tokens, draw.jitter,
                    profile.latency.jitter)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _stream_gap(self, model: str, tokens: int) -> None:
        """Sleep between streamed chunks as the model's per-output-token latency says."""
        lat = self.profiles[model].latency
        self._sleep(lat.per_output_token_ms * tokens, 0.0, 0.0)


def _retry_headers(seconds: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}


def _stream_chunks(response: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """Split a planned response into OpenAI ``chat.completion.chunk`` objects."""
    head = {k: response[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**head, "choices": choices, **extra}

    chunks = []
    for c in response["choices"]:
        i, msg = c["index"], c["message"]
        chunks.append(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        if msg.get("tool_calls"):
            calls = [{"index": k, **tc} for k, tc in enumerate(msg["tool_calls"])]
            chunks.append(chunk([{"index": i, "delta": {"tool_calls": calls}, "finish_reason": None}]))
        else:
            words = msg["content"].split(" ") if msg["content"] else []
            for start in range(0, len(words), _STREAM_CHUNK_TOKENS):
                piece = " ".join(words[start:start + _STREAM_CHUNK_TOKENS])
                text = piece if start == 0 else " " + piece
                chunks.append(chunk([{"index": i, "delta": {"content": text}, "finish_reason": None}]))
        chunks.append(chunk([{"index": i, "delta": {}, "finish_reason": c["finish_reason"]}]))
    if include_usage:
        chunks.append(chunk([], usage=response["usage"], tidyllm_simulator=response["tidyllm_simulator"]))
    return chunks


# --- HTTP ------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive handler threads must not hold up stop()
    request_queue_size = 128  # bursts of ~30 concurrent clients must not overflow the listen backlog
    sim: Simulator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping a keep-alive connection or an abandoned stream is routine, not a server fault.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            logger.debug("provider simulator: client %s went away", client_address)
        else:
            logger.exception("provider simulator: error while serving %s", client_address)

    def close_connections(self) -> None:
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as LiteLLM's and MLflow's HTTP clients expect
    disable_nagle_algorithm = True  # without it keep-alive requests stall ~44 ms on delayed ACKs
    server_version = "tidyllm-provider-simulator/1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("provider simulator %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        sim = self.server.sim
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._read_body() if method == "POST" else {}
            if (method, path) == ("POST", "/v1/chat/completions"):
                response, headers, chunks, cut = sim._chat(body, {k.lower(): v for k, v in self.headers.items()})
                if chunks:
                    self._stream(response["model"], chunks, headers, cut)
                else:
                    self._json(200, response, headers)
            elif (method, path) == ("POST", "/v1/embeddings"):
                self._json(200, sim._embeddings(body))
            elif (method, path) == ("GET", "/health"):
                self._json(200, {"status": "OK", "simulator": True})
            elif (method, path) == ("GET", "/v1/models"):
                self._json(200, {"object": "list", "data": [_model_card(p) for p in sim.profiles.values()]})
            elif method == "GET" and path.startswith("/v1/models/") and path[11:] in sim.profiles:
                self._json(200, _model_card(sim.profiles[path[11:]]))
            elif (method, path) == ("GET", "/_sim/stats"):
                self._json(200, sim.stats())
            elif (method, path) == ("POST", "/_sim/outage"):
                model, down = body.get("model"), body.get("down", True)
                if model not in sim.profiles or not isinstance(down, bool):
                    raise _HTTPError(404 if isinstance(down, bool) else 400, f"no simulated model {model!r} "
                                     "(or 'down' is not a boolean)", "model_not_found")
                sim.set_outage(model, down)
                self._json(200, {"model": model, "down": down})
            elif (method, path) == ("POST", "/_sim/reset"):
                sim.reset_stats()
                self._json(200, {"reset": True})
            else:
                raise _HTTPError(404, f"the provider simulator has no {method} {path}", "not_found")
        except _HTTPError as err:
            self._json(err.status, {"error": {"message": err.message, "type": _ERROR_TYPES.get(err.status, "error"),
                                              "param": None, "code": err.code}}, err.headers)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (e.g. an abandoned stream)
            self.close_connection = True
        except Exception as exc:  # a simulator bug must surface as a 500 the client can read, not a hang
            logger.exception("provider simulator failed on %s %s", method, path)
            self.close_connection = True
            self._json(500, {"error": {"message": f"provider simulator internal error: {exc!r}",
                                       "type": "server_error", "param": None, "code": "simulator_bug"}})

    def _read_body(self) -> dict[str, Any]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            raw = b"".join(self._read_chunks())
        else:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise _HTTPError(400, "the request body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "the request body must be a JSON object", "invalid_json")
        return body

    def _read_chunks(self) -> Iterator[bytes]:
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            yield self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass

    def _json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-tidyllm-simulator", "1")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, model: str, chunks: list[dict[str, Any]], headers: Mapping[str, str], cut: bool) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-tidyllm-simulator", "1")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        stop_at = len(chunks) // 2 if cut else None
        for k, obj in enumerate(chunks):
            if k == stop_at:
                logger.info("provider simulator: cutting a %s stream midway (stream_failure_rate)", model)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            content = (obj["choices"][0]["delta"].get("content") or "") if obj["choices"] else ""
            if content:
                self.server.sim._stream_gap(model, count_tokens(content))
            self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _model_card(p: ModelProfile) -> dict[str, Any]:
    return {"id": p.name, "object": "model", "created": 0, "owned_by": "tidyllm-simulator",
            "kind": p.kind, "description": p.description}


class SimulatorClient:
    """Control a provider simulator running in another process through its ``/_sim`` admin endpoints.

    ``url`` is the simulator's base URL, with or without the trailing ``/v1``.
    """

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.root = url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.root + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("error", {}).get("message", exc.reason)
            raise GatewayError(f"provider simulator at {self.root} refused {path}: {detail}") from None
        except OSError as exc:
            raise GatewayError(f"cannot reach the provider simulator at {self.root} ({exc}); "
                               "is `tidyllm simulate` running?") from None

    def stats(self) -> dict[str, Any]:
        """The simulator's ``/_sim/stats``."""
        return self._call("/_sim/stats")

    def hits(self, model: str | None = None) -> int:
        """Requests received for ``model``, or in total."""
        stats = self.stats()
        return stats["hits"].get(model, 0) if model is not None else stats["total"]

    def set_outage(self, model: str, down: bool = True) -> None:
        """Take ``model`` down or bring it back."""
        self._call("/_sim/outage", {"model": model, "down": down})

    def reset_stats(self) -> None:
        """Zero the counters and restart request numbering."""
        self._call("/_sim/reset", {})

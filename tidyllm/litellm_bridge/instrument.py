"""The sync entry points: ``litellm.completion``, ``litellm.embedding`` and ``litellm.text_completion``.

LiteLLM 1.110 gives callbacks no way to stop a plain sync call: every exception raised in a callback on
that path is swallowed and the call proceeds. So ``install()`` instruments the three functions the way
OpenTelemetry instrumentations wrap client libraries — with ``wrapt``, on the ``litellm`` module, and
reversibly (``uninstall()`` puts the originals back). A call then goes through the one admission
:class:`~tidyllm.governance.gate.Gate` before LiteLLM sees it, exactly like an async call in the
pre-call hook: refused over budget (the provider is never hit), or admitted with tidyllm's own copy of
the metadata carrying the seal token and the clamped ``max_tokens``. Every library built on LiteLLM's
sync API — jupyter-ai's ``%%ai`` among them — is governed without knowing it.

What passes through untouched: ``tidyllm/<group>`` calls (the provider sends them through the governed
Router), and a call the Router strategy already admitted (the Router calls these functions itself with
the seal's token; each token passes once). Code that bound ``from litellm import completion`` *before*
``install()`` keeps the original function: see docs/calls.md. Setting ``governance.instrument_sync:
false`` turns the instrumentation off (such calls are then recorded as ``unenforced``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import litellm
import wrapt

from tidyllm.governance.context import STAMP_KEY
from tidyllm.governance.gate import TRIED_KEY, Candidate
from tidyllm.litellm_bridge.strategy import request_facts
from tidyllm.litellm_bridge.streams import GovernedStream, _wrap

if TYPE_CHECKING:
    from tidyllm.governance.gate import Gate

__all__ = ["instrument", "uninstrument", "instrumented"]

log = logging.getLogger("tidyllm.governance")

#: LiteLLM function -> (call type, names of its leading positional parameters)
_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "completion": ("completion", ("model", "messages")),
    "embedding": ("embedding", ("model", "input")),
    "text_completion": ("text_completion", ("prompt", "model")),
}


class _SyncGate:
    """The wrapper body shared by the three functions (a plain callable, so ``wrapt`` can hold it)."""

    def __init__(self, gate: "Gate", resolve: Callable[[str, str | None], tuple[str, bool]], call_type: str,
                 positional: tuple[str, ...]) -> None:
        self.gate = gate
        self.resolve = resolve
        self.call_type = call_type
        self.positional = positional

    def __call__(self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        call = dict(zip(self.positional, args))
        call.update(kwargs)
        args = args[len(self.positional):]
        model = str(call.get("model") or "")
        md = call.get("metadata")
        if model.startswith("tidyllm/") or (isinstance(md, dict) and self.gate.seals.pass_sync(md.get(STAMP_KEY))):
            return wrapped(*args, **call)
        is_embedding = self.call_type == "embedding"
        messages = call.get("messages") if self.call_type == "completion" else None
        text = call.get("input") if is_embedding else call.get("prompt") if self.call_type == "text_completion" \
            else None
        route, is_gateway = self.resolve(model, call.get("api_base"))
        facts, clean = request_facts(self.gate, model, messages, text, call, entry="sync", call_type=self.call_type)
        lookup = self.gate.governor.trace_lookup if is_gateway else None
        sealed = self.gate.admit(facts, [Candidate(route, is_gateway, bool(call.get("mock_response")),
                                                   traced=lookup is not None)])
        self.gate.seals.pass_sync(sealed.token)
        call["metadata"] = {**clean, STAMP_KEY: sealed.token, TRIED_KEY: [*facts.tried, sealed.route]}
        if not is_embedding:
            call["max_tokens"] = sealed.admission.max_tokens
        if lookup is not None:
            call["extra_headers"] = {**(call.get("extra_headers") or {}), **lookup.headers(sealed.admission.call_id)}
        result = wrapped(*args, **call)
        if call.get("stream") and self.call_type == "completion":
            # a sync stream the caller abandons reports nothing to LiteLLM's callbacks: settle it ourselves
            return _wrap(result, self.gate.governor, call, GovernedStream)
        return result


_installed: dict[str, Any] = {}
_owner: list[Any] = []  # the gate the instrumentation admits through


def instrument(gate: "Gate", resolve: Callable[[str, str | None], tuple[str, bool]]) -> None:
    """Route ``litellm.completion`` / ``embedding`` / ``text_completion`` through ``gate`` (replacing an
    earlier instrumentation)."""
    uninstrument()
    _owner[:] = [gate]
    for name, (call_type, positional) in _TARGETS.items():
        original = getattr(litellm, name)
        wrapper = wrapt.FunctionWrapper(original, _SyncGate(gate, resolve, call_type, positional))
        _installed[name] = original
        setattr(litellm, name, wrapper)


def uninstrument(gate: "Gate | None" = None) -> None:
    """Put LiteLLM's own functions back (only if ``gate``'s instrumentation is the one in place, when given)."""
    if gate is not None and (not _owner or _owner[0] is not gate):
        return
    _owner.clear()
    for name, original in list(_installed.items()):
        current = getattr(litellm, name, None)
        if isinstance(current, wrapt.FunctionWrapper):
            setattr(litellm, name, original)
        _installed.pop(name, None)


def instrumented() -> bool:
    """Whether LiteLLM's sync entry points are instrumented."""
    return bool(_installed) and isinstance(getattr(litellm, "completion", None), wrapt.FunctionWrapper)

"""Governed streams: settle a streamed call however it ends — completed, broken midway, or abandoned.

What LiteLLM 1.110 reports for a stream (measured; see docs/calls.md):

- **completed** (the caller iterates to the end): one success event with the assembled response and
  its usage (the provider's final usage chunk, or LiteLLM's own count when the provider sends none);
- **broken midway** (the connection drops): one failure event. Async streams carry the usage of the
  chunks already delivered (``combined_usage_object``); sync streams carry none;
- **abandoned** (the caller stops iterating, closes the stream, or drops it): *nothing*. No callback
  fires, and the ``Logging`` object LiteLLM keeps is never garbage-collected, so no finaliser
  on it can stand in.

So tidyllm wraps the stream object a governed Router returns in a :class:`GovernedStream`, which
passes every chunk through unchanged while keeping a :class:`StreamTally` of what the caller got
(answer text, tool-call text, finish reason, the usage chunk). It settles the call itself when the
stream is closed before its end, when it is garbage-collected unfinished (``weakref.finalize``,
which also runs at interpreter exit), and when the provider connection breaks after content was
delivered (the failure event then stands aside: sync streams would report no tokens). A completed
stream is settled by LiteLLM's success event like any other call; should that event never come (an
async stream whose event loop closed right after it), the stream settles from its tally after
:data:`EVENT_GRACE_SECONDS`.

Plain ``litellm.acompletion(stream=True)`` returns LiteLLM's object straight to the caller, with no
place for tidyllm to stand: its abandonment is only seen when the reservation's lease expires.
Use the governed Router or ``model="tidyllm/<group>"`` for streams.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tidyllm.litellm_bridge.records import chunk_facts, stream_token

if TYPE_CHECKING:
    from tidyllm.governance.engine import Admission, Governor

__all__ = ["GovernedStream", "AsyncGovernedStream", "StreamTally", "guard_router_streams", "run_blocking"]

log = logging.getLogger("tidyllm.governance")
async def run_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking ``fn`` off the event loop; inline when no thread can take it (interpreter shutdown:
    ``cannot schedule new futures after interpreter shutdown``), so a settlement is never lost."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except RuntimeError as exc:
        if "shutdown" not in str(exc) and "new thread" not in str(exc):
            raise
    return fn(*args, **kwargs)


#: ways a stream ends early that are the caller's doing, not the provider's
_ABANDONING = (GeneratorExit, KeyboardInterrupt, asyncio.CancelledError)


class StreamTally:
    """What a governed stream delivered to its caller so far (updated chunk by chunk)."""

    def __init__(self, admission: "Admission", token: str, messages: Any, tools: Any) -> None:
        self.admission = admission
        #: the seal token of the call: settling the stream claims it (LiteLLM's late event then finds nothing)
        self.token = token
        self.call_id: str = admission.call_id
        self.messages = messages
        self.tools = tools
        self.text: list[str] = []
        self.tool_text: list[str] = []
        self.tool_names: list[str] = []
        self.finish_reason: str | None = None
        self.usage: tuple[int, int] | None = None
        #: set once the stream's end was seen (its success event settles it)
        self.completed = False
        #: set once the call is settled, by LiteLLM's event or by the stream (a second settlement is a no-op)
        self.settled = threading.Event()
        self._lock = threading.Lock()

    def add(self, chunk: Any) -> None:
        """Count one chunk the caller received."""
        facts = chunk_facts(chunk)
        if facts.text:
            self.text.append(facts.text)
        if facts.tool_text:
            self.tool_text.append(facts.tool_text)
        self.tool_names.extend(facts.tool_names)
        self.finish_reason = facts.finish_reason or self.finish_reason
        if facts.usage is not None:
            self.usage = facts.usage

    def claim(self) -> bool:
        """True exactly once: for whoever settles this stream."""
        with self._lock:
            if self.settled.is_set():
                return False
            self.settled.set()
            return True


#: seconds a completed stream waits for LiteLLM's success event before it settles from its own tally
EVENT_GRACE_SECONDS = 5.0


def _settle(governor_ref: "weakref.ReferenceType[Governor]", tally: StreamTally, outcome: str,
            error: BaseException | None) -> None:
    governor = governor_ref()
    if governor is None or not tally.claim():
        return
    try:
        governor.settle_stream(tally, outcome, error)
    except Exception:  # noqa: BLE001 - a stream's close must never raise; the lease still expires
        log.exception("tidyllm could not settle stream %s", tally.call_id)


def _settle_completed(governor_ref: "weakref.ReferenceType[Governor]", tally: StreamTally) -> None:
    """A completed stream is settled by LiteLLM's success event, which carries the provider's usage.

    For an async stream LiteLLM sends that event from a task on the caller's event loop: a loop that
    closes right after the stream ends (``asyncio.run`` returning) cancels it, and the event is lost.
    So the stream waits a little for the event, then settles from what it delivered."""
    if not tally.settled.wait(EVENT_GRACE_SECONDS):
        log.warning("no success event from LiteLLM for completed stream %s; settled from its delivered tokens",
                    tally.call_id)
        _settle(governor_ref, tally, "completed", None)


def _settle_from_finaliser(governor_ref: "weakref.ReferenceType[Governor]", tally: StreamTally) -> None:
    """Run by ``weakref.finalize`` when a governed stream is garbage-collected (or at exit) unsettled.

    The garbage collector may run inside any code, including a mart transaction of this very
    thread: settling there could wait on our own lock. A short-lived thread settles instead
    (non-daemon, so a normal exit waits for it); at interpreter shutdown, inline."""
    if tally.settled.is_set():
        return
    job = partial(_settle_completed, governor_ref, tally) if tally.completed else \
        partial(_settle, governor_ref, tally, "abandoned", None)
    try:
        threading.Thread(target=job, name=f"tidyllm-stream-{tally.call_id[:8]}").start()
    except RuntimeError:  # no new threads at interpreter shutdown
        job()


class _Guard:
    """The part sync and async governed streams share."""

    def __init__(self, inner: Any, governor: "Governor", tally: StreamTally) -> None:
        self._inner = inner
        self._tally = tally
        self._governor_ref = weakref.ref(governor)
        governor.track_stream(tally)
        self._finaliser = weakref.finalize(self, _settle_from_finaliser, self._governor_ref, tally)

    @property
    def tally(self) -> StreamTally:
        """What the caller received so far (the proxy settles a dropped stream from it)."""
        return self._tally

    @property
    def tidyllm_call_id(self) -> str:
        """The id of the governed call (``llm_calls.id``)."""
        return self._tally.call_id

    def __getattr__(self, name: str) -> Any:
        # everything else (``_hidden_params``, ``logging_obj``, ``completion_stream`` ...) is LiteLLM's
        return getattr(self._inner, name)

    def _ended(self) -> None:
        # the finaliser stays: it settles the call should LiteLLM's success event never come
        self._tally.completed = True

    def _stop(self, error: BaseException | None) -> tuple[Any, ...]:
        """Arguments of :func:`_settle` for a stream that ends early: closed (``error`` None), interrupted
        or cancelled (abandoned), or broken by ``error`` (failed)."""
        self._finaliser.detach()
        failed = error is not None and not isinstance(error, _ABANDONING)
        return self._governor_ref, self._tally, "failed" if failed else "abandoned", error if failed else None


class GovernedStream(_Guard):
    """A sync LiteLLM stream whose call is settled however the stream ends (see the module docstring)."""

    def __iter__(self) -> "GovernedStream":
        return self

    def __next__(self) -> Any:
        try:
            chunk = next(self._inner)
        except StopIteration:
            self._ended()
            raise
        except BaseException as exc:
            _settle(*self._stop(exc))
            raise
        self._tally.add(chunk)
        return chunk

    def close(self) -> None:
        """Close the stream; an unfinished one is settled now for what it delivered."""
        try:
            self._inner.close()
        finally:
            if not self._tally.completed:
                _settle(*self._stop(None))

    def __enter__(self) -> "GovernedStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGovernedStream(_Guard):
    """The async counterpart of :class:`GovernedStream`."""

    def __aiter__(self) -> "AsyncGovernedStream":
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self._inner.__anext__()
        except StopAsyncIteration:
            self._ended()
            raise
        except BaseException as exc:
            # the mart write is blocking work: off the event loop
            await run_blocking(_settle, *self._stop(exc))
            raise
        self._tally.add(chunk)
        return chunk

    async def aclose(self) -> None:
        """Close the stream; an unfinished one is settled now for what it delivered."""
        try:
            await self._inner.aclose()
        finally:
            if not self._tally.completed:
                await run_blocking(_settle, *self._stop(None))

    async def __aenter__(self) -> "AsyncGovernedStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _wrap(result: Any, governor: "Governor", kwargs: Mapping[str, Any], cls: type[_Guard]) -> Any:
    if isinstance(result, _Guard) or not kwargs.get("stream"):
        return result
    token = stream_token(result)
    admission = governor.seals.peek(token)
    if admission is None:
        return result  # not admitted by tidyllm (a router governed elsewhere): nothing to settle
    return cls(result, governor, StreamTally(admission, token, kwargs.get("messages"), kwargs.get("tools")))


def guard_router_streams(router: Any, governor: "Governor") -> None:
    """Make ``router.completion`` / ``router.acompletion`` return governed streams for ``stream=True``.

    The replacements are set on the router instance (LiteLLM's Router keeps instance-level
    replacements of its endpoints); non-streaming calls pass through untouched."""
    completion: Callable[..., Any] = router.completion
    acompletion: Callable[..., Any] = router.acompletion
    if getattr(completion, "tidyllm_guarded", False):
        return

    def governed_completion(*args: Any, **kwargs: Any) -> Any:
        return _wrap(completion(*args, **kwargs), governor, kwargs, GovernedStream)

    async def governed_acompletion(*args: Any, **kwargs: Any) -> Any:
        return _wrap(await acompletion(*args, **kwargs), governor, kwargs, AsyncGovernedStream)

    for fn, original in ((governed_completion, completion), (governed_acompletion, acompletion)):
        fn.__doc__ = getattr(original, "__doc__", None)
        fn.tidyllm_guarded = True  # type: ignore[attr-defined]
    router.completion = governed_completion
    router.acompletion = governed_acompletion

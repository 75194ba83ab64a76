"""Sealed admissions: only the gate can admit a call, and an admission cannot be forged or copied.

An admission never travels as data a caller could write. The gate keeps it here, in this process's
memory, under a random token it generates for the attempt, and puts only the token into *its own
copy* of the request (``metadata["tidyllm"]``). When the call finishes, the settlement callback
*claims* the token: the admission comes out exactly once. A token tidyllm never issued (a caller
wrote ``{"tidyllm": ...}`` into its metadata) or one already claimed (a copy of a finished call's
token) yields nothing; the entry points strip such values before governing the call and audit the
attempt as a forgery.

Tokens are 128 random bits (:func:`secrets.token_hex`): guessing a live one is not a strategy.
A token lives until its call is settled; one whose call never reports back (LiteLLM dropped the
event) is dropped after ``max_age`` seconds — its lease is reclaimed by the ledger anyway.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["Seals", "TOKEN_PREFIX"]

#: every token starts with this, so a forged value is recognisable in the audit trail
TOKEN_PREFIX = "tidyllm-seal:"
T = TypeVar("T")
#: the prefixes of every Seals made in this process: a token of a replaced platform is not a forgery
_PREFIXES: set[str] = set()


class Seals(Generic[T]):
    """This process's live admissions, by the token the gate issued for each."""

    def __init__(self, *, max_age: float = 3600.0, remember_claimed: int = 65_536) -> None:
        self.max_age = max_age
        self._live: dict[str, tuple[T, float]] = {}
        #: tokens settled recently: a second event for the same call is a duplicate, not a forgery
        self._claimed: "OrderedDict[str, None]" = OrderedDict()
        self._remember = remember_claimed
        self._hook_seen: set[str] = set()
        self._sync_seen: set[str] = set()
        #: what came back for a live token before its settlement event: (response or exception, ok, when,
        #: the request's messages and tools)
        self._returned: dict[str, tuple[object, bool, float, object, object]] = {}
        self._lock = threading.Lock()
        self._next_prune = time.monotonic() + max_age
        self.prefix = f"{TOKEN_PREFIX}{secrets.token_hex(4)}:"
        _PREFIXES.add(self.prefix)

    def seal(self, admission: T) -> str:
        """Keep ``admission`` and return the token that stands for it."""
        token = self.prefix + secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            self._live[token] = (admission, now)
            if now >= self._next_prune:
                self._prune(now)
        return token

    def peek(self, token: object) -> T | None:
        """The live admission behind ``token`` (not consumed), or None."""
        if not isinstance(token, str):
            return None
        entry = self._live.get(token)
        return entry[0] if entry is not None else None

    def claim(self, token: object) -> T | None:
        """Take the admission behind ``token`` out: the first claim gets it, every later one None."""
        if not isinstance(token, str):
            return None
        with self._lock:
            entry = self._live.pop(token, None)
            self._hook_seen.discard(token)
            self._sync_seen.discard(token)
            self._returned.pop(token, None)
            if entry is not None:
                self._claimed[token] = None
                if len(self._claimed) > self._remember:
                    self._claimed.popitem(last=False)
        return entry[0] if entry is not None else None

    def claimed(self, token: object) -> bool:
        """Whether ``token`` was issued here and already claimed (a duplicate event, not a forgery)."""
        return isinstance(token, str) and token in self._claimed

    def foreign(self, token: object) -> bool:
        """Whether ``token`` was issued by another (replaced) platform of this process: its late event
        belongs to that platform's mart, not to this one, and is no forgery."""
        if not isinstance(token, str) or token.startswith(self.prefix):
            return False
        head = token[: len(self.prefix)]
        return head in _PREFIXES

    def issued(self, token: object) -> bool:
        """Whether this process issued ``token`` (live or recently claimed)."""
        return isinstance(token, str) and (token in self._live or token in self._claimed)

    def pass_hook(self, token: object) -> bool:
        """The pre-call hook's check for a request that arrives with a token: True once per live token
        (the Router strategy admitted this very request); a second request carrying the same token is
        a copy, and gets False."""
        if not isinstance(token, str):
            return False
        with self._lock:
            if token not in self._live or token in self._hook_seen:
                return False
            self._hook_seen.add(token)
            return True

    def note_returned(self, token: object, outcome: object, ok: bool, messages: object = None,
                      tools: object = None) -> bool:
        """Remember what a live call returned (a response, or an exception) until its settlement event
        claims it: should that event never run (its task was cancelled with the caller's event loop, or
        the process exits first), the call is settled from this. True when the token was live."""
        if not isinstance(token, str) or token not in self._live:
            return False
        self._returned[token] = (outcome, ok, time.monotonic(), messages, tools)
        return True

    def unsettled_returns(self, older_than: float | None = None) -> list[tuple[str, T, object, bool, object, object]]:
        """``(token, admission, outcome, ok, messages, tools)`` of live calls that returned but were not
        settled (only those that returned at least ``older_than`` seconds ago, when given)."""
        cutoff = time.monotonic() - older_than if older_than is not None else float("inf")
        with self._lock:
            return [(t, self._live[t][0], o, ok, m, tl) for t, (o, ok, at, m, tl) in self._returned.items()
                    if t in self._live and at <= cutoff]

    @property
    def returned(self) -> int:
        """Live calls that returned and wait for their settlement event."""
        return len(self._returned)

    def pass_sync(self, token: object) -> bool:
        """The sync instrumentation's check (like :meth:`pass_hook`): True once per live token."""
        if not isinstance(token, str):
            return False
        with self._lock:
            if token not in self._live or token in self._sync_seen:
                return False
            self._sync_seen.add(token)
            return True

    def __len__(self) -> int:
        return len(self._live)

    def _prune(self, now: float) -> None:
        cutoff = now - self.max_age
        for token in [t for t, (_, at) in self._live.items() if at < cutoff]:
            self._live.pop(token, None)
            self._hook_seen.discard(token)
            self._sync_seen.discard(token)
            self._returned.pop(token, None)
        self._next_prune = now + self.max_age / 4

"""Admission credit: a busy caller's calls admitted from headroom its process reserved in advance.

Every governed call is admitted against money the database reserved before the provider is called.
Done one call at a time, that is a write transaction on the caller's path for every call. Admission
credit keeps the guarantee and takes the write off that path for a process that calls often:

- When a process makes its second call for the same (department, user, route, model) within a
  second, and the tightest enclosing budget has room for at least twice the block, the admission
  transaction reserves a *block* of ``governance.admission_credit_calls`` worst cases (default 32)
  instead of one call's. The block is an ordinary reservation row and lease; its ``call_id`` is
  ``credit:<reservation id>``.
- The following calls of that key are admitted from the block in memory while it has room for
  their worst case: no database round trip before the provider is called.
- Each such call is written when it finishes, in one transaction on the logging thread: its
  ``llm_calls`` row (it has no ``pending`` row while in flight), its spend, its share of the block
  returned, its audit row.
- A block stops admitting after :attr:`AdmissionCredit.max_age` seconds (2 s, and at most a quarter
  of the lease TTL) or :attr:`AdmissionCredit.idle` seconds without a call (0.5 s); what it has not
  handed out goes back to the budgets then, on a background thread. ``budgets.set()``,
  ``budgets.delete()``, ``budgets.open_reservations()``, ``Platform.close()`` and a normal
  interpreter exit give it back at once; ``budgets.status()`` shows it as not reserved.

Nothing is admitted that the database did not reserve, so limits hold exactly as before, across
threads, processes and hosts. What changes: ``reserved_usd`` includes unused credit for up to
``max_age``; near a limit no block is granted (it needs twice its size free), so the last calls
before a limit are admitted one by one; a block admits only for the budgets that enclosed its key
when it was granted (a budget created in *another* process binds this process's calls within
``max_age``, one created in this process at once). A process that dies leaves its block's lease to
expire, like any reservation.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Hashable

from tidyllm.mart.store import utcnow

if TYPE_CHECKING:
    from tidyllm.governance.budgets import BudgetLedger

__all__ = ["AdmissionCredit", "CREDIT_PREFIX"]

log = logging.getLogger("tidyllm.governance")

#: ``reservations.call_id`` of an admission-credit block starts with this
CREDIT_PREFIX = "credit:"
#: a key is busy when its previous admission in this process is at most this old (seconds)
BUSY_SECONDS = 1.0


class _Block:
    """One block of credit: a reservation this process hands out to calls in memory."""

    __slots__ = ("id", "key", "day", "windows", "available", "outstanding", "last_used", "deadline",
                 "retired", "io")

    def __init__(self, res_id: str, key: Hashable, day: dt.datetime, windows: tuple[tuple[str, str], ...],
                 available: float, now: float, deadline: float) -> None:
        self.id = res_id
        self.key = key
        self.day = day
        self.windows = windows
        #: USD of the block not handed to any call yet
        self.available = available
        #: call id -> the worst case it was admitted with, for calls not written yet
        self.outstanding: dict[str, float] = {}
        self.last_used = now
        self.deadline = deadline
        #: no longer admitting; what is available goes back
        self.retired = False
        #: serialises this block's database writes, so they commit in the order they were decided
        self.io = threading.Lock()


class AdmissionCredit:
    """This process's admission-credit blocks (see the module docstring). Thread-safe."""

    def __init__(self, ledger: "BudgetLedger", *, calls: int, idle: float = 0.5, max_age: float = 2.0) -> None:
        self.ledger = ledger
        #: worst cases per block; 0 turns admission credit off
        self.calls = int(calls)
        #: seconds without a call after which a block stops admitting
        self.idle = float(idle)
        #: seconds after which a block stops admitting (at most a quarter of the lease TTL)
        self.max_age = min(float(max_age), ledger.lease_ttl / 4.0)
        self._lock = threading.Lock()
        self._admitting: dict[Hashable, _Block] = {}
        self._open: dict[str, _Block] = {}
        self._recent: dict[Hashable, float] = {}
        #: keys whose block an admission transaction is reserving right now (one at a time per key)
        self._granting: set[Hashable] = set()
        self._thread: threading.Thread | None = None
        ref = weakref.ref(self)
        # a forked child must not admit from its parent's blocks: the parent owns and settles them
        os.register_at_fork(after_in_child=lambda: _call(ref, "_forget"))
        atexit.register(_call, ref, "return_all")

    @property
    def enabled(self) -> bool:
        return self.calls > 0

    # --- admission (the caller's thread) ---------------------------------------------------------

    def take(self, key: Hashable, day: dt.datetime, worst: float, call_id: str) -> tuple[str | None, float]:
        """``(block id, 0.0)`` when the call is admitted from credit; otherwise ``(None, size)`` where
        ``size`` is the block to ask the admission transaction for (0.0: admit this call alone). A
        caller given a size must then call :meth:`granted` or :meth:`not_granted`."""
        now = time.monotonic()
        with self._lock:
            block = self._admitting.get(key)
            if block is not None:
                if block.day == day and now < block.deadline and block.available >= worst - 1e-12:
                    block.available -= worst
                    block.outstanding[call_id] = worst
                    block.last_used = now
                    return block.id, 0.0
                self._retire(block)
                busy = True
            else:
                last = self._recent.get(key)
                busy = last is not None and now - last <= BUSY_SECONDS
                if len(self._recent) > 4096:
                    self._recent.clear()
                self._recent[key] = now
            if not busy or worst <= 0 or key in self._granting:
                return None, 0.0
            self._granting.add(key)
        return None, worst * self.calls

    def not_granted(self, key: Hashable) -> None:
        """The admission transaction asked for a block of ``key`` did not reserve one."""
        with self._lock:
            self._granting.discard(key)

    def granted(self, key: Hashable, day: dt.datetime, res_id: str, amount: float,
                windows: tuple[tuple[str, str], ...], call_id: str, worst: float) -> None:
        """A block of ``amount`` was reserved along with call ``call_id`` (its first call)."""
        now = time.monotonic()
        block = _Block(res_id, key, day, windows, amount - worst, now, now + self.max_age)
        block.outstanding[call_id] = worst
        with self._lock:
            self._granting.discard(key)
            previous = self._admitting.get(key)
            if previous is not None:
                self._retire(previous)
            self._admitting[key] = block
            self._open[res_id] = block
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tidyllm-credit", daemon=True)
                self._thread.start()

    # --- settlement (LiteLLM's logging threads) ------------------------------------------------

    def settle(self, block_id: str, call_id: str,
               persist: Callable[[str, tuple[tuple[str, str], ...], float, bool], None]) -> bool:
        """Write a finished credit call: ``persist(block id, windows, less, close)`` writes, in one
        transaction, its call row and audit row, its spend, and ``less`` (its share of the block and, when
        the block is retired, the rest of what it had not handed out) given back; ``close`` settles the
        block. False when the call is not outstanding (LiteLLM delivered its event twice)."""
        with self._lock:
            block = self._open.get(block_id)
        if block is None:
            return False
        with block.io:
            # the share leaves ``outstanding`` under ``io``: no other write can close the block before
            # this one has handed the share back
            with self._lock:
                share = block.outstanding.pop(call_id, None)
            if share is None:
                return False
            give_back, close = self._decide(block)
            persist(block.id, block.windows, share + give_back, close)
        return True

    def unused(self) -> dict[tuple[str, str], float]:
        """USD this process holds in credit but has not handed to any call, per window
        ``(budget id, window start ISO)`` — reserved in the database, yet as good as free."""
        out: dict[tuple[str, str], float] = {}
        with self._lock:
            for block in self._open.values():
                if block.available > 0:
                    for window in block.windows:
                        out[window] = out.get(window, 0.0) + block.available
        return out

    # --- giving credit back -----------------------------------------------------------------------

    def return_all(self) -> None:
        """Stop admitting from every block and give back what they have not handed out, now."""
        with self._lock:
            for block in list(self._admitting.values()):
                self._retire(block)
            blocks = list(self._open.values())
        for block in blocks:
            self._flush(block)

    def give_back_retired(self) -> None:
        """Give back, now, what retired blocks have not handed out: an admission that has to ask the
        database must not be refused for money this process holds but no longer uses."""
        with self._lock:
            blocks = [b for b in self._open.values() if b.retired and b.available > 1e-12]
        for block in blocks:
            self._flush(block)

    def _retire(self, block: _Block) -> None:
        """(under ``_lock``) stop admitting from ``block``."""
        block.retired = True
        if self._admitting.get(block.key) is block:
            del self._admitting[block.key]

    def _decide(self, block: _Block) -> tuple[float, bool]:
        """(under ``block.io``) what a write to ``block`` gives back, and whether it closes it."""
        with self._lock:
            give_back = block.available if block.retired else 0.0
            block.available -= give_back
            # a block is closed once, by the write that leaves it out of ``_open``
            close = block.retired and not block.outstanding and self._open.pop(block.id, None) is not None
        return give_back, close

    def _flush(self, block: _Block) -> None:
        """Give back a retired block's unused credit (and close it when no call is outstanding)."""
        with block.io:
            give_back, close = self._decide(block)
            if give_back <= 0 and not close:
                return
            try:
                with self.ledger._store.tx() as tx:
                    self.ledger.credit_reduce(tx, block.id, block.windows, less=give_back, spent=0.0, close=close,
                                              now=utcnow())
            except Exception:  # noqa: BLE001 - the lease still expires; never break a caller over it
                log.exception("could not give back admission credit %s; its lease will expire", block.id)

    def _run(self) -> None:
        """Retire idle and old blocks and give their credit back; ends when no block is open."""
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                for block in list(self._admitting.values()):
                    if now >= block.deadline or now - block.last_used >= self.idle:
                        self._retire(block)
                todo = [b for b in self._open.values() if b.retired]
                if not self._open:
                    self._thread = None
                    return
            for block in todo:
                self._flush(block)

    def _forget(self) -> None:
        """In a forked child: drop the parent's blocks (the parent settles and returns them)."""
        self._lock = threading.Lock()
        self._admitting = {}
        self._open = {}
        self._recent = {}
        self._granting = set()
        self._thread = None


def _call(ref: "weakref.ref[AdmissionCredit]", method: str) -> Any:
    credit = ref()
    if credit is None:
        return None
    try:
        return getattr(credit, method)()
    except Exception:  # noqa: BLE001 - at exit or after a fork the database may be gone; leases expire
        log.debug("admission credit: %s failed", method, exc_info=True)
        return None

"""Settlement at interpreter exit: no admitted call is left unwritten because the script ended.

A script that makes its calls with ``asyncio.run(...)`` and exits leaves LiteLLM's last success
events queued; LiteLLM flushes them from an ``atexit`` handler on a fresh event loop. By then the
interpreter accepts no new work on thread pools, so tidyllm's async callbacks settle inline
(:func:`tidyllm.litellm_bridge.callbacks.run_blocking`). tidyllm's own exit handler — registered
after LiteLLM's, so it runs first — drains LiteLLM's queue itself *before* giving back this
process's unused admission credit and retrying the settlement writes the database refused.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

if TYPE_CHECKING:
    from tidyllm.governance.engine import Governor

__all__ = ["settle_at_exit", "settle_returned", "drain_litellm"]

log = logging.getLogger("tidyllm.governance")
_registered: "weakref.WeakSet[Governor]" = weakref.WeakSet()


def drain_litellm() -> None:
    """Run LiteLLM's queued logging events (its own exit flush; a no-op when nothing is queued)."""
    GLOBAL_LOGGING_WORKER._flush_on_exit()  # noqa: SLF001 - LiteLLM's only way to drain its queue synchronously


def _at_exit(ref: "weakref.ref[Governor]") -> None:
    governor = ref()
    if governor is None:
        return
    try:
        drain_litellm()
    except Exception:  # noqa: BLE001 - at exit nothing may raise; what is left is in the journal or a lease
        log.debug("draining LiteLLM's events at exit failed", exc_info=True)
    try:
        settle_returned(governor)
    except Exception:  # noqa: BLE001 - see above
        log.debug("settling returned calls at exit failed", exc_info=True)
    try:
        if governor.spool is not None and governor.spool.pending:
            governor.spool.drain(governor.apply)
        governor.budgets.credit.return_all()
    except Exception:  # noqa: BLE001 - see above
        log.debug("tidyllm exit settlement failed", exc_info=True)


#: seconds a returned async call waits for LiteLLM's settlement event before it is settled from its response
EVENT_GRACE_SECONDS = 3.0


def settle_returned(governor: "Governor", older_than: float | None = None) -> int:
    """Settle the calls that returned to their caller but whose settlement event never ran (its task was
    cancelled when the caller's event loop closed), from what they returned. Returns how many."""
    import datetime as dt

    from tidyllm.litellm_bridge.records import from_returned

    settled = 0
    for token, admission, outcome, ok, messages, tools in governor.seals.unsettled_returns(older_than):
        record = from_returned(token, admission.call_type, dt.datetime.fromisoformat(admission.started_at),
                               outcome, ok, messages=messages, tools=tools)
        governor.dispatch(record)
        settled += 1
    if settled:
        log.info("settled %d call(s) whose LiteLLM event never came, from their responses", settled)
    return settled


_late_threads: "weakref.WeakKeyDictionary[Governor, threading.Thread]" = weakref.WeakKeyDictionary()
_late_lock = threading.Lock()


def late_settlement(governor: "Governor") -> None:
    """Make sure a thread settles ``governor``'s returned calls whose event does not come within
    :data:`EVENT_GRACE_SECONDS`; it ends once nothing waits."""
    with _late_lock:
        thread = _late_threads.get(governor)
        if thread is not None and thread.is_alive():
            return
        thread = threading.Thread(target=_run_late, args=(weakref.ref(governor),), name="tidyllm-late-settle",
                                  daemon=True)
        _late_threads[governor] = thread
    thread.start()


def _run_late(ref: "weakref.ref[Governor]") -> None:
    idle = 0.0
    while idle < 30.0:
        time.sleep(0.5)
        governor = ref()
        if governor is None:
            return
        try:
            settle_returned(governor, EVENT_GRACE_SECONDS)
        except Exception:  # noqa: BLE001 - never kill the thread; what is left is settled at exit
            log.exception("settling returned calls failed")
        idle = 0.0 if governor.seals.returned else idle + 0.5
        del governor


def settle_at_exit(governor: "Governor") -> None:
    """Register ``governor``'s exit settlement (once)."""
    if governor in _registered:
        return
    _registered.add(governor)
    atexit.register(_at_exit, weakref.ref(governor))

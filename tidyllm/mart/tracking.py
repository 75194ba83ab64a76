"""``track_execution``: record a block of work, its steps and its result in the mart.

A tracked execution costs **one** short transaction: steps are buffered in memory, and when the
block ends the execution row (final status, duration, result, error) and its steps are written
together. The block's exception, if any, is recorded (type and message) and re-raised unchanged;
that includes ``KeyboardInterrupt``, ``SystemExit`` and task cancellation.

Running work stays visible: a block still running :data:`RUNNING_ROW_AFTER_S` seconds after it
started gets its execution row written with status ``running`` (and ``ended_at`` NULL) by a
background thread, and the end of the block then completes that row. So a long block shows up
while it runs, and a process killed in the middle of one leaves its ``running`` row behind; a
block shorter than that (or killed sooner) is written only once, when it ends.

The writes are prepared statements (:meth:`Store.prepared <tidyllm.mart.store.Store.prepared>`)
executed in a :meth:`Store.tx <tidyllm.mart.store.Store.tx>` transaction on the pool's own DB-API
connection: building SQLAlchemy Core statements per execution cost more than the database work.

Inside a block, :func:`current_execution_id` names the execution (a context variable, so it follows
the block into ``asyncio`` tasks it starts and into threads started with ``contextvars.copy_context()``).
The learning router records it with each routing decision made inside the block, so a score given to
the execution (``tracker.record_result(..., score=0.9)`` or ``mart.learn_from_execution({"execution_id":
..., "performance_score": 0.9})``) rewards those decisions.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tidyllm.mart.schema import execution_steps, executions
from tidyllm.mart.store import utcnow

if TYPE_CHECKING:
    from tidyllm.mart.store import Store

__all__ = ["Tracker", "RUNNING_ROW_AFTER_S", "current_execution_id"]

log = logging.getLogger("tidyllm.mart")

#: seconds after which a block that is still running gets its ``running`` execution row written
RUNNING_ROW_AFTER_S = 1.0

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("tidyllm_execution_id", default=None)
#: the blocks open in this process, by execution id (what a block that ends hands the context back to)
_open: dict[str, "Tracker"] = {}


def current_execution_id() -> str | None:
    """The id of the innermost ``track_execution`` block running in this context, or ``None``.

    Set for the block's duration and reset after it (also when it raises); asyncio tasks created inside
    the block and threads started with ``contextvars.copy_context().run`` see it too."""
    return _current.get()


_FINAL_COLUMNS = ("status", "ended_at", "duration_ms", "result", "error_type", "error_message")
_RUNNING_COLUMNS = ("id", "module", "operation", "context", "status", "started_at")
_STEP_COLUMNS = tuple(c.name for c in execution_steps.columns)


def _insert(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    return (sqlite if dialect == "sqlite" else postgresql).insert(executions)


# Statements written once as SQLAlchemy Core and compiled once per database (Store.prepared): each
# execution is the driver's cursor.execute plus SQLAlchemy's own bind processors, so JSON and
# timestamps are stored exactly as everywhere else in tidyllm.

def _final_statement(dialect: str) -> Any:
    """The finished execution row; completes the running row if that was written first."""
    insert = _insert(dialect)
    return insert.on_conflict_do_update(index_elements=[executions.c.id],
                                        set_={c: insert.excluded[c] for c in _FINAL_COLUMNS})


def _running_statement(dialect: str) -> Any:
    """The running row, unless the finished one is there already."""
    return _insert(dialect).on_conflict_do_nothing(index_elements=[executions.c.id])


def _write(store: "Store", execution: dict[str, Any] | None, running: list[dict[str, Any]],
           steps: list[dict[str, Any]]) -> None:
    """One transaction: the finished ``execution`` row, ``running`` rows, ``steps`` (StorageError on failure)."""
    dialect = store.dialect
    with store.tx(write=True) as tx:
        cursor = tx.cursor
        if execution is not None:
            final = store.prepared("tracking.final", lambda: (_final_statement(dialect), list(execution)))
            cursor.execute(final.sql, final.params(execution))
        if running:
            first = store.prepared("tracking.running", lambda: (_running_statement(dialect), _RUNNING_COLUMNS))
            cursor.executemany(first.sql, [first.params(row) for row in running])
        if steps:  # after the execution row: the steps' foreign key points at it
            insert = store.prepared("tracking.steps", lambda: (execution_steps.insert(), _STEP_COLUMNS))
            cursor.executemany(insert.sql, [insert.params(step) for step in steps])


class Tracker:
    """The object ``track_execution`` yields. Use as ``with``/``async with``; thread-safe."""

    def __init__(self, store: "Store", module: str, operation: str, context: Mapping[str, Any] | None,
                 on_score: "Callable[[Tracker, float], None] | None" = None) -> None:
        if not isinstance(module, str) or not module:
            raise TypeError("track_execution(module, ...) needs a non-empty module name")
        if not isinstance(operation, str) or not operation:
            raise TypeError("track_execution(module, operation, ...) needs a non-empty operation name")
        if context is not None and not isinstance(context, Mapping):
            raise TypeError(f"track_execution context must be a mapping, got {type(context).__name__}")
        self._store = store
        self.module = module
        self.operation = operation
        self.context = dict(context or {})
        self.execution_id = str(uuid.uuid4())
        #: steps recorded so far, as dicts with name, data and recorded_at
        self.steps: list[dict[str, Any]] = []
        self.result: Any = None
        #: the score in [0, 1] given with record_result(score=...), if any
        self.score: float | None = None
        self.status = "pending"
        self._on_score = on_score
        self._token: contextvars.Token[str | None] | None = None
        #: the innermost block that was current when this one started (see _reset)
        self._outer: "Tracker | None" = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._started_at = utcnow()

    def record_step(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Record one named step with its payload."""
        if not isinstance(name, str) or not name:
            raise TypeError("record_step(name, data) needs a non-empty step name")
        with self._lock:
            self.steps.append({"name": name, "data": dict(data or {}), "recorded_at": utcnow()})

    def record_result(self, result: Any = None, *, score: float | None = None) -> None:
        """Record the block's result (any JSON-serialisable value) and, optionally, how well it went.

        ``score`` in [0, 1] is learned from when the block ends: it rewards the routing decisions of
        the LLM calls made inside the block (``mart.learn_from_execution`` with this ``execution_id``)."""
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
                raise ValueError(f"record_result(score={score!r}): a score is a number in [0, 1]")
            self.score = float(score)
        self.result = result

    # --- rows ---------------------------------------------------------------------------------

    def _running_row(self) -> dict[str, Any]:
        return {"id": self.execution_id, "module": self.module, "operation": self.operation, "context": self.context,
                "status": "running", "started_at": self._started_at}

    # --- lifecycle ----------------------------------------------------------------------------

    def _start(self) -> "Tracker":
        self._t0 = time.perf_counter()
        self._started_at = utcnow()
        self.status = "running"
        self._outer = _open.get(_current.get() or "")
        _open[self.execution_id] = self
        self._token = _current.set(self.execution_id)
        _running_rows.add(self)
        return self

    def _finish(self, exc: BaseException | None) -> None:
        duration_ms = (time.perf_counter() - self._t0) * 1000.0
        ended_at = utcnow()
        self._reset()
        _running_rows.discard(self)
        self.status = "error" if exc is not None else "success"
        eid = self.execution_id
        with self._lock:
            steps = [{"id": str(uuid.uuid4()), "execution_id": eid, "seq": i, "name": s["name"], "data": s["data"],
                      "recorded_at": s["recorded_at"]} for i, s in enumerate(self.steps)]
        row = {**self._running_row(), "status": self.status, "ended_at": ended_at, "duration_ms": duration_ms,
               "result": self.result, "error_type": type(exc).__name__ if exc is not None else None,
               "error_message": str(exc)[:4000] if exc is not None else None}
        _write(self._store, row, [], steps)
        if self.score is not None and self._on_score is not None:
            self._on_score(self, self.score)

    def _reset(self) -> None:
        """Leave the block: the current execution becomes the innermost enclosing block still open (blocks
        that overlap without nesting may end in any order), or none."""
        token, self._token = self._token, None
        _open.pop(self.execution_id, None)
        if token is None:
            return
        if _current.get() != self.execution_id:
            return  # a block that started after this one is current: it stays so
        outer = self._outer
        while outer is not None and outer.execution_id not in _open:
            outer = outer._outer
        _current.set(outer.execution_id if outer is not None else None)

    def __enter__(self) -> "Tracker":
        return self._start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._finish(exc)

    async def __aenter__(self) -> "Tracker":
        return self._start()  # no I/O: nothing to move off the event loop

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        import asyncio

        self._reset()  # in the task's own context, before the write moves to a thread
        await asyncio.to_thread(self._finish, exc)


class _RunningRows:
    """Writes the ``running`` row of each block that outlives :data:`RUNNING_ROW_AFTER_S`.

    One daemon thread per process, started when a block starts and gone after a few idle polls.
    Blocks are kept in start order, so each poll looks only at the ones that are due. The row is
    ``INSERT ... ON CONFLICT DO NOTHING`` and the end of the block upserts, so whichever of the two
    writes lands first, the final row wins.
    """

    _IDLE_POLLS = 40

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, Tracker] = {}
        self._thread: threading.Thread | None = None

    def add(self, tracker: Tracker) -> None:
        with self._lock:
            self._active[tracker.execution_id] = tracker
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tidyllm-running-rows", daemon=True)
                self._thread.start()

    def discard(self, tracker: Tracker) -> None:
        with self._lock:  # not while the poll iterates
            self._active.pop(tracker.execution_id, None)

    def _run(self) -> None:
        idle = 0
        while True:
            time.sleep(max(RUNNING_ROW_AFTER_S / 4, 0.005))
            now = time.perf_counter()
            due: list[Tracker] = []
            with self._lock:
                for tracker in self._active.values():
                    if now - tracker._t0 < RUNNING_ROW_AFTER_S:
                        break
                    due.append(tracker)
                for tracker in due:
                    del self._active[tracker.execution_id]
                idle = 0 if (due or self._active) else idle + 1
                if idle >= self._IDLE_POLLS:
                    self._thread = None
                    return
            if due:
                self._write(due)

    @staticmethod
    def _write(due: list[Tracker]) -> None:
        by_store: dict[int, tuple["Store", list[dict[str, Any]]]] = {}
        for tracker in due:
            by_store.setdefault(id(tracker._store), (tracker._store, []))[1].append(tracker._running_row())
        for store, rows in by_store.values():
            try:
                _write(store, None, rows, [])
            except Exception as exc:  # noqa: BLE001 - a background thread: log, the final row still comes
                log.warning("could not record %d running execution(s) in %s: %s", len(rows), store.safe_url, exc)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._active = {}
        self._thread = None


_running_rows = _RunningRows()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_running_rows._after_fork)

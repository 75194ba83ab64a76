"""``track_execution``: record a block of work, its steps and its result in the mart.

The execution row is written when the block starts (so running work is visible); steps are
buffered in memory and written with the result in one transaction when the block ends, so a
tracked execution costs two short transactions however many steps it records. The block's
exception, if any, is recorded (type and message) and re-raised unchanged.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Mapping

import sqlalchemy as sa

from tidyllm.mart.schema import execution_steps, executions
from tidyllm.mart.store import utcnow

if TYPE_CHECKING:
    from tidyllm.mart.store import Store

__all__ = ["Tracker"]

# Built once: statements whose values arrive as parameters compile once and hit SQLAlchemy's
# statement cache; ``.values(...)`` with literal values per call cost more than the database work.
_INSERT_EXECUTION = executions.insert()
_INSERT_STEPS = execution_steps.insert()
_FINISH_EXECUTION = executions.update().where(executions.c.id == sa.bindparam("execution_id"))


class Tracker:
    """The object ``track_execution`` yields. Use as ``with``/``async with``; thread-safe."""

    def __init__(self, store: "Store", module: str, operation: str, context: Mapping[str, Any] | None) -> None:
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
        self.status = "pending"
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._started_at = utcnow()

    def record_step(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Record one named step with its payload."""
        if not isinstance(name, str) or not name:
            raise TypeError("record_step(name, data) needs a non-empty step name")
        with self._lock:
            self.steps.append({"name": name, "data": dict(data or {}), "recorded_at": utcnow()})

    def record_result(self, result: Any) -> None:
        """Record the block's result (any JSON-serialisable value)."""
        self.result = result

    # --- lifecycle ----------------------------------------------------------------------------

    def _start(self) -> "Tracker":
        self._t0 = time.perf_counter()
        self._started_at = utcnow()
        self.status = "running"
        with self._store.begin() as conn:
            conn.execute(_INSERT_EXECUTION, {
                "id": self.execution_id, "module": self.module, "operation": self.operation,
                "context": self.context, "status": "running", "started_at": self._started_at})
        return self

    def _finish(self, exc: BaseException | None) -> None:
        duration_ms = (time.perf_counter() - self._t0) * 1000.0
        self.status = "error" if exc is not None else "success"
        with self._lock:
            rows = [{"id": str(uuid.uuid4()), "execution_id": self.execution_id, "seq": i, "name": s["name"],
                     "data": s["data"], "recorded_at": s["recorded_at"]} for i, s in enumerate(self.steps)]
        with self._store.begin() as conn:
            if rows:
                conn.execute(_INSERT_STEPS, rows)
            conn.execute(_FINISH_EXECUTION, {
                "execution_id": self.execution_id, "status": self.status, "ended_at": utcnow(),
                "duration_ms": duration_ms, "result": self.result,
                "error_type": type(exc).__name__ if exc is not None else None,
                "error_message": str(exc)[:4000] if exc is not None else None})

    def __enter__(self) -> "Tracker":
        return self._start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._finish(exc)

    async def __aenter__(self) -> "Tracker":
        import asyncio

        return await asyncio.to_thread(self._start)

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        import asyncio

        await asyncio.to_thread(self._finish, exc)

"""TidyMart, the universal data backbone: SQL tables every tidyllm part writes, read back as pandas.

``TidyMart(url)`` opens (creating or upgrading) a mart on SQLite or PostgreSQL;
``get_tidymart()`` returns the process default built from settings. See ``docs/schema.md``.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.mart.tracking import Tracker
    from tidyllm.settings import Settings

__all__ = ["TidyMart", "get_tidymart"]

#: ``get_optimal_config`` providers per module: fn(context) -> result dict or None (fall back to history)
Optimizer = Callable[[Mapping[str, Any]], "dict[str, Any] | None"]
#: ``learn_from_execution`` listeners: fn(outcome dict) -> None
Learner = Callable[[Mapping[str, Any]], None]

_OUTCOME_KEYS = ("module", "operation", "context", "parameters", "performance_score", "call_id")


class TidyMart:
    """The mart: tracked executions, learned outcomes, LLM calls, audit, budgets, routing decisions.

    Parameters
    ----------
    url:
        SQLAlchemy URL, ``sqlite:///path.db`` or ``postgresql+psycopg://user:pass@host/db``.
    upgrade:
        Bring an older schema up to date when opening (default). With ``False`` an older
        schema raises :class:`~tidyllm.errors.SchemaVersionError` naming ``tidyllm db upgrade``.
    read_only:
        Open for reading only (SQLite ``mode=ro``, PostgreSQL read-only transactions): a missing
        file or a database that is not a tidyllm mart is an error, and nothing is created.
    """

    def __init__(self, url: str, *, upgrade: bool = True, read_only: bool = False) -> None:
        from tidyllm.mart.store import Store

        self.url = url
        self.store = Store(url, upgrade=upgrade and not read_only, read_only=read_only)
        self._optimizers: dict[str, Optimizer] = {}
        self._learners: list[Learner] = []

    def __repr__(self) -> str:
        return f"TidyMart({self.store.safe_url!r})"

    # --- the seed's API -----------------------------------------------------------------------

    def track_execution(self, module: str, operation: str, context: Mapping[str, Any] | None = None) -> "Tracker":
        """Track a block: ``with mart.track_execution("gateway", "mlflow_query", {...}) as tracker:``.

        The tracker has ``execution_id``, ``steps``, ``record_step(name, data)`` and
        ``record_result(result)``. Status, duration and any exception (type and message) are
        recorded when the block ends; the exception is re-raised. Also works with ``async with``.
        """
        from tidyllm.mart.tracking import Tracker

        return Tracker(self.store, module, operation, context, on_score=self._score_execution)

    def _score_execution(self, tracker: "Tracker", score: float) -> None:
        """``tracker.record_result(score=...)``: learn the score as the execution's outcome."""
        self.learn_from_execution({"module": tracker.module, "operation": tracker.operation,
                                   "context": tracker.context, "execution_id": tracker.execution_id,
                                   "performance_score": score})

    def learn_from_execution(self, outcome: Mapping[str, Any]) -> str:
        """Store an outcome and feed it to the learners (the router's bandit for the gateway module).

        ``outcome`` needs ``module``; ``performance_score`` must be a number in [0, 1] when given;
        ``context`` and ``parameters`` are mappings (keys the seed puts at top level, like
        ``route``, are kept in ``data`` and also read as parameters). With a ``call_id`` the score is
        feedback on that LLM call; with an ``execution_id`` (a ``track_execution`` block's) it rewards the
        routing decisions of the calls made inside that block. Returns the outcome id.
        """
        from tidyllm.mart.schema import outcomes
        from tidyllm.mart.store import utcnow

        if not isinstance(outcome, Mapping):
            raise ConfigurationError(f"learn_from_execution needs a dict, got {type(outcome).__name__}")
        module = outcome.get("module")
        if not isinstance(module, str) or not module:
            raise ConfigurationError("learn_from_execution needs a 'module' (e.g. 'gateway')")
        score = outcome.get("performance_score")
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
                raise ConfigurationError(f"performance_score must be a number in [0, 1], got {score!r}")
            score = float(score)
        context = outcome.get("context") or {}
        parameters = outcome.get("parameters") or {}
        for key, value in (("context", context), ("parameters", parameters)):
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"learn_from_execution: {key!r} must be a mapping, got {type(value).__name__}")
        data = {k: v for k, v in outcome.items() if k not in _OUTCOME_KEYS}
        if not parameters and "route" in data:
            parameters = {"route": data["route"]}
        if not context:
            context = {k: data[k] for k in ("department", "use_case", "data_sensitivity", "user_id") if k in data}
        outcome_id = str(uuid.uuid4())
        row = {"id": outcome_id, "recorded_at": utcnow(), "module": module, "operation": outcome.get("operation"),
               "context": dict(context), "parameters": dict(parameters), "performance_score": score,
               "call_id": outcome.get("call_id"), "data": data}
        with self.store.begin(write=True) as conn:
            conn.execute(outcomes.insert().values(**row))
        for learner in list(self._learners):
            learner(row)
        return outcome_id

    def get_optimal_config(self, module: str, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The best-scoring configuration seen for ``module`` in contexts matching ``context``.

        Returns ``{"preferred_route": ..., "parameters": {...}, "confidence": float, "samples": int,
        "source": ...}`` (``preferred_route`` when the configuration names a route).
        ``source`` is ``"history"`` (mean performance of each parameter set over matching
        outcomes; confidence ``n / (n + 5)`` for the winner's ``n`` samples), ``"default"`` when
        nothing matches, or what a registered optimizer reports (the router's bandit answers for
        ``"gateway"`` with ``"bandit"``).
        """
        context = dict(context or {})
        optimizer = self._optimizers.get(module)
        if optimizer is not None:
            answer = optimizer(context)
            if answer is not None:
                return answer
        return self._optimal_from_history(module, context)

    def _optimal_from_history(self, module: str, context: Mapping[str, Any]) -> dict[str, Any]:
        import sqlalchemy as sa

        from tidyllm.mart.schema import outcomes

        with self.store.begin() as conn:
            rows = conn.execute(
                sa.select(outcomes.c.context, outcomes.c.parameters, outcomes.c.performance_score)
                .where(outcomes.c.module == module, outcomes.c.performance_score.is_not(None))).all()
        totals: dict[str, list[float]] = {}
        params_of: dict[str, dict[str, Any]] = {}
        for ctx, params, score in rows:
            ctx = ctx if isinstance(ctx, dict) else json.loads(ctx)
            if any(k in ctx and ctx[k] != v for k, v in context.items()):
                continue
            key = json.dumps(params, sort_keys=True, default=str)
            params_of[key] = params if isinstance(params, dict) else json.loads(params)
            totals.setdefault(key, []).append(float(score))
        if not totals:
            return {"parameters": {}, "confidence": 0.0, "samples": 0, "source": "default"}
        best = max(totals, key=lambda k: (sum(totals[k]) / len(totals[k]), len(totals[k])))
        n = len(totals[best])
        parameters = params_of[best]
        preferred = parameters.get("preferred_route") or parameters.get("route")
        return {**({"preferred_route": preferred} if preferred else {}),
                "parameters": parameters, "confidence": round(n / (n + 5.0), 4), "samples": n,
                "mean_score": sum(totals[best]) / n, "source": "history"}

    # --- extension points ---------------------------------------------------------------------

    def register_optimizer(self, module: str, optimizer: Optimizer | None) -> None:
        """Let ``optimizer(context)`` answer ``get_optimal_config(module, context)`` (None removes it)."""
        if optimizer is None:
            self._optimizers.pop(module, None)
        else:
            self._optimizers[module] = optimizer

    def add_learner(self, learner: Learner) -> None:
        """Call ``learner(outcome_row)`` after every ``learn_from_execution``."""
        if learner not in self._learners:
            self._learners.append(learner)

    def remove_learner(self, learner: Learner) -> None:
        """Stop calling ``learner``."""
        if learner in self._learners:
            self._learners.remove(learner)

    # --- pandas -------------------------------------------------------------------------------

    def frame(self, table: str, *, columns: list[str] | None = None, order_by: str | None = None,
              limit: int | None = None, parse_json: bool = False, **filters: Any) -> "pd.DataFrame":
        """Table ``table`` as a typed DataFrame; keyword filters select rows by column equality
        (a list/tuple/set value means "one of"). ``order_by="-started_at"`` sorts descending."""
        from tidyllm.mart.frames import read_frame

        return read_frame(self.store, table, columns=columns, order_by=order_by, limit=limit,
                          parse_json=parse_json, **filters)

    def executions(self, **filters: Any) -> "pd.DataFrame":
        """Tracked executions (``frame("executions")``)."""
        return self.frame("executions", **filters)

    def steps(self, **filters: Any) -> "pd.DataFrame":
        """Execution steps (``frame("execution_steps")``)."""
        return self.frame("execution_steps", **filters)

    def outcomes(self, **filters: Any) -> "pd.DataFrame":
        """Learned outcomes (``frame("outcomes")``)."""
        return self.frame("outcomes", **filters)

    def sql(self, query: str) -> "pd.DataFrame":
        """Run one read-only SQL query over the mart and return a DataFrame.

        Read-only is enforced by the database, not by inspecting the text: SQLite runs it with
        ``query_only`` and an authorizer that allows only reads; PostgreSQL in a read-only transaction.
        A statement that would write raises :class:`~tidyllm.errors.StorageError` and changes nothing."""
        from tidyllm.mart.frames import read_sql

        return read_sql(self.store, query)

    @staticmethod
    def tables() -> list[str]:
        """Names of the mart's tables."""
        from tidyllm.mart.schema import TABLES

        return sorted(TABLES)

    def close(self) -> None:
        """Release the connection pool."""
        self.store.dispose()


_default: dict[str, TidyMart] = {}
_default_lock = threading.Lock()


def get_tidymart(config: "str | Mapping[str, Any] | Settings | None" = None, **overrides: Any) -> TidyMart:
    """The process's mart for the configured ``database_url`` (one per URL, created on first use).

    ``config`` is a settings file path, a mapping or a :class:`~tidyllm.settings.Settings`;
    keyword arguments override any setting (e.g. ``get_tidymart(database_url="sqlite:///x.db")``).
    """
    from tidyllm.settings import load_settings

    settings = load_settings(config, **overrides)
    url = settings.database_url
    with _default_lock:
        mart = _default.get(url)
        if mart is None:
            mart = _default[url] = TidyMart(url)
        return mart

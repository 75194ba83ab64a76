"""The signal hub: every quality signal on a call is written here, once, and handed to the router.

- :meth:`SignalHub.record` stores a scored signal in ``call_signals`` (one per call and source: a repeat
  is ignored) and asks the learner (the learning router) to learn the call's signals that it has not
  learned yet. A signal may arrive before the call's routing decision is written: it waits in the table
  and is learned when the decision lands (:meth:`BanditChooser.on_finish
  <tidyllm.routing.chooser.BanditChooser.on_finish>`). Claiming a signal is one conditional ``UPDATE``,
  so each signal reaches the bandit exactly once, whichever thread or process gets there first.
- :meth:`SignalHub.record_execution` spreads a score given to a tracked execution over the calls made
  inside it (also those whose decision is written later).
- :meth:`SignalHub.observe` runs the deterministic checks of the answer's use case and, for a sample,
  the LLM judges, on a background worker with a bounded queue, off the caller's path. ``platform.close()``
  drains it; so does interpreter exit, except for judge calls not started yet (LiteLLM cannot settle a new
  call then), which are counted in ``stats["skipped_at_exit"]``.
- :meth:`SignalHub.calibration` fits each source's scores on the human labels of the same calls.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import queue
import re
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import sqlalchemy as sa

from tidyllm.errors import ConfigurationError
from tidyllm.mart.schema import call_signals, routing_decisions
from tidyllm.mart.store import utcnow
from tidyllm.signals.calibration import Calibration, fit_calibration
from tidyllm.signals.config import Judge, SignalSettings

if TYPE_CHECKING:
    from tidyllm.mart import TidyMart

__all__ = ["SignalHub", "SignalLearner", "HUMAN", "EXECUTION", "PROVIDER", "FAILURE", "REFUSAL", "REGENERATE",
           "execution_key"]

log = logging.getLogger("tidyllm.signals")

HUMAN = "human"
EXECUTION = "execution"
PROVIDER = "provider"
FAILURE = "failure"
REFUSAL = "refusal"
REGENERATE = "regenerate"

#: a judge answer's first number
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_CALIBRATION_TTL_S = 5.0


def execution_key(execution_id: str) -> str:
    """The ``call_signals.call_id`` under which an execution's score waits for calls still to be recorded."""
    return f"execution:{execution_id}"


class SignalLearner(Protocol):
    """What learns from signals (the learning router)."""

    def learn_signals(self, call_id: str) -> int:
        """Learn the unlearned signals of ``call_id`` whose decision is known; returns how many."""


class SignalHub:
    """Records signals and runs judges and checks for one platform (see the module docstring)."""

    def __init__(self, mart: "TidyMart", settings: SignalSettings, *,
                 judge_call: Callable[[Judge, list[dict[str, str]], dict[str, Any]], str] | None = None,
                 judge_routes: Callable[[Judge], set[str]] | None = None) -> None:
        self.mart = mart
        self.settings = settings
        self.learner: SignalLearner | None = None
        self.judge_call = judge_call
        self.judge_routes = judge_routes or (lambda judge: set())
        self._calibrations: dict[str, Calibration] = {}
        self._calibrated_at = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=settings.queue_size)
        self._thread: threading.Thread | None = None
        #: what the worker did: judged, judge_refused, judge_failed, checked, dropped (queue full),
        #: skipped_own_route, skipped_at_exit
        self.stats: dict[str, int] = {k: 0 for k in ("judged", "judge_refused", "judge_failed", "checked",
                                                     "dropped", "skipped_own_route", "skipped_at_exit")}
        self._closed = False
        self._exiting = False
        atexit.register(_drain_at_exit, weakref.ref(self))

    # --- recording --------------------------------------------------------------------------------

    def record(self, call_id: str, source: str, score: float, weight: float | None = None, *,
               comment: str | None = None, data: Mapping[str, Any] | None = None,
               execution_id: str | None = None) -> tuple[str, bool]:
        """Store one signal and let the router learn it; returns ``(signal id, new)``.

        ``score`` in [0, 1]; ``weight`` in observations (default: the source's configured weight). A
        second signal from the same source on the same call is ignored (``new`` is False)."""
        if not isinstance(call_id, str) or not call_id:
            raise ConfigurationError("a signal needs the call id of the call it scores (llm_calls.id)")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
            raise ConfigurationError(f"a signal's score must be a number in [0, 1], got {score!r}")
        weight = self.default_weight(source) if weight is None else float(weight)
        row = {"id": str(uuid.uuid4()), "call_id": call_id, "source": source, "score": float(score),
               "weight": weight, "recorded_at": utcnow(), "comment": comment, "execution_id": execution_id,
               "data": dict(data or {})}
        new = self._insert(row)
        if not new:
            with self.mart.store.begin() as conn:
                existing = conn.execute(sa.select(call_signals.c.id).where(
                    call_signals.c.call_id == call_id, call_signals.c.source == source)).scalar_one()
            return str(existing), False
        if self.learner is not None and not call_id.startswith("execution:"):
            self.learner.learn_signals(call_id)
        return row["id"], True

    def _insert(self, row: dict[str, Any]) -> bool:
        """Insert unless the (call, source) pair exists; True if inserted."""
        from sqlalchemy.dialects import postgresql, sqlite

        dialect = self.mart.store.dialect
        insert = (sqlite if dialect == "sqlite" else postgresql).insert(call_signals).values(**row)
        with self.mart.store.begin(write=True) as conn:
            result = conn.execute(insert.on_conflict_do_nothing(index_elements=["call_id", "source"]))
        return bool(result.rowcount)

    def default_weight(self, source: str) -> float:
        """The configured weight of ``source``."""
        s = self.settings
        if source == HUMAN:
            return s.human_weight
        if source == EXECUTION:
            return s.execution_weight
        if source == REGENERATE:
            return s.regenerate_weight
        if source == FAILURE:
            return s.failure_weight
        if source.startswith("judge:"):
            for judge in s.judges:
                if judge.source == source:
                    return judge.weight
            return 0.5
        if source.startswith("check:"):
            return s.check_weight
        return 1.0

    def record_execution(self, execution_id: str, score: float, *, source: str = EXECUTION,
                         comment: str | None = None) -> list[str]:
        """Give ``score`` to every call made inside tracked execution ``execution_id``; returns the call ids
        rewarded now (calls whose decision is written later get it then, see :meth:`pending_execution`)."""
        self.record(execution_key(execution_id), source, score, comment=comment, execution_id=execution_id)
        with self.mart.store.begin() as conn:
            calls = conn.execute(sa.select(routing_decisions.c.call_id).where(
                routing_decisions.c.execution_id == execution_id)).scalars().all()
        for call_id in calls:
            self.record(call_id, source, score, comment=comment, execution_id=execution_id)
        return [c for c in calls if c]

    def pending_execution(self, call_id: str, execution_id: str) -> None:
        """A call of ``execution_id`` was just recorded: give it the execution's score, if one came first."""
        with self.mart.store.begin() as conn:
            rows = conn.execute(sa.select(call_signals.c.source, call_signals.c.score, call_signals.c.comment).where(
                call_signals.c.call_id == execution_key(execution_id))).all()
        for source, score, comment in rows:
            self.record(call_id, source, float(score), comment=comment, execution_id=execution_id)

    def on_outcome(self, outcome: Mapping[str, Any]) -> None:
        """Mart learner (``learn_from_execution``): feedback on a call (``call_id``, module ``gateway``) or a
        score given to a tracked execution (``execution_id``), stored as a signal."""
        score = outcome.get("performance_score")
        if score is None:
            return
        data = outcome.get("data") or {}
        source = str(data.get("signal_source") or "")
        comment = data.get("comment") if isinstance(data.get("comment"), str) else None
        call_id = outcome.get("call_id")
        execution_id = data.get("execution_id")
        if call_id and outcome.get("module") == "gateway":
            self.record(str(call_id), source or HUMAN, float(score), comment=comment)
        elif execution_id:
            self.record_execution(str(execution_id), float(score), source=source or EXECUTION, comment=comment)

    # --- calibration --------------------------------------------------------------------------------

    def calibration(self, source: str) -> Calibration:
        """The calibration of ``source`` against human labels (refreshed every few seconds)."""
        if source in (HUMAN, EXECUTION, PROVIDER, FAILURE, REFUSAL, REGENERATE) or source.startswith("check:"):
            return Calibration(source, 0)  # exact or ground truth: used as given
        if time.monotonic() - self._calibrated_at > _CALIBRATION_TTL_S:
            self.refresh_calibrations()
        return self._calibrations.get(source) or Calibration(source, 0)

    def refresh_calibrations(self) -> dict[str, Calibration]:
        """Refit every judged source on the calls humans labelled too."""
        human = call_signals.alias("human")
        other = call_signals.alias("other")
        query = (sa.select(other.c.source, other.c.score, human.c.score)
                 .join(human, sa.and_(human.c.call_id == other.c.call_id, human.c.source == HUMAN))
                 .where(other.c.source.like("judge:%")))
        with self.mart.store.begin() as conn:
            rows = conn.execute(query).all()
        by_source: dict[str, tuple[list[float], list[float]]] = {}
        for source, score, label in rows:
            xs, ys = by_source.setdefault(source, ([], []))
            xs.append(float(score))
            ys.append(float(label))
        fitted = {s: fit_calibration(s, xs, ys, self.settings.calibration_min_pairs) for s, (xs, ys) in by_source.items()}
        with self._lock:
            self._calibrations = fitted
            self._calibrated_at = time.monotonic()
        return fitted

    def agreement(self) -> list[dict[str, Any]]:
        """Judge–human agreement per judged source: pairs, correlation, bias, mean absolute difference,
        and the calibration line; also the judges with no human label yet."""
        fitted = self.refresh_calibrations()
        out = []
        for judge in self.settings.judges:
            fitted.setdefault(judge.source, Calibration(judge.source, 0))
        for source, cal in sorted(fitted.items()):
            out.append({"source": source, "pairs": cal.pairs, "correlation": cal.correlation, "bias": cal.bias,
                        "mean_abs_diff": cal.mean_abs_diff, "calibrated": cal.calibrated,
                        "intercept": cal.intercept if cal.calibrated else None,
                        "slope": cal.slope if cal.calibrated else None})
        return out

    # --- answers: checks and judges, off the caller's path -------------------------------------------

    def wants(self, department: str | None, use_case: str | None) -> bool:
        """Whether an answer in this context gets any check or judge (cheap; called on every answer)."""
        if (department, use_case) in self.settings.judge_use_cases():
            return False  # the judges' own calls are neither judged nor checked
        return bool(self.settings.checks.get(use_case or "")) or any(j.rate(department) > 0 for j in
                                                                     self.settings.judges)

    def observe(self, call_id: str, route: str | None, context: Mapping[str, Any], messages: Any, answer: str) -> None:
        """An answered call: queue its checks and (sampled) judges; never blocks, never raises."""
        department, use_case = context.get("department"), context.get("use_case")
        if not self.wants(department, use_case):
            return
        judges = [j for j in self.settings.judges if _sampled(call_id, j) < j.rate(department)]
        checks = self.settings.checks.get(use_case or "", ())
        if not judges and not checks:
            return
        self._submit(lambda: self._evaluate(call_id, route, dict(context), messages, answer, judges, checks))

    def _submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.stats["dropped"] += 1
                dropped = self.stats["dropped"]
            if dropped in (1, 10, 100) or dropped % 1000 == 0:
                log.warning("the signal queue is full (%d jobs): %d answers went unscored; raise "
                            "signals.queue_size or lower the judges' sample", self._queue.maxsize, dropped)
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="tidyllm-signals", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except Exception:  # noqa: BLE001 - a background worker: log and go on with the next answer
                log.exception("a signal job failed")
            finally:
                self._queue.task_done()

    def _evaluate(self, call_id: str, route: str | None, context: dict[str, Any], messages: Any, answer: str,
                  judges: Sequence[Judge], checks: Sequence[Any]) -> None:
        from tidyllm.signals.checks import run_check

        request = {"messages": messages, **context}
        for check in checks:
            try:
                score, reason = run_check(check, answer, request)
            except Exception as exc:  # noqa: BLE001 - a user's callable: its failure is not the answer's
                log.warning("check %s of use case %s failed on call %s: %s", check.name, check.use_case, call_id, exc)
                continue
            # a pass is recorded but not learned (weight 0): answering in the right format says little about
            # how good the answer is; a failure is evidence of a poor answer
            self.record(call_id, check.source, score, check.weight * (1.0 - score),
                        comment=None if score >= 1 else reason, data={"check": check.kind, "reason": reason})
            with self._lock:
                self.stats["checked"] += 1
        for judge in judges:
            self._judge(judge, call_id, route, context, messages, answer)

    def _judge(self, judge: Judge, call_id: str, route: str | None, context: Mapping[str, Any], messages: Any,
               answer: str) -> None:
        from tidyllm.errors import GovernanceError

        if route is not None and route in self.judge_routes(judge):
            with self._lock:  # a judge never scores answers of its own route (self-preference)
                self.stats["skipped_own_route"] += 1
            return
        if self.judge_call is None:
            return
        if self._exiting:
            # at interpreter exit LiteLLM can no longer schedule the callbacks that settle a new call: a judge
            # call now could leave its reservation open until the lease expires. platform.close() drains fully.
            with self._lock:
                self.stats["skipped_at_exit"] += 1
            return
        prompt = judge_messages(judge, context.get("use_case"), messages, answer)
        metadata = {"user_id": judge.user_id, "department": judge.department, "use_case": judge.use_case,
                    "audit_reason": f"judge {judge.name} scores call {call_id}"}
        if context.get("data_sensitivity"):
            # the judge reads the request and the answer: the same data rules apply to its route
            metadata["data_sensitivity"] = context["data_sensitivity"]
        try:
            text = self.judge_call(judge, prompt, metadata)
        except GovernanceError as exc:
            # refused by the judge's own budget or rules: audited by the governor; the judged call is untouched
            with self._lock:
                self.stats["judge_refused"] += 1
            log.info("judge %s was refused for call %s: %s", judge.name, call_id, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the judge route failed: no score, the answer stands
            with self._lock:
                self.stats["judge_failed"] += 1
            log.warning("judge %s failed on call %s: %s", judge.name, call_id, exc)
            return
        score = parse_score(text, judge.scale)
        if score is None:
            with self._lock:
                self.stats["judge_failed"] += 1
            log.warning("judge %s answered no score for call %s: %r", judge.name, call_id, text[:200])
            return
        self.record(call_id, judge.source, score, judge.weight, data={"judge_model": judge.model, "raw": text[:200]})
        with self._lock:
            self.stats["judged"] += 1
        self._log_feedback(judge, call_id, score)

    def _log_feedback(self, judge: Judge, call_id: str, score: float) -> None:
        """Attach the score to the call's MLflow trace when the gateway traced it (tracking server)."""
        from tidyllm.mart.schema import audit_log

        with self.mart.store.begin() as conn:
            trace_id = conn.execute(sa.select(audit_log.c.trace_id).where(
                audit_log.c.call_id == call_id, audit_log.c.trace_id.is_not(None))).scalar()
        if not trace_id:
            return
        try:
            import mlflow
            from mlflow.entities import AssessmentSource

            mlflow.log_feedback(trace_id=trace_id, name=judge.name, value=score,
                                source=AssessmentSource(source_type="LLM_JUDGE", source_id=judge.model))
        except Exception as exc:  # noqa: BLE001 - the score is in the mart; the trace annotation is extra
            log.warning("could not log judge %s's score on trace %s: %s", judge.name, trace_id, exc)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued job ran (at most ``timeout`` s); True when the queue is empty."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue and stop the worker (idempotent)."""
        if self._closed:
            return
        self.drain(timeout)
        self._closed = True
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                return
            thread.join(timeout)


def judge_messages(judge: Judge, use_case: str | None, messages: Any, answer: str) -> list[dict[str, str]]:
    """The judge's prompt: its instructions and scale, the request and the answer."""
    lo, hi = judge.scale
    request = "\n".join(f"{m.get('role', 'user')}: {m.get('content')}" for m in (messages or [])
                        if isinstance(m, Mapping) and isinstance(m.get("content"), str))
    return [{"role": "system", "content": f"{judge.instructions_for(use_case)}\nAnswer with one number from "
                                          f"{lo:g} (useless) to {hi:g} (excellent)."},
            {"role": "user", "content": f"Use case: {use_case or 'general'}\n\n[REQUEST]\n{request}\n\n"
                                        f"[ANSWER]\n{answer}\n\n[SCORE]"}]


def parse_score(text: str, scale: tuple[float, float]) -> float | None:
    """The judge's number, mapped from its scale to [0, 1] (clamped); None when it gave none."""
    match = _NUMBER.search(text or "")
    if match is None:
        return None
    lo, hi = scale
    return min(1.0, max(0.0, (float(match.group()) - lo) / (hi - lo)))


def _sampled(call_id: str, judge: Judge) -> float:
    """A uniform number in [0, 1) fixed by the call and the judge: the same call is sampled the same way
    in every process, and each judge samples independently."""
    digest = hashlib.sha256(f"{judge.name}\0{call_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _drain_at_exit(ref: "weakref.ref[SignalHub]") -> None:
    hub = ref()
    if hub is not None:
        hub._exiting = True  # queued checks still run; judges that have not started are skipped (counted)
        hub.close(timeout=10.0)

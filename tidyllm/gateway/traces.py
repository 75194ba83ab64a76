"""Linking a tidyllm call to the trace the tracking-server gateway recorded for it.

With ``usage_tracking`` on (MLflow's default), the tracking server's AI Gateway writes one trace
per request into the experiment ``gateway/<endpoint>``. MLflow 3.17 returns no trace id to the
caller (its only extra response headers are ``X-MLflow-Gateway-Duration-Ms`` and
``X-MLflow-Gateway-Overhead-Duration-Ms``), and a ``traceparent`` header does not make the gateway
reuse the caller's trace id: it starts its own trace and only mirrors a summary span into the
caller's trace. What the gateway does copy into its trace is the ``X-MLflow-Gateway-Caller``
request header, as the trace metadata ``mlflow.gateway.caller``. So tidyllm sends
``X-MLflow-Gateway-Caller: tidyllm/<call id>`` with each governed call to a tracking-server
endpoint and looks the trace up by that value once the call is over.

The server exports traces in batches, by default every 5 s (its
``MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS``), so a trace appears seconds after its response. Waiting for it on
LiteLLM's logging threads would starve them; :class:`TraceLookup` therefore runs one background
thread that polls each endpoint's experiment for all calls it waits for at once, and hands each
call its :class:`TraceRef` (or None after ``wait_seconds``). The thread is not a daemon and stops
when nothing is left to wait for, so a normal exit finishes the pending calls first. The UI shows a
trace at ``{uri}/#/experiments/{experiment_id}/traces/{trace_id}``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from tidyllm.errors import GatewayError
from tidyllm.gateway.client import Auth, RestClient

__all__ = ["CALLER_HEADER", "TraceLookup", "TraceRef", "trace_url"]

log = logging.getLogger("tidyllm.gateway")

#: request header MLflow's gateway records as trace metadata ``mlflow.gateway.caller``
CALLER_HEADER = "X-MLflow-Gateway-Caller"
CALLER_METADATA = "mlflow.gateway.caller"
_PREFIX = "tidyllm/"


@dataclass(frozen=True)
class TraceRef:
    """Where a gateway trace lives."""

    trace_id: str
    experiment_id: str


def trace_url(uri: str, experiment_id: str, trace_id: str) -> str:
    """The MLflow UI page of one trace (MLflow 3's route ``/experiments/:experimentId/traces/:traceId``)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/traces/{trace_id}"


class TraceLookup:
    """Find the gateway traces of tidyllm calls on a tracking server (credentials optional)."""

    def __init__(self, uri: str, auth: Auth | None = None, *, wait_seconds: float = 20.0,
                 poll_seconds: float = 0.25) -> None:
        self.uri = uri.rstrip("/")
        self._auth = auth
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self._experiments: dict[str, str] = {}
        #: call id -> (route, deadline, since epoch ms, callback)
        self._pending: dict[str, tuple[str, float, int, Callable[[TraceRef | None], None]]] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def __repr__(self) -> str:  # never show the credentials
        return f"<TraceLookup {self.uri}>"

    @staticmethod
    def headers(call_id: str) -> dict[str, str]:
        """The request header that tags the gateway's trace with ``call_id``."""
        return {CALLER_HEADER: f"{_PREFIX}{call_id}"}

    def submit(self, call_id: str, route: str, done: Callable[[TraceRef | None], None]) -> bool:
        """Call ``done(trace or None)`` on the lookup thread once the trace of ``call_id`` is found or the
        wait is over. False (and ``done`` is never called) when ``call_id`` was submitted before."""
        with self._lock:
            if call_id in self._seen:
                return False
            self._seen.add(call_id)
            self._pending[call_id] = (route, time.monotonic() + self.wait_seconds,
                                      int(time.time() * 1000) - 60_000, done)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="tidyllm-trace-lookup")
                self._worker.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (True) or ``timeout`` seconds passed (False)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return not self._pending

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                waiting = dict(self._pending)
            by_route: dict[str, list[str]] = {}
            for call_id, (route, *_rest) in waiting.items():
                by_route.setdefault(route, []).append(call_id)
            found: dict[str, TraceRef | None] = {}
            for route, ids in by_route.items():
                found.update(self._search(route, ids, min(waiting[i][2] for i in ids)))
            now = time.monotonic()
            for call_id, (_, deadline, _since, done) in waiting.items():
                if call_id not in found and now < deadline:
                    continue
                with self._lock:
                    self._pending.pop(call_id, None)
                try:
                    done(found.get(call_id))
                except Exception:  # noqa: BLE001 - one call's record must not stop the others'
                    log.exception("recording call %s after its trace lookup failed", call_id)
            time.sleep(self.poll_seconds)

    def _search(self, route: str, ids: list[str], since_ms: int) -> dict[str, TraceRef | None]:
        """Traces of ``ids`` on ``route`` found so far; every id maps to None when the route records none."""
        try:
            with RestClient(self.uri, self._auth, timeout=10.0) as rest:
                exp_id = self._experiment(rest, route)
                if exp_id is None:
                    return dict.fromkeys(ids)
                query = {"locations": [{"type": "MLFLOW_EXPERIMENT",
                                        "mlflow_experiment": {"experiment_id": exp_id}}],
                         "filter": f"metadata.`{CALLER_METADATA}` LIKE '{_PREFIX}%' "
                                   f"AND trace.timestamp_ms >= {since_ms}",
                         "max_results": 500}
                traces = rest.request("POST", "/api/3.0/mlflow/traces/search", json=query).get("traces") or []
        except GatewayError as exc:
            log.warning("could not look up MLflow traces on %s: %s", route, exc)
            return {}
        wanted = {f"{_PREFIX}{i}": i for i in ids}
        out: dict[str, TraceRef | None] = {}
        for trace in traces:
            caller = (trace.get("trace_metadata") or {}).get(CALLER_METADATA)
            if caller in wanted:
                out[wanted[caller]] = TraceRef(str(trace["trace_id"]), exp_id)
        return out

    def _experiment(self, rest: RestClient, route: str) -> str | None:
        if route in self._experiments:
            return self._experiments[route]
        try:
            body = rest.request("GET", "/api/2.0/mlflow/experiments/get-by-name",
                                params={"experiment_name": f"gateway/{route}"})
            exp_id = (body.get("experiment") or {}).get("experiment_id")
        except GatewayError:
            return None  # no such experiment (the endpoint does not track usage), or not reachable now
        if exp_id:
            self._experiments[route] = str(exp_id)
        return str(exp_id) if exp_id else None

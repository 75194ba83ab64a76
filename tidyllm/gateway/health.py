"""Per-endpoint circuit breakers, on top of LiteLLM's own cooldowns.

A breaker opens after ``failure_threshold`` consecutive failures, or when the error rate over
the last ``window`` calls (at least ``min_calls``) reaches ``error_rate``. While open the route
is not offered to the router. After ``cooldown_s`` it lets one probe through (half-open); a
successful probe closes it, a failed one opens it again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CircuitBreaker", "RouteHealth"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class CircuitBreaker:
    """State machine of one route. Thread-safe through its owner's lock."""

    failure_threshold: int = 3
    error_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    cooldown_s: float = 10.0
    state: str = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    calls: int = 0
    failures: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=20))
    latencies: deque = field(default_factory=lambda: deque(maxlen=50))

    def allow(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self.opened_at >= self.cooldown_s:
            self.state, self.probing = HALF_OPEN, False
        if self.state == HALF_OPEN and not self.probing:
            return True
        return False

    def on_pick(self) -> None:
        if self.state == HALF_OPEN:
            self.probing = True

    def record(self, ok: bool, latency_ms: float | None, now: float) -> None:
        self.calls += 1
        self.recent.append(ok)
        if latency_ms is not None and ok:
            self.latencies.append(latency_ms)
        if ok:
            self.consecutive_failures = 0
            if self.state != CLOSED:
                self.state, self.probing = CLOSED, False
                self.recent.clear()
            return
        self.failures += 1
        self.consecutive_failures += 1
        rate_tripped = len(self.recent) >= self.min_calls and \
            self.recent.count(False) / len(self.recent) >= self.error_rate
        if self.state == HALF_OPEN or self.consecutive_failures >= self.failure_threshold or rate_tripped:
            self.state, self.opened_at, self.probing = OPEN, now, False


class RouteHealth:
    """The breakers of every route the platform routes to."""

    def __init__(self, *, failure_threshold: int = 3, error_rate: float = 0.5, min_calls: int = 10,
                 cooldown_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._params = dict(failure_threshold=failure_threshold, error_rate=error_rate, min_calls=min_calls,
                            cooldown_s=cooldown_s)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def _get(self, route: str) -> CircuitBreaker:
        breaker = self._breakers.get(route)
        if breaker is None:
            breaker = self._breakers[route] = CircuitBreaker(**self._params)
        return breaker

    def allow(self, route: str) -> bool:
        """Whether ``route`` may be offered now (an open circuit whose cool-down passed allows one probe)."""
        with self._lock:
            return self._get(route).allow(self._clock())

    def picked(self, route: str) -> None:
        """Note that ``route`` was chosen (a half-open circuit's single probe is now in flight)."""
        with self._lock:
            self._get(route).on_pick()

    def record(self, route: str, ok: bool, latency_ms: float | None = None) -> None:
        """Feed one call's outcome."""
        with self._lock:
            self._get(route).record(ok, latency_ms, self._clock())

    def state(self, route: str) -> str:
        """closed, open or half_open."""
        with self._lock:
            b = self._get(route)
            b.allow(self._clock())
            return b.state

    def status(self) -> "pd.DataFrame":
        """route, state, calls, failures, error_rate (recent), p50 latency_ms (recent)."""
        import pandas as pd

        rows = []
        with self._lock:
            now = self._clock()
            for route, b in sorted(self._breakers.items()):
                b.allow(now)
                recent = list(b.recent)
                lat = sorted(b.latencies)
                rows.append({"route": route, "state": b.state, "calls": b.calls, "failures": b.failures,
                             "error_rate": (recent.count(False) / len(recent)) if recent else 0.0,
                             "latency_ms_p50": lat[len(lat) // 2] if lat else float("nan")})
        return pd.DataFrame(rows, columns=["route", "state", "calls", "failures", "error_rate", "latency_ms_p50"])

"""Simulated routing environments with known expected rewards, for tests and ``bench/routing_bench.py``.

These are simulations, not measurements of real providers: five routes with different quality per
use case, prices and latencies; three departments that weigh quality, cost and latency differently
(so the best route depends on who asks and for what); prompt sizes that change cost, latency and the
quality of small models; and a data-sensitivity rule that keeps confidential prompts off one route.

Every stream pre-draws all randomness (contexts, and for every step and route the quality, latency,
output-token and failure draws), so several policies can be run on *the very same stream* with
common random numbers, and :meth:`Stream.expected` gives the exact expected reward of any route at
any step (the noise is built so the expectation has a closed form), from which the per-context
oracle follows.

Three scenarios: :func:`stationary`, :func:`drift` (a mid-tier route improves, the frontier route's
price falls, the small route slows down, all gradually), and :func:`outage` (the mid-tier route fails
every call for a stretch, then recovers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tidyllm.routing.bandit import reward

__all__ = ["Department", "Environment", "Outcome", "RouteProfile", "Stream", "UseCase",
           "drift", "outage", "stationary", "ENVIRONMENTS"]

# Discrete noise with closed-form expectations: latency multiplier and output-token multiplier.
_LATENCY_MULT = np.array([0.7, 1.0, 1.6])
_LATENCY_P = np.array([0.3, 0.5, 0.2])
_TOKENS_MULT = np.array([0.5, 1.0, 1.5])
_TOKENS_P = np.array([1 / 3, 1 / 3, 1 / 3])
_QUALITY_SPREAD = 0.15  # quality is uniform on q ± min(0.15, q, 1 − q): mean q, sd ≈ 0.09


@dataclass(frozen=True)
class RouteProfile:
    """A simulated route (endpoint): its quality per use case, prices, latency and failure rate."""

    name: str
    quality: Mapping[str, float]
    price_in: float  # USD per 1k prompt tokens
    price_out: float  # USD per 1k output tokens
    latency_s: float  # latency of a 1k-token prompt
    failure_rate: float = 0.01
    long_prompt_penalty: float = 0.0  # quality lost per doubling of the prompt above 1k tokens
    external: bool = True  # hosted outside the company (not for confidential data)


@dataclass(frozen=True)
class Department:
    """A department: what it weighs (reward weights) and the sensitivity class of its data."""

    name: str
    weights: Mapping[str, float]
    data_sensitivity: str
    share: float


@dataclass(frozen=True)
class UseCase:
    """A use case: typical prompt length (log-uniform range) and output length."""

    name: str
    prompt_tokens: tuple[int, int]
    output_tokens: int


@dataclass(frozen=True)
class Outcome:
    """What one call on one route returned at one step of a stream."""

    route: str
    quality: float
    cost_usd: float
    latency_s: float
    failed: bool
    reward: float


# A schedule maps (route profile, progress τ in [0, 1]) to the profile in force at that moment.
Schedule = Callable[[RouteProfile, float], RouteProfile]


@dataclass(frozen=True)
class Environment:
    """Routes, departments and use cases, and how route profiles change over a stream."""

    name: str
    routes: tuple[RouteProfile, ...]
    departments: tuple[Department, ...]
    use_cases: tuple[UseCase, ...]
    schedule: Schedule | None = None
    cost_scale: float = 0.004
    latency_scale: float = 2.0
    description: str = ""

    @property
    def route_names(self) -> list[str]:
        """Names of all routes."""
        return [r.name for r in self.routes]

    def profiles_at(self, progress: float) -> tuple[RouteProfile, ...]:
        """Route profiles in force at ``progress`` (0 = start of the stream, 1 = end)."""
        if self.schedule is None:
            return self.routes
        return tuple(self.schedule(r, progress) for r in self.routes)

    def candidates(self, context: Mapping[str, Any]) -> list[str]:
        """Routes authorised for ``context``: confidential data stays on internal routes."""
        if context.get("data_sensitivity") == "confidential":
            return [r.name for r in self.routes if not r.external]
        return self.route_names

    def stream(self, n: int, seed: int = 0) -> Stream:
        """Draw a stream of ``n`` decisions (contexts and every route's outcome noise) from ``seed``."""
        return Stream(self, n, seed)


def _mean_quality(profile: RouteProfile, use_case: str, prompt_tokens: float) -> float:
    doublings = max(0.0, math.log2(max(prompt_tokens, 1.0) / 1000.0))
    return min(0.99, max(0.01, profile.quality[use_case] - profile.long_prompt_penalty * doublings))


@dataclass
class Stream:
    """One pre-drawn sequence of decisions; every policy run on it sees the same contexts and noise."""

    env: Environment
    n: int
    seed: int
    contexts: list[dict[str, Any]] = field(init=False)
    _use_case: list[UseCase] = field(init=False, repr=False)
    _department: list[Department] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Salted so a stream never shares its random numbers with a policy seeded with the same int:
        # a bandit with random_state=s would otherwise draw the very uniforms that picked the contexts.
        rng = np.random.default_rng([self.seed, 0x5EED])
        env, n, k = self.env, self.n, len(self.env.routes)
        shares = np.array([d.share for d in env.departments])
        dept_idx = rng.choice(len(env.departments), size=n, p=shares / shares.sum())
        uc_idx = rng.integers(0, len(env.use_cases), size=n)
        self.contexts, self._use_case, self._department = [], [], []
        for t in range(n):
            dept, uc = env.departments[dept_idx[t]], env.use_cases[uc_idx[t]]
            low, high = uc.prompt_tokens
            tokens = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
            self.contexts.append({"department": dept.name, "use_case": uc.name,
                                  "data_sensitivity": dept.data_sensitivity, "model_group": "chat",
                                  "prompt_tokens": tokens})
            self._use_case.append(uc)
            self._department.append(dept)
        # per (step, route) noise, drawn whatever the policies do: common random numbers
        self._u_quality = rng.random((n, k))
        self._u_fail = rng.random((n, k))
        self._lat_idx = rng.choice(len(_LATENCY_MULT), size=(n, k), p=_LATENCY_P)
        self._tok_idx = rng.choice(len(_TOKENS_MULT), size=(n, k), p=_TOKENS_P)
        self._index = {name: j for j, name in enumerate(env.route_names)}
        self._profiles_cache: dict[int, tuple[RouteProfile, ...]] = {}
        self._expected_cache: dict[tuple[int, str], float] = {}

    def __len__(self) -> int:
        return self.n

    def candidates(self, t: int) -> list[str]:
        """Authorised routes at step ``t``."""
        return self.env.candidates(self.contexts[t])

    def _profile(self, t: int, route: str) -> RouteProfile:
        # Schedules change slowly: evaluate them on a grid of 1,000 points per stream.
        bucket = int(1000 * t / max(self.n, 1))
        profiles = self._profiles_cache.get(bucket)
        if profiles is None:
            profiles = self._profiles_cache[bucket] = self.env.profiles_at(bucket / 1000)
        return profiles[self._index[route]]

    def _parts(self, t: int, route: str, lat_mult: float, tok_mult: float) -> tuple[float, float, float]:
        profile, context, uc = self._profile(t, route), self.contexts[t], self._use_case[t]
        tokens = context["prompt_tokens"]
        out_tokens = uc.output_tokens * tok_mult
        cost = (tokens * profile.price_in + out_tokens * profile.price_out) / 1000.0
        latency = profile.latency_s * (0.5 + 0.5 * tokens / 1000.0) ** 0.5 * lat_mult
        return _mean_quality(profile, uc.name, tokens), cost, latency

    def outcome(self, t: int, route: str) -> Outcome:
        """What calling ``route`` at step ``t`` returns (the same for every policy)."""
        j = self._index[route]
        profile = self._profile(t, route)
        q_mean, cost, latency = self._parts(t, route, _LATENCY_MULT[self._lat_idx[t, j]],
                                            _TOKENS_MULT[self._tok_idx[t, j]])
        failed = bool(self._u_fail[t, j] < profile.failure_rate)
        half = min(_QUALITY_SPREAD, q_mean, 1.0 - q_mean)
        quality = 0.0 if failed else float(q_mean + half * (2.0 * self._u_quality[t, j] - 1.0))
        weights = self._department[t].weights
        value = reward(quality, cost, latency, failed, weights=weights, cost_scale=self.env.cost_scale,
                       latency_scale=self.env.latency_scale)
        return Outcome(route, quality, cost, latency, failed, value)

    def expected(self, t: int, route: str) -> float:
        """Exact expected reward of ``route`` at step ``t`` (reward is linear in quality)."""
        cached = self._expected_cache.get((t, route))
        if cached is not None:
            return cached
        profile = self._profile(t, route)
        weights = self._department[t].weights
        total = 0.0
        for lm, lp in zip(_LATENCY_MULT, _LATENCY_P):
            for tm, tp in zip(_TOKENS_MULT, _TOKENS_P):
                q_mean, cost, latency = self._parts(t, route, lm, tm)
                total += lp * tp * reward(q_mean, cost, latency, weights=weights, cost_scale=self.env.cost_scale,
                                          latency_scale=self.env.latency_scale)
        value = self._expected_cache[(t, route)] = (1.0 - profile.failure_rate) * total
        return value

    def expected_cost(self, t: int, route: str) -> float:
        """Expected cost in USD of calling ``route`` at step ``t``."""
        return sum(tp * self._parts(t, route, 1.0, tm)[1] for tm, tp in zip(_TOKENS_MULT, _TOKENS_P))

    def oracle(self, t: int) -> str:
        """The authorised route with the highest expected reward at step ``t``."""
        return max(self.candidates(t), key=lambda r: self.expected(t, r))


# ---------------------------------------------------------------------------- the scenarios

# Confidential prompts may use "frontier" (a private tenant deployment), "coder" (self-hosted) and
# "onprem"; "balanced" and "small" are external providers.
_ROUTES = (
    RouteProfile("frontier", {"qa": 0.94, "summarise": 0.93, "code": 0.95}, price_in=0.005, price_out=0.015,
                 latency_s=3.0, failure_rate=0.01, external=False),
    RouteProfile("balanced", {"qa": 0.86, "summarise": 0.88, "code": 0.78}, price_in=0.0006, price_out=0.0018,
                 latency_s=1.0, failure_rate=0.01),
    RouteProfile("small", {"qa": 0.70, "summarise": 0.76, "code": 0.45}, price_in=0.0001, price_out=0.0004,
                 latency_s=0.5, failure_rate=0.01, long_prompt_penalty=0.08),
    RouteProfile("coder", {"qa": 0.66, "summarise": 0.62, "code": 0.93}, price_in=0.001, price_out=0.003,
                 latency_s=1.1, failure_rate=0.01, external=False),
    RouteProfile("onprem", {"qa": 0.76, "summarise": 0.80, "code": 0.62}, price_in=0.0, price_out=0.0,
                 latency_s=3.5, failure_rate=0.02, long_prompt_penalty=0.03, external=False),
)

_DEPARTMENTS = (
    Department("risk", {"quality": 0.85, "cost": 0.05, "latency": 0.1}, "confidential", share=0.3),
    Department("marketing", {"quality": 0.35, "cost": 0.5, "latency": 0.15}, "public", share=0.3),
    Department("engineering", {"quality": 0.5, "cost": 0.1, "latency": 0.4}, "internal", share=0.4),
)
_USE_CASES = (
    UseCase("qa", (150, 900), output_tokens=150),
    UseCase("summarise", (1500, 8000), output_tokens=300),
    UseCase("code", (400, 2500), output_tokens=450),
)


def stationary() -> Environment:
    """Nothing changes: five routes, three departments × three use cases."""
    return Environment("stationary", _ROUTES, _DEPARTMENTS, _USE_CASES,
                       description="fixed qualities, prices and latencies")


def _drift_schedule(profile: RouteProfile, progress: float) -> RouteProfile:
    if profile.name == "balanced":  # a new model version rolls out gradually
        return replace(profile, quality={k: v + 0.08 * progress for k, v in profile.quality.items()})
    if profile.name == "frontier":  # a price cut phased in
        return replace(profile, price_in=profile.price_in * (1 - 0.7 * progress),
                       price_out=profile.price_out * (1 - 0.7 * progress))
    if profile.name == "small":  # the provider gets congested
        return replace(profile, latency_s=profile.latency_s * (1 + 3.0 * progress))
    return profile


def drift() -> Environment:
    """Gradual drift: "balanced" improves, "frontier" gets 70 % cheaper, "small" gets 4× slower."""
    return Environment("drift", _ROUTES, _DEPARTMENTS, _USE_CASES, schedule=_drift_schedule,
                       description="balanced +0.08 quality, frontier -70% price, small 4x latency, linearly")


def _outage_window(start: float, end: float, routes: Sequence[str]) -> Schedule:
    def schedule(profile: RouteProfile, progress: float) -> RouteProfile:
        if profile.name in routes and start <= progress < end:
            return replace(profile, failure_rate=1.0)
        return profile
    return schedule


def outage(start: float = 0.35, end: float = 0.55, routes: Sequence[str] = ("balanced", "coder")) -> Environment:
    """``routes`` fail every call from ``start`` to ``end`` (fractions of the stream), then recover."""
    return Environment("outage", _ROUTES, _DEPARTMENTS, _USE_CASES, schedule=_outage_window(start, end, routes),
                       description=f"{', '.join(routes)} fail every call from {start:.0%} to {end:.0%} "
                                   "of the stream, then recover")


#: the benchmark's scenarios by name
ENVIRONMENTS: dict[str, Callable[[], Environment]] = {"stationary": stationary, "drift": drift, "outage": outage}

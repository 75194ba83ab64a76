"""``RouteBandit``: a contextual bandit that learns which route (endpoint) to prefer per context.

How it decides (see ``docs/routing.md`` for the reasoning and the references):

1. **Oracle.** One ridge regression per route predicts the reward in [0, 1] from the context features
   (:mod:`tidyllm.routing.features`), shrunk towards ``prior_reward``. Its statistics are discounted
   by ``discount`` per observed reward (all routes share this clock), so old evidence fades and the
   model follows drift, price changes and outages (discounted ridge as in D-LinUCB, Russac et al. 2019).
   Because the discount is applied lazily in the eigenbasis of each route's Gram matrix, predictions for
   a route that has not been updated for a while are still exact.
2. **Optimism.** Each prediction gets ``optimism × sqrt(xᵀA⁻¹x)`` added, so a never-seen route, or one
   whose evidence has faded, scores high and is tried (RegCB-optimistic, Foster et al. 2018).
3. **Inverse-gap weighting** (SquareCB, Foster & Rakhlin 2020): route ``a`` gets probability
   ``1 / (K + γ·(best − score_a))`` and the best route the rest, with ``γ = gamma_scale·√n_eff``
   (``n_eff`` = discounted number of observations). This is an explicit distribution, so the logged
   propensity is exact.
4. **Floor.** The distribution is mixed with uniform: every candidate keeps ``≥ floor/K``.
5. **Change detection.** A two-sided CUSUM per route on ``reward − prediction`` notices an outage or a
   recovery within a few rewards and re-learns that route from the observations since the change.
6. **Department cap.** If a department has used its share of exploring decisions, the distribution is
   mixed towards the greedy route, never below the floor. The logged propensity is the probability under
   this final distribution, the one actually sampled from.
"""

from __future__ import annotations

import base64
import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from tidyllm.errors import ConfigurationError, RoutingError
from tidyllm.routing.features import ContextFeaturizer

__all__ = ["Choice", "DEFAULT_REWARD_WEIGHTS", "RouteBandit", "reward"]

_STATE_FORMAT = "tidyllm.RouteBandit/1"

#: weights of the reward's parts when a department has none of its own
DEFAULT_REWARD_WEIGHTS: Mapping[str, float] = {"quality": 0.6, "cost": 0.2, "latency": 0.2}


def reward(quality: float | None, cost_usd: float = 0.0, latency_s: float = 0.0, failed: bool = False, *,
           weights: Mapping[str, float] | None = None, cost_scale: float = 0.01, latency_scale: float = 2.0) -> float:
    """The one objective the router learns: a reward in [0, 1] for one call.

    ``reward = (w_q·quality + w_c·cost_scale/(cost_scale + cost_usd) + w_l·latency_scale/(latency_scale +
    latency_s)) / (w_q + w_c + w_l)``, and exactly 0 for a failed call (a failure delivers nothing, so a
    cheap, fast failure must never look better than a slow success). ``cost_scale`` and ``latency_scale`` are
    the cost and latency that score one half; give each department its own ``weights`` (keys ``quality``,
    ``cost``, ``latency``; missing keys weigh 0) to say what it trades for what.

    >>> round(reward(quality=0.9, cost_usd=0.002, latency_s=1.2), 3)
    0.832
    """
    if failed:
        return 0.0
    table = DEFAULT_REWARD_WEIGHTS if weights is None else weights
    unknown = set(table) - set(DEFAULT_REWARD_WEIGHTS)
    if unknown:
        raise ConfigurationError(f"unknown reward weight(s) {sorted(unknown)}; use quality, cost and latency")
    w = {key: float(table.get(key, 0.0)) for key in DEFAULT_REWARD_WEIGHTS}
    if any(not math.isfinite(v) or v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ConfigurationError(f"reward weights {dict(table)} must be non-negative with a positive sum")
    for name, value, low, high in (("quality", quality, 0.0, 1.0), ("cost_usd", cost_usd, 0.0, math.inf),
                                   ("latency_s", latency_s, 0.0, math.inf)):
        if value is None or isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
            raise RoutingError(f"reward({name}={value!r}): expected a number in [{low}, {high}] "
                               "(quality is only optional for a failed call)")
    for name, scale in (("cost_scale", cost_scale), ("latency_scale", latency_scale)):
        if not isinstance(scale, Real) or not 0 < scale < math.inf:
            raise ConfigurationError(f"reward({name}={scale!r}) must be a positive number")
    parts = {"quality": float(quality), "cost": cost_scale / (cost_scale + cost_usd),
             "latency": latency_scale / (latency_scale + latency_s)}
    return min(1.0, max(0.0, sum(w[k] * parts[k] for k in w) / sum(w.values())))


@dataclass(frozen=True, slots=True)
class Choice:
    """One routing decision.

    Attributes
    ----------
    route:
        The chosen route, always one of the candidates.
    propensity:
        The exact probability with which ``route`` was drawn; log it with the decision.
    scores:
        Predicted mean reward of every candidate (the greedy scores, without optimism).
    probabilities:
        The whole distribution ``route`` was drawn from (sums to 1 over the candidates).
    greedy:
        The candidate with the highest predicted reward.
    explored:
        ``True`` when ``route`` is not ``greedy``; counts against the department's exploration cap.
    version:
        Number of rewards the model had learned from when it decided (a model version for the log).
    """

    route: str
    propensity: float
    scores: dict[str, float]
    probabilities: dict[str, float]
    greedy: str
    explored: bool
    version: int


class _RouteTable:
    """Discounted ridge statistics of every route, eigenbases stacked for vectorised prediction, and
    a change detector per route.

    For the route in slot ``k``: ``A = alpha·I + Σ λ^(t_A−s) x_s x_sᵀ`` and ``b = Σ λ^(t_A−s) x_s (r_s − prior)``
    as of time ``t_A[k]``. At a later time ``t`` the true statistics are ``A(t) = δA + (1−δ)·alpha·I`` and
    ``b(t) = δb`` with ``δ = λ^(t−t_A)``: with ``A = Q diag(s) Qᵀ`` (computed at ``t_eig[k]``), both the
    prediction and ``xᵀA(t)⁻¹x`` cost O(nnz·d) without touching ``A``, so routes that were not chosen for a
    while still forget exactly.

    The change detector is a two-sided CUSUM (Page 1954) on the residuals ``r − prediction``: when the
    route's rewards fall (an outage) or rise (a recovery) by more than ``slack`` for long enough that the
    cumulative excess passes ``threshold``, the route's statistics are rebuilt from the observations since
    the estimated change point only (the "restart" of CUSUM-UCB, Liu et al. 2018).
    """

    def __init__(self, d: int, alpha: float, memory: int = 64) -> None:
        self.d, self.alpha = d, alpha
        self.slots: dict[str, int] = {}
        self.A: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self.n: list[float] = []  # discounted number of observations, as of t_A
        self.t_A: list[float] = []
        self.cusum: list[list[float]] = []  # [g_down, g_up, since_down, since_up]
        self.recent: list[deque[tuple[float, np.ndarray, np.ndarray, float, float]]] = []
        self.memory = memory
        self.Q = np.empty((0, d, d))
        self.s = np.empty((0, d))
        self.c = np.empty((0, d))
        self.t_eig = np.empty(0)

    def slot(self, route: str, t: float) -> int:
        """The slot of ``route``, created empty (prior only) at time ``t`` if new."""
        k = self.slots.get(route)
        if k is not None:
            return k
        k = self.slots[route] = len(self.A)
        self.A.append(np.eye(self.d) * self.alpha)
        self.b.append(np.zeros(self.d))
        self.n.append(0.0)
        self.t_A.append(t)
        self.cusum.append([0.0, 0.0, t, t])
        self.recent.append(deque(maxlen=self.memory))
        if k == len(self.t_eig):  # grow the stacked arrays geometrically
            grow = max(4, k)
            self.Q = np.concatenate([self.Q, np.broadcast_to(np.eye(self.d), (grow, self.d, self.d))])
            self.s = np.concatenate([self.s, np.full((grow, self.d), self.alpha)])
            self.c = np.concatenate([self.c, np.zeros((grow, self.d))])
            self.t_eig = np.concatenate([self.t_eig, np.zeros(grow)])
        self.t_eig[k] = t
        return k

    def advance(self, k: int, t: float, discount: float) -> None:
        """Bring slot ``k``'s statistics forward to time ``t`` (no new data)."""
        if t == self.t_A[k]:
            return
        delta = discount ** (t - self.t_A[k])
        self.A[k] *= delta
        self.A[k].flat[:: self.d + 1] += (1.0 - delta) * self.alpha
        self.b[k] *= delta
        self.n[k] *= delta
        self.t_A[k] = t

    def add(self, k: int, t: float, idx: np.ndarray, val: np.ndarray, target: float, weight: float,
            discount: float) -> None:
        """Add one observation at time ``t`` (``target`` = reward − prior)."""
        self.advance(k, t, discount)
        self.A[k][np.ix_(idx, idx)] += weight * np.outer(val, val)
        self.b[k][idx] += weight * target * val
        self.n[k] += weight
        self.recent[k].append((t, idx, val, target, weight))

    def detect(self, k: int, t: float, residual: float, slack: float, threshold: float,
               weight: float = 1.0) -> float | None:
        """Feed one residual to slot ``k``'s CUSUM; on a detected change return its estimated start time.

        A weighted observation moves the sums in proportion to its weight: a weak signal (a sampled judge,
        an implicit failure) alone cannot make the route forget what it learned."""
        state = self.cusum[k]
        w = min(weight, 1.0)
        state[0] = max(0.0, state[0] - w * (residual + slack))
        state[1] = max(0.0, state[1] + w * (residual - slack))
        for side in (0, 1):
            if state[side] == 0.0:
                state[side + 2] = t  # the change, if any, started after now
        for side in (0, 1):
            if state[side] > threshold:
                since = state[side + 2]
                self.cusum[k] = [0.0, 0.0, t, t]
                return since
        return None

    def restart(self, k: int, since: float, discount: float) -> None:
        """Rebuild slot ``k`` from its remembered observations made after ``since``."""
        kept = [obs for obs in self.recent[k] if obs[0] > since]
        self.A[k] = np.eye(self.d) * self.alpha
        self.b[k] = np.zeros(self.d)
        self.n[k] = 0.0
        self.t_A[k] = kept[0][0] if kept else self.t_A[k]
        self.recent[k].clear()
        for t, idx, val, target, weight in kept:
            self.add(k, t, idx, val, target, weight, discount)

    def refresh(self, k: int) -> None:
        """Recompute slot ``k``'s eigenbasis after updates (O(d³), once per route per ``partial_fit``)."""
        self.A[k] = (self.A[k] + self.A[k].T) * 0.5  # keep it exactly symmetric against rounding drift
        self.s[k], self.Q[k] = np.linalg.eigh(self.A[k])
        self.c[k] = self.Q[k].T @ self.b[k]
        self.t_eig[k] = self.t_A[k]

    def predict(self, idx: np.ndarray, val: np.ndarray, routes: Sequence[str], t: float,
                discount: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean offset from the prior and ``xᵀA⁻¹x`` of each route at time ``t``."""
        slots = np.fromiter((self.slots.get(r, -1) for r in routes), dtype=np.intp, count=len(routes))
        means = np.zeros(len(routes))
        widths = np.full(len(routes), float(np.dot(val, val)) / self.alpha)  # a route with no data
        known = slots >= 0
        if known.any():
            pos = slots[known]
            delta = discount ** (t - self.t_eig[pos])
            z = val @ self.Q[pos[:, None], idx[None, :], :]  # (k, d): x in each route's eigenbasis
            e = delta[:, None] * self.s[pos] + ((1.0 - delta) * self.alpha)[:, None]
            means[known] = delta * np.einsum("kd,kd->k", z, self.c[pos] / e)
            widths[known] = np.einsum("kd,kd->k", z * z, 1.0 / e)
        return means, widths


_blas_controller: Any = None


def _one_blas_thread() -> Any:
    """Context manager limiting BLAS to one thread.

    A 64×64 eigendecomposition takes ~0.5 ms on one thread but ~5-10 ms when OpenBLAS spreads it over
    threads on a busy two-core machine; the decomposition is far too small to gain from threads.
    """
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController  # a scikit-learn dependency

        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f8").tobytes()).decode("ascii")


def _decode(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f8").reshape(shape).astype(np.float64)


class RouteBandit(BaseEstimator):
    """Contextual bandit over routes: SquareCB inverse-gap weighting on a discounted, optimistic ridge oracle.

    Parameters
    ----------
    discount:
        Forgetting factor per observed reward, in (0, 1]. ``0.998`` keeps a memory of about 500 rewards.
    alpha:
        Ridge penalty (prior strength, in observations).
    prior_reward:
        Reward predicted for a route with no evidence; predictions are shrunk towards it.
    optimism:
        Weight of the confidence width ``sqrt(xᵀA⁻¹x)`` added to each score; 0 gives plain SquareCB.
    gamma_scale:
        Greediness of inverse-gap weighting: ``γ = gamma_scale·sqrt(n_eff)``.
    floor:
        Minimum exploration: every candidate keeps probability ``≥ floor / K``.
    exploration_cap:
        Largest share of a department's decisions that may explore (pick a non-greedy route), measured
        over a window of about ``1/(1−discount)`` of its decisions; ``None`` for no cap. Must be ``≥ floor``.
    department_caps:
        Per-department overrides of ``exploration_cap`` (``{"risk": 0.05}``; ``None`` value = uncapped).
    n_features:
        Width of the hashed context feature space (per route).
    interactions:
        Pairs of context keys crossed into one feature each.
    change_threshold:
        CUSUM threshold, in reward units, of the per-route change detector: when a route's rewards
        drop (an outage) or rise (a recovery) so that the cumulative excess over ``change_slack`` passes
        it, the route is re-learnt from the observations since the change. ``None`` turns detection off.
    change_slack:
        Shifts smaller than this (in reward units) are ignored by the change detector.
    prior_strength:
        How many observations a route prior given to :meth:`choose` is worth (see ``prior`` there).
    max_importance_weight:
        ``None`` (default): learn from every observed reward with weight 1. A number: weight each
        observation by ``min(1/propensity, max_importance_weight)``, for learning from logs of another policy.
    random_state:
        Seed (int), ``numpy.random.Generator``, or ``None``, for the draws in :meth:`choose`.
    """

    def __init__(self, *, discount: float = 0.998, alpha: float = 1.0, prior_reward: float = 0.5,
                 optimism: float = 0.1, gamma_scale: float = 50.0, floor: float = 0.02,
                 exploration_cap: float | None = None, department_caps: Mapping[str, float | None] | None = None,
                 n_features: int = 64, interactions: Sequence[Sequence[str]] = (("department", "use_case"),),
                 change_threshold: float | None = 1.5, change_slack: float = 0.1,
                 max_importance_weight: float | None = None, prior_strength: float = 10.0,
                 random_state: Any = None) -> None:
        self.discount = discount
        self.alpha = alpha
        self.prior_reward = prior_reward
        self.optimism = optimism
        self.gamma_scale = gamma_scale
        self.floor = floor
        self.exploration_cap = exploration_cap
        self.department_caps = department_caps
        self.n_features = n_features
        self.interactions = interactions
        self.change_threshold = change_threshold
        self.change_slack = change_slack
        self.max_importance_weight = max_importance_weight
        self.prior_strength = prior_strength
        self.random_state = random_state

    # ------------------------------------------------------------------ lifecycle, validation

    def _check_params(self) -> None:
        def number(name: str, low: float, high: float, *, low_open: bool = False) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ConfigurationError(f"RouteBandit({name}={value!r}): must be a finite number")
            if value < low or value > high or (low_open and value == low):
                bounds = f"{'(' if low_open else '['}{low}, {high}]"
                raise ConfigurationError(f"RouteBandit({name}={value!r}): must be in {bounds}")
            return float(value)

        number("discount", 0.0, 1.0, low_open=True)
        number("alpha", 0.0, math.inf, low_open=True)
        number("prior_reward", 0.0, 1.0)
        number("optimism", 0.0, math.inf)
        number("gamma_scale", 0.0, math.inf)
        floor = number("floor", 0.0, 1.0)
        number("change_slack", 0.0, 1.0)
        number("prior_strength", 0.0, math.inf)
        if self.change_threshold is not None:
            number("change_threshold", 0.0, math.inf, low_open=True)
        if self.max_importance_weight is not None:
            number("max_importance_weight", 1.0, math.inf)
        caps = {"exploration_cap": self.exploration_cap}
        if self.department_caps is not None:
            if not isinstance(self.department_caps, Mapping):
                raise ConfigurationError("RouteBandit(department_caps=...) must be a dict {department: cap}")
            caps.update({f"department_caps[{k!r}]": v for k, v in self.department_caps.items()})
        for label, cap in caps.items():
            if cap is None:
                continue
            if isinstance(cap, bool) or not isinstance(cap, Real) or not 0.0 <= cap <= 1.0:
                raise ConfigurationError(f"RouteBandit({label}={cap!r}): a cap is a share of decisions in [0, 1]")
            if cap < floor:
                raise ConfigurationError(
                    f"RouteBandit({label}={cap!r}) is below floor={floor!r}: the floor keeps every route "
                    "reachable and always applies, so lower floor or raise the cap")
        if isinstance(self.n_features, bool) or not isinstance(self.n_features, Integral) or self.n_features < 8:
            raise ConfigurationError(f"RouteBandit(n_features={self.n_features!r}): must be an integer >= 8")
        _pairs(self.interactions)

    def _state(self) -> dict[str, Any]:
        """The learned state, created on first use (a bandit decides before it has seen any reward)."""
        state = self.__dict__.get("_learned")
        if state is not None:
            if state["structure"] != (self.n_features, self.interactions, self.alpha):  # cheap, every call
                if state["normalized"] != (self.n_features, _pairs(self.interactions), float(self.alpha)):
                    raise RoutingError("n_features, interactions or alpha changed after the bandit learned; "
                                       "start a fresh one with sklearn.base.clone(bandit)")
                state["structure"] = (self.n_features, self.interactions, self.alpha)
            return state
        self._check_params()
        if isinstance(self.random_state, np.random.Generator):
            seed: Any = int(self.random_state.integers(2**63))
        elif self.random_state is None or (isinstance(self.random_state, Integral)
                                           and not isinstance(self.random_state, bool)):
            seed = self.random_state
        else:
            raise ConfigurationError(f"RouteBandit(random_state={self.random_state!r}): "
                                     "use an int, a numpy Generator or None")
        state = {
            "structure": (self.n_features, self.interactions, self.alpha),
            "normalized": (self.n_features, _pairs(self.interactions), float(self.alpha)),
            "featurizer": ContextFeaturizer(self.n_features, self.interactions),
            "table": _RouteTable(int(self.n_features), float(self.alpha)),
            "clock": 0,  # observed rewards so far
            "departments": {},  # department -> [discounted decisions, discounted explored decisions]
            "rng": np.random.default_rng(seed),
        }
        self.__dict__["_learned"] = state
        self.__dict__.setdefault("_lock", threading.RLock())
        return state

    def set_params(self, **params: Any) -> RouteBandit:
        """Set hyperparameters (sklearn API); validated at once when the bandit has already learned."""
        super().set_params(**params)
        if "_learned" in self.__dict__:
            self._check_params()
            self._state()
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # object.__getstate__ returns the live __dict__
        state.pop("_lock", None)  # locks cannot be pickled; a fresh one is made on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["_lock"] = threading.RLock()

    @property
    def _mutex(self) -> threading.RLock:
        return self.__dict__.setdefault("_lock", threading.RLock())

    # ------------------------------------------------------------------ learned attributes

    @property
    def n_updates_(self) -> int:
        """Number of rewards learned from so far."""
        return int(self._state()["clock"])

    @property
    def n_observations_(self) -> float:
        """Weighted number of observations learned so far (the sum of ``sample_weight``; = ``n_updates_`` unweighted)."""
        state = self._state()
        return float(state.get("weight", state["clock"]))

    @property
    def routes_(self) -> tuple[str, ...]:
        """Routes the bandit has observed a reward for, in order of first observation."""
        return tuple(self._state()["table"].slots)

    def exploration_share(self, department: str | None) -> float:
        """Share of the department's recent decisions (discounted window) that explored; 0.0 if none yet."""
        counts = self._state()["departments"].get(department or "")
        return 0.0 if not counts or counts[0] == 0 else counts[1] / counts[0]

    # ------------------------------------------------------------------ deciding

    def _scores(self, state: dict[str, Any], context: Mapping[str, Any],
                routes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted mean reward and confidence width of each route."""
        idx, val = state["featurizer"].transform_one(context)
        means, widths = state["table"].predict(idx, val, routes, float(state["clock"]), float(self.discount))
        means += float(self.prior_reward)
        return means, np.sqrt(widths)

    def _distribution(self, state: dict[str, Any], context: Mapping[str, Any],
                      routes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Exploration distribution before the department cap, the mean scores, and the greedy index."""
        means, widths = self._scores(state, context, routes)
        k = len(routes)
        upper = means + float(self.optimism) * widths
        lam = float(self.discount)
        n_eff = state["clock"] if lam == 1.0 else (1.0 - lam ** state["clock"]) / (1.0 - lam)
        gamma = float(self.gamma_scale) * math.sqrt(n_eff)
        best = int(np.argmax(upper))
        probs = 1.0 / (k + gamma * (upper[best] - upper))
        probs[best] = 0.0
        probs[best] = 1.0 - probs.sum()
        floor = float(self.floor)
        probs = (1.0 - floor) * probs + floor / k
        return probs, means, int(np.argmax(means))

    def _cap_for(self, department: str) -> float | None:
        caps = self.department_caps
        if caps is not None and department in caps:
            return caps[department]
        return self.exploration_cap

    def _check_routes(self, routes: Sequence[str]) -> list[str]:
        if isinstance(routes, str) or not isinstance(routes, Sequence):
            raise RoutingError(f"routes must be a list of route names, got {routes!r}")
        routes = list(routes)
        if not routes:
            raise RoutingError("no candidate route: every route was filtered out (authorisation, health or "
                               "budget); check the policy and the circuit breaker before calling choose()")
        if len(set(routes)) != len(routes) or not all(isinstance(r, str) and r for r in routes):
            raise RoutingError(f"routes must be distinct, non-empty strings, got {routes!r}")
        return routes

    def choose(self, context: Mapping[str, Any], routes: Sequence[str],
               prior: Mapping[str, float] | None = None) -> Choice:
        """Draw one of ``routes`` (the candidates for this call) for ``context``.

        Only a candidate is ever returned; ``Choice.propensity`` is the exact probability it was drawn with.
        ``prior`` (route -> traffic share, e.g. the gateway config's route ``weight``) is where the router
        starts: the distribution is mixed with it in proportion ``prior_strength / (prior_strength + n)``,
        ``n`` the candidates' weighted evidence in this context, so the prior fades as evidence comes in.
        """
        routes = self._check_routes(routes)
        with self._mutex:
            state = self._state()
            probs, means, greedy = self._distribution(state, context, routes)
            if prior:
                probs = self._with_prior(state, context, routes, probs, prior)
            department = str(context.get("department") or "")
            counts = state["departments"].setdefault(department, [0.0, 0.0])
            lam = float(self.discount)
            cap = self._cap_for(department)
            if cap is not None:
                probs = self._apply_cap(probs, greedy, cap, lam * counts[0] + 1.0, lam * counts[1])
            cumulative = np.cumsum(probs)
            draw = state["rng"].random() * cumulative[-1]
            pick = min(int(np.searchsorted(cumulative, draw, side="right")), len(routes) - 1)
            explored = pick != greedy
            counts[0] = lam * counts[0] + 1.0
            counts[1] = lam * counts[1] + float(explored)
            version = int(state["clock"])
        return Choice(route=routes[pick], propensity=float(probs[pick]),
                      scores=dict(zip(routes, means.tolist())), probabilities=dict(zip(routes, probs.tolist())),
                      greedy=routes[greedy], explored=explored, version=version)

    def _with_prior(self, state: dict[str, Any], context: Mapping[str, Any], routes: Sequence[str],
                    probs: np.ndarray, prior: Mapping[str, float]) -> np.ndarray:
        """Mix ``probs`` with the prior shares; the prior's part fades with the evidence in this context."""
        shares = np.array([max(float(prior.get(r, 0.0)), 0.0) for r in routes])
        if shares.sum() <= 0 or np.allclose(shares, shares[0]):
            return probs  # equal weights are no prior at all
        shares /= shares.sum()
        _, widths = self._scores(state, context, routes)
        idx, val = state["featurizer"].transform_one(context)
        norm = float(np.dot(val, val))
        # ridge: xᵀA⁻¹x ≈ |x|² / (alpha + n), so n ≈ |x|²/width² − alpha per route
        evidence = float(np.mean(np.maximum(norm / np.maximum(widths ** 2, 1e-12) - float(self.alpha), 0.0)))
        strength = float(self.prior_strength)
        mix = strength / (strength + evidence) if strength > 0 else 0.0
        out = (1.0 - mix) * probs + mix * shares
        return out / out.sum()

    def _apply_cap(self, probs: np.ndarray, greedy: int, cap: float, decisions: float,
                   explored: float) -> np.ndarray:
        """Mix towards the greedy route so the expected exploring share stays within the cap."""
        explore = 1.0 - probs[greedy]
        allowance = min(max(cap * decisions - explored, 0.0), 1.0)
        if explore <= allowance:
            return probs
        k = len(probs)
        floor = float(self.floor)
        minimal = np.full(k, floor / k)
        minimal[greedy] += 1.0 - floor
        least = 1.0 - minimal[greedy]  # exploring share the floor alone implies
        if explore <= least:
            return probs
        allowance = max(allowance, least)
        mix = (allowance - least) / (explore - least)
        return mix * probs + (1.0 - mix) * minimal

    def predict_proba(self, context: Mapping[str, Any], routes: Sequence[str]) -> dict[str, float]:
        """The distribution :meth:`choose` would draw from, before any department cap; no state changes."""
        routes = self._check_routes(routes)
        with self._mutex:
            probs, _, _ = self._distribution(self._state(), context, routes)
        return dict(zip(routes, probs.tolist()))

    def preferences(self, context: Mapping[str, Any], routes: Sequence[str]) -> dict[str, float]:
        """Predicted mean reward of each route for ``context`` (the greedy scores), best first."""
        routes = self._check_routes(routes)
        with self._mutex:
            means, _ = self._scores(self._state(), context, routes)
        order = np.argsort(-means, kind="stable")
        return {routes[i]: float(means[i]) for i in order}

    # ------------------------------------------------------------------ learning

    def partial_fit(self, contexts: Sequence[Mapping[str, Any]], routes: Sequence[str], rewards: Sequence[float],
                    propensities: Sequence[float] | None = None,
                    sample_weight: Sequence[float] | None = None) -> RouteBandit:
        """Learn from observed rewards (in [0, 1]) of routes taken in contexts; returns ``self``.

        Rewards may arrive late and in any order; each one advances the forgetting clock by one.
        ``propensities`` (the logged probabilities) are validated, and used as importance weights
        when ``max_importance_weight`` is set. ``sample_weight`` says how many observations each reward
        is worth (a calibrated LLM judge less than a human label): it scales the reward's weight in the
        ridge statistics, so the confidence width — and how soon the router trusts a route — follows the
        weighted number of observations.
        """
        contexts, routes = list(contexts), list(routes)
        rewards_arr = np.asarray(rewards, dtype=float)
        n = len(contexts)
        if len(routes) != n or rewards_arr.shape != (n,):
            raise RoutingError(f"partial_fit needs as many routes and rewards as contexts: got {n} contexts, "
                               f"{len(routes)} routes, {rewards_arr.size} rewards")
        if not np.all(np.isfinite(rewards_arr)) or np.any((rewards_arr < 0) | (rewards_arr > 1)):
            raise RoutingError("rewards must be finite numbers in [0, 1]; build them with tidyllm.routing.reward()")
        if not all(isinstance(r, str) and r for r in routes):
            raise RoutingError("each route must be a non-empty string naming the route that was taken")
        weights = np.ones(n)
        if propensities is not None:
            props = np.asarray(propensities, dtype=float)
            if props.shape != (n,) or not np.all((props > 0) & (props <= 1)):
                raise RoutingError("propensities must be one probability in (0, 1] per decision, as logged by choose()")
            if self.max_importance_weight is not None:
                weights = np.minimum(1.0 / props, float(self.max_importance_weight))
        if sample_weight is not None:
            sw = np.asarray(sample_weight, dtype=float)
            if sw.shape != (n,) or not np.all(np.isfinite(sw)) or np.any(sw < 0):
                raise RoutingError("sample_weight must be one non-negative number per reward")
            weights = weights * sw
        with self._mutex:
            state = self._state()
            features = [state["featurizer"].transform_one(c) for c in contexts]  # validate all before changing
            lam, prior, table = float(self.discount), float(self.prior_reward), state["table"]
            threshold, slack = self.change_threshold, float(self.change_slack)
            touched = set()
            for (idx, val), route, r, w in zip(features, routes, rewards_arr, weights):
                if w <= 0.0:
                    continue  # worth nothing: neither learned nor counted on the forgetting clock
                state["clock"] += 1
                state["weight"] = state.get("weight", 0.0) + float(w)
                now = float(state["clock"])
                k = table.slot(route, now)
                target = float(r) - prior
                if threshold is not None:
                    # residual against the model as of this call's start (eigenbases refresh once per call)
                    residual = target - float(table.predict(idx, val, [route], now, lam)[0][0])
                table.add(k, now, idx, val, target, float(w), lam)
                if threshold is not None:
                    since = table.detect(k, now, residual, slack, float(threshold), float(w))
                    if since is not None:
                        table.restart(k, since, lam)
                touched.add(k)
            with _one_blas_thread():
                for k in sorted(touched):
                    table.refresh(k)
        return self

    # ------------------------------------------------------------------ persistence

    def get_state(self) -> dict[str, Any]:
        """The learned state as a JSON-serialisable dict (strings, numbers, lists, dicts).

        Matrices are base64 strings of little-endian float64, so a round trip is exact.
        """
        with self._mutex:
            state = self._state()
            table = state["table"]
            return {
                "format": _STATE_FORMAT,
                "n_features": int(self.n_features),
                "interactions": [list(p) for p in _pairs(self.interactions)],
                "alpha": float(self.alpha),
                "clock": int(state["clock"]),
                "weight": float(state.get("weight", state["clock"])),
                "routes": {route: {"A": _encode(table.A[k]), "b": _encode(table.b[k]), "t_ref": float(table.t_A[k]),
                                   "n": float(table.n[k]), "cusum": [float(v) for v in table.cusum[k]],
                                   "recent": [[t, idx.tolist(), val.tolist(), target, weight]
                                              for t, idx, val, target, weight in table.recent[k]]}
                           for route, k in table.slots.items()},
                "departments": {d: [float(a), float(b)] for d, (a, b) in state["departments"].items()},
                "rng": _jsonable(state["rng"].bit_generator.state),
            }

    def set_state(self, state: Mapping[str, Any]) -> RouteBandit:
        """Restore what :meth:`get_state` returned (hyperparameters stay this estimator's own); returns ``self``."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise RoutingError(f"not a RouteBandit state (expected format {_STATE_FORMAT!r}); "
                               "pass the dict RouteBandit.get_state() returned")
        self._check_params()
        d, alpha = int(self.n_features), float(self.alpha)
        saved_structure = (state.get("n_features"), [tuple(p) for p in state.get("interactions", [])],
                           state.get("alpha"))
        if saved_structure != (d, list(_pairs(self.interactions)), alpha):
            raise RoutingError(f"state was saved with n_features={saved_structure[0]}, interactions="
                               f"{state.get('interactions')} and alpha={saved_structure[2]}; construct "
                               "RouteBandit with the same values to load it")
        try:
            table = _RouteTable(d, alpha)
            for route, saved in state["routes"].items():
                k = table.slot(str(route), float(saved["t_ref"]))
                table.A[k], table.b[k] = _decode(saved["A"], (d, d)), _decode(saved["b"], (d,))
                table.n[k] = float(saved["n"])
                table.cusum[k] = [float(v) for v in saved["cusum"]]
                table.recent[k].extend((float(t), np.asarray(i, dtype=np.intp), np.asarray(v, dtype=np.float64),
                                        float(target), float(weight)) for t, i, v, target, weight in saved["recent"])
                with _one_blas_thread():
                    table.refresh(k)
            departments = {str(k): [float(v[0]), float(v[1])] for k, v in state["departments"].items()}
            clock = int(state["clock"])
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RoutingError(f"the saved RouteBandit state is damaged ({exc!r}); "
                               "start from a fresh bandit or restore another snapshot") from exc
        with self._mutex:
            self.__dict__.pop("_learned", None)
            learned = self._state()
            learned.update(table=table, departments=departments, clock=clock, rng=rng,
                           weight=float(state.get("weight", clock)))
        return self


def _pairs(interactions: Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    pairs = tuple(tuple(p) for p in interactions)
    if not all(len(p) == 2 and all(isinstance(k, str) for k in p) for p in pairs):
        raise ConfigurationError(f"RouteBandit(interactions={interactions!r}): give pairs of context key names, "
                                 "e.g. [('department', 'use_case')]")
    return pairs  # type: ignore[return-value]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value

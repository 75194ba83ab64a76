"""Off-policy evaluation: what would another routing policy have earned on the decisions we logged?

Each logged decision carries the context, the candidate routes, the route taken, the probability it
was taken with (the propensity) and, once known, its reward. For a target policy ``π`` with
importance weight ``w_i = π(route_i | context_i) / propensity_i``:

- **IPS** (inverse propensity scoring): ``mean(w_i · r_i)`` — unbiased when propensities are exact
  and every route ``π`` may take had positive logging probability (the floor guarantees it);
- **SNIPS** (self-normalised IPS): ``Σ w_i r_i / Σ w_i`` — slightly biased, much lower variance;
- **DR** (doubly robust, Dudík et al. 2011): ``mean(Σ_a π(a|x_i) q̂(x_i, a) + w_i (r_i − q̂(x_i, route_i)))``
  with a reward model ``q̂`` (per-route ridge, cross-fitted so no row is scored by a model that saw it):
  unbiased if either the propensities or the model are right, and lower variance than IPS;
- **DM** (direct method): ``mean(Σ_a π(a|x_i) q̂(x_i, a))`` — the model alone, for comparison.

Confidence intervals are percentile bootstrap intervals over decisions. The effective sample size
``(Σw)² / Σw²`` says how many on-policy decisions the estimate is worth: far below ``n`` means the
target policy rarely agrees with the logged one, and the intervals will be wide.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tidyllm.errors import RoutingError
from tidyllm.routing.bandit import RouteBandit

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Estimate", "Evaluation", "evaluate"]

Policy = RouteBandit | str | Callable[[Mapping[str, Any], list[str]], Mapping[str, float]]
_ESTIMATORS = ("ips", "snips", "dr", "dm", "logged")


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate of a policy's average reward per decision, with its bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float

    def covers(self, value: float) -> bool:
        """Whether ``value`` lies inside the confidence interval."""
        return self.ci_low <= value <= self.ci_high


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate`. ``to_frame()`` gives one row per estimator.

    ``logged`` is the logging policy's own average reward on the same rows, for comparison;
    ``support`` is the share of rows where the target policy could have taken the logged route.
    """

    policy: str
    n: int
    n_without_reward: int
    ips: Estimate
    snips: Estimate
    dr: Estimate
    dm: Estimate
    logged: Estimate
    effective_sample_size: float
    max_weight: float
    support: float
    confidence: float
    n_bootstrap: int

    def to_frame(self) -> pd.DataFrame:
        """One row per estimator (ips, snips, dr, dm, logged) with ``value``, ``ci_low``, ``ci_high``."""
        import pandas as pd

        frame = pd.DataFrame([{"estimator": name, "value": getattr(self, name).value,
                               "ci_low": getattr(self, name).ci_low, "ci_high": getattr(self, name).ci_high}
                              for name in _ESTIMATORS]).set_index("estimator")
        frame.attrs.update(policy=self.policy, n=self.n, effective_sample_size=self.effective_sample_size,
                           confidence=self.confidence)
        return frame

    def __str__(self) -> str:
        level = f"{self.confidence:.0%}"
        lines = [f"policy {self.policy}: {self.n} decisions ({self.n_without_reward} without a reward skipped), "
                 f"effective sample size {self.effective_sample_size:.1f}, support {self.support:.1%}, "
                 f"max weight {self.max_weight:.2f}",
                 f"{'estimator':<10}{'value':>9}   {level} interval"]
        for name in _ESTIMATORS:
            est = getattr(self, name)
            lines.append(f"{name:<10}{est.value:>9.4f}   [{est.ci_low:.4f}, {est.ci_high:.4f}]")
        return "\n".join(lines)


def _loads(value: Any, what: str, row: int) -> Any:
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RoutingError(f"decision {row}: {what} is not valid JSON ({exc})") from exc
    return value


def _rows(decisions: Any) -> Iterable[Mapping[str, Any]]:
    if hasattr(decisions, "to_dict") and hasattr(decisions, "columns"):
        missing = {"context", "candidates", "route", "propensity", "reward"} - set(decisions.columns)
        if missing:
            raise RoutingError(f"decisions frame lacks column(s) {sorted(missing)}; it needs context, "
                               "candidates, route, propensity and reward")
        return decisions.to_dict("records")
    if isinstance(decisions, Iterable) and not isinstance(decisions, str | bytes | Mapping):
        return decisions
    raise RoutingError("decisions must be a pandas DataFrame or a list of dicts with context, candidates, "
                       "route, propensity and reward")


def _parse(decisions: Any) -> tuple[list[dict[str, Any]], list[list[str]], list[str], np.ndarray, np.ndarray, int]:
    contexts, candidates, routes, props, rewards = [], [], [], [], []
    skipped = 0
    for i, row in enumerate(_rows(decisions)):
        if not isinstance(row, Mapping):
            raise RoutingError(f"decision {i} is a {type(row).__name__}, not a dict")
        try:
            context, cands = _loads(row["context"], "context", i), _loads(row["candidates"], "candidates", i)
            route, propensity, value = row["route"], row["propensity"], row["reward"]
        except KeyError as exc:
            raise RoutingError(f"decision {i} has no {exc.args[0]!r}; each needs context, candidates, route, "
                               "propensity and reward") from exc
        if value is None or (isinstance(value, float) and math.isnan(value)):
            skipped += 1  # feedback not arrived yet
            continue
        if not isinstance(context, Mapping):
            raise RoutingError(f"decision {i}: context must be a dict, got {context!r}")
        if isinstance(cands, str) or not isinstance(cands, Sequence) or route not in cands:
            raise RoutingError(f"decision {i}: route {route!r} must be one of the candidates {cands!r}")
        propensity, value = float(propensity), float(value)
        if not 0.0 < propensity <= 1.0:
            raise RoutingError(f"decision {i}: propensity {propensity!r} must be in (0, 1]; "
                               "log Choice.propensity with each decision")
        if not 0.0 <= value <= 1.0:
            raise RoutingError(f"decision {i}: reward {value!r} must be in [0, 1]")
        contexts.append(dict(context))
        candidates.append(list(cands))
        routes.append(route)
        props.append(propensity)
        rewards.append(value)
    if not contexts:
        raise RoutingError("no decision with a reward to evaluate on; wait for feedback or pass more decisions")
    return contexts, candidates, routes, np.asarray(props), np.asarray(rewards), skipped


def _policy_fn(policy: Policy) -> tuple[Callable[[Mapping[str, Any], list[str]], Mapping[str, float]], str]:
    if isinstance(policy, RouteBandit):
        return policy.predict_proba, f"RouteBandit({policy.n_updates_} updates)"
    if isinstance(policy, str):
        def fixed(context: Mapping[str, Any], routes: list[str]) -> Mapping[str, float]:
            # A fixed route that is not a candidate (unauthorised, unhealthy) cannot be taken; the
            # Router would then fall back, which we model as a uniform pick among the candidates.
            if policy in routes:
                return {policy: 1.0}
            return {r: 1.0 / len(routes) for r in routes}
        return fixed, f"fixed route {policy!r}"
    if callable(policy):
        return policy, getattr(policy, "__name__", type(policy).__name__)
    raise RoutingError(f"policy must be a RouteBandit, a route name or a callable (context, routes) -> "
                       f"{{route: probability}}, got {policy!r}")


def _policy_matrix(fn: Callable[..., Mapping[str, float]], contexts: list[dict[str, Any]],
                   candidates: list[list[str]]) -> list[np.ndarray]:
    out = []
    for i, (context, cands) in enumerate(zip(contexts, candidates)):
        probs = fn(context, list(cands))
        extra = set(probs) - set(cands)
        if extra:
            raise RoutingError(f"decision {i}: the policy gave probability to non-candidate route(s) "
                               f"{sorted(extra)}; a policy may only pick among the candidates")
        vector = np.array([float(probs.get(r, 0.0)) for r in cands])
        if np.any(vector < 0) or not math.isclose(vector.sum(), 1.0, abs_tol=1e-6):
            raise RoutingError(f"decision {i}: the policy's probabilities {dict(probs)} must be >= 0 and sum to 1")
        out.append(vector)
    return out


def _reward_model_predictions(template: RouteBandit, contexts: list[dict[str, Any]], candidates: list[list[str]],
                              routes: list[str], rewards: np.ndarray, n_folds: int,
                              rng: np.random.Generator) -> list[np.ndarray]:
    """Cross-fitted predictions q̂(x_i, a) for every candidate a of every row."""
    from sklearn.base import clone

    n = len(contexts)
    folds = min(n_folds, n)
    assignment = rng.permutation(n) % folds if folds >= 2 else np.zeros(n, dtype=int)
    predictions: list[np.ndarray] = [np.empty(0)] * n
    for fold in range(max(folds, 1)):
        train = np.flatnonzero(assignment != fold) if folds >= 2 else np.arange(n)
        model = clone(template)
        model.partial_fit([contexts[i] for i in train], [routes[i] for i in train], rewards[train])
        for i in np.flatnonzero(assignment == fold):
            scores = model.preferences(contexts[i], candidates[i])
            predictions[i] = np.clip(np.array([scores[r] for r in candidates[i]]), 0.0, 1.0)
    return predictions


def evaluate(policy: Policy, decisions: Any, *, reward_model: RouteBandit | None = None, n_bootstrap: int = 200,
             confidence: float = 0.95, n_folds: int = 2, max_weight: float | None = None,
             random_state: int | None = None) -> Evaluation:
    """Estimate the average reward per decision ``policy`` would have earned on logged ``decisions``.

    Parameters
    ----------
    policy:
        A :class:`RouteBandit` (its current :meth:`~RouteBandit.predict_proba`, a snapshot), a route
        name (always that route when it is a candidate, else uniform), or a callable
        ``(context, routes) -> {route: probability}``.
    decisions:
        A DataFrame or a list of dicts with ``context`` (dict or JSON), ``candidates`` (list or JSON),
        ``route`` (the one taken), ``propensity`` (its logged probability) and ``reward`` (in [0, 1];
        rows whose reward is missing are skipped and counted).
    reward_model:
        Template of the reward model for DR and DM, cloned and cross-fitted over ``n_folds`` folds;
        default: a per-route ridge model, ``RouteBandit(discount=1.0, change_threshold=None)``.
    n_bootstrap, confidence:
        Bootstrap resamples and the level of the percentile intervals.
    max_weight:
        Clip importance weights at this value (less variance, some bias); ``None`` for no clipping.
    random_state:
        Seed for the folds and the bootstrap.
    """
    if not 0.0 < confidence < 1.0:
        raise RoutingError(f"confidence={confidence!r} must be in (0, 1), e.g. 0.95")
    if int(n_bootstrap) < 10:
        raise RoutingError(f"n_bootstrap={n_bootstrap!r} is too few for an interval; use at least 10 (200 is usual)")
    fn, label = _policy_fn(policy)
    contexts, candidates, routes, props, rewards, skipped = _parse(decisions)
    rng = np.random.default_rng(random_state)
    target = _policy_matrix(fn, contexts, candidates)
    # logs are evaluated as one sample: no forgetting, no change detection in the reward model
    template = reward_model if reward_model is not None else RouteBandit(discount=1.0, optimism=0.0,
                                                                         change_threshold=None)
    q_hat = _reward_model_predictions(template, contexts, candidates, routes, rewards, n_folds, rng)

    chosen = [cands.index(route) for cands, route in zip(candidates, routes)]
    pi_chosen = np.array([t[j] for t, j in zip(target, chosen)])
    weights = pi_chosen / props
    if max_weight is not None:
        weights = np.minimum(weights, float(max_weight))
    q_chosen = np.array([q[j] for q, j in zip(q_hat, chosen)])
    direct = np.array([float(np.dot(t, q)) for t, q in zip(target, q_hat)])
    per_row = {"ips": weights * rewards, "dr": direct + weights * (rewards - q_chosen), "dm": direct,
               "logged": rewards}

    n = len(rewards)
    boot = {name: np.empty(int(n_bootstrap)) for name in _ESTIMATORS}
    chunk = max(1, 2_000_000 // n)
    for start in range(0, int(n_bootstrap), chunk):
        size = min(chunk, int(n_bootstrap) - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)
        for name, values in per_row.items():
            boot[name][start:start + size] = counts @ values / n
        sum_w = counts @ weights
        with np.errstate(invalid="ignore", divide="ignore"):
            boot["snips"][start:start + size] = np.where(sum_w > 0, (counts @ (weights * rewards)) / sum_w, np.nan)
    tail = (1.0 - confidence) / 2.0

    def estimate(name: str, value: float) -> Estimate:
        draws = boot[name][np.isfinite(boot[name])]
        if draws.size == 0:
            return Estimate(value, math.nan, math.nan)
        low, high = np.quantile(draws, [tail, 1.0 - tail])
        return Estimate(float(value), float(low), float(high))

    total_w = float(weights.sum())
    snips = float((weights * rewards).sum() / total_w) if total_w > 0 else math.nan
    return Evaluation(
        policy=label, n=n, n_without_reward=skipped,
        ips=estimate("ips", per_row["ips"].mean()), snips=estimate("snips", snips),
        dr=estimate("dr", per_row["dr"].mean()), dm=estimate("dm", per_row["dm"].mean()),
        logged=estimate("logged", rewards.mean()),
        effective_sample_size=float(total_w**2 / np.sum(weights**2)) if total_w > 0 else 0.0,
        max_weight=float(weights.max()), support=float(np.mean(pi_chosen > 0)),
        confidence=float(confidence), n_bootstrap=int(n_bootstrap),
    )

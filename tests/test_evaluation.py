"""Off-policy evaluation recovers the known value of policies on simulated logs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tidyllm.errors import RoutingError
from tidyllm.routing import Evaluation, RouteBandit, evaluate
from tidyllm.routing.environments import Stream, stationary

N_LOGS = 3000
# These tests check 3 estimators × 3 policies against the truth; at 95 % each, about one check in three
# runs would miss by chance somewhere. 99 % intervals keep the family-wise miss rate near 9 %.
LEVEL = 0.99


def simulate_logs(stream: Stream, logger: RouteBandit, learn: bool = True) -> list[dict]:
    """Decisions of ``logger`` on ``stream`` as the mart would log them (context, candidates, route, p, reward)."""
    rows = []
    for t in range(len(stream)):
        context, candidates = stream.contexts[t], stream.candidates(t)
        choice = logger.choose(context, candidates)
        value = stream.outcome(t, choice.route).reward
        if learn:
            logger.partial_fit([context], [choice.route], [value], propensities=[choice.propensity])
        rows.append({"context": context, "candidates": candidates, "route": choice.route,
                     "propensity": choice.propensity, "reward": value})
    return rows


def true_value(stream: Stream, policy) -> float:
    """Exact expected reward per decision of ``policy`` (a callable giving probabilities) on ``stream``."""
    total = 0.0
    for t in range(len(stream)):
        probs = policy(stream.contexts[t], stream.candidates(t))
        total += sum(p * stream.expected(t, route) for route, p in probs.items())
    return total / len(stream)


def trained_logger(seed: int) -> RouteBandit:
    """A bandit with a generous floor that has learned from 300 decisions of another stream."""
    logger = RouteBandit(random_state=seed, floor=0.2)
    simulate_logs(stationary().stream(300, seed=200 + seed), logger)
    return logger


@pytest.fixture(scope="module")
def logs() -> tuple[Stream, list[dict]]:
    # One model version logging a day of decisions: the logger does not learn while it logs, so the
    # decisions are independent given their contexts, as the bootstrap intervals assume.
    stream = stationary().stream(N_LOGS, seed=21)
    return stream, simulate_logs(stream, trained_logger(21), learn=False)


def fixed(route):
    def policy(context, routes):
        return {route: 1.0} if route in routes else {r: 1 / len(routes) for r in routes}
    return policy


def test_ope_recovers_the_value_of_a_fixed_route_within_its_interval(logs):
    stream, rows = logs
    truth = true_value(stream, fixed("balanced"))
    result = evaluate("balanced", rows, confidence=LEVEL, random_state=0)
    for name in ("ips", "snips", "dr"):
        estimate = getattr(result, name)
        assert estimate.covers(truth), (name, estimate, truth)
    assert abs(result.dr.value - truth) < 0.02
    # the reward model pays off: a narrower interval than plain IPS
    assert result.dr.ci_high - result.dr.ci_low < result.ips.ci_high - result.ips.ci_low
    assert 0 < result.effective_sample_size < result.n == N_LOGS
    assert not result.logged.covers(truth)  # the logging policy's own average is a different number


def test_ope_recovers_the_value_of_a_stochastic_policy_and_of_another_bandit(logs):
    stream, rows = logs
    softmax_prefers_cheap = {"small": 3.0, "onprem": 2.0, "balanced": 1.0, "coder": 0.5, "frontier": 0.2}

    def cheap(context, routes):
        weights = np.array([softmax_prefers_cheap[r] for r in routes])
        return dict(zip(routes, (weights / weights.sum()).tolist()))

    other = RouteBandit(random_state=5)
    simulate_logs(stationary().stream(800, seed=99), other)  # trained on a different stream
    for policy, callable_policy in ((cheap, cheap), (other, other.predict_proba)):
        truth = true_value(stream, callable_policy)
        result = evaluate(policy, rows, confidence=LEVEL, random_state=1)
        assert result.dr.covers(truth) and result.snips.covers(truth) and result.ips.covers(truth), (result, truth)
        assert abs(result.dr.value - truth) < 0.02


def test_logs_of_a_learning_logger_keep_ips_unbiased_and_dr_close():
    # While the logger learns, decisions depend on earlier rewards: IPS stays unbiased, the intervals
    # (which assume independent decisions) are approximate, and SNIPS/DR may be off by a fraction of a
    # percent (docs/routing.md, "Off-policy evaluation"); here support is thin (the logger rarely picks
    # "frontier"), so the intervals are wide and must still hold the truth.
    stream = stationary().stream(2000, seed=22)
    rows = simulate_logs(stream, RouteBandit(random_state=22, floor=0.2))
    truth = true_value(stream, fixed("frontier"))
    result = evaluate("frontier", rows, confidence=LEVEL, random_state=0)
    assert result.ips.covers(truth) and result.dr.covers(truth), (result, truth)


def test_on_policy_evaluation_has_unit_weights_and_full_effective_sample_size():
    stream = stationary().stream(400, seed=3)
    rng = np.random.default_rng(0)
    rows = []
    for t in range(400):
        candidates = stream.candidates(t)
        route = candidates[int(rng.integers(len(candidates)))]
        rows.append({"context": stream.contexts[t], "candidates": candidates, "route": route,
                     "propensity": 1 / len(candidates), "reward": stream.outcome(t, route).reward})

    def uniform(context, routes):
        return {r: 1 / len(routes) for r in routes}

    result = evaluate(uniform, rows, random_state=0)
    assert result.effective_sample_size == pytest.approx(400)
    assert result.ips.value == pytest.approx(result.logged.value)
    assert result.snips.value == pytest.approx(result.logged.value)
    assert result.support == 1.0 and result.max_weight == pytest.approx(1.0)


def test_a_dataframe_with_json_columns_and_pending_rewards_gives_the_same_answer(logs):
    _, rows = logs
    subset = rows[:500]
    frame = pd.DataFrame([{**r, "context": json.dumps(r["context"]), "candidates": json.dumps(r["candidates"])}
                          for r in subset])
    pending = pd.DataFrame([{**subset[0], "context": json.dumps(subset[0]["context"]),
                             "candidates": json.dumps(subset[0]["candidates"]), "reward": math.nan}])
    from_frame = evaluate("coder", pd.concat([frame, pending], ignore_index=True), random_state=4)
    from_list = evaluate("coder", subset, random_state=4)
    assert from_frame.n == 500 and from_frame.n_without_reward == 1
    assert from_frame.dr == from_list.dr and from_frame.ips == from_list.ips
    table = from_frame.to_frame()
    assert list(table.index) == ["ips", "snips", "dr", "dm", "logged"]
    assert list(table.columns) == ["value", "ci_low", "ci_high"]
    assert table.attrs["n"] == 500
    assert "effective sample size" in str(from_frame)
    assert isinstance(from_frame, Evaluation)


def test_bad_logs_and_bad_policies_are_refused_with_what_to_fix(logs):
    _, rows = logs
    good = rows[:20]
    with pytest.raises(RoutingError, match="candidates"):
        evaluate("balanced", [dict(good[0], route="nope")] + good)
    with pytest.raises(RoutingError, match="propensity"):
        evaluate("balanced", [dict(good[0], propensity=0.0)] + good)
    with pytest.raises(RoutingError, match="non-candidate"):
        evaluate(lambda context, routes: {"elsewhere": 1.0}, good)
    with pytest.raises(RoutingError, match="sum to 1"):
        evaluate(lambda context, routes: {routes[0]: 0.5}, good)
    with pytest.raises(RoutingError, match="lacks column"):
        evaluate("balanced", pd.DataFrame({"context": [{}]}))
    with pytest.raises(RoutingError, match="no decision with a reward"):
        evaluate("balanced", [dict(good[0], reward=None)])
    with pytest.raises(RoutingError, match="policy must be"):
        evaluate(42, good)

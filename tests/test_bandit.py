"""RouteBandit: sklearn conventions, exact propensities, exploration, forgetting, persistence, reward."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
from collections import Counter

import numpy as np
import pytest
from sklearn.base import clone

from tidyllm.errors import ConfigurationError, RoutingError
from tidyllm.routing import Choice, RouteBandit, reward
from tidyllm.routing.environments import stationary
from tidyllm.routing.features import ContextFeaturizer, prompt_length_bucket

CTX = {"department": "risk", "use_case": "qa", "data_sensitivity": "internal", "model_group": "chat",
       "prompt_tokens": 812}
ROUTES = ["chat-a", "chat-b", "chat-c"]


def run_stream(bandit: RouteBandit, n: int, seed: int = 0) -> list[Choice]:
    """Drive ``bandit`` through ``n`` decisions of the stationary simulation; return its choices."""
    stream = stationary().stream(n, seed=seed)
    choices = []
    for t in range(n):
        choice = bandit.choose(stream.contexts[t], stream.candidates(t))
        bandit.partial_fit([stream.contexts[t]], [choice.route], [stream.outcome(t, choice.route).reward],
                           propensities=[choice.propensity])
        choices.append(choice)
    return choices


def learn_constant(bandit: RouteBandit, means: dict[str, float], n: int, context: dict = CTX, seed: int = 1) -> None:
    """Feed ``n`` bandit decisions with noisy rewards around fixed per-route ``means``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        choice = bandit.choose(context, list(means))
        value = float(np.clip(means[choice.route] + rng.normal(0, 0.05), 0, 1))
        bandit.partial_fit([context], [choice.route], [value], propensities=[choice.propensity])


# ---------------------------------------------------------------------------- sklearn conventions


def test_init_only_stores_params_and_clone_gives_an_unfitted_copy():
    bandit = RouteBandit(random_state=3, floor=0.05, department_caps={"risk": 0.1})
    assert bandit.get_params()["floor"] == 0.05
    assert not [k for k in vars(bandit) if k.endswith("_") or k.startswith("_")]
    run_stream(bandit, 50)
    assert bandit.n_updates_ == 50
    copy = clone(bandit)
    assert copy.get_params() == bandit.get_params()
    assert copy.n_updates_ == 0 and copy.routes_ == ()
    assert copy.set_params(optimism=0.3) is copy and copy.optimism == 0.3


def test_invalid_params_raise_configuration_errors_naming_the_parameter():
    with pytest.raises(ConfigurationError, match="discount"):
        RouteBandit(discount=0.0).choose(CTX, ROUTES)
    with pytest.raises(ConfigurationError, match="below floor"):
        RouteBandit(floor=0.1, exploration_cap=0.05).choose(CTX, ROUTES)
    with pytest.raises(ConfigurationError, match="random_state"):
        RouteBandit(random_state="seven").choose(CTX, ROUTES)
    fitted = RouteBandit(random_state=0)
    fitted.choose(CTX, ROUTES)
    with pytest.raises(ConfigurationError, match="gamma_scale"):
        fitted.set_params(gamma_scale=-1)
    with pytest.raises(RoutingError, match="clone"):
        fitted.set_params(gamma_scale=5, n_features=128)


def test_same_random_state_same_decisions_and_different_seed_differs():
    first = run_stream(RouteBandit(random_state=7), 300)
    second = run_stream(RouteBandit(random_state=7), 300)
    other = run_stream(RouteBandit(random_state=8), 300)
    assert [(c.route, c.propensity) for c in first] == [(c.route, c.propensity) for c in second]
    assert [c.route for c in first] != [c.route for c in other]


def test_pickle_round_trip_keeps_learning():
    bandit = RouteBandit(random_state=0)
    run_stream(bandit, 40)
    loaded = pickle.loads(pickle.dumps(bandit))
    assert loaded.predict_proba(CTX, ROUTES) == bandit.predict_proba(CTX, ROUTES)
    assert loaded.choose(CTX, ROUTES) == bandit.choose(CTX, ROUTES)


def test_concurrent_decisions_and_updates_are_safe():
    # the Router decides on the event loop while LiteLLM's callback threads report rewards
    bandit = RouteBandit(random_state=0)
    errors = []

    def work(seed: int) -> None:
        try:
            learn_constant(bandit, {"chat-a": 0.7, "chat-b": 0.5}, 100, seed=seed)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and bandit.n_updates_ == 400


# ---------------------------------------------------------------------------- decisions and propensities


def test_only_candidates_are_chosen_and_probabilities_are_valid():
    rng = np.random.default_rng(0)
    universe = [f"route-{i}" for i in range(8)]
    bandit = RouteBandit(random_state=0, floor=0.04)
    for step in range(400):
        candidates = list(rng.choice(universe, size=rng.integers(1, 9), replace=False))
        choice = bandit.choose({**CTX, "use_case": f"uc{step % 3}"}, candidates)
        assert choice.route in candidates
        assert set(choice.probabilities) == set(candidates)
        probs = np.array(list(choice.probabilities.values()))
        assert abs(probs.sum() - 1) < 1e-9
        assert probs.min() >= 0.04 / len(candidates) - 1e-12
        assert choice.propensity == choice.probabilities[choice.route]
        assert choice.explored == (choice.route != choice.greedy)
        bandit.partial_fit([CTX], [choice.route], [float(rng.random())])


def test_propensities_match_empirical_frequencies():
    bandit = RouteBandit(random_state=0)
    learn_constant(bandit, {"chat-a": 0.8, "chat-b": 0.7, "chat-c": 0.4}, 60)
    expected = bandit.predict_proba(CTX, ROUTES)
    n = 10_000
    counts = Counter(bandit.choose(CTX, ROUTES).route for _ in range(n))
    for route, p in expected.items():
        sd = np.sqrt(p * (1 - p) / n)
        assert abs(counts[route] / n - p) < 5 * sd, (route, counts[route] / n, p)


def test_logged_propensity_is_exact_under_a_binding_department_cap():
    # The cap changes the distribution from draw to draw; if each logged propensity is the probability
    # actually used, E[1{route = r} / propensity] = 1 for every route r (the IPS identity).
    bandit = RouteBandit(random_state=0, floor=0.15, exploration_cap=0.15, optimism=0.5)
    learn_constant(bandit, {"chat-a": 0.8, "chat-b": 0.78, "chat-c": 0.75}, 30)
    uncapped = bandit.predict_proba(CTX, ROUTES)  # no learning below: this stays the uncapped distribution
    greedy = bandit.choose(CTX, ROUTES).greedy
    assert 1 - uncapped[greedy] > 0.3  # left alone, the bandit would explore far more than the cap allows
    n = 20_000
    totals, counts = Counter(), Counter()
    for _ in range(n):
        choice = bandit.choose(CTX, ROUTES)
        totals[choice.route] += 1 / choice.propensity
        counts[choice.route] += 1
    assert bandit.exploration_share("risk") <= 0.16
    for route in ROUTES:
        assert abs(totals[route] / n - 1) < 0.08, (route, totals[route] / n)
    # the identity has power: logging the uncapped probabilities instead would be far off
    assert counts[greedy] / n / uncapped[greedy] > 1.2


def test_department_cap_limits_exploring_share_per_department():
    bandit = RouteBandit(random_state=0, floor=0.02, exploration_cap=None, department_caps={"risk": 0.03})
    stream = stationary().stream(1500, seed=2)
    explored = Counter()
    seen = Counter()
    for t in range(1500):
        context = stream.contexts[t]
        choice = bandit.choose(context, stream.candidates(t))
        bandit.partial_fit([context], [choice.route], [stream.outcome(t, choice.route).reward])
        seen[context["department"]] += 1
        explored[context["department"]] += choice.explored
    assert explored["risk"] / seen["risk"] <= 0.045
    assert explored["marketing"] / seen["marketing"] > 0.06  # uncapped departments explore more


# ---------------------------------------------------------------------------- exploration and forgetting


def test_a_new_route_gets_explored_and_adopted_when_better():
    bandit = RouteBandit(random_state=0)
    learn_constant(bandit, {"chat-a": 0.6, "chat-b": 0.5}, 400)
    picks = []
    rng = np.random.default_rng(5)
    means = {"chat-a": 0.6, "chat-b": 0.5, "chat-new": 0.8}
    for _ in range(60):
        choice = bandit.choose(CTX, list(means))
        picks.append(choice.route)
        bandit.partial_fit([CTX], [choice.route], [float(np.clip(means[choice.route] + rng.normal(0, 0.05), 0, 1))])
    assert picks[:10].count("chat-new") >= 1  # tried right away (optimism about the unknown)
    assert picks[-20:].count("chat-new") >= 15  # and preferred once it proved better
    assert next(iter(bandit.preferences(CTX, list(means)))) == "chat-new"


def test_a_route_that_starts_failing_is_abandoned_within_a_bounded_number_of_decisions():
    bandit = RouteBandit(random_state=0)
    learn_constant(bandit, {"chat-a": 0.85, "chat-b": 0.7, "chat-c": 0.6}, 1500)
    assert bandit.preferences(CTX, ROUTES)["chat-a"] > 0.8
    decisions = 0
    while bandit.predict_proba(CTX, ROUTES)["chat-a"] > 0.1:
        choice = bandit.choose(CTX, ROUTES)
        value = 0.0 if choice.route == "chat-a" else {"chat-b": 0.7, "chat-c": 0.6}[choice.route]
        bandit.partial_fit([CTX], [choice.route], [value])
        decisions += 1
        assert decisions <= 40, "a failing route must be abandoned within 40 decisions"
    assert next(iter(bandit.preferences(CTX, ROUTES))) == "chat-b"


def test_forgetting_brings_an_abandoned_route_back_into_consideration():
    bandit = RouteBandit(random_state=0, discount=0.99)
    learn_constant(bandit, {"chat-a": 0.1, "chat-b": 0.6}, 200)
    before = bandit.predict_proba(CTX, ["chat-a", "chat-b"])["chat-a"]
    other = {**CTX, "department": "marketing"}  # time passes: rewards elsewhere advance the clock
    learn_constant(bandit, {"chat-a": 0.1, "chat-b": 0.6}, 400, context=other)
    after = bandit.predict_proba(CTX, ["chat-a", "chat-b"])["chat-a"]
    assert after > before


def test_learns_close_to_the_oracle_on_the_stationary_simulation():
    n = 1500
    stream = stationary().stream(n, seed=4)
    bandit = RouteBandit(random_state=0)
    earned = oracle = 0.0
    for t in range(n):
        choice = bandit.choose(stream.contexts[t], stream.candidates(t))
        bandit.partial_fit([stream.contexts[t]], [choice.route], [stream.outcome(t, choice.route).reward])
        if t >= n // 2:
            earned += stream.expected(t, choice.route)
            oracle += stream.expected(t, stream.oracle(t))
    assert earned / oracle > 0.96


# ---------------------------------------------------------------------------- persistence


def test_state_round_trips_through_json_exactly():
    bandit = RouteBandit(random_state=11)
    run_stream(bandit, 200)
    state = json.loads(json.dumps(bandit.get_state()))
    restored = RouteBandit(random_state=999).set_state(state)
    assert restored.n_updates_ == 200 and restored.routes_ == bandit.routes_
    stream = stationary().stream(30, seed=9)
    for t in range(30):
        assert restored.preferences(stream.contexts[t], stream.candidates(t)) == bandit.preferences(
            stream.contexts[t], stream.candidates(t))
        a, b = bandit.choose(stream.contexts[t], stream.candidates(t)), restored.choose(
            stream.contexts[t], stream.candidates(t))
        assert a == b  # the random stream continues where it left off
    assert restored.exploration_share("risk") == bandit.exploration_share("risk")


def test_state_from_another_structure_or_damaged_is_refused():
    state = RouteBandit(random_state=0).partial_fit([CTX], ["chat-a"], [0.5]).get_state()
    with pytest.raises(RoutingError, match="n_features"):
        RouteBandit(n_features=32).set_state(state)
    broken = dict(state, routes={"chat-a": {"A": "AAAA", "b": "", "t_ref": 1, "n": 1}})
    with pytest.raises(RoutingError, match="damaged"):
        RouteBandit().set_state(broken)
    with pytest.raises(RoutingError, match="get_state"):
        RouteBandit().set_state({"routes": {}})


# ---------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("routes", [[], ["a", "a"], "chat-a", ["a", ""]])
def test_bad_candidate_sets_are_refused(routes):
    with pytest.raises(RoutingError):
        RouteBandit().choose(CTX, routes)


def test_bad_feedback_is_refused_and_changes_nothing():
    bandit = RouteBandit(random_state=0)
    with pytest.raises(RoutingError, match=r"\[0, 1\]"):
        bandit.partial_fit([CTX, CTX], ["a", "b"], [0.5, 1.5])
    with pytest.raises(RoutingError, match="as many"):
        bandit.partial_fit([CTX], ["a", "b"], [0.5, 0.5])
    with pytest.raises(RoutingError, match="propensities"):
        bandit.partial_fit([CTX], ["a"], [0.5], propensities=[0.0])
    with pytest.raises(RoutingError, match="prompt_tokens"):
        bandit.partial_fit([CTX, {"prompt_tokens": -3}], ["a", "a"], [0.5, 0.5])
    assert bandit.n_updates_ == 0


def test_importance_weighting_uses_the_propensities():
    plain = RouteBandit(random_state=0).partial_fit([CTX] * 2, ["a", "a"], [1.0, 0.0], propensities=[0.1, 1.0])
    weighted = RouteBandit(random_state=0, max_importance_weight=20).partial_fit(
        [CTX] * 2, ["a", "a"], [1.0, 0.0], propensities=[0.1, 1.0])
    assert weighted.preferences(CTX, ["a"])["a"] > plain.preferences(CTX, ["a"])["a"] + 0.2


# ---------------------------------------------------------------------------- features


def test_features_cover_known_keys_buckets_crosses_and_extras():
    featurizer = ContextFeaturizer()
    named = featurizer.feature_dict({**CTX, "region": "eu", "streaming": True, "budget_usd": 3.0, "tag": None})
    assert named["department=risk"] == 1 and named["prompt_len=256-1k"] == 1
    assert named["department=risk&use_case=qa"] == 1
    assert named["region=eu"] == 1 and named["streaming=True"] == 1
    assert named["budget_usd"] == pytest.approx(np.log1p(3.0))
    assert "tag" not in str(named)
    idx, val = featurizer.transform_one(CTX)
    assert idx[0] == 0 and val[0] == 1.0 and idx.max() < 64
    assert featurizer.transform_one(dict(CTX)) is featurizer.transform_one(CTX)  # memoised
    with pytest.raises(RoutingError, match="list"):
        featurizer.feature_dict({"tags": ["a"]})
    assert [prompt_length_bucket(n) for n in (10, 300, 5000, 99999)] == ["0-256", "256-1k", "4k-16k", ">=16k"]


# ---------------------------------------------------------------------------- reward


def test_reward_combines_quality_cost_latency_and_zeroes_failures():
    base = reward(quality=0.9, cost_usd=0.002, latency_s=1.2)
    assert 0 < base < 1
    assert reward(quality=0.9, cost_usd=0.02, latency_s=1.2) < base
    assert reward(quality=0.9, cost_usd=0.002, latency_s=5.0) < base
    assert reward(quality=1.0, cost_usd=0.0, latency_s=0.0) == 1.0
    assert reward(quality=None, cost_usd=0.0001, latency_s=0.01, failed=True) == 0.0
    quality_only = reward(quality=0.7, cost_usd=5.0, latency_s=60, weights={"quality": 1.0})
    assert quality_only == pytest.approx(0.7)
    assert reward(quality=0.5, cost_usd=0.01, weights={"quality": 0, "cost": 1}, cost_scale=0.01) == 0.5
    with pytest.raises(ConfigurationError, match="unknown"):
        reward(quality=0.5, weights={"speed": 1})
    with pytest.raises(RoutingError, match="quality"):
        reward(quality=1.2)
    with pytest.raises(RoutingError, match="quality"):
        reward(quality=None)


def test_importing_routing_does_not_import_litellm():
    code = "import sys, tidyllm.routing; assert 'litellm' not in sys.modules, 'litellm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

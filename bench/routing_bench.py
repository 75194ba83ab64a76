"""Benchmark of the learning router (``tidyllm.routing.RouteBandit``) on simulated routing environments.

Every policy runs on the very same pre-drawn streams (``tidyllm.routing.environments``: stationary,
gradual drift, outage with recovery; 5 routes, 3 departments × 3 use cases) and is scored by the
environment, so differences come from the decisions alone:

- ``oracle``: the authorised route with the highest expected reward for each decision (knows the simulation);
- ``random``: uniform among the authorised routes;
- ``fixed:<route>``: always that route where authorised, else uniform (the best one is reported);
- ``bandit``: ``RouteBandit(random_state=seed)`` with default parameters;
- ``vw``: Vowpal Wabbit ``--cb_explore_adf --squarecb`` with the same context features, crossed with the
  route (``-q CA``), if ``vowpalwabbit`` is installed (benchmark-only dependency);
- ``litellm:<strategy>``: LiteLLM's built-in routing strategies, through a real ``litellm.Router`` whose
  deployments are served by tidyllm's provider simulator (latencies scaled down; outages mirrored).

Judge-only (issue #18): the learner and VW learn only what production tells them — failures, and on 20 %,
5 % or 0 % of the answered calls a judge's score (true quality + N(0, 0.15) + 0.1 on one route, the route
that is second best most often) — and are scored on the true reward, as a share of the oracle's.

Also: a RouteLLM-style cost–quality table (share of calls to the most expensive route, quality relative
to always using it, cost saved), and ``choose``/``partial_fit`` latency with 8 routes.

Run::

    PYTHONPATH=. .venv/bin/python bench/routing_bench.py --out bench/results/routing.json

It prints tables and writes all numbers as JSON. These are simulations, not provider measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The bandit's per-call linear algebra is tiny; BLAS threads only fight over the two cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tidyllm.routing import RouteBandit, reward  # noqa: E402
from tidyllm.routing.environments import ENVIRONMENTS, Stream  # noqa: E402
from tidyllm.routing.features import ContextFeaturizer  # noqa: E402

MOST_EXPENSIVE = "frontier"


# ---------------------------------------------------------------------------- policies


class Policy(ABC):
    """A routing policy: ``decide`` picks among candidates, ``learn`` sees the reward."""

    name = "policy"

    @abstractmethod
    def decide(self, t: int, context: dict[str, Any], candidates: list[str]) -> tuple[str, float]:
        """The chosen route and the probability it was chosen with."""

    def learn(self, t: int, context: dict[str, Any], route: str, value: float, propensity: float) -> None:
        """Policies that do not learn ignore feedback."""


class Oracle(Policy):
    name = "oracle"

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def decide(self, t, context, candidates):
        return self.stream.oracle(t), 1.0


class Uniform(Policy):
    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def decide(self, t, context, candidates):
        return candidates[int(self.rng.integers(len(candidates)))], 1.0 / len(candidates)


class Fixed(Uniform):
    def __init__(self, route: str, seed: int) -> None:
        super().__init__(seed)
        self.route = route
        self.name = f"fixed:{route}"

    def decide(self, t, context, candidates):
        if self.route in candidates:
            return self.route, 1.0
        return super().decide(t, context, candidates)


class Bandit(Policy):
    name = "bandit"

    def __init__(self, seed: int, **params: Any) -> None:
        self.bandit = RouteBandit(random_state=seed, **params)

    def decide(self, t, context, candidates):
        choice = self.bandit.choose(context, candidates)
        return choice.route, choice.propensity

    def learn(self, t, context, route, value, propensity):
        self.bandit.partial_fit([context], [route], [value], propensities=[propensity])


class VowpalWabbit(Policy):
    """VW's SquareCB over action-dependent features: shared context namespace C crossed with route namespace A."""

    name = "vw"

    def __init__(self, seed: int, extra_args: str = "") -> None:
        import vowpalwabbit

        self.vw = vowpalwabbit.Workspace(f"--cb_explore_adf --squarecb -q CA --quiet --random_seed {seed} "
                                         f"{extra_args}".strip())
        self.featurizer = ContextFeaturizer()  # the same named features the bandit sees
        self.rng = np.random.default_rng(seed)
        self.last: dict[str, Any] = {}

    def _shared(self, context: dict[str, Any]) -> str:
        parts = []
        for key, value in self.featurizer.feature_dict(context).items():
            token = key.replace(" ", "_").replace(":", ";").replace("|", "/")
            parts.append(token if value == 1.0 else f"{token}:{value:.6g}")
        return "shared |C " + " ".join(parts)

    def decide(self, t, context, candidates):
        shared = self._shared(context)
        example = [shared] + [f"|A route={r}" for r in candidates]
        pmf = np.asarray(self.vw.predict(example), dtype=float)
        pmf = pmf / pmf.sum()
        j = min(int(np.searchsorted(np.cumsum(pmf), self.rng.random(), side="right")), len(candidates) - 1)
        self.last = {"shared": shared, "candidates": candidates}
        return candidates[j], float(pmf[j])

    def learn(self, t, context, route, value, propensity):
        lines = [self.last["shared"]]
        for r in self.last["candidates"]:
            label = f"0:{-value:.6f}:{propensity:.6f} " if r == route else ""
            lines.append(f"{label}|A route={r}")
        self.vw.learn(lines)

    def close(self) -> None:
        self.vw.finish()


# ---------------------------------------------------------------------------- running


def run_policy(policy: Policy, stream: Stream, weights: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Run ``policy`` through ``stream``; ``weights`` optionally overrides per-department reward weights."""
    rewards, expected, costs, qualities, failures, expensive = [], [], [], [], 0, 0
    decide_s = 0.0
    for t in range(len(stream)):
        context, candidates = stream.contexts[t], stream.candidates(t)
        start = time.perf_counter()
        route, propensity = policy.decide(t, context, candidates)
        decide_s += time.perf_counter() - start
        assert route in candidates, (policy.name, route, candidates)
        outcome = stream.outcome(t, route)
        value = outcome.reward
        if weights is not None:
            value = reward(outcome.quality, outcome.cost_usd, outcome.latency_s, outcome.failed,
                           weights=weights[context["department"]], cost_scale=stream.env.cost_scale,
                           latency_scale=stream.env.latency_scale)
        policy.learn(t, context, route, value, propensity)
        rewards.append(value)
        expected.append(stream.expected(t, route))
        costs.append(outcome.cost_usd)
        qualities.append(outcome.quality)
        failures += outcome.failed
        expensive += route == MOST_EXPENSIVE
    n = len(stream)
    return {"policy": policy.name, "avg_reward": float(np.mean(rewards)),
            "avg_expected_reward": float(np.mean(expected)), "avg_cost_usd": float(np.mean(costs)),
            "avg_quality": float(np.mean(qualities)),
            "failure_rate": failures / n, "expensive_share": expensive / n, "decide_ms": 1000 * decide_s / n,
            "cumulative_reward": float(np.sum(rewards))}


#: the judge-only settings: (label, share of calls judged); a judge's score is the answer's quality plus
#: Gaussian noise (σ = JUDGE_SIGMA) plus JUDGE_BIAS on one route; failures are always seen (reward 0)
JUDGE_SETTINGS = (("judge 20%", 0.20), ("judge 5%", 0.05), ("no feedback", 0.0))
JUDGE_SIGMA = 0.15
JUDGE_BIAS = 0.10


def run_judged(policy: Policy, stream: Stream, rate: float, biased_route: str, seed: int,
               sigma: float = JUDGE_SIGMA, bias: float = JUDGE_BIAS) -> dict[str, Any]:
    """Run ``policy`` on ``stream`` learning only what production would tell it: a failure (reward 0, always
    known) and, on a ``rate`` sample of the answered calls, a noisy, biased judge's score in place of the
    true quality (cost and latency are known exactly). It is scored on the true reward, like every policy."""
    rng = np.random.default_rng(10_000 + seed)
    departments = {d.name: d for d in stream.env.departments}
    judged_u, noise = rng.random(len(stream)), rng.normal(0.0, sigma, len(stream))
    rewards, expected, learned = [], [], 0
    decide_s = 0.0
    for t in range(len(stream)):
        context, candidates = stream.contexts[t], stream.candidates(t)
        start = time.perf_counter()
        route, propensity = policy.decide(t, context, candidates)
        decide_s += time.perf_counter() - start
        outcome = stream.outcome(t, route)
        if outcome.failed:
            seen: float | None = 0.0
        elif judged_u[t] < rate:
            score = min(1.0, max(0.0, outcome.quality + noise[t] + (bias if route == biased_route else 0.0)))
            seen = reward(score, outcome.cost_usd, outcome.latency_s, weights=departments[context["department"]].weights, cost_scale=stream.env.cost_scale,
                latency_scale=stream.env.latency_scale)
        else:
            seen = None
        if seen is not None:
            policy.learn(t, context, route, seen, propensity)
            learned += 1
        rewards.append(outcome.reward)
        expected.append(stream.expected(t, route))
    n = len(stream)
    return {"policy": policy.name, "avg_reward": float(np.mean(rewards)),
            "avg_expected_reward": float(np.mean(expected)), "learned_share": learned / n,
            "decide_ms": 1000 * decide_s / n}


def judge_only(env_names: Sequence[str], n: int, seeds: int, have_vw: bool) -> dict[str, Any]:
    """The judge-only table: learner, VW and the best fixed route on the same streams, as % of the oracle."""
    out: dict[str, Any] = {}
    for env_name in env_names:
        env = ENVIRONMENTS[env_name]()
        # the judge favours the route that is second best most often (a bias that can mislead the learner)
        out[env_name] = {}
        for label, rate in JUDGE_SETTINGS:
            per: dict[str, list[float]] = {}
            biased_route = ""
            for seed in range(seeds):
                stream = env.stream(n, seed=seed)
                if not biased_route:
                    biased_route = _runner_up(stream)
                oracle = run_policy(Oracle(stream), stream)["avg_reward"]
                fixed = max(run_policy(Fixed(r, seed), stream)["avg_reward"] for r in env.route_names)
                per.setdefault("best fixed", []).append(fixed / oracle)
                policies: list[Policy] = [Bandit(seed)]
                if have_vw:
                    policies.append(VowpalWabbit(seed))
                for policy in policies:
                    result = run_judged(policy, stream, rate, biased_route, seed)
                    per.setdefault(policy.name, []).append(result["avg_reward"] / oracle)
                    per.setdefault(policy.name + ":learned", []).append(result["learned_share"])
                    if isinstance(policy, VowpalWabbit):
                        policy.close()
            out[env_name][label] = {"rate": rate, "biased_route": biased_route,
                                    **{k: float(np.mean(v)) for k, v in per.items()}}
    return out


def _runner_up(stream: Stream) -> str:
    """The route that is second best (by expected reward) most often on ``stream``."""
    counts: dict[str, int] = {}
    for t in range(0, len(stream), 5):
        ranked = sorted(stream.candidates(t), key=lambda r: -stream.expected(t, r))
        if len(ranked) > 1:
            counts[ranked[1]] = counts.get(ranked[1], 0) + 1
    return max(counts, key=counts.get)


class ThroughRouter(Policy):
    """One LiteLLM built-in strategy: each decision is a real ``Router.acompletion`` to the simulator.

    The route taken is the simulator model that received the request (``num_retries=0``, so exactly one).
    The scenario is mirrored in the simulator before each call: outages as 503s, and latency drift, so
    latency-based routing sees what the environment does. Prices in the deployments stay as configured.
    """

    def __init__(self, strategy: str, router: Any, sim: Any, loop: Any, stream: Stream) -> None:
        self.name = f"litellm:{strategy}"
        self.router, self.sim, self.loop, self.stream = router, sim, loop, stream

    def decide(self, t, context, candidates):
        from tidyllm.gateway.simulator import Latency

        sim = self.sim
        for p in self.stream.env.profiles_at(t / len(self.stream)):
            sim.set_outage(p.name, p.failure_rate >= 1.0)
            if sim.profiles[p.name].latency.base_ms != 1000 * p.latency_s:
                sim.profiles[p.name] = replace(sim.profiles[p.name],
                                               latency=Latency(base_ms=1000 * p.latency_s, jitter=0.3))
        group = "chat-confidential" if context["data_sensitivity"] == "confidential" else "chat"
        before = sim.stats()["hits"]
        error = None
        try:
            self.loop.run_until_complete(self.router.acompletion(
                model=group, messages=[{"role": "user", "content": "route me"}],
                metadata={"use_case": context["use_case"]}))
        except Exception as exc:  # noqa: BLE001 - a failed call is scored by the environment as failed
            error = exc
        after = sim.stats()["hits"]
        called = [m for m in after if after[m] != before.get(m, 0)]
        if len(called) != 1:
            raise RuntimeError(f"expected one simulator hit per decision, got {called} ({error!r})")
        return called[0], float("nan")


def litellm_policies(stream: Stream, seed: int, strategies: Sequence[str],
                     latency_scale: float) -> dict[str, dict[str, Any]]:
    """LiteLLM's built-in strategies through a real Router against the provider simulator.

    Calls go through ``Router.acompletion``: in LiteLLM 1.110 the sync ``Router.completion`` with
    ``cost-based-routing`` finds no deployment ("No deployments available"), the async path works.
    """
    import asyncio
    import logging

    from tidyllm._litellm import import_litellm
    from tidyllm.gateway.simulator import Latency, ModelProfile, OutputTokens, Simulator

    litellm = import_litellm()
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)  # per-deployment custom-pricing warnings
    env = stream.env
    profiles = {r.name: ModelProfile(name=r.name, latency=Latency(base_ms=1000 * r.latency_s, jitter=0.3),
                                     output_tokens=OutputTokens(min=4, max=8), error_rate=r.failure_rate,
                                     quality=dict(r.quality))
                for r in env.routes}
    results = {}
    for strategy in strategies:
        sim = Simulator(profiles, seed=seed, latency_scale=latency_scale).start()
        loop = asyncio.new_event_loop()
        try:
            model_list = []
            for group in ("chat", "chat-confidential"):
                allowed = env.candidates({"data_sensitivity": "confidential" if group != "chat" else "public"})
                model_list += [{"model_name": group,
                                "litellm_params": {"model": f"openai/{r.name}", "api_base": sim.url,
                                                   "api_key": "simulator", "max_retries": 0,
                                                   "input_cost_per_token": r.price_in / 1000,
                                                   "output_cost_per_token": r.price_out / 1000},
                                "model_info": {"id": f"{group}/{r.name}"}}
                               for r in env.routes if r.name in allowed]
            router = litellm.Router(model_list=model_list, routing_strategy=strategy, num_retries=0)
            results[f"litellm:{strategy}"] = run_policy(ThroughRouter(strategy, router, sim, loop, stream), stream)
        finally:
            # LiteLLM leaves a logging worker task on the loop; stop it before closing the loop
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
            sim.stop()
    return results


def latency_bench(n_routes: int = 8, warmup: int = 2000, calls: int = 5000) -> dict[str, float]:
    """``choose`` and ``partial_fit`` latency of a bandit that has learned on ``n_routes`` routes."""
    routes = [f"route-{i}" for i in range(n_routes)]
    rng = np.random.default_rng(0)
    departments, use_cases = ["risk", "marketing", "engineering", "legal"], ["qa", "summarise", "code", "extract"]
    contexts = [{"department": d, "use_case": u, "data_sensitivity": "internal", "model_group": "chat",
                 "prompt_tokens": int(rng.integers(100, 8000))} for d in departments for u in use_cases]
    bandit = RouteBandit(random_state=0)
    for i in range(warmup):
        context = contexts[i % len(contexts)]
        choice = bandit.choose(context, routes)
        bandit.partial_fit([context], [choice.route], [float(rng.random())], propensities=[choice.propensity])
    choose_times, fit_times = [], []
    for i in range(calls):
        context = contexts[int(rng.integers(len(contexts)))]
        start = time.perf_counter()
        choice = bandit.choose(context, routes)
        middle = time.perf_counter()
        if i % 5 == 0:
            bandit.partial_fit([context], [choice.route], [float(rng.random())])
            fit_times.append(time.perf_counter() - middle)
        choose_times.append(middle - start)
    ms = lambda xs, q: float(np.quantile(xs, q) * 1000)  # noqa: E731
    return {"routes": n_routes, "choose_p50_ms": ms(choose_times, 0.5), "choose_p90_ms": ms(choose_times, 0.9),
            "choose_p99_ms": ms(choose_times, 0.99), "partial_fit_p50_ms": ms(fit_times, 0.5)}


def cost_quality(stream: Stream, seed: int) -> list[dict[str, Any]]:
    """RouteLLM-style: the bandit under quality weights from low to high vs always the most expensive route."""
    always = run_policy(Fixed(MOST_EXPENSIVE, seed), stream)
    rows = [{"policy": f"always {MOST_EXPENSIVE}", "quality_weight": None, "expensive_share": always["expensive_share"],
             "quality_vs_expensive": 1.0, "cost_saved": 0.0, "avg_reward": always["avg_reward"]}]
    for w_quality in (0.5, 0.7, 0.85, 0.9, 0.95, 0.98):
        rest = 1.0 - w_quality
        weights = {"quality": w_quality, "cost": rest * 0.7, "latency": rest * 0.3}
        result = run_policy(Bandit(seed), stream, weights={d.name: weights for d in stream.env.departments})
        rows.append({"policy": "bandit", "quality_weight": w_quality, "expensive_share": result["expensive_share"],
                     "quality_vs_expensive": result["avg_quality"] / always["avg_quality"],
                     "cost_saved": 1.0 - result["avg_cost_usd"] / always["avg_cost_usd"],
                     "avg_reward": result["avg_reward"]})
    return rows


# ---------------------------------------------------------------------------- reporting


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and sd) over seeds of each metric."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], float | int) and not isinstance(runs[0][k], bool)]
    out: dict[str, Any] = {"policy": runs[0]["policy"], "seeds": len(runs)}
    for k in keys:
        values = [r[k] for r in runs]
        out[k] = float(np.mean(values))
        if len(values) > 1:
            out[k + "_sd"] = float(statistics.stdev(values))
    return out


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> None:
    print(f"\n{title}")
    widths = [max(len(header), *(len(fmt(r.get(key))) for r in rows)) for key, header, fmt in columns]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths))))
    for r in rows:
        print("  ".join(fmt(r.get(k)).ljust(w) if i == 0 else fmt(r.get(k)).rjust(w)
                        for i, ((k, _, fmt), w) in enumerate(zip(columns, widths))))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="decisions per stream (default 2000)")
    parser.add_argument("--seeds", type=int, default=5, help="streams per environment (default 5)")
    parser.add_argument("--litellm-seeds", type=int, default=1,
                        help="streams per environment for the LiteLLM Router runs (slow: real HTTP calls)")
    parser.add_argument("--latency-scale", type=float, default=0.002,
                        help="simulator latency multiplier for the LiteLLM runs (default 0.002)")
    parser.add_argument("--environments", default=",".join(ENVIRONMENTS))
    parser.add_argument("--no-vw", action="store_true", help="skip Vowpal Wabbit")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM Router strategies")
    parser.add_argument("--no-judge", action="store_true", help="skip the judge-only settings")
    parser.add_argument("--only-judge", action="store_true", help="run only the judge-only settings")
    parser.add_argument("--out", default="bench/results/routing.json", help="where to write the JSON results")
    args = parser.parse_args(argv)

    have_vw = not args.no_vw
    if have_vw:
        try:
            import vowpalwabbit  # noqa: F401
        except ImportError:
            print("vowpalwabbit is not installed: skipping Vowpal Wabbit (pip install vowpalwabbit==9.11.9)")
            have_vw = False
    strategies = ["simple-shuffle", "least-busy", "usage-based-routing-v2", "latency-based-routing",
                  "cost-based-routing"]
    started = time.time()
    report: dict[str, Any] = {"n": args.n, "seeds": args.seeds, "litellm_seeds": 0 if args.no_litellm else
                              args.litellm_seeds, "python": platform.python_version(), "environments": {}}
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    money = lambda v: "" if v is None else f"{1000 * v:.3f}"  # noqa: E731
    text = lambda v: "" if v is None else str(v)  # noqa: E731
    for env_name in [] if args.only_judge else args.environments.split(","):
        env = ENVIRONMENTS[env_name]()
        per_policy: dict[str, list[dict[str, Any]]] = {}
        for seed in range(args.seeds):
            stream = env.stream(args.n, seed=seed)
            policies: list[Policy] = [Oracle(stream), Uniform(seed), Bandit(seed)]
            policies += [Fixed(r, seed) for r in env.route_names]
            if have_vw:
                policies.append(VowpalWabbit(seed))
            for policy in policies:
                result = run_policy(policy, stream)
                result["seed"] = seed
                per_policy.setdefault(policy.name, []).append(result)
                if isinstance(policy, VowpalWabbit):
                    policy.close()
            if not args.no_litellm and seed < args.litellm_seeds:
                for name, result in litellm_policies(stream, seed, strategies, args.latency_scale).items():
                    result["seed"] = seed
                    per_policy.setdefault(name, []).append(result)
        # ratios to the oracle on the same seeds
        oracle_by_seed = {r["seed"]: r for r in per_policy["oracle"]}
        for runs in per_policy.values():
            for r in runs:
                o = oracle_by_seed[r["seed"]]
                r["vs_oracle"] = r["avg_reward"] / o["avg_reward"]
                r["vs_oracle_expected"] = r["avg_expected_reward"] / o["avg_expected_reward"]
        summary = {name: summarise(runs) for name, runs in per_policy.items()}
        fixed = [s for name, s in summary.items() if name.startswith("fixed:")]
        best_fixed = max(fixed, key=lambda s: s["avg_reward"])
        rows = sorted(summary.values(), key=lambda s: -s["avg_reward"])
        report["environments"][env_name] = {"description": env.description, "policies": summary,
                                            "best_fixed": best_fixed["policy"], "runs": per_policy}
        print_table(f"== {env_name}: {env.description} ({args.n} decisions, mean over seeds; "
                    f"LiteLLM rows: {report['litellm_seeds']} seed(s))",
                    [dict(r, **{"policy": r["policy"] + (" (best fixed)" if r is best_fixed else "")}) for r in rows],
                    [("policy", "policy", text), ("seeds", "seeds", text), ("avg_reward", "reward", num),
                     ("vs_oracle", "% oracle", pct), ("avg_cost_usd", "cost m$/call", money),
                     ("avg_quality", "quality", num), ("failure_rate", "failed", pct),
                     ("expensive_share", f"{MOST_EXPENSIVE}", pct)])
    if "stationary" in args.environments.split(",") and not args.only_judge:
        stream = ENVIRONMENTS["stationary"]().stream(args.n, seed=0)
        rows = cost_quality(stream, 0)
        report["cost_quality"] = rows
        at95 = [r for r in rows if r["policy"] == "bandit" and r["quality_vs_expensive"] >= 0.95]
        report["cost_saved_at_95pct_quality"] = max((r["cost_saved"] for r in at95), default=None)
        print_table(f"== cost-quality (stationary, seed 0; RouteLLM style, vs always '{MOST_EXPENSIVE}')", rows,
                    [("policy", "policy", text), ("quality_weight", "quality weight", text),
                     ("expensive_share", f"calls to {MOST_EXPENSIVE}", pct),
                     ("quality_vs_expensive", "quality vs it", pct), ("cost_saved", "cost saved", pct),
                     ("avg_reward", "reward", num)])
        print(f"cost saved at >= 95% of {MOST_EXPENSIVE}'s quality: {pct(report['cost_saved_at_95pct_quality'])}")
    if not args.no_judge:
        judged = judge_only(args.environments.split(","), args.n, args.seeds, have_vw)
        report["judge_only"] = judged
        rows = []
        for env_name, settings in judged.items():
            for label, r in settings.items():
                rows.append({"setting": f"{env_name}, {label}", "bandit": r["bandit"], "vw": r.get("vw"),
                             "best_fixed": r["best fixed"], "learned": r["bandit:learned"],
                             "biased": r["biased_route"]})
        print_table(f"== judge-only: rewards only from failures and a judge (σ={JUDGE_SIGMA}, +{JUDGE_BIAS} towards "
                    f"one route) on a share of calls; % of the oracle's true reward, mean over {args.seeds} seeds",
                    rows, [("setting", "setting", text), ("bandit", "bandit", pct), ("vw", "vw", pct),
                           ("best_fixed", "best fixed", pct), ("learned", "calls learned", pct),
                           ("biased", "judge favours", text)])
    lat = latency_bench()
    report["latency"] = lat
    print(f"\n== latency with {lat['routes']} routes: choose p50 {lat['choose_p50_ms']:.3f} ms, "
          f"p90 {lat['choose_p90_ms']:.3f} ms, p99 {lat['choose_p99_ms']:.3f} ms; "
          f"partial_fit p50 {lat['partial_fit_p50_ms']:.3f} ms")
    report["elapsed_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out} ({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

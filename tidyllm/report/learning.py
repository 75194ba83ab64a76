"""Did the router learn? The demo's answer, from the simulation's ground truth.

In the provider simulator every route's expected quality per use case, price, answer length, latency and
error rate are known, so the expected reward of *every* route for *every* request can be computed, not just
the one taken. That gives, on the same requests:

- the learning router's value: the mean expected reward of the routes it answered with;
- each fixed route's value ("always this route where authorised, else what the router did"), the best one;
- the per-request difference router − best fixed route, with a 95 % normal interval;
- the learning curve: the router's value as a share of the oracle's (the best authorised route for each
  request), per tenth of the run;
- the outage route's share of the requests it could serve before, during and after its outage.

This is only possible in a simulation; with real providers use the doubly robust estimate of
:func:`tidyllm.routing.evaluate` on the logged, rewarded decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Request", "learning_summary"]


@dataclass(frozen=True)
class Request:
    """One answered request, as the evaluation needs it."""

    index: int
    department: str
    use_case: str
    prompt_tokens: int
    max_tokens: int
    route: str
    #: routes of the group this request was authorised to use
    allowed: tuple[str, ...]


def _expected_tokens(lo: int, hi: int, cap: int) -> float:
    """E[min(U{lo..hi}, cap)]."""
    values = range(lo, hi + 1)
    return sum(min(v, cap) for v in values) / len(values)


def learning_summary(requests: Sequence[Request], *, profiles: Mapping[str, Any], model_of: Mapping[str, str],
                     prices: Mapping[str, tuple[float, float]], weights_of: Callable[[str], Mapping[str, float]],
                     latency_scale: float, outage: Mapping[str, Any] | None = None,
                     warmup: float = 1 / 3) -> dict[str, Any]:
    """The learning figures (see the module docstring); ``warmup`` is the share of requests left out of the
    comparison with fixed routes (the router's first decisions explore by design)."""
    from tidyllm.routing.bandit import reward

    out_route = (outage or {}).get("route")
    out_from, out_to = (outage or {}).get("from", -1), (outage or {}).get("to", -1)

    def value(req: Request, route: str) -> float:
        if route == out_route and out_from <= req.index < out_to:
            return 0.0  # the route is down: every call to it fails
        p = profiles[model_of[route]]
        tokens = _expected_tokens(p.output_tokens.min, p.output_tokens.max, req.max_tokens)
        price_in, price_out = prices[route]
        cost = (req.prompt_tokens * price_in + tokens * price_out) / 1e6
        lat = p.latency
        latency_s = (lat.base_ms + lat.per_output_token_ms * tokens + lat.per_input_token_ms * req.prompt_tokens) \
            * latency_scale / 1000.0
        return (1.0 - p.error_rate) * reward(p.quality_for(req.use_case), cost, latency_s,
                                             weights=weights_of(req.department))

    ordered = sorted(requests, key=lambda r: r.index)
    if len(ordered) < 10:
        return {"note": "too few answered requests to evaluate the learning"}
    routes = sorted({r for req in ordered for r in req.allowed})
    chosen = [value(req, req.route) for req in ordered]
    oracle = [max(value(req, r) for r in req.allowed) for req in ordered]
    start = int(len(ordered) * warmup)
    tail = range(start, len(ordered))
    fixed = {}
    for route in routes:
        fixed[route] = [value(ordered[i], route) if route in ordered[i].allowed else chosen[i] for i in tail]
    router_tail = [chosen[i] for i in tail]
    best = max(fixed, key=lambda r: sum(fixed[r]))
    diff = [a - b for a, b in zip(router_tail, fixed[best])]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n else 0.0
    tenth = max(1, len(ordered) // 10)
    curve = []
    for k in range(0, len(ordered), tenth):
        part = range(k, min(k + tenth, len(ordered)))
        got, best_possible = sum(chosen[i] for i in part), sum(oracle[i] for i in part)
        curve.append(round(got / best_possible, 4) if best_possible > 0 else None)
    shares: dict[str, Any] = {}
    if out_route:
        for label, keep in (("before", lambda i: i < out_from), ("during", lambda i: out_from <= i < out_to),
                            ("after", lambda i: i >= out_to), ("last_tenth", lambda i: i >= len(ordered) - tenth)):
            able = [req for req in ordered if keep(req.index) and out_route in req.allowed]
            shares[label] = round(sum(req.route == out_route for req in able) / len(able), 4) if able else None
    return {
        "router_value": round(sum(router_tail) / n, 5),
        "best_fixed_route": best,
        "best_fixed_value": round(sum(fixed[best]) / n, 5),
        "fixed_values": {r: round(sum(v) / n, 5) for r, v in fixed.items()},
        "oracle_value": round(sum(oracle[i] for i in tail) / n, 5),
        "difference": round(mean, 5),
        "difference_ci": [round(mean - half, 5), round(mean + half, 5)],
        "compared_requests": n,
        "warmup_requests": start,
        "learning_curve": curve,
        "outage_route": out_route,
        "outage_route_share": shares,
    }

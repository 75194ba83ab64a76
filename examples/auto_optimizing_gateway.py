"""The seed's ``AutoOptimizingGateway``: TidyMart decides, the gateway governs, MLflow routes, TidyMart learns.

``smart_completion`` asks ``mart.get_optimal_config("gateway", request)`` (the learning router's
preference and its confidence), lets ``TidyLLMGateway.apply_governance`` pin the preferred endpoint
once the router is confident enough (before that the router keeps exploring the whole group),
sends the request through ``TidyLLMGateway.mlflow_completion`` (governed: authorisation, budget
reservation, audit) and learns from the result with ``mart.learn_from_execution``.
Requests that governance refuses (here: a department with no budget left) never reach a provider.

    python examples/auto_optimizing_gateway.py

Offline: without ``TIDYLLM_GATEWAY_URI`` it starts the provider simulator and a real MLflow gateway.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from _common import example_platform, use_case_body

import tidyllm

#: below this confidence the router explores instead of being pinned to its current favourite
PIN_CONFIDENCE = 0.35


class AutoOptimizingGateway:
    """Automatic optimisation and governance (the seed's class, on the real API)."""

    def __init__(self, platform: Any) -> None:
        self.mart = platform.mart
        self.gateway = tidyllm.TidyLLMGateway(mlflow_gateway_uri=platform.gateway.uri, config=platform.settings)

    def smart_completion(self, request: Mapping[str, Any]) -> dict[str, Any]:
        context = {k: request[k] for k in ("department", "use_case") if k in request} | {"model_group": "chat"}
        optimization = self.mart.get_optimal_config("gateway", context)
        confident = optimization["confidence"] >= PIN_CONFIDENCE
        governed_request = self.gateway.apply_governance(request, optimization if confident else None)
        response = self.gateway.mlflow_completion(governed_request)
        performance = self._measure_performance(response)
        self.mart.learn_from_execution({"module": "gateway", "operation": "smart_completion",
                                        "call_id": response["call_id"], "route": response["route"],
                                        "performance_score": performance["quality"],
                                        "optimization": {"preferred_route": optimization["parameters"].get(
                                            "preferred_route"), "confidence": optimization["confidence"],
                                            "pinned": confident}})
        return {**response, "pinned": confident, "performance": performance}

    @staticmethod
    def _measure_performance(response: Mapping[str, Any]) -> dict[str, Any]:
        """Quality of the answer (the simulator's score; an evaluator's in production), cost and latency."""
        return {"quality": float(response["response"].usage.tidyllm_sim_quality), "cost_usd": response["cost_usd"],
                "latency_ms": response["latency_ms"]}


#: a campaign brief (about 300 words): marketing's requests are long, and its budget is small
BRIEF = " ".join(["Our spring campaign targets small businesses that export to Europe and need faster payments."] * 20)


def main(requests: int = 30) -> None:
    with example_platform("auto_optimizing_gateway") as platform:
        gateway = AutoOptimizingGateway(platform)
        platform.budgets.set("department", "marketing", 0.0005)  # a small budget, to show refusals
        routes: Counter[tuple[bool, str]] = Counter()
        refused = 0
        for i in range(requests):
            department, use_case = [("research", "code"), ("marketing", "summarise")][i % 2]
            notes = BRIEF if department == "marketing" else "def parse(s): ..."
            request = {"model": "chat", "user_id": "ivy" if department == "research" else "fay",
                       "department": department, "use_case": use_case, "audit_reason": "weekly digest",
                       "max_tokens": 200,
                       "messages": [{"role": "user", "content": f"Request {i}: {use_case} these notes.\n{notes}"}]}
            try:
                out = gateway.smart_completion(request | {"extra_body": use_case_body(use_case)})
            except tidyllm.GovernanceError as exc:  # budget or authorisation: no provider saw the request
                refused += 1
                if refused == 1:
                    print(f"request {i} ({department}) refused before reaching a provider: "
                          f"{str(exc).splitlines()[0]}")
                continue
            routes[(out["pinned"], f"{department}/{use_case} -> {out['route']}")] += 1
        print(f"\n{requests} requests, {refused} refused by governance; routes while exploring and once pinned:")
        for (pinned, label), n in sorted(routes.items()):
            print(f"  {'pinned   ' if pinned else 'exploring'} {label:<40} {n:>3}")
        for department, use_case in [("research", "code"), ("marketing", "summarise")]:
            best = platform.mart.get_optimal_config("gateway", {"department": department, "use_case": use_case,
                                                                "model_group": "chat"})
            print(f"optimal for {department}/{use_case}: {best['parameters']['preferred_route']} "
                  f"(confidence {best['confidence']:.2f}, {best['samples']} updates)")
        print(platform.budgets.status(scope="department")[["name", "limit_usd", "spent_usd", "remaining_usd"]]
              .to_string(index=False))
        print(platform.audit.verify())


if __name__ == "__main__":
    main()

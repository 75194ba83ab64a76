"""The seed's ``MLFlowRouteOptimizer``: TidyMart learns which MLflow route serves each context best.

``get_optimal_route`` asks ``mart.get_optimal_config("gateway", context)`` — answered by the learning
router's bandit — and ``update_route_performance`` feeds a score back with
``mart.learn_from_execution``, joined to the routing decision by call id. The first rounds let the
router explore the ``chat`` group; afterwards each context's preferred route is printed with its
confidence, next to the mean quality each route actually delivered for it.

    python examples/mlflow_route_optimizer.py

Offline: without ``TIDYLLM_GATEWAY_URI`` it starts the provider simulator and a real MLflow gateway.
"""

from __future__ import annotations

from typing import Any, Mapping

from _common import example_platform, use_case_body

import tidyllm


class MLFlowRouteOptimizer:
    """Optimal MLflow route per request context, learned in TidyMart (the seed's class, on the real API)."""

    def __init__(self, platform: Any, default_route: str = "chat") -> None:
        self.mart = platform.mart
        self.default_route = default_route

    def get_optimal_route(self, request_context: Mapping[str, Any]) -> str:
        """The route the learning router currently prefers for this context (the group before any data)."""
        optimal = self.mart.get_optimal_config("gateway", {"model_group": "chat", **request_context})
        return optimal["parameters"].get("preferred_route", self.default_route)

    def update_route_performance(self, route: str, performance_data: Mapping[str, Any]) -> str:
        """Feed one call's outcome back; ``performance_data`` carries ``call_id`` and ``quality``."""
        return self.mart.learn_from_execution({
            "module": "gateway", "operation": "mlflow_route", "route": route,
            "call_id": performance_data["call_id"],
            "performance_score": self._calculate_performance_score(performance_data), **performance_data})

    @staticmethod
    def _calculate_performance_score(performance_data: Mapping[str, Any]) -> float:
        """The quality of the answer in [0, 1] (here the simulator's score; an evaluator's in production).
        The router combines it with the call's cost and latency into its reward."""
        return float(performance_data["quality"])


CONTEXTS = [
    {"department": "research", "use_case": "code", "user_id": "hal", "audit_reason": "prototype code"},
    {"department": "finance", "use_case": "extraction", "user_id": "dev", "audit_reason": "quarterly close"},
    {"department": "risk", "use_case": "qa", "user_id": "ana", "audit_reason": "MVR peer review"},
]
PROMPT = {"code": "Write a function that parses ISO 8601 dates and test it.",
          "extraction": "Extract every amount and currency from: paid 1,200 EUR and 300 USD on 3 March.",
          "qa": "Which committee approves changes to the credit risk model?"}


def main(rounds: int = 10) -> None:
    with example_platform("mlflow_route_optimizer") as platform:
        optimizer = MLFlowRouteOptimizer(platform)
        router = platform.router()
        before = {c["use_case"]: optimizer.get_optimal_route(c)
                  for c in CONTEXTS}
        quality: dict[tuple[str, str], list[float]] = {}
        for i in range(rounds):
            for context in CONTEXTS:
                metadata = {**context, "tidyllm_call_id": f"opt-{i}-{context['use_case']}"}
                try:
                    response = router.completion(model="chat", max_tokens=150, metadata=metadata,
                                                 messages=[{"role": "user", "content": PROMPT[context["use_case"]]}],
                                                 extra_body=use_case_body(context["use_case"]))
                except tidyllm.GovernanceError as exc:
                    print(f"refused: {exc}")
                    continue
                # the row of the attempt that answered (a retry is recorded as <call id>#<n>) names its route
                row = platform.wait_for_call(metadata["tidyllm_call_id"], last_attempt=True)
                score = float(response.usage.tidyllm_sim_quality)
                quality.setdefault((context["use_case"], row["route"]), []).append(score)
                optimizer.update_route_performance(row["route"], {"call_id": row["id"], "quality": score})
        print(f"\n{rounds * len(CONTEXTS)} requests through the learning router; preferred route per context:")
        print("context               before        after         confidence  mean quality seen per route")
        for context in CONTEXTS:
            best = platform.mart.get_optimal_config("gateway", {"model_group": "chat", **context})
            seen = ", ".join(f"{route} {sum(q) / len(q):.2f} (n={len(q)})"
                             for (uc, route), q in sorted(quality.items()) if uc == context["use_case"])
            label = f"{context['department']}/{context['use_case']}"
            print(f"{label:<21} {before[context['use_case']]:<13} {best['parameters']['preferred_route']:<13} "
                  f"{best['confidence']:<11.2f} {seen}")
        outcomes = platform.mart.outcomes(module="gateway")
        print(f"\nlearned outcomes stored: {len(outcomes)}; routing decisions logged: "
              f"{len(platform.mart.frame('routing_decisions'))}")


if __name__ == "__main__":
    main()

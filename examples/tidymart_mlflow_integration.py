"""The seed's ``TidyMartMLFlowIntegration``: every gateway request tracked in TidyMart.

Each request runs inside ``mart.track_execution("gateway", "mlflow_query", ...)``: TidyMart is asked
for the optimal configuration of the context (the learning router answers for the ``gateway``
module), the request goes through the governed Router to the MLflow AI Gateway endpoint, and the
tokens, exact cost and latency are recorded as a step, with the result.

    python examples/tidymart_mlflow_integration.py

Offline: without ``TIDYLLM_GATEWAY_URI`` it starts the provider simulator and a real MLflow gateway.
"""

from __future__ import annotations

from typing import Any, Mapping

from _common import example_platform, use_case_body

import tidyllm


class TidyMartMLFlowIntegration:
    """Track MLflow gateway requests in TidyMart (the seed's class, on the real API)."""

    def __init__(self, platform: Any) -> None:
        self.platform = platform
        self.mart = platform.mart
        self.router = platform.router()  # governed litellm.Router over the gateway's endpoints

    def track_mlflow_request(self, route: str, request_data: Mapping[str, Any],
                             user_context: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``request_data`` to gateway ``route`` (an endpoint or a model group such as ``chat``)."""
        context = {"route": route, "model": request_data.get("model", route),
                   "user_id": user_context.get("user_id"), "department": user_context.get("department")}
        with self.mart.track_execution("gateway", "mlflow_query", context) as tracker:
            optimal = self.mart.get_optimal_config("gateway", {
                "model_group": route, "department": user_context.get("department"),
                "use_case": user_context.get("use_case")})
            tracker.record_step("configuration_optimized", {
                "preferred_route": optimal["parameters"].get("preferred_route"),
                "confidence": optimal["confidence"], "source": optimal["source"]})
            metadata = {**user_context, "tidyllm_call_id": f"{tracker.execution_id}-call"}
            response = self.router.completion(
                model=route, messages=list(request_data["messages"]), max_tokens=request_data.get("max_tokens", 200),
                metadata=metadata, extra_body=use_case_body(user_context.get("use_case", "qa")))
            # the attempt that answered (a retry is recorded as <call id>#<n>): its exact cost is settled by
            # LiteLLM's success callback a moment after the call returns
            row = self.platform.wait_for_call(metadata["tidyllm_call_id"], last_attempt=True)
            call_id = row["id"]
            step = {"route_used": row["route"], "tokens_used": response.usage.total_tokens,
                    "cost_usd": row["cost_usd"], "latency_ms": row["latency_ms"]}
            tracker.record_step("mlflow_execution", step)
            tracker.record_result({"call_id": call_id, **step})
            return {"execution_id": tracker.execution_id, "call_id": call_id, **step,
                    "content": response.choices[0].message.content}


def main() -> None:
    requests = [
        ({"user_id": "ana", "department": "risk", "audit_reason": "MVR peer review", "use_case": "qa"},
         "Which controls cover model drift in the credit scoring model?"),
        ({"user_id": "dev", "department": "finance", "audit_reason": "variance analysis", "use_case": "analysis"},
         "Explain the variance between Q2 forecast and actuals for interest income."),
        ({"user_id": "hal", "department": "research", "audit_reason": "literature review", "use_case": "summarise"},
         "Summarise the attached paper on conformal prediction in five bullet points."),
        ({"user_id": "ana", "department": "risk", "audit_reason": "MVR peer review", "use_case": "qa",
          "data_sensitivity": "confidential"},
         "Does the confidential validation report flag any limitation of the PD model?"),
    ]
    with example_platform("tidymart_mlflow_integration") as platform:
        integration = TidyMartMLFlowIntegration(platform)
        print("\nrequest                          route         tokens  cost_usd   latency_ms")
        for round_ in range(3):
            for context, question in requests:
                label = f"{context['department']}/{context['use_case']}" + (
                    " (confidential)" if context.get("data_sensitivity") else "")
                try:
                    out = integration.track_mlflow_request(
                        "chat", {"messages": [{"role": "user", "content": question}]}, context)
                except tidyllm.GovernanceError as exc:  # refused before any provider saw it; tracked as an error
                    print(f"{label:<32} refused: {exc}")
                    continue
                if round_ == 0:
                    print(f"{label:<32} {out['route_used']:<13} {out['tokens_used']:>6}  {out['cost_usd']:.6f}  "
                          f"{out['latency_ms']:>10.0f}")
        executions = platform.mart.executions(module="gateway")
        steps = platform.mart.steps()
        print(f"\ntracked executions: {len(executions)} (module 'gateway', operation 'mlflow_query'), "
              f"status {executions['status'].value_counts().to_dict()}")
        print(f"steps recorded: {steps['name'].value_counts().to_dict()}")
        answered = platform.calls(data_sensitivity="confidential", status="success")
        print(f"confidential requests answered on premises only: {sorted(set(answered['route']))}")
        print(f"spend by department: {platform.calls().groupby('department')['cost_usd'].sum().round(6).to_dict()}")
        print(platform.audit.verify())


if __name__ == "__main__":
    main()

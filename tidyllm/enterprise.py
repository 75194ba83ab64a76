"""The seed's ``TidyLLMGateway`` and ``EnterpriseConfig``, on the real platform.

``TidyLLMGateway(mlflow_gateway_uri=..., enterprise_config=EnterpriseConfig(require_audit=True))``
installs governance and sends each ``completion`` through the governed, learning Router over the
MLflow gateway's endpoints. It returns the dict the seed's workflows read: ``model``, ``route``,
``cost_usd``, ``usage``, ``call_id``, ``content`` and the LiteLLM ``response``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    from tidyllm.platform import Platform

__all__ = ["EnterpriseConfig", "TidyLLMGateway"]


@dataclass(frozen=True)
class EnterpriseConfig:
    """Enterprise controls of a :class:`TidyLLMGateway`.

    ``require_audit``: refuse calls without an audit reason. ``enable_cost_tracking``: wait for each
    call's exact cost before returning (otherwise ``cost_usd`` is None and the call returns at once).
    ``default_model``: the model group used when a request names none.
    """

    require_audit: bool = True
    enable_cost_tracking: bool = True
    default_model: str = "chat"


class TidyLLMGateway:
    """Governed LLM completions through the corporate MLflow gateway (the seed's gateway object)."""

    def __init__(self, mlflow_gateway_uri: str | None = None, enterprise_config: EnterpriseConfig | None = None, *,
                 config: Any = None, **overrides: Any) -> None:
        import tidyllm

        self.enterprise_config = enterprise_config or EnterpriseConfig()
        gov = dict(overrides.pop("governance", {}) or {})
        gov.setdefault("require_audit", self.enterprise_config.require_audit)
        if mlflow_gateway_uri is not None:
            overrides["gateway_uri"] = mlflow_gateway_uri
        self.platform: "Platform" = tidyllm.install(config, governance=gov, **overrides)

    def completion(self, model: str | None = None, messages: list[Mapping[str, Any]] | None = None, *,
                   user_id: str | None = None, department: str | None = None, audit_reason: str | None = None,
                   use_case: str | None = None, data_sensitivity: str | None = None,
                   route_optimization: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """One governed completion. ``route_optimization`` names an endpoint to use instead of letting the
        router choose within ``model``'s group (the seed's ``route_preference``)."""
        if not messages:
            raise ConfigurationError("completion() needs messages=[{'role': 'user', 'content': ...}]")
        call_id = str(uuid.uuid4())
        metadata = {k: v for k, v in {"user_id": user_id, "department": department, "audit_reason": audit_reason,
                                      "use_case": use_case, "data_sensitivity": data_sensitivity}.items() if v}
        metadata["tidyllm_call_id"] = call_id
        target = route_optimization or model or self.enterprise_config.default_model
        response = self.platform.router().completion(model=target, messages=list(messages), metadata=metadata,
                                                     **kwargs)
        return self._result(response, call_id)

    async def acompletion(self, model: str | None = None, messages: list[Mapping[str, Any]] | None = None,
                          **kwargs: Any) -> dict[str, Any]:
        """:meth:`completion` for async code."""
        import asyncio

        return await asyncio.to_thread(self.completion, model, messages, **kwargs)

    def _result(self, response: Any, call_id: str) -> dict[str, Any]:
        from tidyllm.litellm_bridge.records import answer_text, usage_of

        usage = usage_of(response)
        row: dict[str, Any] = {}
        if self.enterprise_config.enable_cost_tracking:
            # the attempt that answered: a Router retry is recorded as <call_id>#<n>
            row = self.platform.wait_for_call(call_id, last_attempt=True)
            call_id = row.get("id", call_id)
        content = answer_text(response) or None
        return {"model": getattr(response, "model", None), "route": row.get("route"), "cost_usd": row.get("cost_usd"),
                "usage": {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
                "latency_ms": row.get("latency_ms"), "call_id": call_id, "content": content, "response": response}

    # --- the seed's AutoOptimizingGateway vocabulary ------------------------------------------

    def apply_governance(self, request: Mapping[str, Any], optimization: Mapping[str, Any] | None = None) -> dict:
        """Merge an optimiser's suggestion (``get_optimal_config``) into a request, keeping the caller's context."""
        governed = dict(request)
        params = dict((optimization or {}).get("parameters") or {})
        if params.get("preferred_route") and not governed.get("route_optimization"):
            governed["route_optimization"] = params["preferred_route"]
        return governed

    def mlflow_completion(self, governed_request: Mapping[str, Any]) -> dict[str, Any]:
        """Run a request dict (keys as :meth:`completion`'s arguments) through the governed gateway."""
        request = dict(governed_request)
        allowed = {"model", "messages", "user_id", "department", "audit_reason", "use_case", "data_sensitivity",
                   "route_optimization", "max_tokens", "temperature", "extra_body", "tools", "tool_choice"}
        return self.completion(**{k: v for k, v in request.items() if k in allowed})

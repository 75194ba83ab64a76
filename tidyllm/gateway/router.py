"""Building the governed ``litellm.Router`` over the MLflow gateway's endpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tidyllm._litellm import import_litellm
from tidyllm.errors import ConfigurationError
from tidyllm.gateway.client import embeddings_api_base

if TYPE_CHECKING:
    from tidyllm.platform import Platform

__all__ = ["build_router", "model_list"]

#: the OpenAI client needs a key; both MLflow gateways ignore it (they hold the provider secrets)
_PLACEHOLDER_KEY = "mlflow-gateway-holds-the-provider-key"


def model_list(platform: "Platform") -> list[dict[str, Any]]:
    """One deployment per endpoint under its model group, plus one under the endpoint's own name."""
    handle = platform.gateway
    if handle.config is None:
        raise ConfigurationError("no gateway routes configured: set gateway_config (TIDYLLM_GATEWAY_CONFIG) to "
                                 "your gateway.yaml")
    if handle.api_base is None:
        raise ConfigurationError("no gateway_uri configured: start the gateway with `tidyllm gateway start "
                                 "--config gateway.yaml` and set gateway_uri (TIDYLLM_GATEWAY_URI)")
    headers = handle.auth_headers()
    deployments = []
    for route in handle.config.routes:
        price = platform.prices.lookup(route.name)
        embedding = "embeddings" in route.endpoint_type
        # the tracking server serves embeddings on its OpenAI passthrough, not under /gateway/mlflow/v1
        base = embeddings_api_base(handle.uri, handle.mode) if embedding else handle.api_base
        params: dict[str, Any] = {"model": f"openai/{route.name}", "api_base": base, "api_key": _PLACEHOLDER_KEY}
        if price is not None:
            # LiteLLM would otherwise cost an MLflow endpoint name at $0 silently
            params["input_cost_per_token"] = price.input_per_1m / 1e6
            params["output_cost_per_token"] = price.output_per_1m / 1e6
            # explicit (zero) cache prices stop LiteLLM warning once per endpoint that it has none
            params["cache_creation_input_token_cost"] = 0.0
            params["cache_read_input_token_cost"] = 0.0
        if headers:
            params["extra_headers"] = dict(headers)
        info = {"tidyllm_route": route.name, "mode": "embedding" if embedding else "chat"}
        group = route.group or route.name
        deployments.append({"model_name": group, "litellm_params": dict(params),
                            "model_info": {**info, "id": route.name}})
        if group != route.name:
            deployments.append({"model_name": route.name, "litellm_params": dict(params),
                                "model_info": {**info, "id": f"{route.name}@direct"}})
    return deployments


def _connect_server(platform: "Platform") -> None:
    """Check the tracking server's credential once, and link calls to the traces it records.

    A missing or wrong credential would otherwise surface on the first call as LiteLLM's
    ``AuthenticationError`` from deep inside the Router; here it is a :class:`~tidyllm.GatewayError`
    naming ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``. The password is only
    passed to the HTTP client, never logged."""
    from tidyllm.gateway.client import list_endpoints, resolve_auth
    from tidyllm.gateway.traces import TraceLookup

    # settings already fall back to MLFLOW_TRACKING_USERNAME / _PASSWORD; half a credential is an error
    auth = resolve_auth(platform.settings.mlflow_username, platform.settings.mlflow_password, environ={})
    uri = str(platform.gateway.uri)  # model_list() already refused a platform without one
    list_endpoints(uri, mode="server", auth=auth)
    if platform.governor.trace_lookup is None:
        platform.governor.trace_lookup = TraceLookup(uri, auth)


def build_router(platform: "Platform", **router_kwargs: Any) -> Any:
    """A ``litellm.Router`` over the gateway endpoints with tidyllm's governed strategy registered.

    For a tracking-server gateway it first checks the MLflow credential (a clear
    :class:`~tidyllm.GatewayError` when it is missing or wrong) and turns on trace links."""
    litellm = import_litellm()
    options: dict[str, Any] = {"num_retries": 2, "allowed_fails": 3, "cooldown_time": 5, "timeout": 60}
    options.update(router_kwargs)
    deployments = model_list(platform)
    if platform.gateway.mode == "server":
        _connect_server(platform)
    router = litellm.Router(model_list=deployments, **options)
    names = {r.name for r in platform.gateway.config.routes} if platform.gateway.config else set()
    return platform.govern(router, gateway_routes=names)

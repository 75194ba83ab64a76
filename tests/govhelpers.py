"""Helpers shared by the governance tests: a governed Router straight at the provider simulator."""

from __future__ import annotations

from typing import Any

ROUTES = {"ep-small": ("sim-gpt-small", 1.0, 2.0), "ep-large": ("sim-gpt-large", 10.0, 30.0)}
META = {"user_id": "ana", "department": "risk", "audit_reason": "MVR peer review", "use_case": "qa"}
#: the audit rows of calls (administrative changes, such as setting a budget, are audited too)
CALL_ROWS = ["allowed", "refused", "unenforced"]


def sim_router(platform: Any, sim_url: str, routes: dict[str, tuple[str, float, float]] | None = None,
               **router_kwargs: Any) -> Any:
    """A governed litellm.Router whose deployments call the simulator directly (group ``chat``)."""
    import litellm

    routes = routes or ROUTES
    for name, (_, price_in, price_out) in routes.items():
        platform.prices.set(name, price_in, price_out)
    model_list = [{"model_name": "chat",
                   "litellm_params": {"model": f"openai/{model}", "api_base": sim_url, "api_key": "sk-test-not-real"},
                   "model_info": {"id": name}} for name, (model, _, _) in routes.items()]
    options = {"num_retries": 0}
    options.update(router_kwargs)
    return platform.govern(litellm.Router(model_list=model_list, **options))

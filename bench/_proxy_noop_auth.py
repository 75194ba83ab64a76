"""A ``custom_auth`` that accepts every request without looking anything up: the baseline proxy of
bench/proxy_bench.py that authenticates the way `tidyllm proxy` does (custom auth, no LiteLLM key checks)
but does no work of its own. Never use it in a real proxy."""

from __future__ import annotations

from typing import Any


async def accept_all(request: Any, api_key: str) -> Any:
    """Every request is the same anonymous caller."""
    from litellm.proxy._types import UserAPIKeyAuth

    return UserAPIKeyAuth(api_key="bench-baseline")

"""What an OpenAI SDK sees when tidyllm refuses a call through the proxy: HTTP status, error type, one line.

| refusal | HTTP | ``error.type`` |
|---|---|---|
| :class:`~tidyllm.errors.BudgetExceededError` | 429 | ``insufficient_quota`` |
| :class:`~tidyllm.errors.RateLimitedError` | 429 (``Retry-After``) | ``rate_limit_exceeded`` |
| :class:`~tidyllm.errors.RouteNotAuthorizedError`, unpriced model under a budget, an identity claim that contradicts the key | 403 | ``permission_denied`` |
| :class:`~tidyllm.errors.MetadataError` (missing or malformed caller context) | 400 | ``invalid_request_error`` |
| a missing, unknown, revoked or expired key | 401 | ``auth_error`` (LiteLLM's type for a refused key) |

``error.message`` is tidyllm's own one-line message; ``error.code`` is the HTTP status as a string
(the LiteLLM proxy's convention); the ``x-tidyllm-rule`` header carries the rule that refused.
"""

from __future__ import annotations

from typing import Any

from tidyllm.errors import GovernanceError

__all__ = ["find_refusal", "http_error", "IDENTITY_RULE", "KeyRefusedError"]

#: ``rule`` of a refusal for a declared identity that contradicts the key's (mapped to 403)
IDENTITY_RULE = "proxy_identity"


class KeyRefusedError(GovernanceError):
    """The proxy refused a request's API key (missing, unknown, revoked or expired): HTTP 401.

    A governance refusal like the others, so LiteLLM's failure event for it is not recorded as an
    unenforced call; its audit row is written by :meth:`tidyllm.proxy.keys.KeyStore.check`."""

    status_code = 401
    type = "auth_error"
    param = "api_key"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.rule = f"proxy_key:{reason}"


def find_refusal(exc: BaseException | None) -> Any:
    """The tidyllm governance refusal ``exc`` is or wraps (LiteLLM re-wraps exceptions), else None."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, GovernanceError):
            return current
        todo += [getattr(current, "original_exception", None), current.__cause__, current.__context__]
    return None


def http_error(refusal: Any) -> tuple[int, str, dict[str, str]]:
    """``(status, error type, headers)`` an OpenAI-compatible client gets for a governance refusal."""
    import math

    from tidyllm import errors

    rule = str(getattr(refusal, "rule", "") or "")
    headers = {"x-tidyllm-rule": rule} if rule else {}
    if isinstance(refusal, KeyRefusedError):
        return 401, "auth_error", headers
    if isinstance(refusal, errors.BudgetExceededError):
        return 429, "insufficient_quota", headers
    if isinstance(refusal, errors.RateLimitedError):
        retry = getattr(refusal, "retry_after", 0.0) or 0.0
        return 429, "rate_limit_exceeded", {**headers, "retry-after": str(max(1, math.ceil(retry)))}
    if isinstance(refusal, errors.MetadataError) and not rule.startswith(IDENTITY_RULE):
        return 400, "invalid_request_error", headers
    return 403, "permission_denied", headers

"""The governance refusals that carry LiteLLM's no-retry contract (``litellm.BudgetExceededError``).

Defined here, at module level, because they subclass a LiteLLM class; users import them from
:mod:`tidyllm.errors` (or ``tidyllm``), whose names they carry (``__module__``), so they pickle
across processes (a ``ProcessPoolExecutor`` worker's refusal reaches its parent intact).
"""

from __future__ import annotations

from typing import Any

from tidyllm._litellm import import_litellm
from tidyllm.errors import GovernanceError

__all__ = ["BudgetExceededError", "RouteNotAuthorizedError", "RateLimitedError", "MetadataError",
           "UnpricedModelError"]

_base = import_litellm().BudgetExceededError


class _Refusal(GovernanceError, _base):  # type: ignore[misc, valid-type]
    """What every refusal shares: LiteLLM's contract, tidyllm's one-line message, and pickling by
    keyword arguments (LiteLLM's ``__init__`` takes no positional message)."""

    rule = "governance"
    #: the HTTP status and OpenAI error type a server (the LiteLLM proxy) answers this refusal with
    http_status = 403
    openai_type = "permission_denied"
    #: the keyword attributes an instance is rebuilt from when unpickled
    _fields: tuple[str, ...] = ()

    def __init__(self, message: str, *, current_cost: float = 0.0, max_budget: float = 0.0) -> None:
        _base.__init__(self, current_cost=current_cost, max_budget=max_budget, message=message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {f: getattr(self, f) for f in self._fields}
        return _rebuild, (type(self), self.message, kwargs)


def _rebuild(cls: type, message: str, kwargs: dict[str, Any]) -> Exception:
    return cls(message, **kwargs)


class BudgetExceededError(_Refusal):
    """A call's worst-case cost does not fit in an enclosing budget.

    Attributes ``scope``, ``name``, ``spent_usd``, ``reserved_usd``, ``limit_usd`` and
    LiteLLM's ``current_cost`` / ``max_budget`` describe the tightest budget.
    """

    rule = "budget"
    http_status, openai_type = 429, "insufficient_quota"
    _fields = ("scope", "name", "spent_usd", "reserved_usd", "limit_usd", "rule")

    def __init__(self, message: str, *, scope: str = "", name: str = "", spent_usd: float = 0.0,
                 reserved_usd: float = 0.0, limit_usd: float = 0.0, rule: str = "budget") -> None:
        super().__init__(message, current_cost=spent_usd + reserved_usd, max_budget=limit_usd)
        self.scope, self.name, self.rule = scope, name, rule
        self.spent_usd, self.reserved_usd, self.limit_usd = spent_usd, reserved_usd, limit_usd


class RouteNotAuthorizedError(_Refusal):
    """The caller's department or data-sensitivity class may not use the requested route."""

    rule = "authorization"
    _fields = ("rule",)

    def __init__(self, message: str, *, rule: str = "authorization") -> None:
        super().__init__(message)
        self.rule = rule


class RateLimitedError(_Refusal):
    """A requests- or tokens-per-minute limit is reached; retry after ``retry_after`` seconds."""

    rule = "rate_limit"
    http_status, openai_type = 429, "rate_limit_exceeded"
    _fields = ("retry_after", "rule")

    def __init__(self, message: str, *, retry_after: float = 0.0, rule: str = "rate_limit") -> None:
        super().__init__(message)
        self.retry_after, self.rule = retry_after, rule


class MetadataError(_Refusal, ValueError):
    """The caller context (``metadata=``) is missing a required key or has a wrong value."""

    rule = "metadata"
    http_status, openai_type = 400, "invalid_request_error"
    _fields = ("rule",)

    def __init__(self, message: str, *, rule: str = "metadata") -> None:
        super().__init__(message)
        self.rule = rule


class UnpricedModelError(_Refusal):
    """A call under a budget names a model tidyllm has no price for, and policy is to fail closed."""

    rule = "unpriced"
    http_status, openai_type = 403, "permission_denied"


for _cls in (BudgetExceededError, RouteNotAuthorizedError, RateLimitedError, MetadataError, UnpricedModelError):
    _cls.__module__ = "tidyllm.errors"
del _cls

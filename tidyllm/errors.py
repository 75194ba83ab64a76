"""The one exception tree of tidyllm.

Every error tidyllm raises is a :class:`TidyLLMError`; its message says what to do next.
This module imports only the standard library. The governance refusals, which LiteLLM
must not retry also carry LiteLLM's own contract; those classes are built on first use (they
need ``litellm``, which takes seconds to import), so ``import tidyllm.errors`` stays cheap::

    TidyLLMError
    ├── ConfigurationError          bad settings file, bad argument, bad gateway config
    │   └── GatewayConfigError      a gateway YAML that does not validate (file, route, field)
    ├── StorageError                the mart cannot be opened, written or read
    │   └── SchemaVersionError      the database schema is older/newer than this code
    ├── GovernanceError             a governed call was refused before reaching a provider
    │   ├── MetadataError           *also* no-retry; caller context missing or malformed (no audit reason…)
    │   ├── UnpricedModelError      *also* no-retry; a budgeted call to a model with no price (fail closed)
    │   ├── BudgetExceededError     *also* ``litellm.BudgetExceededError`` (not retried by LiteLLM)
    │   ├── RouteNotAuthorizedError *also* ``litellm.BudgetExceededError``'s no-retry contract
    │   └── RateLimitedError        *also* no-retry; carries ``retry_after`` seconds
    ├── AdministrationError         a change to budgets, rules, prices… was refused (not an admin, no reason)
    ├── InsufficientHistoryError    too little call history to forecast load
    ├── GatewayError                an MLflow gateway cannot be started, reached or provisioned
    └── RoutingError                the router has no candidate, or the bandit got bad input
"""

from __future__ import annotations

__all__ = [
    "TidyLLMError",
    "ConfigurationError",
    "GatewayConfigError",
    "StorageError",
    "SchemaVersionError",
    "GovernanceError",
    "MetadataError",  # noqa: F822 - built on first use (see __getattr__)
    "UnpricedModelError",  # noqa: F822 - built on first use (see __getattr__)
    "BudgetExceededError",  # noqa: F822 - built on first use (see __getattr__)
    "RouteNotAuthorizedError",  # noqa: F822 - built on first use (see __getattr__)
    "RateLimitedError",  # noqa: F822 - built on first use (see __getattr__)
    "GatewayError",
    "RoutingError",
    "InsufficientHistoryError",
    "AdministrationError",
]


class TidyLLMError(Exception):
    """Base class of every error tidyllm raises."""


class ConfigurationError(TidyLLMError, ValueError):
    """A setting, argument or configuration file is invalid; the message names what to fix."""


class GatewayConfigError(ConfigurationError):
    """A gateway configuration file does not validate; the message names file, route and field."""


class AdministrationError(TidyLLMError, PermissionError):
    """A change to budgets, rules, prices, rate limits or settings was refused (the caller is not one of
    ``governance.admins``, or gave no reason while ``require_audit`` is on); the refusal is audited."""


class StorageError(TidyLLMError):
    """The mart database cannot be opened, written or read."""


class SchemaVersionError(StorageError):
    """The database was made by an older or newer tidyllm schema than this code."""


class GovernanceError(TidyLLMError):
    """A governed LLM call was refused before any provider was contacted."""

    #: machine-readable rule or reason, also written to the audit row
    rule: str = "governance"


class InsufficientHistoryError(TidyLLMError):
    """The mart holds too little call history to fit and evaluate a forecast."""


class GatewayError(TidyLLMError):
    """An MLflow gateway could not be started, reached or provisioned."""


class RoutingError(TidyLLMError):
    """The router could not choose a route (no candidate), or the bandit got invalid input."""


# --- the refusals that must carry LiteLLM's no-retry contract -----------------------------
#
# LiteLLM's Router retries and falls back on ordinary exceptions (6 attempts with
# num_retries=2), but not on ``litellm.BudgetExceededError``. A refusal is final, so these
# classes subclass it. Building them needs litellm, so they are created on first access.

_LAZY = ("BudgetExceededError", "RouteNotAuthorizedError", "RateLimitedError", "MetadataError",
         "UnpricedModelError")
_built: dict[str, type] = {}


def _build() -> None:
    from tidyllm._litellm import import_litellm

    litellm = import_litellm()
    base = litellm.BudgetExceededError

    class BudgetExceededError(GovernanceError, base):  # type: ignore[misc, valid-type]
        """A call's worst-case cost does not fit in an enclosing budget.

        Attributes ``scope``, ``name``, ``spent_usd``, ``reserved_usd``, ``limit_usd`` and
        LiteLLM's ``current_cost`` / ``max_budget`` describe the tightest budget.
        """

        rule = "budget"

        def __init__(self, message: str, *, scope: str = "", name: str = "", spent_usd: float = 0.0,
                     reserved_usd: float = 0.0, limit_usd: float = 0.0) -> None:
            base.__init__(self, current_cost=spent_usd + reserved_usd, max_budget=limit_usd, message=message)
            self.message = message
            self.scope, self.name = scope, name
            self.spent_usd, self.reserved_usd, self.limit_usd = spent_usd, reserved_usd, limit_usd

        def __str__(self) -> str:
            return self.message

    class RouteNotAuthorizedError(GovernanceError, base):  # type: ignore[misc, valid-type]
        """The caller's department or data-sensitivity class may not use the requested route."""

        rule = "authorization"

        def __init__(self, message: str, *, rule: str = "authorization") -> None:
            base.__init__(self, current_cost=0.0, max_budget=0.0, message=message)
            self.message, self.rule = message, rule

        def __str__(self) -> str:
            return self.message

    class RateLimitedError(GovernanceError, base):  # type: ignore[misc, valid-type]
        """A requests- or tokens-per-minute limit is reached; retry after ``retry_after`` seconds."""

        rule = "rate_limit"

        def __init__(self, message: str, *, retry_after: float = 0.0, rule: str = "rate_limit") -> None:
            base.__init__(self, current_cost=0.0, max_budget=0.0, message=message)
            self.message, self.retry_after, self.rule = message, retry_after, rule

        def __str__(self) -> str:
            return self.message

    class MetadataError(GovernanceError, ValueError, base):  # type: ignore[misc, valid-type]
        """The caller context (``metadata=``) is missing a required key or has a wrong value."""

        rule = "metadata"

        def __init__(self, message: str) -> None:
            base.__init__(self, current_cost=0.0, max_budget=0.0, message=message)
            self.message = message

        def __str__(self) -> str:
            return self.message

    class UnpricedModelError(GovernanceError, base):  # type: ignore[misc, valid-type]
        """A call under a budget names a model tidyllm has no price for, and policy is to fail closed."""

        rule = "unpriced"

        def __init__(self, message: str) -> None:
            base.__init__(self, current_cost=0.0, max_budget=0.0, message=message)
            self.message = message

        def __str__(self) -> str:
            return self.message

    for cls in (BudgetExceededError, RouteNotAuthorizedError, RateLimitedError, MetadataError, UnpricedModelError):
        cls.__module__ = __name__
        _built[cls.__name__] = cls
        # module attributes from now on: later imports find them without calling __getattr__
        globals()[cls.__name__] = cls


def __getattr__(name: str) -> type:
    if name in _LAZY:
        if not _built:
            _build()
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

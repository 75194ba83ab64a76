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
    ├── TokenError                  a caller token is malformed, tampered, expired or another platform's
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
    "TokenError",
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


class TokenError(TidyLLMError):
    """A signed caller token cannot be accepted; ``kind`` is malformed, wrong-platform, tampered or expired."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
# classes subclass it. They are defined at module level in :mod:`tidyllm.litellm_bridge.errors`
# (which imports litellm, slowly) and become attributes of this module on first access; their
# ``__module__`` is this one, so they pickle and unpickle by these names.

_LAZY = ("BudgetExceededError", "RouteNotAuthorizedError", "RateLimitedError", "MetadataError",
         "UnpricedModelError")


def __getattr__(name: str) -> type:
    if name in _LAZY:
        from tidyllm.litellm_bridge import errors as bridged

        for lazy in _LAZY:
            # module attributes from now on: later lookups do not come through here
            globals()[lazy] = getattr(bridged, lazy)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

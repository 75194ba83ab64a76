"""tidyllm: governed, audited, self-optimising LLM calls over LiteLLM and MLflow AI Gateway.

``import tidyllm`` is cheap and changes nothing global: LiteLLM, pandas, SQLAlchemy,
scikit-learn, MLflow and IPython load on first use of the names below.

>>> import tidyllm
>>> platform = tidyllm.install("tidyllm.yaml")      # doctest: +SKIP
>>> mart = tidyllm.get_tidymart()                     # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "install": "tidyllm.platform",
    "uninstall": "tidyllm.platform",
    "Platform": "tidyllm.platform",
    "TidyLLMGateway": "tidyllm.enterprise",
    "EnterpriseConfig": "tidyllm.enterprise",
    "TidyMart": "tidyllm.mart",
    "get_tidymart": "tidyllm.mart",
    "Settings": "tidyllm.settings",
    "load_settings": "tidyllm.settings",
    "TidyLLMError": "tidyllm.errors",
    "ConfigurationError": "tidyllm.errors",
    "GatewayConfigError": "tidyllm.errors",
    "StorageError": "tidyllm.errors",
    "SchemaVersionError": "tidyllm.errors",
    "GovernanceError": "tidyllm.errors",
    "MetadataError": "tidyllm.errors",
    "UnpricedModelError": "tidyllm.errors",
    "BudgetExceededError": "tidyllm.errors",
    "RouteNotAuthorizedError": "tidyllm.errors",
    "RateLimitedError": "tidyllm.errors",
    "GatewayError": "tidyllm.errors",
    "RoutingError": "tidyllm.errors",
}

__all__ = sorted([*_EXPORTS, "__version__", "load_ipython_extension", "unload_ipython_extension"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tidyllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext tidyllm``: register the ``%%llm`` family of magics."""
    from tidyllm.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext tidyllm``."""
    from tidyllm.magics import unload_ipython_extension as unload

    unload(ipython)

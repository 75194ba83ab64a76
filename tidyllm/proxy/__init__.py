"""The LiteLLM proxy as a tidyllm deployment: ``tidyllm proxy``, keys bound to identities, SDK-shaped refusals.

``tidyllm proxy`` runs LiteLLM's own proxy server with a config tidyllm generates
(:func:`~tidyllm.proxy.config.proxy_config`): a ``model_list`` of every gateway route and group,
tidyllm's callbacks (:mod:`tidyllm.proxy.runtime`) and tidyllm's key check as LiteLLM's
``custom_auth``. Keys live hashed in the mart (:class:`~tidyllm.proxy.keys.KeyStore`,
``tidyllm keys``). See docs/operations.md.

Importing this package does nothing; :mod:`tidyllm.proxy.runtime` (which the proxy imports by name)
installs the platform. ``tidyllm.proxy.proxy_handler_instance``, the name older configs list under
``litellm_settings.callbacks``, still resolves to it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["proxy_handler_instance"]  # noqa: F822 - resolved on first access (see __getattr__)


def __getattr__(name: str) -> Any:
    if name == "proxy_handler_instance":
        from tidyllm.proxy import runtime

        return runtime.proxy_handler_instance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

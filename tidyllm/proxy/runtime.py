"""What a LiteLLM proxy imports by name from its config (this module acts at import).

``litellm_settings.callbacks: [tidyllm.proxy.runtime.proxy_handler_instance]`` and
``general_settings.custom_auth: tidyllm.proxy.runtime.user_api_key_auth``. Importing it installs a
platform from ``tidyllm.yaml`` / ``TIDYLLM_*`` (or ``$TIDYLLM_CONFIG``), which registers the
governance callbacks with LiteLLM, and builds the proxy hooks over it. ``TIDYLLM_PROXY_KEY_CACHE_SECONDS``
(default 5) is how long an accepted key is trusted before the mart is read again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import tidyllm
from tidyllm.errors import ConfigurationError
from tidyllm.proxy.hooks import ProxyGovernance, RefusalLogFilter
from tidyllm.proxy.keys import KeyStore

__all__ = ["platform", "proxy_handler_instance", "user_api_key_auth"]


def _cache_seconds() -> float:
    raw = os.environ.get("TIDYLLM_PROXY_KEY_CACHE_SECONDS", "5")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"TIDYLLM_PROXY_KEY_CACHE_SECONDS must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ConfigurationError(f"TIDYLLM_PROXY_KEY_CACHE_SECONDS must be ≥ 0, got {raw!r}")
    return value


platform = tidyllm.install()
#: the hooks the proxy config lists under ``litellm_settings.callbacks``
proxy_handler_instance = ProxyGovernance(platform, KeyStore(platform.mart, platform.audit,
                                                            cache_seconds=_cache_seconds()))
# tidyllm's own lines (one per refusal) go to stderr as they are, whatever handlers LiteLLM or MLflow add
_handler = logging.StreamHandler()
_handler.setFormatter(logging.Formatter("%(message)s"))
_proxy_log = logging.getLogger("tidyllm.proxy")
_proxy_log.addHandler(_handler)
_proxy_log.setLevel(logging.INFO)
_proxy_log.propagate = False
_filter = RefusalLogFilter()
for _name in ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router", "LiteLLM Proxy.stdout"):
    # first: LiteLLM's own filters format and truncate a record (dropping the exception in its arguments)
    logging.getLogger(_name).filters.insert(0, _filter)


async def user_api_key_auth(request: Any, api_key: str) -> Any:
    """The proxy's ``general_settings.custom_auth``: tidyllm's key check (see :class:`ProxyGovernance`)."""
    return await proxy_handler_instance.authenticate(request, api_key)

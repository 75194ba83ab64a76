"""tidyllm's callbacks for a LiteLLM **proxy**: ``litellm_settings: callbacks: tidyllm.proxy.proxy_handler_instance``.

Unlike the rest of tidyllm this module acts at import: the proxy imports it by name from its
``config.yaml`` and expects a ready callback object. It installs a platform from ``tidyllm.yaml`` /
``TIDYLLM_*`` (or ``$TIDYLLM_CONFIG``) and exposes its LiteLLM callbacks. In the proxy every request
is async, so ``async_pre_call_deployment_hook`` enforces budgets and authorisation before the
provider is called, and the success/failure callbacks settle and audit (see docs/operations.md).
"""

from __future__ import annotations

import tidyllm

platform = tidyllm.install()
#: the object a LiteLLM proxy config lists under ``litellm_settings.callbacks``
proxy_handler_instance = platform._callbacks

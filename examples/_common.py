"""What every example needs: a governed platform over an MLflow AI Gateway, offline by default.

Without configuration an example starts its own local stack — the provider **simulator** and a real
MLflow legacy gateway over it (:class:`tidyllm.stack.LocalStack`) — with the bundled example settings
(department budgets, authorisation rules, the learning router) and a fresh mart in a temporary folder.
Point it at a gateway you already run instead with ``TIDYLLM_GATEWAY_URI`` (and, for its routes file,
``TIDYLLM_GATEWAY_CONFIG``); ``TIDYLLM_DATABASE_URL`` picks the mart.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator

def use_case_body(use_case: str) -> dict[str, Any]:
    """``extra_body`` telling the provider simulator which use case to score the answer's quality for
    (MLflow's gateway forwards body fields, not headers); a real provider ignores it."""
    return {"metadata": {"use_case": use_case}}


@contextlib.contextmanager
def example_platform(name: str) -> Iterator[Any]:
    """A governed :class:`tidyllm.Platform` for the example ``name`` (see the module docstring)."""
    import tidyllm
    from tidyllm.stack import LocalStack, bundled_gateway_config, bundled_settings

    with tempfile.TemporaryDirectory(prefix=f"tidyllm-{name}-") as tmp:
        database_url = os.environ.get("TIDYLLM_DATABASE_URL") or f"sqlite:///{tmp}/{name}.db"
        if os.environ.get("TIDYLLM_GATEWAY_URI"):
            config = os.environ.get("TIDYLLM_GATEWAY_CONFIG") or str(bundled_gateway_config())
            platform = tidyllm.install(str(bundled_settings()), database_url=database_url, gateway_config=config)
            print(f"[{name}] using the MLflow gateway at {platform.gateway.uri}")
            try:
                yield platform
            finally:
                tidyllm.uninstall()
            return
        print(f"[{name}] starting the provider simulator and an MLflow AI Gateway (a few seconds) ...")
        with LocalStack(latency_scale=0.05, settings=str(bundled_settings()), database_url=database_url) as stack:
            print(f"[{name}] gateway ready at {stack.gateway.uri}")
            yield stack.platform

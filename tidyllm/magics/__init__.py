"""IPython magics: governed LLM calls in a notebook, and the budgets, routes and audit trail behind them.

``%load_ext tidyllm`` (or ``c.InteractiveShellApp.extensions = ["tidyllm"]``) installs the platform
(from ``c.LLMMagics.settings_file`` / ``tidyllm.yaml`` / ``TIDYLLM_*``), so every LiteLLM call in the
notebook is governed from the first cell — with the notebook's identity: ``%llm_config``'s user and
department, and the session user (``$JUPYTERHUB_USER``, else the OS account) — and registers:

- ``%%llm [options]`` — the cell is the prompt, sent through tidyllm's governed path (budgets,
  authorisation, audit, the learning router); the answer renders as markdown, text, code, json or
  html with a one-line receipt (route, tokens, cost, the tightest budget's remaining amount,
  latency) read back from the mart;
- ``%llm_config key=value ...`` — notebook defaults (user, department, reason, model, …);
- ``%llm_budget``, ``%llm_routes``, ``%llm_audit`` — inspection;
- ``%llm_feedback 👍|👎|0.7 [comment]`` — human feedback on the last ``%%llm`` answer (buttons under the answer
  where the front end shows widgets);
- ``%llm --help`` — all of it.

Errors a user can act on (over budget, not authorised, no audit reason, gateway down, unknown model,
bad option) are one line (IPython's ``UsageError``), never a traceback. The reference is
``docs/magics.md``.
"""

from __future__ import annotations

from typing import Any

from tidyllm.magics._magics import LLMMagics
from tidyllm.magics._render import LLMResult, Receipt

__all__ = ["LLMMagics", "LLMResult", "Receipt", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """Register :class:`LLMMagics` with ``ipython`` (configured from ``c.LLMMagics.*``) and the applications'
    magics (:mod:`tidyllm.magics._apps`: ``%mvr_review``, ``%ask``, ``%extract``, ``%summarise``, ``%rag``),
    and install the platform with the notebook's identity. A platform that cannot be installed is reported on
    one line (the magics stay, so ``%llm_config config=...`` can fix it); LiteLLM calls are not governed until
    it is."""
    import sys

    from IPython.core.error import UsageError

    from tidyllm.magics._apps import AppMagics

    magics = LLMMagics(shell=ipython)
    ipython.register_magics(magics)
    ipython.register_magics(AppMagics(shell=ipython))
    try:
        magics.platform()
    except UsageError as exc:
        print(f"tidyllm: {exc}; LiteLLM calls in this notebook are NOT governed until it is installed "
              "(fix the settings, then run %%llm or %llm_budget)", file=sys.stderr)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics ``load_ipython_extension`` registered (the installed platform stays)."""
    from tidyllm.magics._apps import AppMagics

    manager = ipython.magics_manager
    manager.registry.pop(AppMagics.__name__, None)
    for kind, names in AppMagics.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    instance = manager.registry.pop(LLMMagics.__name__, None)
    for kind, names in LLMMagics.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    if instance is not None:
        instance.forget_identity()
        instance.close()
        if instance in getattr(ipython, "configurables", []):
            ipython.configurables.remove(instance)

"""IPython magics: governed LLM calls in a notebook, and the budgets, routes and audit trail behind them.

``%load_ext tidyllm`` (or ``c.InteractiveShellApp.extensions = ["tidyllm"]``) registers:

- ``%%llm [options]`` — the cell is the prompt, sent through tidyllm's governed path (budgets,
  authorisation, audit, the learning router); the answer renders as markdown, text, code, json or
  html with a one-line receipt (route, tokens, cost, the tightest budget's remaining amount,
  latency) read back from the mart;
- ``%llm_config key=value ...`` — notebook defaults (user, department, reason, model, …);
- ``%llm_budget``, ``%llm_routes``, ``%llm_audit`` — inspection;
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
    """Register :class:`LLMMagics` with ``ipython`` (configured from ``c.LLMMagics.*``), and the applications'
    magics (:mod:`tidyllm.magics._apps`: ``%mvr_review``, ``%ask``, ``%extract``, ``%summarise``, ``%rag``)."""
    from tidyllm.magics._apps import AppMagics

    ipython.register_magics(LLMMagics(shell=ipython))
    ipython.register_magics(AppMagics(shell=ipython))


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
        instance.close()
        if instance in getattr(ipython, "configurables", []):
            ipython.configurables.remove(instance)

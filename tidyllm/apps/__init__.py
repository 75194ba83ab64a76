"""Applications built only on tidyllm's public platform: MVR peer review, a QA orchestrator, document
analysis and RAG. Each is a Python function or class here, a notebook magic (``%load_ext tidyllm``) and a
``tidyllm apps`` command; see ``docs/applications.md``.

Every application estimates its worst-case cost before it starts (and refuses up front when ``max_cost`` or
the caller's budgets cannot cover it), runs every LLM call as a governed call with the caller's identity,
inside one tracked execution, and reports its actual cost; quality feedback on a result reaches the router.

>>> from tidyllm.apps import mvr_review, sample_path                          # doctest: +SKIP
>>> review = mvr_review(sample_path("mvr_rm_pd_v3.pdf"), user_id="ana", department="risk",
...                     audit_reason="MVR peer review")                      # doctest: +SKIP
>>> review.findings                                                           # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# public name -> module that defines it (imported on first access: these pull in pandas, LiteLLM, ...)
_EXPORTS = {
    "read_document": "tidyllm.apps.documents",
    "read_documents": "tidyllm.apps.documents",
    "chunk_document": "tidyllm.apps.documents",
    "Document": "tidyllm.apps.documents",
    "Chunk": "tidyllm.apps.documents",
    "Block": "tidyllm.apps.documents",
    "DocumentError": "tidyllm.apps.documents",
    "CostEstimate": "tidyllm.apps._run",
    "CostLimitError": "tidyllm.apps._run",
    "feedback": "tidyllm.apps._run",
    "mvr_review": "tidyllm.apps.mvr",
    "Review": "tidyllm.apps.mvr",
    "load_checklist": "tidyllm.apps.mvr",
    "default_checklist_path": "tidyllm.apps.mvr",
    "ask": "tidyllm.apps.qa",
    "Answer": "tidyllm.apps.qa",
    "extract": "tidyllm.apps.analysis",
    "summarise": "tidyllm.apps.analysis",
    "Summary": "tidyllm.apps.analysis",
    "Index": "tidyllm.apps.rag",
    "IndexUpdate": "tidyllm.apps.rag",
    "RagAnswer": "tidyllm.apps.rag",
}

__all__ = sorted([*_EXPORTS, "sample_path", "samples_dir", "simulator_answers", "simulator_profiles"])


def samples_dir() -> Path:
    """The bundled sample documents: a synthetic ~20-page MVR (PDF and DOCX) and ``policies/``."""
    return Path(__file__).with_name("samples")


def sample_path(name: str) -> Path:
    """A bundled sample document by file name (e.g. ``"mvr_rm_pd_v3.pdf"`` or ``"policies"``)."""
    path = samples_dir() / name
    if not path.exists():
        from tidyllm.errors import ConfigurationError

        names = sorted(p.name for p in samples_dir().iterdir())
        raise ConfigurationError(f"no bundled sample {name!r}; there are {', '.join(names)}")
    return path


def simulator_answers() -> list[dict[str, Any]]:
    """The scripted simulator answers for the sample documents (``apps/data/simulator_answers.yaml``)."""
    import yaml

    data = yaml.safe_load((Path(__file__).with_name("data") / "simulator_answers.yaml").read_text(encoding="utf-8"))
    return list(data["answers"])


def simulator_profiles(latency: bool = True) -> dict[str, Any]:
    """The bundled provider-simulator profiles with :func:`simulator_answers` on every chat model (for the
    applications' notebook and demos: the simulator stands in for real providers). ``latency=False`` answers
    at once."""
    import yaml

    from tidyllm.gateway.simulator import bundled_profiles_path, parse_profiles

    data = yaml.safe_load(bundled_profiles_path().read_text(encoding="utf-8"))
    for spec in data["models"].values():
        if spec.get("kind", "chat") == "chat":
            spec["answers"] = simulator_answers()
        if not latency:
            spec["latency"] = {"base_ms": 0}
    return parse_profiles(data)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tidyllm.apps' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

"""The sealed gate's structure: one admission sequence, LiteLLM objects read only in the bridge, and no
import cycle through governance, routing or the platform."""

from __future__ import annotations

from pathlib import Path

from _imports import cycles, import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "tidyllm"


def test_no_import_cycle_through_governance_routing_or_the_platform() -> None:
    graph = import_graph(PACKAGE)
    touching = [c for c in cycles(graph)
                if any(m.startswith(("tidyllm.governance", "tidyllm.routing", "tidyllm.litellm_bridge.strategy",
                                     "tidyllm.litellm_bridge.callbacks")) or m == "tidyllm.platform" for m in c)]
    assert touching == []


def test_governance_and_routing_import_no_litellm() -> None:
    """Every class that touches LiteLLM objects lives in tidyllm.litellm_bridge (type-checking imports aside)."""
    graph = import_graph(PACKAGE, external=True)
    offenders = {module: sorted(n for n in names if n == "litellm" or n.startswith(
        ("litellm.", "tidyllm.litellm_bridge", "tidyllm._litellm")))
        for module, names in graph.items() if module.startswith(("tidyllm.governance", "tidyllm.routing"))}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_admission_sequence_exists_once() -> None:
    """Only the gate calls Governor.admit; every LiteLLM entry point calls the gate."""
    governor_callers = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                        if "gov.admit(" in p.read_text(encoding="utf-8")
                        or "governor.admit(" in p.read_text(encoding="utf-8")}
    gate_callers = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                    if "gate.admit" in p.read_text(encoding="utf-8")}
    assert governor_callers == {"governance/gate.py"}
    assert gate_callers == {"litellm_bridge/strategy.py", "litellm_bridge/callbacks.py",
                            "litellm_bridge/instrument.py"}

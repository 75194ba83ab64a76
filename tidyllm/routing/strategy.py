"""What a routing rule is: :class:`Chooser` picks one of the candidate routes and says with which
probability (:class:`Decision`); :class:`CheapestChooser` is the simple documented rule.

The LiteLLM Router strategy that asks a chooser lives in :mod:`tidyllm.litellm_bridge.strategy`;
the admission sequence around it in :mod:`tidyllm.governance.gate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from tidyllm.governance.gate import CALL_ID_KEY, TRIED_KEY

__all__ = ["Decision", "Chooser", "CheapestChooser", "route_of", "TRIED_KEY", "CALL_ID_KEY"]


@dataclass(frozen=True)
class Decision:
    """A chooser's pick."""

    route: str
    propensity: float
    policy: str
    explored: bool = False
    model_version: int = 0
    scores: Mapping[str, float] = field(default_factory=dict)


class Chooser(Protocol):
    """Picks one route of ``candidates`` for a call context."""

    name: str

    def choose(self, context: Mapping[str, Any], group: str, candidates: Sequence[str],
               prices: Mapping[str, float | None]) -> Decision: ...


class CheapestChooser:
    """The simple documented rule: the cheapest candidate (input + output price per 1M tokens),
    ties broken by name; unpriced routes last."""

    name = "cheapest"

    def choose(self, context: Mapping[str, Any], group: str, candidates: Sequence[str],
               prices: Mapping[str, float | None]) -> Decision:
        ranked = sorted(candidates, key=lambda r: (prices.get(r) is None, prices.get(r) or 0.0, r))
        return Decision(ranked[0], 1.0, self.name)


def route_of(deployment: Mapping[str, Any]) -> str:
    """The tidyllm route (gateway endpoint) a deployment serves."""
    info = deployment.get("model_info") or {}
    return str(info.get("tidyllm_route") or info.get("id") or deployment.get("model_name"))

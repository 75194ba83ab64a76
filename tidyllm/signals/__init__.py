"""Quality signals the learning router learns from, outside the simulator.

With a real provider nothing reports an answer's quality. These sources do, each written to the mart's
``call_signals`` table joined to the routing decision by call id, each with its source and weight, each
learned by the router exactly once, late or out of order:

1. **LLM judges** (``signals.judges``): a sample of each department's answers scored through a governed
   judge route with its own budget, on a background worker (:class:`SignalHub`);
2. **deterministic checks** per use case (``signals.checks``): JSON schema, Python parses, regex,
   length bounds, a callable by import path (:mod:`tidyllm.signals.checks`);
3. **human feedback**: ``platform.feedback(call_id, score, comment=None)``, ``%llm_feedback``;
4. **implicit signals**: failures, provider refusals, a regeneration of the same prompt;

plus scores given to tracked executions (``tracker.record_result(score=...)``). Judges are calibrated on
human labels of the same calls (:mod:`tidyllm.signals.calibration`). See ``docs/signals.md``.
"""

from __future__ import annotations

from typing import Any

from tidyllm.signals.calibration import Calibration, fit_calibration
from tidyllm.signals.config import Check, Judge, SignalSettings, parse_signals

__all__ = ["Calibration", "Check", "Judge", "SignalHub", "SignalSettings", "fit_calibration", "parse_signals"]


def __getattr__(name: str) -> Any:
    if name == "SignalHub":  # it needs SQLAlchemy: loaded on first use, so reading settings stays light
        from tidyllm.signals.hub import SignalHub

        return SignalHub
    raise AttributeError(f"module 'tidyllm.signals' has no attribute {name!r}")

"""The number check shared by the routes file (:mod:`tidyllm.gateway.config`) and the simulator's
profiles (:mod:`tidyllm.gateway.simulator`); each caller words its own error."""

from __future__ import annotations

from typing import Any


def is_number(value: Any, lo: float | None = None, hi: float | None = None, *, integer: bool = False) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (only an ``int`` with ``integer``; never a ``bool``)
    within ``lo <= value <= hi`` (a bound left out is not checked; NaN is outside any bound)."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return (lo is None or lo <= value) and (hi is None or value <= hi)

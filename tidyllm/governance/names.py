"""One spelling per user and department: the normalisation every budget, rule, rate limit and row uses."""

from __future__ import annotations

import unicodedata

__all__ = ["normalize_name"]


def normalize_name(value: str) -> str:
    """The canonical form of a user or department name: Unicode NFKC, invisible format and control
    characters dropped, surrounding whitespace removed, inner runs of whitespace collapsed to one
    space, case folded. ``"  Risk\u00a0 Management "`` and ``"risk management"`` are the same
    department; ``"risk-management"`` is another one."""
    if not (value.isascii() and value.isprintable()):
        value = "".join(" " if ch.isspace() else ch for ch in unicodedata.normalize("NFKC", value)
                        if ch.isspace() or unicodedata.category(ch) not in ("Cf", "Cc"))
    return " ".join(value.split()).casefold()

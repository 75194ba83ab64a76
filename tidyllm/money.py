"""How tidyllm shows an amount of money: one function, used by the CLI, the magics, the report and refusals.

Budgets here are often a few cents or less (a department's daily allowance for a cheap model, a
test budget), so cents are not enough: a limit of $0.006 must not read "$0.01" and a spend of
$0.004 must not read "$0.00". :func:`usd` shows whole dollars and above with cents, and smaller
amounts with three significant digits (at least two decimals).
"""

from __future__ import annotations

import math

__all__ = ["usd"]

#: significant digits shown for amounts under one dollar
_SIGNIFICANT = 3
#: amounts below a millionth of a cent are float residue of sums and differences, shown as zero
_RESIDUE = 1e-12


def usd(amount: float | int | None, decimals: int | None = None) -> str:
    """``amount`` US dollars for people to read: never "$0.00" for an amount that is not zero.

    >>> [usd(x) for x in (1234.5, 50, 0.5, 0.006, 0.00523, 0.0000012, 0, -0.004, 0.00004 - 0.00003999999999999999)]
    ['$1,234.50', '$50.00', '$0.50', '$0.006', '$0.00523', '$0.0000012', '$0.00', '-$0.004', '$0.00']

    ``None`` and NaN read "-" (no amount); infinity reads "unlimited". ``decimals`` fixes the number
    of decimals instead (to show what changed between two close amounts: $3.999989 of $4.00).
    """
    if amount is None:
        return "-"
    value = float(amount)
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "unlimited" if value > 0 else "-unlimited"
    sign = "-" if value <= -_RESIDUE else ""
    value = abs(value)
    if decimals is not None:
        return f"{sign}${value:,.{decimals}f}"
    if value < _RESIDUE:  # float residue of sums (0.00004 - 0.00004 = 6.8e-21), not money
        return "$0.00"
    if round(value, 2) >= 1:
        return f"{sign}${value:,.2f}"
    # enough decimals for _SIGNIFICANT digits, then drop trailing zeros down to cents
    decimals = max(2, _SIGNIFICANT - 1 - math.floor(math.log10(value)))
    text = f"{value:.{decimals}f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{sign}${whole}.{fraction.ljust(2, '0')}"

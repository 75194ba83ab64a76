"""What every red-team test counts: what the provider (the simulator) answered and billed, what the ledger
charged, and what the audit trail holds — three numbers that must agree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

ROUTES = {"ep-small": ("sim-gpt-small", 1.0, 2.0)}
META = {"user_id": "ana", "department": "risk", "audit_reason": "red team", "use_case": "qa"}
MSG = [{"role": "user", "content": "Summarise the findings of the model validation report."}]


@dataclass(frozen=True)
class Books:
    """The three sides of the books after a scenario."""

    answered: int          # requests the provider answered (simulator outcome "ok")
    billed_usd: float      # what the provider billed, at the routes' prices
    charged_rows: int      # llm_calls rows that were charged: success / failure with cost / unsettled
    unsettled_rows: int
    pending_rows: int
    charged_usd: float     # settled + unsettled spend in the ledger's budget windows
    reserved_usd: float
    audited_calls: int     # distinct call ids with an audit row for an allowed / unenforced call


def books(platform: Any, sim: Any, prices: dict[str, tuple[float, float]]) -> Books:
    """Count the provider's, the ledger's and the audit trail's side (``prices``: simulator model ->
    (input, output) USD per 1M tokens)."""
    stats = sim.stats()
    answered = sum(c.get("ok", 0) for c in stats["outcomes"].values())
    billed = sum((b.get("prompt_tokens", 0) * prices[m][0] + b.get("completion_tokens", 0) * prices[m][1]) / 1e6
                 for m, b in stats["billed"].items())
    with platform.mart.store.begin() as conn:
        status = dict(conn.execute(sa.text("SELECT status, count(*) FROM llm_calls GROUP BY status")).all())
        spent, reserved = conn.execute(sa.text(
            "SELECT coalesce(sum(spent_usd), 0), coalesce(sum(reserved_usd), 0) FROM budget_windows w "
            "JOIN budgets b ON b.id = w.budget_id WHERE b.scope = 'department'")).one()
        audited = conn.execute(sa.text(
            "SELECT count(DISTINCT call_id) FROM audit_log WHERE decision IN ('allowed', 'unenforced') "
            "AND status IN ('success', 'unsettled')")).scalar_one()
    charged = status.get("success", 0) + status.get("unsettled", 0) + status.get("unenforced", 0)
    return Books(answered, billed, charged, status.get("unsettled", 0), status.get("pending", 0), float(spent),
                 float(reserved), audited)


def sim_prices() -> dict[str, tuple[float, float]]:
    return {model: (pin, pout) for model, pin, pout in ROUTES.values()}


def assert_books_agree(b: Books, *, limit: float | None = None) -> None:
    """answered == charged call rows == audited calls; charged ≥ billed; spend within the limit."""
    assert b.pending_rows == 0, b
    assert b.answered == b.charged_rows == b.audited_calls, b
    assert b.charged_usd >= b.billed_usd - 1e-9, b
    if limit is not None:
        assert b.charged_usd <= limit + 1e-9, b

"""Prices: effective-dated USD per 1M input/output tokens per endpoint or model, and the cost of a call.

An explicit price (from settings, the gateway config or :meth:`PriceBook.set`) wins; otherwise
LiteLLM's own price map is used when it knows the model. A model with neither has *no* price:
:meth:`PriceBook.lookup` returns None and governance refuses or allows the call by policy, but
never silently costs it at $0. Every price version is a row of the ``prices`` table, and every
cost the mart records names the version it used.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.mart import TidyMart

__all__ = ["Price", "PriceBook", "parse_effective"]

_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class Price:
    """One price version."""

    model: str
    input_per_1m: float
    output_per_1m: float
    effective_from: dt.datetime
    #: prices.id, or None for a LiteLLM price not (yet) stored
    id: str | None
    source: str

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for the given token counts."""
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1_000_000.0


def parse_effective(value: Any, *, what: str = "effective") -> dt.datetime:
    """A price's effective date as an aware UTC datetime (accepts date, datetime, ISO string)."""
    if value is None:
        return _EPOCH
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    if isinstance(value, str):
        try:
            return parse_effective(dt.datetime.fromisoformat(value))
        except ValueError:
            pass
    raise ConfigurationError(f"{what} must be a date like 2026-01-01, got {value!r}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{what} must be a number of USD per 1M tokens, got {value!r}") from None
    if value != value or value < 0:
        raise ConfigurationError(f"{what} must be a non-negative number, got {value!r}")
    return float(value)


class PriceBook:
    """Effective-dated prices stored in the mart, with LiteLLM's price map as the fallback."""

    def __init__(self, mart: "TidyMart", *, use_litellm_prices: bool = True) -> None:
        self._mart = mart
        self._use_litellm = use_litellm_prices
        self._lock = threading.Lock()
        self._cache: dict[str, list[Price]] | None = None

    def set(self, model: str, input_per_1m: Any, output_per_1m: Any, effective: Any = None, *,
            source: str = "api") -> Price:
        """Register a price for ``model`` from ``effective`` on (idempotent for the same values)."""
        import sqlalchemy as sa

        from tidyllm.mart.schema import prices
        from tidyllm.mart.store import utcnow

        if not isinstance(model, str) or not model:
            raise ConfigurationError("a price needs the endpoint or model name it applies to")
        price_in = _number(input_per_1m, f"price of {model}: input_per_1m")
        price_out = _number(output_per_1m, f"price of {model}: output_per_1m")
        start = parse_effective(effective, what=f"price of {model}: effective")
        with self._mart.store.begin(write=True) as conn:
            self._mart.store.lock_for_update(conn)  # concurrent first registrations: one inserts, the rest find it
            row = conn.execute(sa.select(prices).where(prices.c.model == model,
                                                       prices.c.effective_from == start)).mappings().first()
            if row is not None and (row["input_per_1m"], row["output_per_1m"]) == (price_in, price_out):
                price_id = row["id"]
            elif row is not None:
                raise ConfigurationError(
                    f"{model} already has a different price effective {start.date()}; a price version is "
                    "immutable because recorded costs refer to it — add one with a later effective date")
            else:
                price_id = str(uuid.uuid4())
                conn.execute(prices.insert().values(id=price_id, model=model, input_per_1m=price_in,
                                                    output_per_1m=price_out, effective_from=start,
                                                    source=source, created_at=utcnow()))
        self.refresh()
        return Price(model, price_in, price_out, start, price_id, source)

    def refresh(self) -> None:
        """Forget cached prices (another process may have added versions)."""
        with self._lock:
            self._cache = None

    def _load(self) -> dict[str, list[Price]]:
        import sqlalchemy as sa

        from tidyllm.mart.schema import prices

        with self._lock:
            if self._cache is not None:
                return self._cache
        with self._mart.store.begin() as conn:
            rows = conn.execute(sa.select(prices).order_by(prices.c.effective_from)).mappings().all()
        table: dict[str, list[Price]] = {}
        for r in rows:
            eff = r["effective_from"]
            eff = eff if eff.tzinfo else eff.replace(tzinfo=dt.timezone.utc)
            table.setdefault(r["model"], []).append(
                Price(r["model"], r["input_per_1m"], r["output_per_1m"], eff, r["id"], r["source"]))
        with self._lock:
            self._cache = table
        return table

    def lookup(self, model: str, at: dt.datetime | None = None) -> Price | None:
        """The price of ``model`` in force at ``at`` (default now), or None when nobody prices it."""
        at = at or dt.datetime.now(dt.timezone.utc)
        versions = self._load().get(model)
        if versions:
            current = [p for p in versions if p.effective_from <= at]
            if current:
                return current[-1]
        return self._litellm_price(model) if self._use_litellm else None

    def _litellm_price(self, model: str) -> Price | None:
        from tidyllm._litellm import import_litellm

        litellm = import_litellm()
        names = [model]
        if "/" in model:
            names.append(model.split("/", 1)[1])
        for name in names:
            info = litellm.model_cost.get(name)
            if not info:
                continue
            price_in, price_out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
            # Router() writes zero-priced entries for unknown deployments into the global map:
            # a 0/0 price there means "unknown", not "free".
            if price_in is None or price_out is None or (not price_in and not price_out):
                continue
            return Price(model, float(price_in) * 1e6, float(price_out) * 1e6, _EPOCH, None, "litellm")
        return None

    def frame(self) -> "pd.DataFrame":
        """Every stored price version."""
        return self._mart.frame("prices", order_by="effective_from")

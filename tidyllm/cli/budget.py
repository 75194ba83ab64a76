"""``tidyllm budget``: set and show hard budgets."""

from __future__ import annotations

import click

from tidyllm.cli._common import echo_frame, platform, settings_options
from tidyllm.money import usd


@click.group()
def budget() -> None:
    """Hard budgets per org, department, user, route or model."""


@budget.command("set")
@click.argument("scope", type=click.Choice(["org", "department", "user", "route", "model"]))
@click.argument("name")
@click.argument("limit_usd", type=float)
@click.option("--period", type=click.Choice(["day", "week", "month", "total"]), default="month", show_default=True)
@click.option("--soft-threshold", type=float, help="Warn at this fraction of the limit (e.g. 0.8).")
@settings_options
def set_(scope: str, name: str, limit_usd: float, period: str, soft_threshold: float | None,
         config: str | None, database_url: str | None) -> None:
    """Set SCOPE NAME's limit to LIMIT_USD per period (e.g. `tidyllm budget set department risk 50`)."""
    p = platform(config, database_url)
    row = p.budgets.set(scope, name, limit_usd, period, soft_threshold=soft_threshold)
    click.echo(f"{row['scope']} {row['name']!r}: {usd(row['limit_usd'])} per {row['period']}")


@budget.command("show")
@click.option("--scope", type=click.Choice(["org", "department", "user", "route", "model"]))
@click.option("--name")
@settings_options
def show(scope: str | None, name: str | None, config: str | None, database_url: str | None) -> None:
    """Show every budget's spend, reservations and what is left in its current window."""
    p = platform(config, database_url)
    echo_frame(p.budgets.status(scope=scope, name=name))

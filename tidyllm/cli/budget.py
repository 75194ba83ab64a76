"""``tidyllm budget``: set and show hard budgets."""

from __future__ import annotations

import click

from tidyllm.cli._common import echo_frame, platform, reader, settings_options
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
@click.option("--alert-at", "thresholds", multiple=True, type=float,
              help="Alert at this fraction of the limit (repeat: --alert-at 0.5 --alert-at 0.8); default alerts.thresholds.")
@click.option("--reason", help="Why (recorded in the audit trail; required when governance.require_audit is on).")
@settings_options
def set_(scope: str, name: str, limit_usd: float, period: str, soft_threshold: float | None,
         thresholds: tuple[float, ...], reason: str | None, config: str | None, database_url: str | None) -> None:
    """Set SCOPE NAME's limit to LIMIT_USD per period (e.g. `tidyllm budget set department risk 50 --reason ...`).

    The change is audited (who, old → new, reason) and is not reverted by the next `tidyllm apply` or
    install() while governance.config_authority is "database" (the default): the drift is reported."""
    p = platform(config, database_url)
    row = p.budgets.set(scope, name, limit_usd, period, soft_threshold=soft_threshold,
                        thresholds=list(thresholds) or None, reason=reason, via="cli")
    click.echo(f"{row['scope']} {row['name']!r}: {usd(row['limit_usd'])} per {row['period']} (audited)")


@budget.command("delete")
@click.argument("scope", type=click.Choice(["org", "department", "user", "route", "model"]))
@click.argument("name")
@click.option("--period", type=click.Choice(["day", "week", "month", "total"]), default="month", show_default=True)
@click.option("--reason", help="Why (recorded in the audit trail; required when governance.require_audit is on).")
@settings_options
def delete(scope: str, name: str, period: str, reason: str | None, config: str | None,
           database_url: str | None) -> None:
    """Remove SCOPE NAME's budget for the period (audited)."""
    p = platform(config, database_url)
    if not p.budgets.delete(scope, name, period, reason=reason, via="cli"):
        raise click.ClickException(f"no {period} budget for {scope} {name!r}")
    click.echo(f"{scope} {name!r}: {period} budget removed (audited)")


@budget.command("show")
@click.option("--scope", type=click.Choice(["org", "department", "user", "route", "model"]))
@click.option("--name")
@settings_options
def show(scope: str | None, name: str | None, config: str | None, database_url: str | None) -> None:
    """Show every budget's spend, reservations and what is left in its current window (read-only)."""
    r = reader(config, database_url)
    try:
        echo_frame(r.budgets.status(scope=scope, name=name))
    finally:
        r.close()

"""``tidyllm report``: write the unified dashboard of a mart (see :mod:`tidyllm.report`)."""

from __future__ import annotations

from pathlib import Path

import click

from tidyllm.cli._common import load, settings_options


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write index.html into (created if missing).")
@click.option("--hours", type=click.IntRange(1, 744), default=24, show_default=True,
              help="Horizon of the load forecast shown on the page.")
@settings_options
def report(out: Path, hours: int, config: str | None, database_url: str | None) -> None:
    """Write a self-contained HTML dashboard (OUT/index.html) from the mart: spend, budgets, refusals,
    routing, learning, audit, tracked executions and the load forecast."""
    from tidyllm.report.data import open_mart
    from tidyllm.report import write_report

    settings = load(config, database_url)
    mart = open_mart(settings.database_url)
    try:
        path = write_report(mart, out, forecast_hours=hours, timezone=settings.governance.timezone)
    finally:
        mart.close()
    click.echo(f"dashboard written: {path}")

"""``tidyllm forecast``: predicted gateway load per route and department (see :mod:`tidyllm.forecast`)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from tidyllm.cli._common import echo_frame, load, settings_options
from tidyllm.money import usd


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


@click.command("forecast", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hours", type=click.IntRange(1, 744), default=24, show_default=True, help="Hours to forecast.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every forecast row (hour, dimension, name, requests, spend_usd) to this CSV file.")
@settings_options
def forecast(hours: int, csv_path: Path | None, config: str | None, database_url: str | None) -> None:
    """Forecast requests and spend per route and per department for the coming hours, from the mart's
    call history, and report the model's error on held-out history."""
    from tidyllm.forecast import forecast as make_forecast
    from tidyllm.report.data import open_mart

    settings = load(config, database_url)
    mart = open_mart(settings.database_url)
    try:
        frame = make_forecast(mart, hours=hours)
    finally:
        mart.close()
    m = frame.attrs["metrics"]
    click.echo(f"model: {frame.attrs['model']}")
    click.echo(f"history: {frame.attrs['history_calls']:,} calls over {frame.attrs['history_hours']} hours; "
               f"trained on {m['train_hours']} h, evaluated on the newest {m['test_hours']} h")
    click.echo(f"held-out error: requests MAE {m['mae_requests']:.2f} per series-hour (same hour yesterday: "
               f"{m['baseline_mae_requests']:.2f}), MAPE {_pct(m['mape_requests'])}, WAPE {_pct(m['wape_requests'])} "
               f"of the hourly load; spend MAE {usd(m['mae_spend_usd'])}, MAPE {_pct(m['mape_spend'])}, "
               f"WAPE {_pct(m['wape_spend'])}")
    totals = (frame.groupby(["dimension", "name"])[["requests", "spend_usd"]].sum().reset_index()
              .round({"requests": 1, "spend_usd": 4}))
    click.echo(f"\nnext {hours} h per route and department:")
    echo_frame(totals)
    per_hour = (frame[frame["dimension"] == "route"].groupby("hour")[["requests", "spend_usd"]].sum().reset_index()
                .round({"requests": 1, "spend_usd": 4}))
    click.echo("\nper hour (all routes, UTC):")
    echo_frame(per_hour)
    if csv_path is not None:
        frame.to_csv(csv_path, index=False)
        click.echo(f"\nwritten: {csv_path}")

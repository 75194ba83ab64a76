"""``tidyllm audit``: verify, export and show the hash-chained audit trail."""

from __future__ import annotations

import json
import sys

import click

from tidyllm.cli._common import platform, settings_options


@click.group()
def audit() -> None:
    """The tamper-evident audit trail."""


@audit.command()
@settings_options
def verify(config: str | None, database_url: str | None) -> None:
    """Re-compute the hash chain; exit 1 and name the first broken row if anything was changed."""
    result = platform(config, database_url).audit.verify()
    click.echo(str(result))
    if not result.ok:
        sys.exit(1)


@audit.command()
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--department")
@click.option("--user", "user_id")
@click.option("--decision", type=click.Choice(["allowed", "refused", "unenforced"]))
@click.option("--since", help="Only rows at or after this time (ISO, UTC).")
@click.option("--until", help="Only rows before this time (ISO, UTC).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@settings_options
def export(fmt: str, department: str | None, user_id: str | None, decision: str | None, since: str | None,
           until: str | None, output: str | None, config: str | None, database_url: str | None) -> None:
    """Export audit rows as CSV or JSON Lines, with filters."""
    filters = {k: v for k, v in {"department": department, "user_id": user_id, "decision": decision}.items() if v}
    text = platform(config, database_url).audit.export(fmt, since=since, until=until, **filters)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@audit.command()
@click.argument("call_id")
@settings_options
def show(call_id: str, config: str | None, database_url: str | None) -> None:
    """Print the audit row of one call (with its MLflow trace link when the server gateway traced it)."""
    p = platform(config, database_url)
    row = p.audit.show(call_id)
    if row is None:
        raise click.ClickException(f"no audit row for call {call_id!r}")
    for key, value in row.items():
        click.echo(f"{key:>18}: {value}")
    extra = row.get("extra") or {}
    if isinstance(extra, str):  # some drivers hand JSON columns back as text
        extra = json.loads(extra)
    experiment = extra.get("trace_experiment_id")
    if row.get("trace_id") and experiment and p.gateway.uri and p.gateway.mode == "server":
        from tidyllm.gateway.traces import trace_url

        click.echo(f"{'trace':>18}: {trace_url(p.gateway.uri, experiment, row['trace_id'])}")

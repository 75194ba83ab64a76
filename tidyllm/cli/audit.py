"""``tidyllm audit``: verify, export and show the hash-chained audit trail."""

from __future__ import annotations

import json
import sys

import click

from tidyllm.cli._common import reader, settings_options


@click.group()
def audit() -> None:
    """The tamper-evident audit trail."""


@audit.command()
@settings_options
def verify(config: str | None, database_url: str | None) -> None:
    """Re-compute the hash chain and check it against the signed checkpoints and the call rows; exit 1
    naming the first broken row or contradicted checkpoint if anything was edited, deleted, re-chained,
    truncated, reordered or wiped."""
    from tidyllm.governance.checkpoints import verify_trail

    r = reader(config, database_url)
    try:
        result = verify_trail(r.mart, r.checkpoints)
    finally:
        r.close()
    click.echo(str(result))
    if not result.ok:
        sys.exit(1)


@audit.command()
@settings_options
def checkpoint(config: str | None, database_url: str | None) -> None:
    """Sign the audit chain's head now with the audit key (audit.key_file) and append it to the checkpoint
    file (audit.checkpoint_file) and MLflow when configured. Reads the database only."""
    r = reader(config, database_url)
    try:
        line = r.checkpoints.checkpoint(reason="command")
    finally:
        r.close()
    click.echo(f"checkpoint signed: {line['rows']} rows, head seq={line['seq']} digest {line['digest'][:16]}…, "
               f"{line['calls']} calls; key {line['key_id']}; written to {r.checkpoints.checkpoint_file}")


@audit.command()
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--department")
@click.option("--user", "user_id")
@click.option("--decision", type=click.Choice(["allowed", "refused", "unenforced", "admin", "admin_refused"]))
@click.option("--since", help="Only rows at or after this time (ISO, UTC).")
@click.option("--until", help="Only rows before this time (ISO, UTC).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@settings_options
def export(fmt: str, department: str | None, user_id: str | None, decision: str | None, since: str | None,
           until: str | None, output: str | None, config: str | None, database_url: str | None) -> None:
    """Export audit rows as CSV or JSON Lines, with filters."""
    filters = {k: v for k, v in {"department": department, "user_id": user_id, "decision": decision}.items() if v}
    r = reader(config, database_url)
    try:
        text = r.audit.export(fmt, since=since, until=until, **filters)
    finally:
        r.close()
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
    r = reader(config, database_url)
    try:
        row = r.audit.show(call_id)
    finally:
        r.close()
    if row is None:
        raise click.ClickException(f"no audit row for call {call_id!r}")
    for key, value in row.items():
        click.echo(f"{key:>18}: {value}")
    extra = row.get("extra") or {}
    if isinstance(extra, str):  # some drivers hand JSON columns back as text
        extra = json.loads(extra)
    experiment = extra.get("trace_experiment_id")
    gateway_uri, mode = r.settings.gateway_uri, r.settings.gateway_mode
    if row.get("trace_id") and experiment and gateway_uri and mode == "server":
        from tidyllm.gateway.traces import trace_url

        click.echo(f"{'trace':>18}: {trace_url(gateway_uri.rstrip('/'), experiment, row['trace_id'])}")

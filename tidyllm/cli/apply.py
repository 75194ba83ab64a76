"""``tidyllm apply``: make the mart match tidyllm.yaml's budgets, rules, prices and rate limits."""

from __future__ import annotations

import click

from tidyllm.cli._common import load, settings_options


@click.command("apply", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dry-run", is_flag=True, help="Show the differences and what would happen; change nothing.")
@click.option("--reason", help="Why (recorded with every change; required when governance.require_audit is on).")
@settings_options
def apply(dry_run: bool, reason: str | None, config: str | None, database_url: str | None) -> None:
    """Compare tidyllm.yaml's budgets, authorisation rules, prices and rate limits (and the gateway routes
    and governance settings) with the mart, and apply the differences, each audited.

    A value changed at run time (`tidyllm budget set`) since the last apply is DRIFT: the database's value
    stays while governance.config_authority is "database" (the default), the file's is put back when it is
    "file"; either way it is reported here.
    """
    settings = load(config, database_url)
    if dry_run:
        from types import SimpleNamespace

        from tidyllm.governance.declared import DeclaredState
        from tidyllm.mart import TidyMart
        from tidyllm.platform import GatewayHandle

        mart = TidyMart(settings.database_url, read_only=True)
        try:
            view = SimpleNamespace(mart=mart, gateway=GatewayHandle(settings), settings=settings)
            plan = DeclaredState(view).plan(settings)  # type: ignore[arg-type]
        finally:
            mart.close()
        click.echo(str(plan))
        return
    from tidyllm.platform import Platform

    platform = Platform(settings, apply=False)
    try:
        plan = platform.state.apply(settings, reason=reason, via="cli")
    finally:
        platform.close()
    click.echo(str(plan))

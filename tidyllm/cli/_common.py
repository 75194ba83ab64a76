"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

from typing import Any, Callable

import click


def settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--config`` and ``--database-url`` on a command."""
    fn = click.option("--database-url", help="Override the mart's database URL.")(fn)
    fn = click.option("--config", "config", type=click.Path(dir_okay=False),
                      help="Settings file (default ./tidyllm.yaml or $TIDYLLM_CONFIG).")(fn)
    return fn


def load(config: str | None, database_url: str | None) -> Any:
    """The settings for a command."""
    from tidyllm.settings import load_settings

    return load_settings(config, **({"database_url": database_url} if database_url else {}))


def platform(config: str | None, database_url: str | None) -> Any:
    """A platform for administering the mart (not registered with LiteLLM; the file is not applied:
    that is `tidyllm apply`)."""
    from tidyllm.platform import Platform

    return Platform(load(config, database_url), apply=False)


class Reader:
    """What read commands need, over a mart opened read-only: a missing path or a database that is
    not a tidyllm mart is an error, and nothing is created or written."""

    def __init__(self, settings: Any) -> None:
        from tidyllm.governance.audit import AuditTrail
        from tidyllm.governance.budgets import BudgetLedger
        from tidyllm.governance.checkpoints import Checkpoints
        from tidyllm.mart import TidyMart
        from tidyllm.platform import register_secrets

        register_secrets(settings)
        self.settings = settings
        self.mart = TidyMart(settings.database_url, read_only=True)
        self.audit = AuditTrail(self.mart, capture=settings.audit.capture)
        self.budgets = BudgetLedger(self.mart, timezone=settings.governance.timezone, credit_calls=0)
        au = settings.audit
        self.checkpoints = Checkpoints(self.mart, key_file=au.key_file, checkpoint_file=au.checkpoint_file,
                                       every_rows=au.checkpoint_rows, every_minutes=au.checkpoint_minutes,
                                       mlflow_uri=au.checkpoint_mlflow_uri)

    def close(self) -> None:
        self.mart.close()


def reader(config: str | None, database_url: str | None) -> Reader:
    """The mart of the settings, opened read-only."""
    return Reader(load(config, database_url))


def echo_frame(frame: Any) -> None:
    """Print a DataFrame as a plain table (or a note when it is empty)."""
    if frame.empty:
        click.echo("(none)")
        return
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200):
        click.echo(frame.to_string(index=False))

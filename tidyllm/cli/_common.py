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
    """A platform for reading and administering the mart (not registered with LiteLLM)."""
    from tidyllm.platform import Platform

    return Platform(load(config, database_url))


def echo_frame(frame: Any) -> None:
    """Print a DataFrame as a plain table (or a note when it is empty)."""
    if frame.empty:
        click.echo("(none)")
        return
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200):
        click.echo(frame.to_string(index=False))

"""The ``tidyllm`` command: a thin shell over the library.

Each subcommand group lives in its own module and is attached here; errors from the library
(:class:`tidyllm.errors.TidyLLMError`) become one line on stderr and exit code 1.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from tidyllm.errors import TidyLLMError

# (module, attribute) of each subcommand; imported only when the command runs or --help lists it,
# so `tidyllm --help` stays fast.
_COMMANDS = {
    "apps": ("tidyllm.cli.apps", "apps"),
    "apply": ("tidyllm.cli.apply", "apply"),
    "audit": ("tidyllm.cli.audit", "audit"),
    "budget": ("tidyllm.cli.budget", "budget"),
    "db": ("tidyllm.cli.db", "db"),
    "demo": ("tidyllm.cli.demo", "demo"),
    "forecast": ("tidyllm.cli.forecast", "forecast"),
    "gateway": ("tidyllm.cli.gateway", "gateway"),
    "keys": ("tidyllm.cli.keys", "keys"),
    "proxy": ("tidyllm.cli.proxy", "proxy"),
    "report": ("tidyllm.cli.report", "report"),
    "routes": ("tidyllm.cli.routes", "routes"),
    "simulate": ("tidyllm.cli.simulate", "simulate"),
    "token": ("tidyllm.cli.token", "token"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        import importlib.util

        return sorted(name for name, (module, _) in _COMMANDS.items() if importlib.util.find_spec(module))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TidyLLMError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tidyllm")
def main() -> None:
    """tidyllm: governed, audited, self-optimising LLM calls over LiteLLM and MLflow AI Gateway."""

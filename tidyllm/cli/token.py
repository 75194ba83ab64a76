"""``tidyllm token``: signed caller tokens for services (``governance.identity``, docs/governance.md)."""

from __future__ import annotations

import datetime as dt
import json
import sys

import click

from tidyllm.cli._common import load, settings_options


@click.group()
def token() -> None:
    """Signed caller tokens: who a service calls as, verified with the platform's key."""


@token.command("issue")
@click.option("--user", required=True, help="The user the token identifies.")
@click.option("--department", help="The department the token's calls are charged to.")
@click.option("--ttl", default="8h", show_default=True, help="Lifetime: 30m, 8h, 7d, 2w or seconds.")
@settings_options
def issue(user: str, department: str | None, ttl: str, config: str | None, database_url: str | None) -> None:
    """Print a token for USER (and DEPARTMENT), valid for TTL. Pass it as metadata={"tidyllm_token": ...}
    or $TIDYLLM_TOKEN. Creates the platform's key file (mode 0600) on first use."""
    from tidyllm.governance.tokens import TokenKey, parse_ttl

    seconds = parse_ttl(ttl)
    path = load(config, database_url).governance.key_path()
    if path.exists():
        key = TokenKey.load(path)
    else:
        key = TokenKey.create(path)
        click.echo(f"created the platform's token key {path} (mode 0600, key id {key.key_id}); keep it out of "
                   "backups of the database and off shared disks", err=True)
    click.echo(key.issue(user, department, ttl_seconds=seconds))


@token.command("verify")
@click.argument("value", required=False)
@settings_options
def verify(value: str | None, config: str | None, database_url: str | None) -> None:
    """Check a token (VALUE, else $TIDYLLM_TOKEN, else stdin) and print what it says; exit 1 when it is
    expired, tampered, malformed or another platform's."""
    from tidyllm.errors import TokenError
    from tidyllm.governance.tokens import TokenKey

    settings = load(config, database_url)
    text = value or settings.governance.token or sys.stdin.readline()
    claims = None
    try:
        claims = TokenKey.load(settings.governance.key_path()).verify(text.strip())
    except TokenError as exc:
        click.echo(f"invalid ({exc.kind}): {exc}", err=True)
        sys.exit(1)

    def when(ts: int) -> str:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")

    click.echo(json.dumps({"valid": True, "user_id": claims.user_id, "department": claims.department,
                           "issued_at": when(claims.issued_at), "expires_at": when(claims.expires_at),
                           "key_id": claims.key_id, "token_id": claims.token_id}, indent=2))

"""``tidyllm keys``: API keys of the tidyllm proxy, each bound to a user and a department (stored hashed)."""

from __future__ import annotations

import getpass
from typing import Any

import click

from tidyllm.cli._common import echo_frame, platform, settings_options


def _store(config: str | None, database_url: str | None) -> Any:
    from tidyllm.proxy.keys import KeyStore

    p = platform(config, database_url)
    return KeyStore(p.mart, p.audit)


def _actor() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container): the audit row says who by key only
        return None


@click.group("keys")
def keys() -> None:
    """Create, list, revoke and rotate the proxy's API keys."""


@keys.command("create")
@click.option("--department", required=True, help="Department every call with the key is governed as.")
@click.option("--user", "user_id", default=None,
              help="User the key speaks for. Leave it out for an application key: the request's OpenAI `user` "
                   "field (or metadata user_id) then names the end user.")
@click.option("--ttl", default=None, help="Lifetime, e.g. 90d, 12h, 2w (default: never expires).")
@click.option("--routes", "routes", multiple=True,
              help="Glob pattern of the routes/groups the key may call, e.g. 'chat*' (repeatable; default: any "
                   "the authorisation policy allows).")
@click.option("--note", default=None, help="What the key is for.")
@settings_options
def create(department: str, user_id: str | None, ttl: str | None, routes: tuple[str, ...], note: str | None,
           config: str | None, database_url: str | None) -> None:
    """Create a key; it is printed once and stored only as a SHA-256 digest."""
    patterns = [p.strip() for value in routes for p in value.split(",") if p.strip()]
    row, key = _store(config, database_url).create(department=department, user_id=user_id, ttl=ttl,
                                                   routes=patterns, note=note, actor=_actor())
    who = f"user {row['user_id']!r} in " if row["user_id"] else "an application in "
    click.echo(f"key {row['id']} for {who}department {row['department']!r}"
               + (f", routes {', '.join(row['routes'])}" if row["routes"] else "")
               + (f", expires {row['expires_at']:%Y-%m-%d %H:%M} UTC" if row["expires_at"] else ""), err=True)
    click.echo("the key is shown this once; store it now:", err=True)
    click.echo(key)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked and rotated keys.")
@settings_options
def list_(include_revoked: bool, config: str | None, database_url: str | None) -> None:
    """The keys (their ids and first characters, never the keys)."""
    echo_frame(_store(config, database_url).list(include_revoked=include_revoked))


@keys.command("revoke")
@click.argument("key_id")
@settings_options
def revoke(key_id: str, config: str | None, database_url: str | None) -> None:
    """Revoke KEY_ID (an id from `tidyllm keys list`, or a unique start of one)."""
    row = _store(config, database_url).revoke(key_id, actor=_actor())
    click.echo(f"revoked key {row['id']} ({row['prefix']}…) of department {row['department']!r}")


@keys.command("rotate")
@click.argument("key_id")
@click.option("--ttl", default=None, help="Lifetime of the new key (default: the old key's).")
@settings_options
def rotate(key_id: str, ttl: str | None, config: str | None, database_url: str | None) -> None:
    """Replace KEY_ID by a new key with the same identity; the old key stops working at once."""
    row, key = _store(config, database_url).rotate(key_id, ttl=ttl, actor=_actor())
    click.echo(f"key {row['id']} replaces the old key; it is shown this once, store it now:", err=True)
    click.echo(key)

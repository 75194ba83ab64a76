"""``tidyllm db``: where the mart is, and bringing its schema up to date."""

from __future__ import annotations

import click


@click.group()
def db() -> None:
    """The mart database (SQLite or PostgreSQL)."""


@db.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Settings file (default ./tidyllm.yaml).")
@click.option("--database-url", help="Override the database URL.")
def upgrade(config: str | None, database_url: str | None) -> None:
    """Create the mart or migrate it to this version's schema."""
    from tidyllm.mart.store import Store
    from tidyllm.settings import load_settings

    settings = load_settings(config, **({"database_url": database_url} if database_url else {}))
    store = Store(settings.database_url, upgrade=True)
    click.echo(f"{store.safe_url}: schema at {store.current_revision()}")
    store.dispose()


@db.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Settings file (default ./tidyllm.yaml).")
def path(config: str | None) -> None:
    """Print the database URL tidyllm uses (password hidden)."""
    import sqlalchemy as sa

    from tidyllm.settings import load_settings

    url = load_settings(config).database_url
    click.echo(sa.engine.make_url(url).render_as_string(hide_password=True))

"""Alembic environment for the mart: runs on the connection tidyllm hands it (``config.attributes``)."""

from alembic import context

from tidyllm.mart.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

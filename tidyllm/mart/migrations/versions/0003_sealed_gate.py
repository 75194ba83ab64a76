"""The sealed gate: lease owners, unsettled charges, execution links and identity sources.

Why: a lease whose process died must be reclaimed within seconds — charged at its worst case when its
call may have reached a provider, released otherwise — so reservations name the process that holds
them (``reservations.owner``, ``lease_owners``). Calls remember the tracked execution they were made
in (rewards reach the routing decisions inside it), where their identity came from, and the input
tokens their reservation assumed (the estimate learns a per-route factor from what providers report).

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('lease_owners',
    sa.Column('owner', sa.String(length=200), nullable=False, comment='host:pid:process start time of a process holding leases'),
    sa.Column('host', sa.String(length=200), nullable=False, comment='host name: on the same host a dead pid is seen at once'),
    sa.Column('pid', sa.Integer(), nullable=False, comment='process id'),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time the process registered'),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False, comment="last sign of life: other hosts reclaim the leases of an owner whose heartbeat stopped"),
    sa.PrimaryKeyConstraint('owner'),
    comment='Processes holding leases (migration 0003): dead owners\' leases are reclaimed within seconds, not at TTL.'
    )
    with op.batch_alter_table('reservations') as batch:
        batch.add_column(sa.Column('owner', sa.String(length=200), nullable=True, comment='lease_owners.owner of the process holding the lease: reclaimed within seconds when it dies (0003)'))
    with op.batch_alter_table('llm_calls') as batch:
        batch.add_column(sa.Column('execution_id', sa.String(length=36), nullable=True, comment='executions.id of the tracked execution the call was made in (migration 0003)'))
        batch.add_column(sa.Column('identity_source', sa.String(length=32), nullable=True, comment='where user and department came from: declared, default, token, notebook, proxy-key (0003)'))
        batch.add_column(sa.Column('reserved_prompt_tokens', sa.Integer(), nullable=True, comment='input tokens the reservation assumed; with prompt_tokens it teaches the estimate (0003)'))
        batch.create_index('ix_llm_calls_execution', ['execution_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('llm_calls') as batch:
        batch.drop_index('ix_llm_calls_execution')
        batch.drop_column('reserved_prompt_tokens')
        batch.drop_column('identity_source')
        batch.drop_column('execution_id')
    with op.batch_alter_table('reservations') as batch:
        batch.drop_column('owner')
    op.drop_table('lease_owners')

"""Quality signals: call_signals (judges, deterministic checks, human feedback, implicit signals, scores
given to tracked executions), and the tracked execution of each routing decision.

Why: with a real provider nothing reports quality with the answer; the router learns from signals that
arrive later, from several sources of different reliability, each of which must reach it exactly once
per call, whatever order they arrive in and whichever process receives them.

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('call_signals',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the signal'),
    sa.Column('call_id', sa.String(length=64), nullable=False, comment='llm_calls.id the signal scores; joined to routing_decisions.call_id (it may arrive first)'),
    sa.Column('source', sa.String(length=200), nullable=False, comment='who scored it: judge:<name>, check:<use case>, human, execution, provider, failure, refusal or regenerate; one signal per source and call (a repeat is ignored)'),
    sa.Column('score', sa.Float(), nullable=False, comment='the raw score in [0, 1] as the source gave it'),
    sa.Column('weight', sa.Float(), nullable=False, comment='how much the source counts, in observations (human 1, a judge less, a weak implicit signal less still)'),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time the signal arrived'),
    sa.Column('comment', sa.Text(), nullable=True, comment='free-text comment (human feedback), or why a check failed'),
    sa.Column('execution_id', sa.String(length=36), nullable=True, comment='the tracked execution the score was given to, if any'),
    sa.Column('data', sa.JSON(none_as_null=True), nullable=False, comment='other facts (judge route and cost, check details, ...)'),
    sa.Column('quality', sa.Float(), nullable=True, comment="the score after the source's calibration on human labels, as the router learned it"),
    sa.Column('reward', sa.Float(), nullable=True, comment='the reward (quality, cost, latency) the router learned from it'),
    sa.Column('applied_at', sa.DateTime(timezone=True), nullable=True, comment='UTC time the router learned from it; NULL while its routing decision is not known yet'),
    sa.Column('applied_by', sa.String(length=64), nullable=True, comment='router instance that learned it (others replay it from here)'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('call_id', 'source', name='uq_call_signals_call_source'),
    comment='Quality signals on LLM calls (judges, checks, human feedback, implicit signals), each learned by the router exactly once.'
    )
    op.create_index('ix_call_signals_applied', 'call_signals', ['applied_at'], unique=False)
    with op.batch_alter_table('routing_decisions') as batch:
        batch.add_column(sa.Column('execution_id', sa.String(length=36), nullable=True, comment='track_execution() block the call was made in (migration 0006): a score given to the execution rewards this decision'))
        batch.create_index('ix_routing_decisions_execution', ['execution_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('routing_decisions') as batch:
        batch.drop_index('ix_routing_decisions_execution')
        batch.drop_column('execution_id')
    op.drop_index('ix_call_signals_applied', table_name='call_signals')
    op.drop_table('call_signals')

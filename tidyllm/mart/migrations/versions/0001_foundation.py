"""Foundation: tracked executions, their steps, and learned outcomes (the seed's TidyMart).

Why: track_execution() writes one execution row plus its steps; learn_from_execution()
writes outcomes that get_optimal_config() reads back.

Revision ID: 0001
Revises: 
"""

from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('executions',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the tracked execution'),
    sa.Column('module', sa.String(length=100), nullable=False, comment="subsystem that ran it, e.g. 'gateway' or 'workflow'"),
    sa.Column('operation', sa.String(length=200), nullable=False, comment="what it did, e.g. 'mlflow_query'"),
    sa.Column('context', sa.JSON(), nullable=False, comment='caller context (department, route, ...) as given'),
    sa.Column('status', sa.String(length=20), nullable=False, comment='running, success or error'),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False, comment='UTC start of the block'),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True, comment='UTC end of the block; NULL while running'),
    sa.Column('duration_ms', sa.Float(), nullable=True, comment='wall time of the block'),
    sa.Column('result', sa.JSON(), nullable=True, comment='what record_result() stored'),
    sa.Column('error_type', sa.String(length=200), nullable=True, comment='exception class when the block raised'),
    sa.Column('error_message', sa.Text(), nullable=True, comment='exception message when the block raised'),
    sa.PrimaryKeyConstraint('id'),
    comment='One row per track_execution() block.'
    )
    op.create_index('ix_executions_module_started', 'executions', ['module', 'started_at'], unique=False)
    op.create_table('outcomes',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the outcome'),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time it was learned'),
    sa.Column('module', sa.String(length=100), nullable=False, comment='subsystem the outcome is about'),
    sa.Column('operation', sa.String(length=200), nullable=True, comment='operation the outcome is about'),
    sa.Column('context', sa.JSON(), nullable=False, comment='context keys the outcome applies to (department, use_case, ...)'),
    sa.Column('parameters', sa.JSON(), nullable=False, comment='the configuration that produced it (route, model, ...)'),
    sa.Column('performance_score', sa.Float(), nullable=True, comment='score in [0, 1]; higher is better'),
    sa.Column('call_id', sa.String(length=64), nullable=True, comment='LLM call this outcome scores, when it is feedback on one call'),
    sa.Column('data', sa.JSON(), nullable=False, comment='every other field given to learn_from_execution()'),
    sa.PrimaryKeyConstraint('id'),
    comment='Learned outcomes: what configuration scored how well in which context.'
    )
    op.create_index('ix_outcomes_call', 'outcomes', ['call_id'], unique=False)
    op.create_index('ix_outcomes_module', 'outcomes', ['module', 'recorded_at'], unique=False)
    op.create_table('execution_steps',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the step'),
    sa.Column('execution_id', sa.String(length=36), nullable=False, comment='the execution this step belongs to'),
    sa.Column('seq', sa.Integer(), nullable=False, comment='order of the step within its execution, from 0'),
    sa.Column('name', sa.String(length=200), nullable=False, comment='step name given to record_step()'),
    sa.Column('data', sa.JSON(), nullable=False, comment='step payload given to record_step()'),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time record_step() was called'),
    sa.ForeignKeyConstraint(['execution_id'], ['executions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    comment='Steps recorded inside a tracked execution.'
    )
    op.create_index('ix_execution_steps_execution', 'execution_steps', ['execution_id', 'seq'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_execution_steps_execution', table_name='execution_steps')
    op.drop_table('execution_steps')
    op.drop_index('ix_outcomes_module', table_name='outcomes')
    op.drop_index('ix_outcomes_call', table_name='outcomes')
    op.drop_table('outcomes')
    op.drop_index('ix_executions_module_started', table_name='executions')
    op.drop_table('executions')

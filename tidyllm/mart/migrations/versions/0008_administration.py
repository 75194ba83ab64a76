"""Administration and alerts: the declared state of budgets, rules, prices and rate limits (what the
file said at the last apply, and the runtime value), per-budget alert thresholds, and alert events.

Why: a runtime change (``tidyllm budget set``) must not be silently reverted by the next ``install()``;
drift is only measurable against what the file declared last time. Alerts fire once per threshold per
window, which a unique key in the database guarantees across processes.

Revision ID: 0008
Revises: 0007
"""

from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('declared_state',
    sa.Column('kind', sa.String(length=20), nullable=False, comment='budget, rule, price, rate_limit, route or governance'),
    sa.Column('key', sa.String(length=400), nullable=False, comment="which one: 'department/risk/month', a rule or route name, 'model@effective', a setting"),
    sa.Column('file_value', sa.JSON(none_as_null=True), nullable=True, comment='what tidyllm.yaml declared at the last apply (NULL: not in the file); drift is measured from it'),
    sa.Column('value', sa.JSON(none_as_null=True), nullable=True, comment='the value in force for kinds kept only here (rules, rate limits); NULL when deleted'),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time of the last change'),
    sa.Column('updated_by', sa.String(length=200), nullable=True, comment='who made the last change (audited in audit_log)'),
    sa.PrimaryKeyConstraint('kind', 'key'),
    comment='Declared state of the administered settings: the file\'s last applied value and the runtime value.'
    )
    op.create_table('alert_events',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the alert'),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False, comment='UTC time the alert fired'),
    sa.Column('budget_id', sa.String(length=36), nullable=False, comment='budget concerned'),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False, comment='UTC start of the budget window it fired in'),
    sa.Column('kind', sa.String(length=20), nullable=False, comment='threshold (a share of the limit spent) or forecast'),
    sa.Column('threshold', sa.Float(), nullable=False, comment='the fraction crossed (threshold) or 0 (forecast): one alert per threshold per window'),
    sa.Column('message', sa.Text(), nullable=False, comment='the text delivered to people'),
    sa.Column('data', sa.JSON(none_as_null=True), nullable=False, comment='scope, name, period, limit, spend and forecast at the time'),
    sa.Column('deliveries', sa.JSON(none_as_null=True), nullable=True, comment='per sink: delivered, failed after retries, with the last error'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('budget_id', 'window_start', 'kind', 'threshold', name='uq_alert_events_once'),
    comment='Budget alerts: soft thresholds and forecast exhaustion, once per threshold per window.'
    )
    op.create_index('ix_alert_events_at', 'alert_events', ['at'], unique=False)
    if op.get_bind().dialect.name == "postgresql":  # SQLite keeps no comments
        op.alter_column('audit_log', 'decision', existing_type=sa.String(length=20), existing_nullable=False,
                        comment='allowed, refused or unenforced (calls); admin or admin_refused (administrative changes)')
        op.alter_column('audit_log', 'status', existing_type=sa.String(length=20), existing_nullable=False,
                        comment='success, failure, refused, unenforced (calls); applied or refused (administrative changes)')
        op.create_table_comment('audit_log', 'Append-only, hash-chained audit trail: one row per governed call and '
                                'per administrative change.')
    with op.batch_alter_table('budgets') as batch:
        batch.add_column(sa.Column('thresholds', sa.JSON(none_as_null=True), nullable=True,
                                   comment='fractions of the limit that raise an alert (NULL: alerts.thresholds); added in 0004'))


def downgrade() -> None:
    with op.batch_alter_table('budgets') as batch:
        batch.drop_column('thresholds')
    op.drop_index('ix_alert_events_at', table_name='alert_events')
    op.drop_table('alert_events')
    op.drop_table('declared_state')

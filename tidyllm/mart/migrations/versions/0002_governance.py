"""Governance, calls and routing: llm_calls, the hash-chained audit_log and its head, budgets with their
windows, reservations (leases) and events, effective-dated prices, routing decisions with
propensities, the bandit's saved state, and rate-limit events.

Why: enforcement must be decided in SQL transactions shared by every process (reserve-then-settle),
and every governed call must leave a verifiable audit row.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_head',
    sa.Column('id', sa.Integer(), nullable=False, comment='always 1: the single head row'),
    sa.Column('seq', sa.BigInteger(), nullable=False, comment='seq of the newest audit row'),
    sa.Column('digest', sa.String(length=64), nullable=False, comment='digest of the newest audit row'),
    sa.Column('rows', sa.BigInteger(), nullable=False, comment='number of audit rows written'),
    sa.PrimaryKeyConstraint('id'),
    comment='Head of the audit chain: detects deletion of the newest rows; its row lock serialises appends.'
    )
    op.create_table('audit_log',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False, comment='position in the hash chain'),
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the audit row'),
    sa.Column('call_id', sa.String(length=64), nullable=True, comment='llm_calls.id'),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time the row was written'),
    sa.Column('user_id', sa.String(length=200), nullable=True, comment='who asked'),
    sa.Column('department', sa.String(length=200), nullable=True, comment='department charged'),
    sa.Column('audit_reason', sa.Text(), nullable=True, comment='why the caller said they made the call'),
    sa.Column('use_case', sa.String(length=200), nullable=True, comment='use case'),
    sa.Column('data_sensitivity', sa.String(length=50), nullable=True, comment='sensitivity class'),
    sa.Column('requested_model', sa.String(length=300), nullable=True, comment='model or group requested'),
    sa.Column('route', sa.String(length=300), nullable=True, comment='endpoint that served it'),
    sa.Column('decision', sa.String(length=20), nullable=False, comment='allowed, refused or unenforced'),
    sa.Column('rule', sa.String(length=300), nullable=True, comment='the rule that refused it (budget scope, authorisation rule, ...)'),
    sa.Column('status', sa.String(length=20), nullable=False, comment='success, failure, refused, unenforced'),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True, comment='input tokens'),
    sa.Column('completion_tokens', sa.Integer(), nullable=True, comment='output tokens'),
    sa.Column('cost_usd', sa.Float(), nullable=True, comment='exact cost'),
    sa.Column('latency_ms', sa.Float(), nullable=True, comment='latency'),
    sa.Column('error', sa.Text(), nullable=True, comment='error class and message (secrets redacted)'),
    sa.Column('content_hash', sa.String(length=64), nullable=True, comment='SHA-256 of the request messages (capture=hash or full)'),
    sa.Column('content', sa.JSON(none_as_null=True), nullable=True, comment='the request messages (capture=full only)'),
    sa.Column('tools', sa.JSON(none_as_null=True), nullable=True, comment='names of tools offered or called (never argument values unless capture=full)'),
    sa.Column('trace_id', sa.String(length=100), nullable=True, comment='MLflow trace id when the server gateway traced the call'),
    sa.Column('extra', sa.JSON(none_as_null=True), nullable=True, comment='other facts (stream outcome, price version, ...)'),
    sa.Column('prev_digest', sa.String(length=64), nullable=False, comment='digest of the previous row (chain link)'),
    sa.Column('digest', sa.String(length=64), nullable=False, comment="SHA-256 over this row's canonical content and prev_digest"),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    comment='Append-only, hash-chained audit trail: one row per governed call.'
    )
    op.create_table('bandit_state',
    sa.Column('name', sa.String(length=100), nullable=False, comment='which bandit (one per platform)'),
    sa.Column('version', sa.Integer(), nullable=False, comment='updates folded into the state'),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time saved'),
    sa.Column('last_decision_at', sa.DateTime(timezone=True), nullable=True, comment='rewarded decisions up to this time are folded in'),
    sa.Column('state', sa.JSON(none_as_null=True), nullable=False, comment="the estimator's learned state"),
    sa.PrimaryKeyConstraint('name'),
    comment='Snapshot of the learned router state, restored at start-up.'
    )
    op.create_table('budget_events',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the event'),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False, comment='UTC time'),
    sa.Column('budget_id', sa.String(length=36), nullable=True, comment='budget concerned'),
    sa.Column('kind', sa.String(length=30), nullable=False, comment='soft_threshold, refused, expired_lease, clamped'),
    sa.Column('data', sa.JSON(none_as_null=True), nullable=False, comment='numbers at the time (spent, reserved, limit, call id)'),
    sa.PrimaryKeyConstraint('id'),
    comment='Budget warnings and notable events.'
    )
    op.create_table('budgets',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the budget'),
    sa.Column('scope', sa.String(length=20), nullable=False, comment='org, department, user, route or model'),
    sa.Column('name', sa.String(length=300), nullable=False, comment='which org/department/user/route/model'),
    sa.Column('period', sa.String(length=10), nullable=False, comment='day, week, month or total'),
    sa.Column('limit_usd', sa.Float(), nullable=False, comment='hard cap per period'),
    sa.Column('soft_threshold', sa.Float(), nullable=True, comment='fraction of the limit that triggers a warning event'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='UTC creation time'),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time of the last change'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('scope', 'name', 'period', name='uq_budgets_scope_name_period'),
    comment='Hard budgets per scope and period.'
    )
    op.create_table('llm_calls',
    sa.Column('id', sa.String(length=64), nullable=False, comment='LiteLLM call id (litellm_call_id)'),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time the governed call started'),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True, comment='UTC time it ended'),
    sa.Column('call_type', sa.String(length=40), nullable=False, comment='completion, acompletion, embedding, ...'),
    sa.Column('user_id', sa.String(length=200), nullable=True, comment='who asked'),
    sa.Column('department', sa.String(length=200), nullable=True, comment='whose budget it spends'),
    sa.Column('use_case', sa.String(length=200), nullable=True, comment='what for (qa, summarise, ...)'),
    sa.Column('data_sensitivity', sa.String(length=50), nullable=True, comment="sensitivity class of the request's data"),
    sa.Column('requested_model', sa.String(length=300), nullable=True, comment='model or group the caller asked for'),
    sa.Column('route', sa.String(length=300), nullable=True, comment='gateway endpoint / deployment that served it'),
    sa.Column('provider_model', sa.String(length=300), nullable=True, comment='upstream model name the provider reported'),
    sa.Column('status', sa.String(length=20), nullable=False, comment='success, failure, refused, or unenforced (plain sync call that bypassed enforcement)'),
    sa.Column('stream', sa.Boolean(), nullable=False, comment='whether the call streamed'),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True, comment='input tokens reported by the provider'),
    sa.Column('completion_tokens', sa.Integer(), nullable=True, comment='output tokens reported by the provider'),
    sa.Column('cached_tokens', sa.Integer(), nullable=True, comment="input tokens served from the provider's cache, when reported"),
    sa.Column('reasoning_tokens', sa.Integer(), nullable=True, comment='reasoning tokens, when reported'),
    sa.Column('cost_usd', sa.Float(), nullable=True, comment='exact cost at the price version used'),
    sa.Column('reserved_usd', sa.Float(), nullable=True, comment='worst-case amount reserved before the call'),
    sa.Column('price_id', sa.String(length=36), nullable=True, comment='prices.id of the price version used'),
    sa.Column('latency_ms', sa.Float(), nullable=True, comment='end-to-end latency'),
    sa.Column('error_type', sa.String(length=200), nullable=True, comment='exception class on failure or refusal'),
    sa.Column('error_message', sa.Text(), nullable=True, comment='exception message (secrets redacted)'),
    sa.Column('outcome', sa.String(length=20), nullable=True, comment='stream outcome: completed, abandoned or failed'),
    sa.PrimaryKeyConstraint('id'),
    comment='One row per governed LLM call attempt.'
    )
    op.create_index('ix_llm_calls_dept_started', 'llm_calls', ['department', 'started_at'], unique=False)
    op.create_index('ix_llm_calls_route', 'llm_calls', ['route', 'started_at'], unique=False)
    op.create_table('prices',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the price version'),
    sa.Column('model', sa.String(length=300), nullable=False, comment='endpoint or model name the price applies to'),
    sa.Column('input_per_1m', sa.Float(), nullable=False, comment='USD per 1M input tokens'),
    sa.Column('output_per_1m', sa.Float(), nullable=False, comment='USD per 1M output tokens'),
    sa.Column('effective_from', sa.DateTime(timezone=True), nullable=False, comment='UTC time from which this price applies'),
    sa.Column('source', sa.String(length=50), nullable=False, comment='config, api, litellm'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time registered'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model', 'effective_from', name='uq_prices_model_effective'),
    comment='Effective-dated prices per endpoint or model.'
    )
    op.create_table('rate_events',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID'),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False, comment='UTC time of the admitted call'),
    sa.Column('user_id', sa.String(length=200), nullable=True, comment='caller'),
    sa.Column('department', sa.String(length=200), nullable=True, comment='department'),
    sa.Column('route', sa.String(length=300), nullable=True, comment='route or requested model'),
    sa.Column('tokens', sa.Integer(), nullable=False, comment='worst-case tokens admitted'),
    sa.PrimaryKeyConstraint('id'),
    comment='Admitted calls in the last minute, for requests- and tokens-per-minute limits.'
    )
    op.create_index('ix_rate_events_at', 'rate_events', ['at'], unique=False)
    op.create_table('reservations',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the reservation (lease)'),
    sa.Column('call_id', sa.String(length=64), nullable=False, comment='llm_calls.id it pays for'),
    sa.Column('amount_usd', sa.Float(), nullable=False, comment='worst-case amount held'),
    sa.Column('windows', sa.JSON(none_as_null=True), nullable=False, comment='[[budget_id, window_start], ...] it is held against'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time reserved'),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False, comment='lease end: after it the amount returns'),
    sa.Column('status', sa.String(length=20), nullable=False, comment='open, settled, released or expired'),
    sa.Column('settled_usd', sa.Float(), nullable=True, comment='actual cost charged at settlement'),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True, comment='UTC time it was settled/released/expired'),
    sa.PrimaryKeyConstraint('id'),
    comment='Reserve-then-settle leases against budget windows.'
    )
    op.create_index('ix_reservations_call', 'reservations', ['call_id'], unique=False)
    op.create_index('ix_reservations_open', 'reservations', ['status', 'expires_at'], unique=False)
    op.create_table('routing_decisions',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the decision'),
    sa.Column('call_id', sa.String(length=64), nullable=True, comment='llm_calls.id of the call routed'),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time of the decision'),
    sa.Column('department', sa.String(length=200), nullable=True, comment='department (for per-department analysis)'),
    sa.Column('use_case', sa.String(length=200), nullable=True, comment='use case'),
    sa.Column('model_group', sa.String(length=300), nullable=True, comment='requested model group'),
    sa.Column('context', sa.JSON(none_as_null=True), nullable=False, comment='features the bandit saw'),
    sa.Column('candidates', sa.JSON(none_as_null=True), nullable=False, comment='authorised, healthy, affordable routes offered'),
    sa.Column('route', sa.String(length=300), nullable=False, comment='route chosen'),
    sa.Column('propensity', sa.Float(), nullable=False, comment='probability the route was chosen with'),
    sa.Column('explored', sa.Boolean(), nullable=False, comment='the pick was not the greedy one'),
    sa.Column('policy', sa.String(length=50), nullable=False, comment='bandit, cheapest, fixed'),
    sa.Column('model_version', sa.Integer(), nullable=False, comment='bandit updates seen when deciding'),
    sa.Column('instance', sa.String(length=64), nullable=True, comment='process that decided (others replay its rewards into their bandit)'),
    sa.Column('reward', sa.Float(), nullable=True, comment='reward in [0, 1] once known'),
    sa.Column('quality', sa.Float(), nullable=True, comment='quality score in [0, 1] once known'),
    sa.Column('cost_usd', sa.Float(), nullable=True, comment='cost of the call'),
    sa.Column('latency_ms', sa.Float(), nullable=True, comment='latency of the call'),
    sa.Column('failed', sa.Boolean(), nullable=True, comment='the call failed at the provider'),
    sa.Column('rewarded_at', sa.DateTime(timezone=True), nullable=True, comment='UTC time the reward was recorded'),
    sa.PrimaryKeyConstraint('id'),
    comment='One row per routing decision, with its propensity and later its reward.'
    )
    op.create_index('ix_routing_decisions_call', 'routing_decisions', ['call_id'], unique=False)
    op.create_index('ix_routing_decisions_decided', 'routing_decisions', ['decided_at'], unique=False)
    op.create_table('budget_windows',
    sa.Column('budget_id', sa.String(length=36), nullable=False, comment='the budget'),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False, comment='UTC start of the period window'),
    sa.Column('spent_usd', sa.Float(), nullable=False, comment='settled spend in the window'),
    sa.Column('reserved_usd', sa.Float(), nullable=False, comment='open reservations in the window'),
    sa.Column('warned', sa.Boolean(), nullable=False, comment='soft-threshold warning already recorded'),
    sa.ForeignKeyConstraint(['budget_id'], ['budgets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('budget_id', 'window_start'),
    comment='Running totals of a budget in one period window; the row reservations lock.'
    )


def downgrade() -> None:
    op.drop_table('budget_windows')
    op.drop_index('ix_routing_decisions_decided', table_name='routing_decisions')
    op.drop_index('ix_routing_decisions_call', table_name='routing_decisions')
    op.drop_table('routing_decisions')
    op.drop_index('ix_reservations_open', table_name='reservations')
    op.drop_index('ix_reservations_call', table_name='reservations')
    op.drop_table('reservations')
    op.drop_index('ix_rate_events_at', table_name='rate_events')
    op.drop_table('rate_events')
    op.drop_table('prices')
    op.drop_index('ix_llm_calls_route', table_name='llm_calls')
    op.drop_index('ix_llm_calls_dept_started', table_name='llm_calls')
    op.drop_table('llm_calls')
    op.drop_table('budgets')
    op.drop_table('budget_events')
    op.drop_table('bandit_state')
    op.drop_table('audit_log')
    op.drop_table('audit_head')

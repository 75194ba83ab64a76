"""The mart's tables: declared once here, changed only through migrations (``tidyllm/mart/migrations``).

The schema is public API: platform teams read these tables with pandas and SQL. Every column has a
comment saying why it exists; ``docs/schema.md`` is generated from this module.
Ids are UUID strings, timestamps are UTC, free-form context is JSON.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

_ts = DateTime(timezone=True)
#: Python None is stored as SQL NULL (not the JSON text "null") so "no value" reads back as missing
_json = JSON(none_as_null=True)

executions = Table(
    "executions",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the tracked execution"),
    Column("module", String(100), nullable=False, comment="subsystem that ran it, e.g. 'gateway' or 'workflow'"),
    Column("operation", String(200), nullable=False, comment="what it did, e.g. 'mlflow_query'"),
    Column("context", _json, nullable=False, comment="caller context (department, route, ...) as given"),
    Column("status", String(20), nullable=False, comment="running, success or error"),
    Column("started_at", _ts, nullable=False, comment="UTC start of the block"),
    Column("ended_at", _ts, comment="UTC end of the block; NULL while running"),
    Column("duration_ms", Float, comment="wall time of the block"),
    Column("result", _json, comment="what record_result() stored"),
    Column("error_type", String(200), comment="exception class when the block raised"),
    Column("error_message", Text, comment="exception message when the block raised"),
    comment="One row per track_execution() block.",
)
Index("ix_executions_module_started", executions.c.module, executions.c.started_at)

execution_steps = Table(
    "execution_steps",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the step"),
    Column("execution_id", String(36), ForeignKey("executions.id", ondelete="CASCADE"), nullable=False,
           comment="the execution this step belongs to"),
    Column("seq", Integer, nullable=False, comment="order of the step within its execution, from 0"),
    Column("name", String(200), nullable=False, comment="step name given to record_step()"),
    Column("data", _json, nullable=False, comment="step payload given to record_step()"),
    Column("recorded_at", _ts, nullable=False, comment="UTC time record_step() was called"),
    comment="Steps recorded inside a tracked execution.",
)
Index("ix_execution_steps_execution", execution_steps.c.execution_id, execution_steps.c.seq)

outcomes = Table(
    "outcomes",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the outcome"),
    Column("recorded_at", _ts, nullable=False, comment="UTC time it was learned"),
    Column("module", String(100), nullable=False, comment="subsystem the outcome is about"),
    Column("operation", String(200), comment="operation the outcome is about"),
    Column("context", _json, nullable=False, comment="context keys the outcome applies to (department, use_case, ...)"),
    Column("parameters", _json, nullable=False, comment="the configuration that produced it (route, model, ...)"),
    Column("performance_score", Float, comment="score in [0, 1]; higher is better"),
    Column("call_id", String(64), comment="LLM call this outcome scores, when it is feedback on one call"),
    Column("data", _json, nullable=False, comment="every other field given to learn_from_execution()"),
    comment="Learned outcomes: what configuration scored how well in which context.",
)
Index("ix_outcomes_module", outcomes.c.module, outcomes.c.recorded_at)
Index("ix_outcomes_call", outcomes.c.call_id)

# --- governance, calls and routing (migration 0002) -------------------------------------------

llm_calls = Table(
    "llm_calls",
    metadata,
    Column("id", String(64), primary_key=True,
           comment="call id: tidyllm's own per attempt, or the caller's unique tidyllm_call_id"),
    Column("started_at", _ts, nullable=False, comment="UTC time the governed call started"),
    Column("ended_at", _ts, comment="UTC time it ended"),
    Column("call_type", String(40), nullable=False, comment="completion, acompletion, embedding, ..."),
    Column("user_id", String(200), comment="who asked"),
    Column("department", String(200), comment="whose budget it spends"),
    Column("use_case", String(200), comment="what for (qa, summarise, ...)"),
    Column("data_sensitivity", String(50), comment="sensitivity class of the request's data"),
    Column("requested_model", String(300), comment="model or group the caller asked for"),
    Column("route", String(300), comment="gateway endpoint / deployment that served it"),
    Column("provider_model", String(300), comment="upstream model name the provider reported"),
    Column("status", String(20), nullable=False,
           comment="pending, success, failure, refused, unsettled (its owner died or its lease expired while "
                   "it may have reached the provider: charged at its worst case until evidence corrects it), "
                   "or unenforced (a call that reached a provider without admission)"),
    Column("stream", Boolean, nullable=False, default=False, comment="whether the call streamed"),
    Column("prompt_tokens", Integer, comment="input tokens reported by the provider"),
    Column("completion_tokens", Integer, comment="output tokens reported by the provider"),
    Column("cached_tokens", Integer, comment="input tokens served from the provider's cache, when reported"),
    Column("reasoning_tokens", Integer, comment="reasoning tokens, when reported"),
    Column("cost_usd", Float, comment="exact cost at the price version used"),
    Column("reserved_usd", Float, comment="worst-case amount reserved before the call"),
    Column("price_id", String(36), comment="prices.id of the price version used"),
    Column("latency_ms", Float, comment="end-to-end latency"),
    Column("error_type", String(200), comment="exception class on failure or refusal"),
    Column("error_message", Text, comment="exception message (secrets redacted)"),
    Column("outcome", String(20), comment="stream outcome: completed, abandoned or failed"),
    Column("execution_id", String(36),
           comment="executions.id of the tracked execution the call was made in (migration 0003)"),
    Column("identity_source", String(32),
           comment="where user and department came from: declared, default, token, notebook, proxy-key (0003)"),
    Column("reserved_prompt_tokens", Integer,
           comment="input tokens the reservation assumed; with prompt_tokens it teaches the estimate (0003)"),
    comment="One row per governed LLM call attempt.",
)
Index("ix_llm_calls_dept_started", llm_calls.c.department, llm_calls.c.started_at)
Index("ix_llm_calls_route", llm_calls.c.route, llm_calls.c.started_at)
Index("ix_llm_calls_execution", llm_calls.c.execution_id)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True,
           comment="position in the hash chain"),
    Column("id", String(36), nullable=False, unique=True, comment="UUID of the audit row"),
    Column("call_id", String(64), comment="llm_calls.id"),
    Column("recorded_at", _ts, nullable=False, comment="UTC time the row was written"),
    Column("user_id", String(200), comment="who asked"),
    Column("department", String(200), comment="department charged"),
    Column("audit_reason", Text, comment="why the caller said they made the call"),
    Column("use_case", String(200), comment="use case"),
    Column("data_sensitivity", String(50), comment="sensitivity class"),
    Column("requested_model", String(300), comment="model or group requested"),
    Column("route", String(300), comment="endpoint that served it"),
    Column("decision", String(20), nullable=False,
           comment="allowed, refused or unenforced (calls); admin or admin_refused (administrative changes)"),
    Column("rule", String(300), comment="the rule that refused it (budget scope, authorisation rule, ...)"),
    Column("status", String(20), nullable=False,
           comment="success, failure, refused, unenforced (calls); applied or refused (administrative changes)"),
    Column("prompt_tokens", Integer, comment="input tokens"),
    Column("completion_tokens", Integer, comment="output tokens"),
    Column("cost_usd", Float, comment="exact cost"),
    Column("latency_ms", Float, comment="latency"),
    Column("error", Text, comment="error class and message (secrets redacted)"),
    Column("content_hash", String(64), comment="SHA-256 of the request messages (capture=hash or full)"),
    Column("content", _json, comment="the request messages (capture=full only)"),
    Column("tools", _json, comment="names of tools offered or called (never argument values unless capture=full)"),
    Column("trace_id", String(100), comment="MLflow trace id when the server gateway traced the call"),
    Column("extra", _json, comment="other facts (stream outcome, price version, ...)"),
    Column("prev_digest", String(64), nullable=False, comment="digest of the previous row (chain link)"),
    Column("digest", String(64), nullable=False, comment="SHA-256 over this row's canonical content and prev_digest"),
    comment="Append-only, hash-chained audit trail: one row per governed call and per administrative change.",
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, comment="always 1: the single head row"),
    Column("seq", BigInteger, nullable=False, comment="seq of the newest audit row"),
    Column("digest", String(64), nullable=False, comment="digest of the newest audit row"),
    Column("rows", BigInteger, nullable=False, comment="number of audit rows written"),
    comment="Head of the audit chain: detects deletion of the newest rows; its row lock serialises appends.",
)

budgets = Table(
    "budgets",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the budget"),
    Column("scope", String(20), nullable=False, comment="org, department, user, route or model"),
    Column("name", String(300), nullable=False, comment="which org/department/user/route/model"),
    Column("period", String(10), nullable=False, comment="day, week, month or total"),
    Column("limit_usd", Float, nullable=False, comment="hard cap per period"),
    Column("soft_threshold", Float, comment="fraction of the limit that triggers a warning event"),
    Column("thresholds", _json,
           comment="fractions of the limit that raise an alert (NULL: alerts.thresholds); added in 0004"),
    Column("created_at", _ts, nullable=False, comment="UTC creation time"),
    Column("updated_at", _ts, nullable=False, comment="UTC time of the last change"),
    UniqueConstraint("scope", "name", "period", name="uq_budgets_scope_name_period"),
    comment="Hard budgets per scope and period.",
)

budget_windows = Table(
    "budget_windows",
    metadata,
    Column("budget_id", String(36), ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True,
           comment="the budget"),
    Column("window_start", _ts, primary_key=True, comment="UTC start of the period window"),
    Column("spent_usd", Float, nullable=False, default=0.0, comment="settled spend in the window"),
    Column("reserved_usd", Float, nullable=False, default=0.0, comment="open reservations in the window"),
    Column("warned", Boolean, nullable=False, default=False, comment="soft-threshold warning already recorded"),
    comment="Running totals of a budget in one period window; the row reservations lock.",
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the reservation (lease)"),
    Column("call_id", String(64), nullable=False,
           comment="llm_calls.id it pays for, or credit:<reservation id> for an admission-credit block"),
    Column("amount_usd", Float, nullable=False, comment="worst-case amount held"),
    Column("windows", _json, nullable=False, comment="[[budget_id, window_start], ...] it is held against"),
    Column("created_at", _ts, nullable=False, comment="UTC time reserved"),
    Column("expires_at", _ts, nullable=False, comment="lease end: after it the amount returns"),
    Column("status", String(20), nullable=False,
           comment="open, settled, released, expired (returned: nothing reached a provider), or unsettled "
                   "(charged at its worst case because its call may have reached a provider; corrected by evidence)"),
    Column("settled_usd", Float, comment="actual cost charged at settlement"),
    Column("closed_at", _ts, comment="UTC time it was settled/released/expired"),
    Column("owner", String(200),
           comment="lease_owners.owner of the process holding the lease: reclaimed within seconds when it dies (0003)"),
    comment="Reserve-then-settle leases against budget windows.",
)
Index("ix_reservations_open", reservations.c.status, reservations.c.expires_at)
Index("ix_reservations_call", reservations.c.call_id)

lease_owners = Table(
    "lease_owners",
    metadata,
    Column("owner", String(200), primary_key=True, comment="host:pid:process start time of a process holding leases"),
    Column("host", String(200), nullable=False, comment="host name: on the same host a dead pid is seen at once"),
    Column("pid", Integer, nullable=False, comment="process id"),
    Column("started_at", _ts, nullable=False, comment="UTC time the process registered"),
    Column("heartbeat_at", _ts, nullable=False,
           comment="last sign of life: other hosts reclaim the leases of an owner whose heartbeat stopped"),
    comment="Processes holding leases (migration 0003): dead owners' leases are reclaimed within seconds, not at TTL.",
)

budget_events = Table(
    "budget_events",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the event"),
    Column("at", _ts, nullable=False, comment="UTC time"),
    Column("budget_id", String(36), comment="budget concerned"),
    Column("kind", String(30), nullable=False, comment="soft_threshold, refused, expired_lease, unsettled_lease, clamped"),
    Column("data", _json, nullable=False, comment="numbers at the time (spent, reserved, limit, call id)"),
    comment="Budget warnings and notable events.",
)

prices = Table(
    "prices",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the price version"),
    Column("model", String(300), nullable=False, comment="endpoint or model name the price applies to"),
    Column("input_per_1m", Float, nullable=False, comment="USD per 1M input tokens"),
    Column("output_per_1m", Float, nullable=False, comment="USD per 1M output tokens"),
    Column("effective_from", _ts, nullable=False, comment="UTC time from which this price applies"),
    Column("source", String(50), nullable=False, comment="config, api, litellm"),
    Column("created_at", _ts, nullable=False, comment="UTC time registered"),
    UniqueConstraint("model", "effective_from", name="uq_prices_model_effective"),
    comment="Effective-dated prices per endpoint or model.",
)

routing_decisions = Table(
    "routing_decisions",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the decision"),
    Column("call_id", String(64), comment="llm_calls.id of the call routed"),
    Column("decided_at", _ts, nullable=False, comment="UTC time of the decision"),
    Column("department", String(200), comment="department (for per-department analysis)"),
    Column("use_case", String(200), comment="use case"),
    Column("model_group", String(300), comment="requested model group"),
    Column("context", _json, nullable=False, comment="features the bandit saw"),
    Column("candidates", _json, nullable=False, comment="authorised, healthy, affordable routes offered"),
    Column("route", String(300), nullable=False, comment="route chosen"),
    Column("propensity", Float, nullable=False, comment="probability the route was chosen with"),
    Column("explored", Boolean, nullable=False, default=False, comment="the pick was not the greedy one"),
    Column("policy", String(50), nullable=False, comment="bandit, cheapest, fixed"),
    Column("model_version", Integer, nullable=False, default=0, comment="bandit updates seen when deciding"),
    Column("instance", String(64), comment="process that decided (others replay its rewards into their bandit)"),
    Column("reward", Float, comment="reward in [0, 1] once known"),
    Column("quality", Float, comment="quality score in [0, 1] once known"),
    Column("cost_usd", Float, comment="cost of the call"),
    Column("latency_ms", Float, comment="latency of the call"),
    Column("failed", Boolean, comment="the call failed at the provider"),
    Column("rewarded_at", _ts, comment="UTC time the reward was recorded"),
    Column("execution_id", String(36),
           comment="track_execution() block the call was made in (migration 0006): a score given to the "
                   "execution rewards this decision"),
    comment="One row per routing decision, with its propensity and later its reward.",
)
Index("ix_routing_decisions_decided", routing_decisions.c.decided_at)
Index("ix_routing_decisions_call", routing_decisions.c.call_id)
Index("ix_routing_decisions_execution", routing_decisions.c.execution_id)

# --- quality signals (migration 0006) ---------------------------------------------------------------

call_signals = Table(
    "call_signals",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the signal"),
    Column("call_id", String(64), nullable=False,
           comment="llm_calls.id the signal scores; joined to routing_decisions.call_id (it may arrive first)"),
    Column("source", String(200), nullable=False,
           comment="who scored it: judge:<name>, check:<use case>, human, execution, provider, failure, "
                   "refusal or regenerate; one signal per source and call (a repeat is ignored)"),
    Column("score", Float, nullable=False, comment="the raw score in [0, 1] as the source gave it"),
    Column("weight", Float, nullable=False,
           comment="how much the source counts, in observations (human 1, a judge less, a weak implicit signal "
                   "less still)"),
    Column("recorded_at", _ts, nullable=False, comment="UTC time the signal arrived"),
    Column("comment", Text, comment="free-text comment (human feedback), or why a check failed"),
    Column("execution_id", String(36), comment="the tracked execution the score was given to, if any"),
    Column("data", _json, nullable=False, comment="other facts (judge route and cost, check details, ...)"),
    Column("quality", Float,
           comment="the score after the source's calibration on human labels, as the router learned it"),
    Column("reward", Float, comment="the reward (quality, cost, latency) the router learned from it"),
    Column("applied_at", _ts,
           comment="UTC time the router learned from it; NULL while its routing decision is not known yet"),
    Column("applied_by", String(64), comment="router instance that learned it (others replay it from here)"),
    UniqueConstraint("call_id", "source", name="uq_call_signals_call_source"),
    comment="Quality signals on LLM calls (judges, checks, human feedback, implicit signals), each learned "
            "by the router exactly once.",
)
Index("ix_call_signals_applied", call_signals.c.applied_at)

bandit_state = Table(
    "bandit_state",
    metadata,
    Column("name", String(100), primary_key=True, comment="which bandit (one per platform)"),
    Column("version", Integer, nullable=False, comment="updates folded into the state"),
    Column("updated_at", _ts, nullable=False, comment="UTC time saved"),
    Column("last_decision_at", _ts, comment="rewarded decisions up to this time are folded in"),
    Column("state", _json, nullable=False, comment="the estimator's learned state"),
    comment="Snapshot of the learned router state, restored at start-up.",
)

rate_events = Table(
    "rate_events",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID"),
    Column("at", _ts, nullable=False, comment="UTC time of the admitted call"),
    Column("user_id", String(200), comment="caller"),
    Column("department", String(200), comment="department"),
    Column("route", String(300), comment="route or requested model"),
    Column("tokens", Integer, nullable=False, comment="worst-case tokens admitted"),
    comment="Admitted calls in the last minute, for requests- and tokens-per-minute limits.",
)
Index("ix_rate_events_at", rate_events.c.at)

proxy_keys = Table(
    "proxy_keys",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the key: what `tidyllm keys revoke` and `rotate` take"),
    Column("key_hash", String(64), nullable=False, unique=True,
           comment="SHA-256 of the key; the key itself is shown once at creation and never stored"),
    Column("prefix", String(24), nullable=False, comment="first characters of the key, to recognise it in listings"),
    Column("user_id", String(200), comment="user the key speaks for; NULL for an application key (the request's "
                                           "OpenAI `user` field names the end user)"),
    Column("department", String(200), nullable=False, comment="department every call with the key is governed as"),
    Column("routes", _json, comment="glob patterns of the routes and groups the key may call; NULL: any the "
                                    "authorisation policy allows"),
    Column("note", String(300), comment="free text: what the key is for"),
    Column("created_at", _ts, nullable=False, comment="UTC creation time"),
    Column("expires_at", _ts, comment="UTC time the key stops working (NULL: never)"),
    Column("revoked_at", _ts, comment="UTC time the key was revoked or rotated (NULL: live)"),
    Column("replaced_by", String(36), comment="proxy_keys.id of the key that replaced it by rotation"),
    comment="API keys of the tidyllm LiteLLM proxy, each bound to a user and department (stored hashed).",
)

# --- retrieval indexes (migration 0007) ------------------------------------------------------

rag_indexes = Table(
    "rag_indexes",
    metadata,
    Column("name", String(200), primary_key=True, comment="index name given to tidyllm.apps.Index"),
    Column("embedding_model", String(300), nullable=False,
           comment="gateway embedding route or group the index embeds with (queries must use the same)"),
    Column("dimensions", Integer, comment="length of the vectors; set by the first embedding"),
    Column("backend", String(20), nullable=False, comment="vector store: sqlite-vec or pgvector"),
    Column("vector_table", String(100), nullable=False,
           comment="table holding the vectors (created on first use: its type depends on the dimensions)"),
    Column("created_at", _ts, nullable=False, comment="UTC creation time"),
    Column("updated_at", _ts, nullable=False, comment="UTC time of the last add()"),
    comment="Retrieval (RAG) indexes: which embedding model and vector table each one uses.",
)

rag_chunks = Table(
    "rag_chunks",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True,
           comment="chunk row id; the key of its vector in the index's vector table"),
    Column("index_name", String(200), ForeignKey("rag_indexes.name", ondelete="CASCADE"), nullable=False,
           comment="the index"),
    Column("document", String(1000), nullable=False, comment="document name the chunk comes from"),
    Column("chunk_key", String(64), nullable=False,
           comment="hash of (document, section, first paragraph): the chunk's place, stable across edits"),
    Column("location", String(1000), nullable=False, comment="citation: document, page, section, paragraphs"),
    Column("section", Text, comment="heading path of the chunk"),
    Column("page", Integer, comment="first page (PDF)"),
    Column("text", Text, nullable=False, comment="the chunk's text, as embedded"),
    Column("text_hash", String(64), nullable=False,
           comment="SHA-256 of the text: a chunk whose hash is unchanged is not embedded again"),
    Column("tokens", Integer, comment="cl100k_base tokens of the text"),
    Column("call_id", String(64), comment="llm_calls.id of the embedding call that produced its vector"),
    Column("execution_id", String(36), comment="executions.id of the add() run that embedded it"),
    Column("embedded_at", _ts, nullable=False, comment="UTC time it was embedded"),
    UniqueConstraint("index_name", "document", "chunk_key", name="uq_rag_chunks_place"),
    comment="Chunks of the documents in each retrieval index, with their citations and embedding calls.",
)
# --- administration and alerts (migration 0004) --------------------------------------------------

declared_state = Table(
    "declared_state",
    metadata,
    Column("kind", String(20), primary_key=True, comment="budget, rule, price, rate_limit, route or governance"),
    Column("key", String(400), primary_key=True,
           comment="which one: 'department/risk/month', a rule or route name, 'model@effective', a setting"),
    Column("file_value", _json,
           comment="what tidyllm.yaml declared at the last apply (NULL: not in the file); drift is measured from it"),
    Column("value", _json,
           comment="the value in force for kinds kept only here (rules, rate limits); NULL when deleted"),
    Column("updated_at", _ts, nullable=False, comment="UTC time of the last change"),
    Column("updated_by", String(200), comment="who made the last change (audited in audit_log)"),
    comment="Declared state of the administered settings: the file's last applied value and the runtime value.",
)

alert_events = Table(
    "alert_events",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUID of the alert"),
    Column("at", _ts, nullable=False, comment="UTC time the alert fired"),
    Column("budget_id", String(36), nullable=False, comment="budget concerned"),
    Column("window_start", _ts, nullable=False, comment="UTC start of the budget window it fired in"),
    Column("kind", String(20), nullable=False, comment="threshold (a share of the limit spent) or forecast"),
    Column("threshold", Float, nullable=False,
           comment="the fraction crossed (threshold) or 0 (forecast): one alert per threshold per window"),
    Column("message", Text, nullable=False, comment="the text delivered to people"),
    Column("data", _json, nullable=False, comment="scope, name, period, limit, spend and forecast at the time"),
    Column("deliveries", _json, comment="per sink: delivered, failed after retries, with the last error"),
    UniqueConstraint("budget_id", "window_start", "kind", "threshold", name="uq_alert_events_once"),
    comment="Budget alerts: soft thresholds and forecast exhaustion, once per threshold per window.",
)
Index("ix_alert_events_at", alert_events.c.at)

#: tables created by each migration, for ``frame()`` and the docs
TABLES = {t.name: t for t in metadata.sorted_tables}

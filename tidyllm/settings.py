"""One settings object: ``tidyllm.yaml`` + ``TIDYLLM_*`` environment + explicit arguments.

Precedence: explicit keyword arguments > environment variables > the file > defaults.
Only the boundaries (``install()``, ``get_tidymart()``, the CLI, the magics) call
:func:`load_settings`; library objects take their configuration as constructor arguments.

The file is found as: the ``config`` argument, else ``$TIDYLLM_CONFIG``, else ``./tidyllm.yaml``
when it exists. Sections (``defaults``, ``governance``, ``audit``, ``routing``, ``budgets``,
``authorization``, ``prices``, ``rate_limits``) are validated here, so a bad file is reported
with the file, the key and what is allowed before anything is opened or written.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tidyllm.errors import ConfigurationError

__all__ = ["Settings", "load_settings", "default_database_url", "default_home", "mask_url", "SENSITIVITY_CLASSES"]

#: the data-sensitivity classes understood by default, least to most sensitive
SENSITIVITY_CLASSES = ("public", "internal", "confidential", "restricted")

_DEFAULTS_KEYS = ("user_id", "department", "audit_reason", "use_case", "data_sensitivity")


def default_home() -> Path:
    """tidyllm's home folder: ``$TIDYLLM_HOME``, else ``$XDG_DATA_HOME/tidyllm``, else ``~/.local/share/tidyllm``."""
    home = os.environ.get("TIDYLLM_HOME")
    if home:
        return Path(home)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tidyllm"


def default_database_url() -> str:
    """The default mart: ``tidyllm.db`` in :func:`default_home`."""
    return f"sqlite:///{default_home() / 'tidyllm.db'}"


@dataclass(frozen=True)
class GovernanceSettings:
    """Knobs of the governance layer (budgets, authorisation, leases)."""

    #: refuse a call that carries no ``audit_reason`` (the same as listing it in ``require``)
    require_audit: bool = False
    #: context every call must carry, from department, user_id, audit_reason, use_case, data_sensitivity
    #: (``TIDYLLM_REQUIRE`` takes them comma-separated; ``[]`` requires none). Whatever it says, a call
    #: without a department is refused while any department budget exists.
    require: tuple[str, ...] = ("department",)
    #: "declared": a caller's metadata is taken unless a token or an authenticated identity says otherwise;
    #: "verified": every call needs a verified identity (authenticated, token, notebook user) and a
    #: declared user or department that disagrees with it is refused (docs/governance.md).
    identity: str = "declared"
    #: the department of each user whose verified identity names none: ``{user: department}``
    user_departments: Mapping[str, str] = field(default_factory=dict)
    #: file holding the platform's token signing key, outside the database (default: ``token.key`` in
    #: ``$TIDYLLM_HOME``); `tidyllm token issue` creates it, mode 0600
    token_key_file: str | None = None
    #: this process's signed caller token (from the environment; never put it in a file)
    token: str | None = field(default=None, repr=False)
    #: time zone in which budget periods (day/week/month) start
    timezone: str = "UTC"
    #: allowed ``data_sensitivity`` values, least to most sensitive
    sensitivity_classes: tuple[str, ...] = SENSITIVITY_CLASSES
    #: what to do with a budgeted call to a model without a price: "refuse" (fail closed) or "allow"
    unpriced: str = "refuse"
    #: per-department override of ``unpriced``
    unpriced_by_department: Mapping[str, str] = field(default_factory=dict)
    #: output tokens assumed for the worst case when the caller sets no ``max_tokens``
    default_max_tokens: int = 1024
    #: seconds a reservation lives before it expires (its process presumably died)
    lease_ttl_seconds: float = 300.0
    #: fraction of a limit at which a soft warning is logged and recorded
    soft_threshold: float = 0.8
    #: refuse calls whose model is not a configured gateway endpoint
    gateway_only: bool = False
    #: allow ``mock_response`` calls when ``gateway_only`` is on (tests and demos)
    allow_mock: bool = False
    #: worst cases per admission-credit block: a busy process admits calls from headroom it reserved in advance,
    #: with no database write before the provider is called (docs/governance.md); 0 admits every call alone
    admission_credit_calls: int = 32
    #: folder of the per-process settlement journal (a settlement write that fails is kept there and replayed;
    #: admission-credit calls are written ahead there); default: ``spool/`` beside the mart's SQLite file, or
    #: ``$TIDYLLM_HOME/spool`` (``~/.local/share/tidyllm/spool``) for PostgreSQL
    spool_dir: str | None = None
    #: tokenizer uncertainty added to every reserved prompt (0.05 = 5 %): providers' tokenizers differ
    estimate_margin: float = 0.05
    #: seconds between a lease-holding process's heartbeats; another host reclaims its leases after 3 missed
    owner_heartbeat_seconds: float = 2.0
    #: govern plain sync ``litellm.completion`` / ``embedding`` / ``text_completion`` by instrumenting them at
    #: ``install()`` (off: such calls are only recorded, as ``unenforced``)
    instrument_sync: bool = True
    #: which side wins when the mart was changed at run time and ``tidyllm.yaml`` says otherwise:
    #: "database" (runtime changes stick; the file's drift is reported) or "file" (the file is put back, reported
    #: and audited); see docs/operations.md
    config_authority: str = "database"
    #: apply ``tidyllm.yaml``'s budgets, rules, prices and rate limits to the mart at ``install()``
    apply_on_install: bool = True
    #: who may change budgets, rules, prices and rate limits (user names, or ``group:NAME`` for an OS group);
    #: empty = anyone
    admins: tuple[str, ...] = ()

    def required(self) -> tuple[str, ...]:
        """``require``, with ``audit_reason`` added when ``require_audit`` is on."""
        extra = ("audit_reason",) if self.require_audit and "audit_reason" not in self.require else ()
        return tuple(self.require) + extra

    def key_path(self) -> Path:
        """The token key file: ``token_key_file``, else ``token.key`` in :func:`default_home`."""
        return Path(self.token_key_file) if self.token_key_file else default_home() / "token.key"


@dataclass(frozen=True)
class AuditSettings:
    """How much of each request the audit trail keeps."""

    #: "none" (no content), "hash" (SHA-256 of the messages) or "full" (the messages)
    capture: str = "hash"
    #: Ed25519 private key signing the audit checkpoints (created owner-only on first use); keep it outside the
    #: database's host backups. Default: ``audit-ed25519.key`` beside the default mart (``$TIDYLLM_AUDIT_KEY_FILE``)
    key_file: str | None = None
    #: append-only file the signed checkpoints are written to. Default: ``audit-checkpoints.jsonl`` beside the key
    checkpoint_file: str | None = None
    #: sign a checkpoint after this many new audit rows (0 = never by count)
    checkpoint_rows: int = 1000
    #: and at least this often while rows are added (minutes; 0 = never by time)
    checkpoint_minutes: float = 60.0
    #: MLflow tracking URI the checkpoints are also logged to as artifacts (default ``$MLFLOW_TRACKING_URI``; none)
    checkpoint_mlflow_uri: str | None = None


@dataclass(frozen=True)
class RoutingSettings:
    """Knobs of the learning router."""

    #: "bandit" (learned, starting from the routes' ``weight``), "cheapest" (cheapest healthy, authorised,
    #: affordable endpoint) or "weighted" (traffic split by the routes' ``weight``)
    strategy: str = "bandit"
    #: minimum probability mass spread over all candidates (exploration floor)
    exploration_floor: float = 0.02
    #: per-update discount of past evidence (1.0 = never forget; 0.998 remembers about 500 rewards)
    discount: float = 0.998
    #: cap on the share of a department's traffic that may explore (0..1)
    max_exploration_share: float = 0.2
    #: per-department override of ``max_exploration_share``
    exploration_share_by_department: Mapping[str, float] = field(default_factory=dict)
    #: reward weights on quality, cost and latency (a failed call always scores 0)
    weights: Mapping[str, float] = field(default_factory=lambda: {"quality": 0.6, "cost": 0.2, "latency": 0.2})
    #: per-department overrides of ``weights``
    weights_by_department: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: seconds between refreshes of the learned state from the shared mart
    refresh_seconds: float = 30.0
    #: seed of the router's random draws (None = fresh entropy)
    random_state: int | None = None


@dataclass(frozen=True)
class AlertSettings:
    """Budget alerts: thresholds, forecast exhaustion and where alerts are delivered."""

    #: fractions of a limit at which an alert fires, once per budget window (a budget's own ``thresholds`` win)
    thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    #: alert when the window's spend rate would exhaust the budget this many hours before the window ends (0 = off)
    forecast_hours: float = 72.0
    #: log every alert on the ``tidyllm.alerts`` logger
    log: bool = True
    #: URL an alert is POSTed to as JSON (none = no webhook)
    webhook_url: str | None = None
    #: "json" (tidyllm's own payload) or "slack" (``{"text": ...}``, Slack/Teams incoming-webhook compatible)
    webhook_format: str = "json"
    #: SMTP server "host:port" that emails alerts (none = no email)
    smtp_server: str | None = None
    #: sender address of alert emails
    email_from: str = "tidyllm@localhost"
    #: recipients of alert emails
    email_to: tuple[str, ...] = ()
    #: use STARTTLS on the SMTP connection
    smtp_starttls: bool = False
    #: SMTP login user (the password comes from ``$TIDYLLM_SMTP_PASSWORD``)
    smtp_username: str | None = None
    #: delivery attempts per alert and sink before it is given up (logged)
    retries: int = 5
    #: first retry delay in seconds; doubles each attempt
    backoff_seconds: float = 1.0


@dataclass(frozen=True)
class Settings:
    """Every tidyllm setting. Build it with :func:`load_settings`; pass it to entry points."""

    #: SQLAlchemy URL of the mart: ``sqlite:///path.db`` or ``postgresql+psycopg://user:pass@host/db``
    database_url: str = field(default_factory=default_database_url)
    #: base URL of the running MLflow gateway (legacy server or tracking server), e.g. ``http://127.0.0.1:5000``
    gateway_uri: str | None = None
    #: "legacy" (``mlflow gateway start``) or "server" (tracking-server AI Gateway)
    gateway_mode: str = "legacy"
    #: path of the gateway routes file (seed or MLflow 3 format)
    gateway_config: str | None = None
    #: MLflow basic-auth credentials for the server gateway (never logged or stored)
    mlflow_username: str | None = dataclasses.field(default=None, repr=False)
    #: its password (from the environment; never put it in a file)
    mlflow_password: str | None = dataclasses.field(default=None, repr=False)
    #: default caller context merged under each call's metadata
    defaults: Mapping[str, str] = field(default_factory=dict)
    #: budgets, authorisation and lease knobs (section below)
    governance: GovernanceSettings = field(default_factory=GovernanceSettings)
    #: what the audit trail keeps of each request (section below)
    audit: AuditSettings = field(default_factory=AuditSettings)
    #: the learning router (section below)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    #: budget alerts and their delivery (section below)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    #: SMTP password for alert emails (from ``$TIDYLLM_SMTP_PASSWORD``; never put it in a file)
    smtp_password: str | None = dataclasses.field(default=None, repr=False)
    #: budgets applied at install: [{scope, name, limit_usd, period, soft_threshold, thresholds}]
    budgets: tuple[Mapping[str, Any], ...] = ()
    #: authorisation rules: [{name, departments, users, sensitivity, routes, deny_routes, require_tags}]
    authorization: tuple[Mapping[str, Any], ...] = ()
    #: explicit prices: [{model, input_per_1m, output_per_1m, effective}]
    prices: tuple[Mapping[str, Any], ...] = ()
    #: rate limits: [{scope, name, rpm, tpm}]
    rate_limits: tuple[Mapping[str, Any], ...] = ()
    #: quality signals the router learns from: judges, checks per use case, source weights (see tidyllm.signals)
    signals: Mapping[str, Any] = field(default_factory=dict)
    #: the file these settings came from, if any
    source: str | None = None

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (validated like keyword overrides)."""
        return _checked(self, changes, "argument")

    def __repr__(self) -> str:
        # dataclass's repr would print database_url with its password; secrets are masked, never shown
        shown = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if f.name in ("database_url", "gateway_uri") and isinstance(value, str):
                value = mask_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def mask_url(url: str) -> str:
    """``url`` with the password of any ``user:password@`` part replaced by ``***``."""
    import re

    return re.sub(r"(?<=://)([^/\s:@]*):[^/\s@]*@", r"\1:***@", url)


_SECTIONS = {"governance": GovernanceSettings, "audit": AuditSettings, "routing": RoutingSettings,
             "alerts": AlertSettings}
_LISTS = ("budgets", "authorization", "prices", "rate_limits")
_ENV = {
    "database_url": "TIDYLLM_DATABASE_URL",
    "gateway_uri": "TIDYLLM_GATEWAY_URI",
    "gateway_mode": "TIDYLLM_GATEWAY_MODE",
    "gateway_config": "TIDYLLM_GATEWAY_CONFIG",
    "mlflow_username": "MLFLOW_TRACKING_USERNAME",
    "mlflow_password": "MLFLOW_TRACKING_PASSWORD",
    "smtp_password": "TIDYLLM_SMTP_PASSWORD",
}
_ENV_DEFAULTS = {"user_id": "TIDYLLM_USER", "department": "TIDYLLM_DEPARTMENT"}
_ENV_NESTED = {
    "TIDYLLM_REQUIRE_AUDIT": ("governance", "require_audit"),
    "TIDYLLM_AUDIT_CAPTURE": ("audit", "capture"),
    "TIDYLLM_GATEWAY_ONLY": ("governance", "gateway_only"),
    "TIDYLLM_TIMEZONE": ("governance", "timezone"),
    "TIDYLLM_REQUIRE": ("governance", "require"),
    "TIDYLLM_IDENTITY": ("governance", "identity"),
    "TIDYLLM_TOKEN_KEY_FILE": ("governance", "token_key_file"),
    "TIDYLLM_TOKEN": ("governance", "token"),
    "TIDYLLM_AUDIT_KEY_FILE": ("audit", "key_file"),
    "TIDYLLM_CONFIG_AUTHORITY": ("governance", "config_authority"),
}
_CHOICES = {
    ("", "gateway_mode"): ("legacy", "server"),
    ("governance", "unpriced"): ("refuse", "allow"),
    ("governance", "identity"): ("declared", "verified"),
    ("governance", "config_authority"): ("database", "file"),
    ("audit", "capture"): ("none", "hash", "full"),
    ("routing", "strategy"): ("bandit", "cheapest", "weighted"),
    ("alerts", "webhook_format"): ("json", "slack"),
}
#: numbers that must be strictly positive
_POSITIVE = {("governance", "lease_ttl_seconds"), ("governance", "owner_heartbeat_seconds")}
#: numbers that are fractions in [0, 1]
_FRACTIONS = {("governance", "soft_threshold"), ("routing", "exploration_floor"), ("routing", "discount"),
              ("routing", "max_exploration_share")}
#: optional strings (None allowed)
_OPTIONAL_STR = {("governance", "spool_dir"), ("governance", "token_key_file"), ("governance", "token"),
                 ("audit", "key_file"), ("audit", "checkpoint_file"), ("audit", "checkpoint_mlflow_uri"),
                 ("alerts", "webhook_url"), ("alerts", "smtp_server"), ("alerts", "smtp_username")}

#: keys each entry of a list section may have
ENTRY_KEYS = {
    "budgets": ("scope", "name", "limit_usd", "period", "soft_threshold", "thresholds"),
    "authorization": ("name", "departments", "users", "sensitivity", "routes", "deny_routes", "require_tags"),
    "prices": ("model", "input_per_1m", "output_per_1m", "effective"),
    "rate_limits": ("scope", "name", "rpm", "tpm"),
}
_BUDGET_SCOPES = ("org", "department", "user", "route", "model")
_BUDGET_PERIODS = ("day", "week", "month", "total")


class _Problems:
    """Every problem found in one source of settings, reported together."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise ConfigurationError(f"{self.origin}: {self.items[0]}")
        listed = "\n".join(f"  - {item}" for item in self.items)
        raise ConfigurationError(f"{self.origin}: {len(self.items)} problems (nothing was applied):\n{listed}")


def _did_you_mean(key: str, allowed: Any) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_settings(config: str | os.PathLike[str] | Mapping[str, Any] | Settings | None = None,
                  **overrides: Any) -> Settings:
    """Read settings from ``config`` (a path, a mapping or a :class:`Settings`), the environment and ``overrides``.

    The whole of each source is validated before anything is returned: unknown keys (with a "did you
    mean"), wrong types, non-finite numbers and bad list entries (named by position and name) are
    listed together in one :class:`~tidyllm.errors.ConfigurationError` naming the file.
    """
    if isinstance(config, Settings):
        return _checked(config, overrides, "argument") if overrides else config
    data: Mapping[str, Any] = {}
    origin = "argument"
    source = None
    if isinstance(config, Mapping):
        data = config
    else:
        path = Path(config) if config is not None else _find_file()
        if path is not None:
            data, source = _read_yaml(path), str(path)
            origin = source
    settings = _checked(Settings(), data, origin)
    settings = _checked(settings, _from_env(), "environment")
    settings = dataclasses.replace(settings, source=source)
    return _checked(settings, overrides, "argument") if overrides else settings


def _checked(base: Settings, data: Mapping[str, Any], origin: str) -> Settings:
    problems = _Problems(origin)
    settings = _apply(base, data, problems)
    problems.raise_if_any()
    return settings


def _find_file() -> Path | None:
    env = os.environ.get("TIDYLLM_CONFIG")
    if env:
        return Path(env)
    here = Path.cwd() / "tidyllm.yaml"
    return here if here.is_file() else None


def _read_yaml(path: Path) -> Mapping[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read settings file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


def _from_env() -> dict[str, Any]:
    env: dict[str, Any] = {}
    for key, var in _ENV.items():
        if os.environ.get(var):
            env[key] = os.environ[var]
    defaults = {k: os.environ[v] for k, v in _ENV_DEFAULTS.items() if os.environ.get(v)}
    if defaults:
        env["defaults"] = defaults
    for var, (section, key) in _ENV_NESTED.items():
        if os.environ.get(var):
            env.setdefault(section, {})[key] = os.environ[var]
    return env


def _apply(base: Settings, data: Mapping[str, Any], problems: _Problems) -> Settings:
    known = {f.name for f in dataclasses.fields(Settings)} - {"source"}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            problems.add(f"unknown setting {key!r}{_did_you_mean(key, known)}; allowed: {', '.join(sorted(known))}")
            continue
        if key in _SECTIONS:
            if isinstance(value, _SECTIONS[key]):
                changes[key] = value
                continue
            section = _section(getattr(base, key), value, key, problems)
            if section is not None:
                changes[key] = section
        elif key in _LISTS:
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
                problems.add(f"{key!r} must be a list of mappings")
                continue
            entries = tuple(dict(v) for v in value)
            _check_entries(key, entries, problems)
            changes[key] = entries
        elif key == "signals":
            from tidyllm.signals.config import parse_signals

            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                problems.add("'signals' must be a mapping (judges, checks, weights)")
                continue
            try:
                parse_signals(value)
            except ConfigurationError as exc:
                problems.add(str(exc))
                continue
            changes[key] = dict(value)
        elif key == "defaults":
            if not isinstance(value, Mapping):
                problems.add(f"'defaults' must be a mapping of {', '.join(_DEFAULTS_KEYS)}")
                continue
            ok = True
            for k, v in value.items():
                if not isinstance(v, str):
                    problems.add(f"defaults.{k} must be a string, got {type(v).__name__}")
                    ok = False
            if ok:
                changes[key] = {**base.defaults, **value}
        else:
            if value is not None and not isinstance(value, str):
                problems.add(f"{key!r} must be a string, got {type(value).__name__}")
                continue
            if _check_choice("", key, value, problems):
                changes[key] = value
    return dataclasses.replace(base, **changes)


def _section(current: Any, value: Any, name: str, problems: _Problems) -> Any:
    if not isinstance(value, Mapping):
        problems.add(f"{name!r} must be a mapping")
        return None
    fields = {f.name: f for f in dataclasses.fields(current)}
    changes: dict[str, Any] = {}
    for key, raw in value.items():
        if key not in fields:
            problems.add(f"unknown setting {name}.{key}{_did_you_mean(key, fields)}; "
                         f"allowed: {', '.join(sorted(fields))}")
            continue
        default = getattr(type(current)(), key)
        before = len(problems.items)
        coerced = _coerce(raw, default, name, key, problems)
        if len(problems.items) == before and _check_choice(name, key, coerced, problems):
            coerced = _names(coerced, f"{name}.{key}", problems)
            if len(problems.items) == before:
                changes[key] = coerced
    return dataclasses.replace(current, **changes)


def _finite(raw: Any, whole: bool) -> Any:
    """``raw`` as a finite int/float, or raise ValueError."""
    import math

    if isinstance(raw, bool):
        raise ValueError(raw)
    number = float(raw)
    if not math.isfinite(number):
        raise ValueError(raw)
    if whole:
        if number != int(number):
            raise ValueError(raw)
        return int(number)
    return number


def _coerce(raw: Any, default: Any, section: str, name: str, problems: _Problems) -> Any:
    key = f"{section}.{name}"
    if (section, name) in _OPTIONAL_STR:
        if raw is not None and not isinstance(raw, str):
            problems.add(f"{key} must be a string, got {type(raw).__name__}")
        return raw
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        problems.add(f"{key} must be true or false, got {raw!r}")
        return None
    if isinstance(default, (int, float)) or (default is None and name == "random_state"):
        if raw is None and default is None:
            return None
        whole = isinstance(default, int) or name == "random_state"
        try:
            number = _finite(raw, whole)
        except (TypeError, ValueError, OverflowError):
            kind = "a whole number" if whole else "a number"
            problems.add(f"{key} must be {kind} (finite), got {raw!r}")
            return None
        if (section, name) in _POSITIVE and number <= 0:
            problems.add(f"{key} must be more than 0, got {raw!r}")
        elif (section, name) in _FRACTIONS and not 0 <= number <= 1:
            problems.add(f"{key} must be a fraction between 0 and 1, got {raw!r}")
        elif number < 0 and name != "random_state":
            problems.add(f"{key} must not be negative, got {raw!r}")
        return number
    if isinstance(default, tuple):
        if isinstance(raw, str):  # from the environment: comma-separated
            raw = [v.strip() for v in raw.split(",") if v.strip()]
        if raw is None:
            raw = []
        if not isinstance(raw, (list, tuple)):
            problems.add(f"{key} must be a list")
            return None
        if (section, name) == ("alerts", "thresholds"):
            return _thresholds(raw, key, problems)
        if not all(isinstance(v, str) for v in raw):
            problems.add(f"{key} must be a list of strings")
            return None
        return tuple(raw)
    if isinstance(default, Mapping):
        if not isinstance(raw, Mapping):
            problems.add(f"{key} must be a mapping")
            return None
        return _mapping(dict(raw), section, name, problems)
    if not isinstance(raw, str):
        problems.add(f"{key} must be a string, got {type(raw).__name__}")
        return None
    return raw


def _names(value: Any, key: str, problems: "_Problems") -> Any:
    """Department and user names in the keys (and values) of per-department / per-user mappings,
    normalised as every call's are (:func:`tidyllm.governance.identity.normalize_name`)."""
    if not (key.endswith("_by_department") or key == "governance.user_departments"):
        return value
    from tidyllm.governance.names import normalize_name

    out: dict[str, Any] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not normalize_name(name):
            problems.add(f"{key} keys must be names, got {name!r}")
            continue
        canonical = normalize_name(name)
        if key == "governance.user_departments":
            if not isinstance(item, str) or not normalize_name(item):
                problems.add(f"{key}.{name} must be a department name, got {item!r}")
                continue
            item = normalize_name(item)
        if canonical in out:
            problems.add(f"{key} names {canonical!r} twice (names are compared without case and surrounding spaces)")
            continue
        out[canonical] = item
    return out


def _thresholds(raw: Any, key: str, problems: _Problems) -> tuple[float, ...] | None:
    out = []
    for v in raw:
        try:
            t = _finite(v, False)
        except (TypeError, ValueError, OverflowError):
            problems.add(f"{key} must be fractions of the limit like 0.8, got {v!r}")
            return None
        if not 0 < t <= 10:
            problems.add(f"{key} must be fractions of the limit above 0 (1.0 = the whole limit), got {v!r}")
            return None
        out.append(t)
    return tuple(sorted(set(out)))


def _mapping(value: dict[str, Any], section: str, name: str, problems: _Problems) -> dict[str, Any] | None:
    """Validate the values of a mapping setting (per-department overrides, weights)."""
    key = f"{section}.{name}"
    if (section, name) == ("governance", "unpriced_by_department"):
        for dept, policy in value.items():
            if policy not in ("refuse", "allow"):
                problems.add(f"{key}.{dept} must be one of refuse, allow; got {policy!r}")
    elif (section, name) == ("routing", "exploration_share_by_department"):
        for dept, share in value.items():
            try:
                value[dept] = _finite(share, False)
            except (TypeError, ValueError, OverflowError):
                problems.add(f"{key}.{dept} must be a finite number, got {share!r}")
                continue
            if not 0 <= value[dept] <= 1:
                problems.add(f"{key}.{dept} must be a fraction between 0 and 1, got {share!r}")
    elif (section, name) == ("routing", "weights"):
        _weights(value, key, problems)
    elif (section, name) == ("routing", "weights_by_department"):
        for dept, weights in value.items():
            if not isinstance(weights, Mapping):
                problems.add(f"{key}.{dept} must be a mapping of quality, cost, latency weights")
                continue
            value[dept] = dict(weights)
            _weights(value[dept], f"{key}.{dept}", problems)
    return value


def _weights(value: dict[str, Any], key: str, problems: _Problems) -> None:
    for k, w in value.items():
        try:
            value[k] = _finite(w, False)
        except (TypeError, ValueError, OverflowError):
            problems.add(f"{key}.{k} must be a finite number, got {w!r}")


def _entry_label(section: str, index: int, entry: Mapping[str, Any]) -> str:
    if section == "budgets":
        scope, name = entry.get("scope"), entry.get("name")
        who = f"{scope} {name!r}" if name is not None else f"{scope}"
        return f"{section}[{index}] ({who})"
    name = entry.get("model") if section == "prices" else entry.get("name")
    if section == "rate_limits":
        name = f"{entry.get('scope')} {entry.get('name', '*')!r}"
    return f"{section}[{index}]" + (f" ({name})" if name is not None else "")


def _check_entries(section: str, entries: tuple[dict[str, Any], ...], problems: _Problems) -> None:
    """Validate each entry of a list section; problems name the entry by position (from 0) and name."""
    allowed = ENTRY_KEYS[section]
    seen: dict[Any, int] = {}
    for i, entry in enumerate(entries):
        label = _entry_label(section, i, entry)
        for k in entry:
            if k not in allowed:
                problems.add(f"{label}: unknown key {k!r}{_did_you_mean(k, allowed)}; allowed: {', '.join(allowed)}")
        check = {"budgets": _check_budget, "authorization": _check_rule, "prices": _check_price,
                 "rate_limits": _check_rate}[section]
        identity = check(entry, label, problems)
        if identity is not None:
            if identity in seen:
                problems.add(f"{label}: duplicates {section}[{seen[identity]}]")
            else:
                seen[identity] = i


def _number_in(entry: Mapping[str, Any], key: str, label: str, problems: _Problems, *, required: bool,
               whole: bool = False) -> Any:
    if key not in entry or entry[key] is None:
        if required:
            problems.add(f"{label}: missing {key}")
        return None
    try:
        number = _finite(entry[key], whole)
    except (TypeError, ValueError, OverflowError):
        kind = "a whole number" if whole else "a number"
        problems.add(f"{label}: {key} must be {kind} (finite), got {entry[key]!r}")
        return None
    if number < 0:
        problems.add(f"{label}: {key} must not be negative, got {entry[key]!r}")
        return None
    return number


def _check_budget(entry: Mapping[str, Any], label: str, problems: _Problems) -> Any:
    scope, period = entry.get("scope"), entry.get("period", "month")
    if scope not in _BUDGET_SCOPES:
        problems.add(f"{label}: scope must be one of {', '.join(_BUDGET_SCOPES)}, got {scope!r}")
    name = entry.get("name", "org" if scope == "org" else None)
    if scope != "org" and (not isinstance(name, str) or not name.strip()):
        problems.add(f"{label}: missing name (the {scope}'s name)")
    if period not in _BUDGET_PERIODS:
        problems.add(f"{label}: period must be one of {', '.join(_BUDGET_PERIODS)}, got {period!r}"
                     f"{_did_you_mean(period, _BUDGET_PERIODS)}")
    _number_in(entry, "limit_usd", label, problems, required=True)
    soft = _number_in(entry, "soft_threshold", label, problems, required=False)
    if soft is not None and not 0 < soft <= 1:
        problems.add(f"{label}: soft_threshold must be in (0, 1], got {entry['soft_threshold']!r}")
    if entry.get("thresholds") is not None:
        if isinstance(entry["thresholds"], (list, tuple)):
            _thresholds(entry["thresholds"], f"{label}: thresholds", problems)
        else:
            problems.add(f"{label}: thresholds must be a list of fractions like [0.5, 0.8, 1.0]")
    return (scope, name, period)


def _check_rule(entry: Mapping[str, Any], label: str, problems: _Problems) -> Any:
    for key in ("departments", "users", "sensitivity", "routes", "deny_routes"):
        value = entry.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            problems.add(f"{label}: {key} must be a list of strings")
    tags = entry.get("require_tags")
    if tags is not None and not isinstance(tags, Mapping):
        problems.add(f"{label}: require_tags must be a mapping")
    if not (entry.get("routes") or entry.get("deny_routes") or entry.get("require_tags")):
        problems.add(f"{label}: constrains nothing: give routes, deny_routes or require_tags")
    return entry.get("name")


def _check_price(entry: Mapping[str, Any], label: str, problems: _Problems) -> Any:
    model = entry.get("model")
    if not isinstance(model, str) or not model:
        problems.add(f"{label}: missing model (the endpoint or model name)")
    _number_in(entry, "input_per_1m", label, problems, required=True)
    _number_in(entry, "output_per_1m", label, problems, required=True)
    effective = entry.get("effective")
    if effective is not None:
        import datetime as dt

        if isinstance(effective, str):
            try:
                dt.datetime.fromisoformat(effective)
            except ValueError:
                problems.add(f"{label}: effective must be a date like 2026-01-01, got {effective!r}")
        elif not isinstance(effective, (dt.date, dt.datetime)):
            problems.add(f"{label}: effective must be a date like 2026-01-01, got {effective!r}")
    return (model, str(effective))


def _check_rate(entry: Mapping[str, Any], label: str, problems: _Problems) -> Any:
    scope = entry.get("scope")
    if scope not in ("user", "department", "route"):
        problems.add(f"{label}: scope must be user, department or route, got {scope!r}")
    found = False
    for key in ("rpm", "tpm"):
        value = entry.get(key)
        if value is None:
            continue
        found = True
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.add(f"{label}: {key} must be a positive whole number, got {value!r}")
    if not found:
        problems.add(f"{label}: give rpm and/or tpm")
    return (scope, entry.get("name", "*"))


def _check_choice(section: str, key: str, value: Any, problems: _Problems) -> bool:
    allowed = _CHOICES.get((section, key))
    name = f"{section}.{key}" if section else key
    if allowed and value not in allowed:
        problems.add(f"{name} must be one of {', '.join(allowed)}; got {value!r}{_did_you_mean(value, allowed)}")
        return False
    if (section, key) == ("governance", "require"):
        from tidyllm.governance.identity import REQUIRABLE

        unknown = [item for item in value if item not in REQUIRABLE]
        if unknown:
            problems.add(f"governance.require: unknown key {unknown[0]!r}; use any of {', '.join(REQUIRABLE)}")
            return False
    if (section, key) == ("governance", "timezone"):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            problems.add(f"governance.timezone {value!r} is not a known IANA time zone (e.g. 'UTC', 'Europe/Paris')")
            return False
    return True

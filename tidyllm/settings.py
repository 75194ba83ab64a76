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

__all__ = ["Settings", "load_settings", "default_database_url", "default_home", "SENSITIVITY_CLASSES"]

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
    #: budgets applied at install: [{scope, name, limit_usd, period}]
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
        return _apply(self, changes, origin="argument")


_SECTIONS = {"governance": GovernanceSettings, "audit": AuditSettings, "routing": RoutingSettings}
_LISTS = ("budgets", "authorization", "prices", "rate_limits")
_ENV = {
    "database_url": "TIDYLLM_DATABASE_URL",
    "gateway_uri": "TIDYLLM_GATEWAY_URI",
    "gateway_mode": "TIDYLLM_GATEWAY_MODE",
    "gateway_config": "TIDYLLM_GATEWAY_CONFIG",
    "mlflow_username": "MLFLOW_TRACKING_USERNAME",
    "mlflow_password": "MLFLOW_TRACKING_PASSWORD",
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
}
_CHOICES = {
    ("", "gateway_mode"): ("legacy", "server"),
    ("governance", "unpriced"): ("refuse", "allow"),
    ("governance", "identity"): ("declared", "verified"),
    ("audit", "capture"): ("none", "hash", "full"),
    ("routing", "strategy"): ("bandit", "cheapest", "weighted"),
}


def load_settings(config: str | os.PathLike[str] | Mapping[str, Any] | Settings | None = None,
                  **overrides: Any) -> Settings:
    """Read settings from ``config`` (a path, a mapping or a :class:`Settings`), the environment and ``overrides``.

    Raises :class:`~tidyllm.errors.ConfigurationError` naming the file, the key and what is allowed.
    """
    if isinstance(config, Settings):
        return _apply(config, overrides, origin="argument") if overrides else config
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
    settings = _apply(Settings(), data, origin=origin)
    settings = _apply(settings, _from_env(), origin="environment")
    settings = dataclasses.replace(settings, source=source)
    return _apply(settings, overrides, origin="argument") if overrides else settings


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


def _apply(base: Settings, data: Mapping[str, Any], *, origin: str) -> Settings:
    known = {f.name for f in dataclasses.fields(Settings)} - {"source"}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigurationError(f"{origin}: unknown setting {key!r}; allowed: {', '.join(sorted(known))}")
        if key in _SECTIONS:
            if isinstance(value, _SECTIONS[key]):
                changes[key] = value
                continue
            changes[key] = _section(getattr(base, key), value, key, origin)
        elif key in _LISTS:
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
                raise ConfigurationError(f"{origin}: {key!r} must be a list of mappings")
            changes[key] = tuple(dict(v) for v in value)
        elif key == "signals":
            from tidyllm.signals.config import parse_signals

            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"{origin}: 'signals' must be a mapping (judges, checks, weights)")
            try:
                parse_signals(value)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{origin}: {exc}") from None
            changes[key] = dict(value)
        elif key == "defaults":
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"{origin}: 'defaults' must be a mapping of {', '.join(_DEFAULTS_KEYS)}")
            for k, v in value.items():
                if not isinstance(v, str):
                    raise ConfigurationError(f"{origin}: defaults.{k} must be a string, got {type(v).__name__}")
            changes[key] = {**base.defaults, **value}
        else:
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{origin}: {key!r} must be a string, got {type(value).__name__}")
            _check_choice("", key, value, origin)
            changes[key] = value
    return dataclasses.replace(base, **changes)


def _section(current: Any, value: Any, name: str, origin: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{origin}: {name!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(current)}
    changes: dict[str, Any] = {}
    for key, raw in value.items():
        if key not in fields:
            raise ConfigurationError(
                f"{origin}: unknown setting {name}.{key}; allowed: {', '.join(sorted(fields))}")
        default = getattr(type(current)(), key)
        changes[key] = _names(_coerce(raw, default, f"{name}.{key}", origin), f"{name}.{key}", origin)
        _check_choice(name, key, changes[key], origin)
    return dataclasses.replace(current, **changes)


def _coerce(raw: Any, default: Any, key: str, origin: str) -> Any:
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigurationError(f"{origin}: {key} must be true or false, got {raw!r}")
    if isinstance(default, (int, float)) or (default is None and key.endswith("random_state")):
        try:
            whole = isinstance(default, int) or key.endswith("random_state")
            number = int(raw) if whole else float(raw)
        except (TypeError, ValueError):
            if raw is None and default is None:
                return None
            raise ConfigurationError(f"{origin}: {key} must be a number, got {raw!r}") from None
        if isinstance(number, float) and number < 0:
            raise ConfigurationError(f"{origin}: {key} must not be negative, got {raw!r}")
        return number
    if isinstance(default, tuple):
        if isinstance(raw, str):  # from the environment: comma-separated
            raw = [v.strip() for v in raw.split(",") if v.strip()]
        if raw is None:
            raw = []
        if not isinstance(raw, (list, tuple)) or not all(isinstance(v, str) for v in raw):
            raise ConfigurationError(f"{origin}: {key} must be a list of strings")
        return tuple(raw)
    if isinstance(default, Mapping):
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"{origin}: {key} must be a mapping")
        return dict(raw)
    if not isinstance(raw, str):
        raise ConfigurationError(f"{origin}: {key} must be a string, got {type(raw).__name__}")
    return raw


def _names(value: Any, key: str, origin: str) -> Any:
    """Department and user names in the keys (and values) of per-department / per-user mappings,
    normalised as every call's are (:func:`tidyllm.governance.identity.normalize_name`)."""
    if not (key.endswith("_by_department") or key == "governance.user_departments"):
        return value
    from tidyllm.governance.names import normalize_name

    out: dict[str, Any] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not normalize_name(name):
            raise ConfigurationError(f"{origin}: {key} keys must be names, got {name!r}")
        canonical = normalize_name(name)
        if key == "governance.user_departments":
            if not isinstance(item, str) or not normalize_name(item):
                raise ConfigurationError(f"{origin}: {key}.{name} must be a department name, got {item!r}")
            item = normalize_name(item)
        if canonical in out:
            raise ConfigurationError(f"{origin}: {key} names {canonical!r} twice (names are compared without case "
                                     "and surrounding spaces)")
        out[canonical] = item
    return out


def _check_choice(section: str, key: str, value: Any, origin: str) -> None:
    allowed = _CHOICES.get((section, key))
    if allowed and value not in allowed:
        name = f"{section}.{key}" if section else key
        raise ConfigurationError(f"{origin}: {name} must be one of {', '.join(allowed)}; got {value!r}")
    if (section, key) == ("governance", "require"):
        from tidyllm.governance.identity import REQUIRABLE

        for item in value:
            if item not in REQUIRABLE:
                raise ConfigurationError(f"{origin}: governance.require: unknown key {item!r}; use any of "
                                         f"{', '.join(REQUIRABLE)}")
    if (section, key) == ("governance", "admission_credit_calls") and value < 0:
        raise ConfigurationError(f"{origin}: governance.admission_credit_calls must be 0 (off) or more, got {value!r}")
    if (section, key) == ("governance", "timezone"):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"{origin}: governance.timezone {value!r} is not a known IANA time zone (e.g. 'UTC', 'Europe/Paris')"
            ) from None

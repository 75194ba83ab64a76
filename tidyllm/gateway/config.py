"""The gateway routes file: one YAML that describes the corporate LLM routes, validated once.

Two shapes are accepted, so a file written for the seed or for MLflow 3 loads unchanged:

* the seed's shape: a top-level ``routes:`` list of endpoints with ``route_type`` (MLflow 2.x);
* MLflow 3's shape: ``endpoints:`` with ``endpoint_type``, and ``routes:`` as traffic splits
  (``destinations`` with ``traffic_percentage``). In the seed's shape an entry of ``routes:``
  that has ``destinations`` instead of ``model`` is a traffic split too.

On top of MLflow's fields each route may carry tidyllm's own: ``price`` (USD per 1M tokens,
effective-dated), ``tags``, ``sensitivity`` (the data classes it may carry), ``group`` (the
model group callers ask for), ``weight``, ``fallbacks`` and ``usage_tracking`` (both for the
tracking-server flavour). Every error names the file, the route and the field.

Values written as ``$NAME`` (or ``${NAME}``) are environment references and stay references
here. Keys that hold credentials (see :func:`is_secret_key`) are resolved only by the process
that needs them: the legacy gateway resolves them itself, and :mod:`tidyllm.gateway.sync`
sends them to the tracking server, which encrypts them. Non-secret references (a base URL)
are substituted when the config is translated for a gateway.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tidyllm.errors import GatewayConfigError
from tidyllm.gateway._checks import is_number
from tidyllm.settings import SENSITIVITY_CLASSES

__all__ = [
    "DEFAULT_SENSITIVITY",
    "ENDPOINT_TYPES",
    "PROVIDER_CONFIG_KEYS",
    "GatewayConfig",
    "Limit",
    "Price",
    "Route",
    "TrafficSplit",
    "env_ref",
    "is_secret_key",
    "load_gateway_config",
]

ENDPOINT_TYPES = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings")

#: provider -> (required config keys, optional config keys), copied from the ``CONFIG_TYPE`` of
#: each provider in MLflow 3.17's registry (``mlflow.gateway.provider_registry``). A copy, so that
#: loading a routes file does not import MLflow (3 s); a test pins it to the installed MLflow.
_OPENAI_KEYS = ({"openai_api_key"}, {"openai_api_type", "openai_api_base", "openai_api_version",
                                     "openai_deployment_name", "openai_organization"})
_COMPATIBLE_KEYS = ({"api_key"}, {"api_base"})
_DATABRICKS_KEYS: tuple[set[str], set[str]] = (set(), {"host", "token", "client_id", "client_secret"})
PROVIDER_CONFIG_KEYS: Mapping[str, tuple[set[str], set[str]]] = {
    "openai": _OPENAI_KEYS,
    "azure": _OPENAI_KEYS,
    "anthropic": ({"anthropic_api_key"}, {"anthropic_version", "anthropic_api_base"}),
    "cohere": ({"cohere_api_key"}, set()),
    "ai21labs": ({"ai21labs_api_key"}, set()),
    "mlflow-model-serving": ({"model_server_url"}, set()),
    "mosaicml": ({"mosaicml_api_key"}, {"mosaicml_api_base"}),
    "huggingface-text-generation-inference": ({"hf_server_url"}, set()),
    "palm": ({"palm_api_key"}, set()),
    "gemini": ({"gemini_api_key"}, set()),
    "bedrock": ({"aws_config"}, set()),
    "amazon-bedrock": ({"aws_config"}, set()),
    "databricks-model-serving": _DATABRICKS_KEYS,
    "databricks": _DATABRICKS_KEYS,
    "mistral": ({"mistral_api_key"}, set()),
    "togetherai": ({"togetherai_api_key"}, set()),
    "litellm": (set(), {"litellm_provider", "litellm_auth_config"}),
    "groq": _COMPATIBLE_KEYS,
    "deepseek": _COMPATIBLE_KEYS,
    "xai": _COMPATIBLE_KEYS,
    "openrouter": _COMPATIBLE_KEYS,
    "ollama": (set(), {"api_key", "api_base"}),
    "vertex_ai": ({"vertex_project"}, {"vertex_location", "vertex_credentials", "vertex_anthropic_betas"}),
    "portkey": ({"api_key"}, {"api_base", "portkey_provider", "portkey_config", "provider_api_key"}),
    "sap-ai-core": (set(), set()),
    "typesafe": ({"typesafe_api_key"}, {"typesafe_api_base"}),
}

#: the seed's Azure keys (its example uses them) and their MLflow 3 names
_AZURE_ALIASES = {"azure_api_key": "openai_api_key", "azure_api_base": "openai_api_base",
                  "azure_api_version": "openai_api_version", "azure_api_type": "openai_api_type",
                  "azure_deployment_name": "openai_deployment_name"}
#: the seed writes Bedrock credentials flat in ``config``; MLflow 3 nests them in ``aws_config``
_AWS_KEYS = {"aws_region", "aws_role_arn", "session_length_seconds", "aws_access_key_id",
             "aws_secret_access_key", "aws_session_token", "aws_bearer_token"}

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # MLflow's is_valid_endpoint_name
_TAG_KEY = re.compile(r"[A-Za-z0-9_.:\-]+")
_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_PERIODS = ("second", "minute", "hour", "day", "month", "year")
_ROUTE_KEYS = {"name", "route_type", "endpoint_type", "model", "limit", "price", "tags", "sensitivity",
               "group", "weight", "fallbacks", "usage_tracking"}
_SPLIT_KEYS = {"name", "task_type", "endpoint_type", "route_type", "destinations", "routing_strategy"}
#: sensitivity a route may carry when it declares none: confidential data needs an explicit opt-in
DEFAULT_SENSITIVITY = ("public", "internal")


def env_ref(value: Any) -> str | None:
    """The variable name if ``value`` is a whole ``$NAME`` / ``${NAME}`` reference, else ``None``."""
    if isinstance(value, str):
        match = _REF.fullmatch(value)
        if match:
            return match.group(1) or match.group(2)
    return None


def is_secret_key(key: str) -> bool:
    """Whether a provider config key holds a credential (kept as a reference, never substituted).

    Secret: keys ending in ``api_key``, ``_token``, ``_secret``, ``secret_access_key``,
    ``password`` or ``credentials``, plus ``token``, ``aws_access_key_id`` and ``portkey_config``
    (MLflow treats a Portkey config as a secret because it may embed upstream credentials).
    Everything else (base URLs, versions, regions, deployment names) is not a secret.
    """
    k = key.lower()
    return (k in {"token", "aws_access_key_id", "portkey_config"}
            or k.endswith(("api_key", "_token", "_secret", "secret_access_key", "password", "credentials")))


@dataclass(frozen=True)
class Price:
    """A route's price in USD per one million tokens, in force from ``effective`` on."""

    input_per_1m: float
    output_per_1m: float
    effective: dt.date = dt.date(1970, 1, 1)

    @property
    def input_cost_per_token(self) -> float:
        """USD per input token, as LiteLLM's ``input_cost_per_token`` expects."""
        return self.input_per_1m / 1_000_000

    @property
    def output_cost_per_token(self) -> float:
        """USD per output token, as LiteLLM's ``output_cost_per_token`` expects."""
        return self.output_per_1m / 1_000_000


@dataclass(frozen=True)
class Limit:
    """MLflow's per-endpoint rate limit: ``calls`` per ``renewal_period`` (legacy flavour only)."""

    calls: int
    renewal_period: str
    key: str | None = None


@dataclass(frozen=True)
class Route:
    """One gateway endpoint and tidyllm's facts about it."""

    name: str
    endpoint_type: str
    provider: str
    model_name: str
    #: provider config as written in the file; ``$VAR`` references kept
    config: Mapping[str, Any]
    group: str
    tags: Mapping[str, str] = field(default_factory=dict)
    sensitivity: tuple[str, ...] = DEFAULT_SENSITIVITY
    #: prices sorted by ``effective``
    prices: tuple[Price, ...] = ()
    limit: Limit | None = None
    #: relative share of this route in its group
    weight: float = 1.0
    #: routes tried in order when this one fails (tracking-server flavour)
    fallbacks: tuple[str, ...] = ()
    #: one MLflow trace per call on the tracking-server flavour
    usage_tracking: bool = True

    def __hash__(self) -> int:
        # config and tags are mappings; a route is identified by its name within a file
        return hash((self.name, self.endpoint_type, self.provider, self.model_name))

    def price_at(self, when: dt.date | dt.datetime | None = None) -> Price | None:
        """The price in force on ``when`` (default: today, UTC), or ``None`` if none is yet."""
        if when is None:
            when = dt.datetime.now(dt.timezone.utc).date()
        elif isinstance(when, dt.datetime):
            when = when.date()
        current = None
        for price in self.prices:
            if price.effective <= when:
                current = price
        return current

    def mlflow_config(self) -> dict[str, Any]:
        """``config`` in MLflow 3's schema: the seed's Azure and flat Bedrock keys moved; refs kept."""
        config = dict(self.config)
        if self.provider == "azure" or any(k in config for k in _AZURE_ALIASES):
            for old, new in _AZURE_ALIASES.items():
                if old in config:
                    config[new] = config.pop(old)
            if self.provider == "azure":
                config.setdefault("openai_api_type", "azure")
            if str(config.get("openai_api_type", "openai")).lower() in ("azure", "azuread"):
                config.setdefault("openai_deployment_name", self.model_name)
        if self.provider in ("bedrock", "amazon-bedrock"):
            flat = {k: config.pop(k) for k in list(config) if k in _AWS_KEYS}
            if flat:
                config["aws_config"] = flat
        return config

    def env_refs(self, *, secret: bool | None = None) -> set[str]:
        """Variables referenced by the config; ``secret=True``/``False`` keeps only (non-)secret keys."""
        return {ref for path, ref in _refs(self.config)
                if secret is None or is_secret_key(path[-1]) == secret}


@dataclass(frozen=True)
class TrafficSplit:
    """An endpoint that spreads calls over other routes by percentage (both flavours)."""

    name: str
    endpoint_type: str
    #: (route name, percentage) pairs; the percentages add up to 100
    destinations: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class GatewayConfig:
    """A validated routes file. Build it with :func:`load_gateway_config`."""

    routes: tuple[Route, ...]
    splits: tuple[TrafficSplit, ...] = ()
    #: the file it came from, for messages
    source: str = "<mapping>"

    def route(self, name: str) -> Route:
        """The route called ``name``; :class:`GatewayConfigError` listing the known names if none."""
        for route in self.routes:
            if route.name == name:
                return route
        raise GatewayConfigError(
            f"{self.source}: no route named {name!r}; known routes: {', '.join(r.name for r in self.routes)}")

    def groups(self) -> dict[str, list[Route]]:
        """Routes by model group, in file order."""
        out: dict[str, list[Route]] = {}
        for route in self.routes:
            out.setdefault(route.group, []).append(route)
        return out

    def secret_refs(self) -> set[str]:
        """Environment variables holding credentials that the routes reference."""
        return set().union(*(r.env_refs(secret=True) for r in self.routes))

    def env_refs(self) -> set[str]:
        """Every environment variable the routes reference (credentials and plain values)."""
        return set().union(*(r.env_refs() for r in self.routes))

    def check_secrets(self, environ: Mapping[str, str] | None = None) -> None:
        """Raise :class:`GatewayConfigError` naming the first unset ``$VAR`` and its route.

        Checks every reference, credentials and plain values (a base URL) alike: a gateway
        started with either unset fails on the first call, so tidyllm fails before starting it.
        """
        env = os.environ if environ is None else environ
        for route in self.routes:
            for path, ref in _refs(route.config):
                if not env.get(ref):
                    raise GatewayConfigError(
                        f"{self.source}: route {route.name!r}: model.config.{'.'.join(path)} references "
                        f"${ref}, which is not set; export {ref} before starting the gateway")

    def to_mlflow_dict(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """MLflow 3's YAML schema for ``mlflow gateway start``; credentials stay ``$VAR`` references.

        Plain references (a base URL) are substituted from ``environ``: MLflow resolves ``$VAR``
        only in API-key fields. :meth:`legacy_environment` gives the credentials it cannot
        resolve itself (Bedrock keys), which go to the gateway process's environment instead.
        """
        env = os.environ if environ is None else environ
        endpoints = []
        for route in self.routes:
            model_config, _ = _legacy_model_config(self, route, env)
            endpoint: dict[str, Any] = {
                "name": route.name,
                "endpoint_type": route.endpoint_type,
                "model": {"provider": route.provider, "name": route.model_name, "config": model_config},
            }
            if route.limit is not None:
                endpoint["limit"] = {k: v for k, v in dataclasses.asdict(route.limit).items() if v is not None}
            endpoints.append(endpoint)
        out: dict[str, Any] = {"endpoints": endpoints}
        if self.splits:
            out["routes"] = [
                {"name": s.name, "task_type": s.endpoint_type, "routing_strategy": "TRAFFIC_SPLIT",
                 "destinations": [{"name": d, "traffic_percentage": p} for d, p in s.destinations]}
                for s in self.splits
            ]
        return out

    def to_mlflow_yaml(self, path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Path:
        """Write :meth:`to_mlflow_dict` to ``path`` (mode 0600) and return the path."""
        import yaml

        target = Path(path)
        text = yaml.safe_dump(self.to_mlflow_dict(environ), sort_keys=False)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return target

    def legacy_environment(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Extra environment the legacy gateway process needs: Bedrock credentials for boto3.

        MLflow's legacy gateway resolves ``$VAR`` only in API-key fields, so Bedrock's
        ``aws_access_key_id`` / ``aws_secret_access_key`` / ``aws_session_token`` are left out of
        the YAML and handed to the process as ``AWS_*`` variables, which boto3 reads.
        """
        env = os.environ if environ is None else environ
        aws: dict[str, str] = {}
        for route in self.routes:
            _, route_aws = _legacy_model_config(self, route, env)
            for key, value in route_aws.items():
                if aws.get(key, value) != value:
                    raise GatewayConfigError(
                        f"{self.source}: route {route.name!r}: the legacy gateway can give boto3 only one set "
                        f"of AWS credentials, and the Bedrock routes use different ones; use aws_role_arn, "
                        f"one set of keys, or the tracking-server flavour (--mode server)")
                aws[key] = value
        return aws


def load_gateway_config(source: str | os.PathLike[str] | Mapping[str, Any] | GatewayConfig, *,
                        sensitivity_classes: Sequence[str] = SENSITIVITY_CLASSES) -> GatewayConfig:
    """Read and validate a routes file (a path or an already-parsed mapping).

    ``sensitivity_classes`` are the data classes a route's ``sensitivity`` may name (pass
    ``settings.governance.sensitivity_classes`` when you changed them). Raises
    :class:`GatewayConfigError` naming the file, the route and the field.
    """
    if isinstance(source, GatewayConfig):
        return source
    if isinstance(source, Mapping):
        return _Parser("<mapping>", tuple(sensitivity_classes)).config(source)
    import yaml

    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GatewayConfigError(f"cannot read gateway config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GatewayConfigError(f"{path}: not valid YAML: {exc}") from exc
    return _Parser(str(path), tuple(sensitivity_classes)).config(data)


# --- parsing ---------------------------------------------------------------------------------


class _Parser:
    def __init__(self, source: str, classes: tuple[str, ...]) -> None:
        self.source, self.classes = source, classes

    def fail(self, where: str, message: str) -> GatewayConfigError:
        return GatewayConfigError(f"{self.source}: {where}: {message}")

    def config(self, data: Any) -> GatewayConfig:
        if not isinstance(data, Mapping):
            raise GatewayConfigError(f"{self.source}: the top level must be a mapping with 'routes:' or 'endpoints:'")
        unknown = set(data) - {"routes", "endpoints"}
        if unknown:
            raise GatewayConfigError(f"{self.source}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                                     f"allowed: routes, endpoints")
        endpoints = self._list(data, "endpoints") if "endpoints" in data else None
        entries = self._list(data, "routes") if "routes" in data else []
        route_items, split_items = [], []
        for index, item in enumerate(entries):
            # MLflow 3 puts only traffic splits under routes:; the seed puts endpoints there.
            is_split = isinstance(item, Mapping) and ("destinations" in item or endpoints is not None)
            (split_items if is_split else route_items).append((index, item))
        route_items = [(i, e) for i, e in enumerate(endpoints or [])] + route_items
        routes = [self.route(item, f"{'endpoints' if endpoints is not None else 'routes'}[{i}]")
                  for i, item in route_items]
        splits = [self.split(item, f"routes[{i}]") for i, item in split_items]
        if not routes:
            raise GatewayConfigError(f"{self.source}: no routes; list them under 'routes:' (seed format) "
                                     f"or 'endpoints:' (MLflow 3 format)")
        seen: set[str] = set()
        for name in [r.name for r in routes] + [s.name for s in splits]:
            if name in seen:
                raise GatewayConfigError(f"{self.source}: duplicate route name {name!r}; endpoint and traffic-split "
                                         f"names share one namespace, rename one of them")
            seen.add(name)
        by_name = {r.name: r for r in routes}
        for route in routes:
            for target in route.fallbacks:
                where = f"route {route.name!r}: fallbacks"
                if target == route.name:
                    raise self.fail(where, "a route cannot fall back to itself")
                if target not in by_name:
                    raise self.fail(where, f"unknown route {target!r}; fallbacks name other routes of this file")
                if by_name[target].endpoint_type != route.endpoint_type:
                    raise self.fail(where, f"{target!r} is {by_name[target].endpoint_type}, "
                                           f"this route is {route.endpoint_type}")
        for index, split in enumerate(splits):
            if not split.endpoint_type and split.destinations[0][0] in by_name:
                split = splits[index] = dataclasses.replace(
                    split, endpoint_type=by_name[split.destinations[0][0]].endpoint_type)
            for target, _ in split.destinations:
                where = f"route {split.name!r}: destinations"
                if target not in by_name:
                    raise self.fail(where, f"unknown route {target!r}; destinations name endpoints of this file")
                if by_name[target].endpoint_type != split.endpoint_type:
                    raise self.fail(where, f"{target!r} is {by_name[target].endpoint_type}, "
                                           f"the split is {split.endpoint_type}")
        return GatewayConfig(routes=tuple(routes), splits=tuple(splits), source=self.source)

    def _list(self, data: Mapping[str, Any], key: str) -> list[Any]:
        value = data[key]
        if value is None:
            return []
        if not isinstance(value, list):
            raise GatewayConfigError(f"{self.source}: '{key}' must be a list, got {type(value).__name__}")
        return value

    def _name(self, item: Mapping[str, Any], where: str) -> str:
        name = item.get("name")
        if name is None:
            raise self.fail(where, "missing field 'name'")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise self.fail(where, f"name {name!r} may only contain letters, digits, '_', '-' and '.' "
                                   f"(MLflow uses it in URLs)")
        return name

    def _endpoint_type(self, item: Mapping[str, Any], where: str, keys: Sequence[str]) -> str | None:
        given = [k for k in keys if k in item]
        if len(given) > 1:
            raise self.fail(where, f"give one of {', '.join(given)}, not both")
        if not given:
            return None
        value = item[given[0]]
        if value not in ENDPOINT_TYPES:
            raise self.fail(where, f"{given[0]} {value!r} is not one of {', '.join(ENDPOINT_TYPES)}")
        return value

    def _fields(self, item: Mapping[str, Any], where: str, allowed: Sequence[str], *, prefix: str = "",
                context: str = "") -> None:
        """Refuse fields of ``item`` not in ``allowed`` (listed in the error in that order)."""
        unknown = set(item) - set(allowed)
        if unknown:
            raise self.fail(where, f"unknown field(s) {', '.join(prefix + k for k in sorted(map(str, unknown)))}"
                                   f"{context}; allowed: {', '.join(allowed)}")

    def _entry(self, item: Any, where: str, what: str, allowed: set[str], context: str = "") -> tuple[str, str]:
        """``(name, where)`` of a routes-list entry: a mapping with a valid name and only ``allowed`` fields."""
        if not isinstance(item, Mapping):
            raise self.fail(where, f"each {what} must be a mapping")
        name = self._name(item, where)
        where = f"route {name!r}"
        self._fields(item, where, sorted(allowed), context=context)
        return name, where

    def route(self, item: Any, where: str) -> Route:
        name, where = self._entry(item, where, "route", _ROUTE_KEYS)
        endpoint_type = self._endpoint_type(item, where, ("endpoint_type", "route_type"))
        if endpoint_type is None:
            raise self.fail(where, "missing field 'endpoint_type' (or the seed's 'route_type'), e.g. llm/v1/chat")
        provider, model_name, config = self.model(item.get("model"), where)
        route = Route(
            name=name,
            endpoint_type=endpoint_type,
            provider=provider,
            model_name=model_name,
            config=config,
            group=self.group(item.get("group", name), where),
            tags=self.tags(item.get("tags"), where),
            sensitivity=self.sensitivity(item.get("sensitivity"), where),
            prices=self.prices(item.get("price"), where, embeddings=endpoint_type == "llm/v1/embeddings"),
            limit=self.limit(item.get("limit"), where),
            weight=self.number(item.get("weight", 1.0), f"{where}: weight", positive=True),
            fallbacks=self.names(item.get("fallbacks"), f"{where}: fallbacks"),
            usage_tracking=self.flag(item.get("usage_tracking", True), f"{where}: usage_tracking"),
        )
        self.provider_config(route, where)
        return route

    def model(self, model: Any, where: str) -> tuple[str, str, dict[str, Any]]:
        if model is None:
            raise self.fail(where, "missing field 'model' (provider, name, config)")
        if not isinstance(model, Mapping):
            raise self.fail(where, "model must be a mapping with provider, name and config")
        self._fields(model, where, ("provider", "name", "config"), prefix="model.")
        for key in ("provider", "name"):
            if not model.get(key):
                raise self.fail(where, f"missing field 'model.{key}'")
            if not isinstance(model[key], str):
                raise self.fail(where, f"model.{key} must be a string")
        provider = _provider(model["provider"])
        if provider is None:
            raise self.fail(where, f"unknown provider {model['provider']!r} in model.provider; "
                                   f"MLflow supports: {', '.join(sorted(PROVIDER_CONFIG_KEYS))}")
        config = model.get("config")
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise self.fail(where, "model.config must be a mapping")
        for path, value in _leaves(config):
            if isinstance(value, str) and value.startswith("$") and env_ref(value) is None:
                raise self.fail(where, f"model.config.{'.'.join(path)}: {value!r} is not a valid "
                                       f"environment reference; write $NAME or ${{NAME}}")
        return provider, model["name"], dict(config)

    def provider_config(self, route: Route, where: str) -> None:
        config = route.mlflow_config()
        required, optional = PROVIDER_CONFIG_KEYS[route.provider]
        allowed = required | optional
        aliases = set(_AZURE_ALIASES) if route.provider in ("openai", "azure") else set()
        aliases |= _AWS_KEYS if route.provider in ("bedrock", "amazon-bedrock") else set()
        for key in config:
            if key not in allowed:
                listed = ", ".join(sorted(allowed | aliases)) or "none"
                raise self.fail(where, f"unknown field 'model.config.{key}' for provider {route.provider}; "
                                       f"allowed: {listed}")
        for key in sorted(required):
            if key not in config:
                hint = " (or the seed's flat aws_* keys)" if key == "aws_config" else ""
                raise self.fail(where, f"missing field 'model.config.{key}'{hint} for provider {route.provider}")
        if "aws_config" in config and "aws_config" in route.config and set(route.config) & _AWS_KEYS:
            raise self.fail(where, "give Bedrock credentials either flat or under aws_config, not both")
        if "aws_config" in config:
            self.aws_config(config["aws_config"], where)
        if route.provider in ("openai", "azure"):
            api_type = str(config.get("openai_api_type", "openai")).lower()
            if api_type not in ("openai", "azure", "azuread"):
                raise self.fail(where, f"model.config.openai_api_type {api_type!r} is not openai, azure or azuread")
            if api_type == "openai" and "openai_deployment_name" in config:
                raise self.fail(where, "model.config.openai_deployment_name needs openai_api_type azure or azuread")
            if api_type != "openai":
                for key in ("openai_api_base", "openai_api_version"):
                    if not config.get(key):
                        raise self.fail(where, f"missing field 'model.config.{key}' (Azure OpenAI needs the "
                                               f"resource URL and API version)")

    def aws_config(self, aws: Any, where: str) -> None:
        if not isinstance(aws, Mapping):
            raise self.fail(where, "model.config.aws_config must be a mapping")
        unknown = set(aws) - _AWS_KEYS
        if unknown:
            raise self.fail(where, f"unknown field(s) in aws_config: {', '.join(sorted(map(str, unknown)))}; "
                                   f"allowed: {', '.join(sorted(_AWS_KEYS))}")
        if ("aws_access_key_id" in aws) != ("aws_secret_access_key" in aws):
            raise self.fail(where, "Bedrock needs aws_access_key_id and aws_secret_access_key together")

    def split(self, item: Any, where: str) -> TrafficSplit:
        name, where = self._entry(item, where, "traffic split", _SPLIT_KEYS, " in a traffic split")
        if item.get("routing_strategy", "TRAFFIC_SPLIT") != "TRAFFIC_SPLIT":
            raise self.fail(where, "routing_strategy must be TRAFFIC_SPLIT (for fallbacks, use a route's "
                                   "'fallbacks:' field)")
        destinations = item.get("destinations")
        if not isinstance(destinations, list) or not destinations:
            raise self.fail(where, "missing field 'destinations': a list of {name, traffic_percentage}")
        pairs = []
        for dest in destinations:
            if not isinstance(dest, Mapping) or set(dest) != {"name", "traffic_percentage"}:
                raise self.fail(where, "each destination must be {name: <route>, traffic_percentage: <0..100>}")
            pct = dest["traffic_percentage"]
            if not is_number(pct, 0, 100, integer=True):
                raise self.fail(where, f"traffic_percentage of {dest['name']!r} must be an integer 0..100, got {pct!r}")
            pairs.append((str(dest["name"]), pct))
        if sum(p for _, p in pairs) != 100:
            raise self.fail(where, f"traffic percentages add up to {sum(p for _, p in pairs)}, not 100")
        # MLflow requires task_type; when it is left out the destinations' common type is used
        endpoint_type = self._endpoint_type(item, where, ("task_type", "endpoint_type", "route_type"))
        return TrafficSplit(name=name, endpoint_type=endpoint_type or "", destinations=tuple(pairs))

    def group(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise self.fail(where, f"group {value!r} must be a name of letters, digits, '_', '-' or '.'")
        return value

    def tags(self, value: Any, where: str) -> dict[str, str]:
        if value is None:
            return {}
        if isinstance(value, list):
            value = {tag: True for tag in value}
        if not isinstance(value, Mapping):
            raise self.fail(where, "tags must be a list (e.g. [on_prem]) or a mapping (e.g. {region: eu})")
        out = {}
        for key, raw in value.items():
            if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
                raise self.fail(where, f"tag {key!r} must be a word of letters, digits, '_', '-', '.' or ':'")
            if isinstance(raw, bool):
                out[key] = "true" if raw else "false"
            elif isinstance(raw, (str, int, float)):
                out[key] = str(raw)
            else:
                raise self.fail(where, f"tag {key!r} must have a plain value, got {type(raw).__name__}")
        return out

    def sensitivity(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            return DEFAULT_SENSITIVITY
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"sensitivity must be a list of classes from {', '.join(self.classes)}")
        for item in value:
            if item not in self.classes:
                raise self.fail(where, f"sensitivity class {item!r} is not one of {', '.join(self.classes)}")
        return tuple(dict.fromkeys(value))

    def prices(self, value: Any, where: str, *, embeddings: bool) -> tuple[Price, ...]:
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        prices = []
        for item in items:
            if not isinstance(item, Mapping):
                raise self.fail(where, "price must be {input_per_1m, output_per_1m, effective} or a list of them")
            self._fields(item, where, ("input_per_1m", "output_per_1m", "effective"), prefix="price.")
            if "input_per_1m" not in item:
                raise self.fail(where, "missing field 'price.input_per_1m' (USD per 1M input tokens)")
            if "output_per_1m" not in item and not embeddings:
                raise self.fail(where, "missing field 'price.output_per_1m' (USD per 1M output tokens)")
            if "effective" not in item and len(items) > 1:
                raise self.fail(where, "each of several prices needs 'effective' (the date it applies from)")
            prices.append(Price(
                input_per_1m=self.number(item["input_per_1m"], f"{where}: price.input_per_1m"),
                output_per_1m=self.number(item.get("output_per_1m", 0.0), f"{where}: price.output_per_1m"),
                effective=self.date(item.get("effective", dt.date(1970, 1, 1)), f"{where}: price.effective"),
            ))
        prices.sort(key=lambda p: p.effective)
        for a, b in zip(prices, prices[1:]):
            if a.effective == b.effective:
                raise self.fail(where, f"two prices take effect on {a.effective}; keep one")
        return tuple(prices)

    def limit(self, value: Any, where: str) -> Limit | None:
        if value is None:
            return None
        if not isinstance(value, Mapping) or set(value) - {"calls", "renewal_period", "key"}:
            raise self.fail(where, "limit must be {calls: <int>, renewal_period: second|minute|hour|day|month|year}")
        calls = value.get("calls")
        if not is_number(calls, 1, integer=True):
            raise self.fail(where, f"limit.calls must be a positive integer, got {calls!r}")
        period = value.get("renewal_period")
        if not isinstance(period, str) or period.rstrip("s") not in _PERIODS:
            raise self.fail(where, f"limit.renewal_period {period!r} must be one of {', '.join(_PERIODS)}")
        key = value.get("key")
        return Limit(calls=calls, renewal_period=period, key=None if key is None else str(key))

    def number(self, value: Any, where: str, *, positive: bool = False) -> float:
        if not is_number(value) or not math.isfinite(value):
            raise GatewayConfigError(f"{self.source}: {where} must be a number, got {value!r}")
        if value < 0 or (positive and value == 0):
            raise GatewayConfigError(f"{self.source}: {where} must be {'positive' if positive else '>= 0'}, "
                                     f"got {value!r}")
        return float(value)

    def date(self, value: Any, where: str) -> dt.date:
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
        raise GatewayConfigError(f"{self.source}: {where} must be a date like 2025-01-31, got {value!r}")

    def names(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise GatewayConfigError(f"{self.source}: {where} must be a list of route names")
        if len(set(value)) != len(value):
            raise GatewayConfigError(f"{self.source}: {where} names a route twice")
        return tuple(value)

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise GatewayConfigError(f"{self.source}: {where} must be true or false, got {value!r}")
        return value


def _provider(name: str) -> str | None:
    """MLflow's canonical provider value for ``name`` ('-' and '_' are interchangeable, as in MLflow)."""
    wanted = name.replace("-", "_").lower()
    for value in PROVIDER_CONFIG_KEYS:
        if value.replace("-", "_") == wanted:
            return value
    return None


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, path + (str(key),))
    else:
        yield path, value


def _refs(config: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    for path, value in _leaves(config):
        ref = env_ref(value)
        if ref is not None:
            yield path, ref


# --- translation for the legacy gateway ------------------------------------------------------

_AWS_CREDENTIALS = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
                    "aws_session_token": "AWS_SESSION_TOKEN"}


def _mlflow_resolves(path: tuple[str, ...]) -> bool:
    """Whether MLflow's legacy gateway resolves a ``$VAR`` at ``path`` itself.

    It does so in the API-key fields of every provider config (``*_api_key``, ``api_key``,
    ``provider_api_key``) and in ``litellm_auth_config.api_key``; nowhere else.
    """
    return (len(path) == 1 and path[0].endswith("api_key")) or path == ("litellm_auth_config", "api_key")


def _legacy_model_config(cfg: GatewayConfig, route: Route,
                         environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(provider config for MLflow's YAML, AWS variables for the gateway process) of ``route``."""
    aws_env: dict[str, str] = {}

    def value_of(ref: str, path: tuple[str, ...]) -> str:
        if not environ.get(ref):
            raise GatewayConfigError(f"{cfg.source}: route {route.name!r}: model.config.{'.'.join(path)} "
                                     f"references ${ref}, which is not set; export {ref}")
        return environ[ref]

    def convert(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, Mapping):
            if path == ("aws_config",) and any(env_ref(value.get(k)) for k in _AWS_CREDENTIALS):
                # boto3 reads these from the process environment when aws_config has no keys
                for key, var in _AWS_CREDENTIALS.items():
                    if key in value:
                        raw = value[key]
                        aws_env[var] = value_of(env_ref(raw), path + (key,)) if env_ref(raw) else str(raw)
                value = {k: v for k, v in value.items() if k not in _AWS_CREDENTIALS}
            return {k: convert(v, path + (str(k),)) for k, v in value.items()}
        ref = env_ref(value)
        if ref is None:
            return value
        if not is_secret_key(path[-1]):
            return value_of(ref, path)
        if _mlflow_resolves(path):
            return f"${ref}"
        raise GatewayConfigError(
            f"{cfg.source}: route {route.name!r}: the legacy gateway does not resolve ${ref} in "
            f"model.config.{'.'.join(path)}, and tidyllm does not write credentials to disk; use the "
            f"tracking-server flavour (tidyllm gateway start --mode server), which stores it encrypted")

    return convert(route.mlflow_config(), ()), aws_env

"""Provision the tracking-server AI Gateway (``mlflow server``) from a routes file, idempotently.

MLflow keeps the server gateway in its database as three layers, created over REST under
``/api/3.0/mlflow/gateway/``: a **secret** (credentials, encrypted with a key derived from
``MLFLOW_CRYPTO_KEK_PASSPHRASE``, plus a plain ``auth_config`` such as the base URL), a
**model definition** (provider + upstream model name + secret) and an **endpoint** (PRIMARY
and FALLBACK model definitions, optional traffic split). For each route tidyllm owns:

* secret ``tidyllm-<route>`` and model definition ``tidyllm-<route>``;
* endpoint ``<route>`` tagged ``tidyllm.managed=true`` (what ``prune`` may delete; endpoints
  made by hand or by other tools are never touched, and a name clash is an error),
  ``tidyllm.endpoint_type`` and ``tidyllm.secret_digest``.

MLflow never returns a secret, so "has the key changed?" is answered by the digest tag: a
salted PBKDF2 of the credentials (salt = the secret's id), not reversible. A second sync of
an unchanged file makes no write. A sync that fails half-way leaves objects the next sync
completes. Credentials are read from the environment at the moment of the sync, sent once
over the REST call, and never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from tidyllm.errors import GatewayConfigError, GatewayError
from tidyllm.gateway.client import TAG_ENDPOINT_TYPE, Auth, RestClient, resolve_auth
from tidyllm.gateway.config import GatewayConfig, Route, env_ref, is_secret_key, load_gateway_config

__all__ = ["PREFIX", "SyncReport", "sync_gateway"]

_log = logging.getLogger(__name__)

#: name prefix of the secrets and model definitions tidyllm creates
PREFIX = "tidyllm-"
TAG_MANAGED = "tidyllm.managed"
TAG_DIGEST = "tidyllm.secret_digest"
_DIGEST_ITERATIONS = 100_000


@dataclass(frozen=True)
class SyncReport:
    """Endpoint names by what a sync did to them."""

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether the sync wrote anything."""
        return bool(self.created or self.updated or self.deleted)

    def __str__(self) -> str:
        parts = [f"{label}: {', '.join(names) if names else '-'}" for label, names in
                 (("created", self.created), ("updated", self.updated),
                  ("unchanged", self.unchanged), ("deleted", self.deleted))]
        return "\n".join(parts)


@dataclass(frozen=True)
class _ModelSpec:
    """What one route becomes on the server: a secret and a model definition."""

    provider: str
    model_name: str
    auth_config: Mapping[str, str]
    secret: Mapping[str, str] = field(repr=False)


def sync_gateway(server_uri: str, config: Any, prune: bool = False, auth: Auth | None = None,
                 environ: Mapping[str, str] | None = None) -> SyncReport:
    """Make the tracking server at ``server_uri`` serve exactly ``config``'s routes and traffic splits.

    ``config`` is a path, a mapping or a :class:`~tidyllm.gateway.config.GatewayConfig`.
    Credentials (``$VAR`` references) are resolved from ``environ`` (default ``os.environ``).
    With ``prune``, endpoints tidyllm created earlier that left the file are deleted, with their
    model definitions and secrets. ``auth`` defaults to ``MLFLOW_TRACKING_USERNAME/PASSWORD``.
    Every route is translated before the first write, so a bad file changes nothing.
    """
    cfg = load_gateway_config(config)
    env = os.environ if environ is None else environ
    specs = {route.name: server_spec(cfg, route, env) for route in cfg.routes}
    auth = auth if auth is not None else resolve_auth(environ=env)
    with RestClient(server_uri, auth) as rest:
        return _Sync(rest, cfg, specs).run(prune)


class _Sync:
    def __init__(self, rest: RestClient, cfg: GatewayConfig, specs: Mapping[str, _ModelSpec]) -> None:
        self.rest, self.cfg, self.specs = rest, cfg, specs
        self.endpoints = {e.get("name"): e for e in rest.gateway("GET", "endpoints/list").get("endpoints", [])}
        self.secrets = {s["secret_name"]: s for s in rest.gateway("GET", "secrets/list").get("secrets", [])}
        self.definitions = {d["name"]: d for d in
                            rest.gateway("GET", "model-definitions/list").get("model_definitions", [])}
        self.definition_ids: dict[str, str] = {}
        self.digests: dict[str, str] = {}
        self.touched: set[str] = set()

    def run(self, prune: bool) -> SyncReport:
        wanted = [r.name for r in self.cfg.routes] + [s.name for s in self.cfg.splits]
        for name in wanted:
            if name in self.endpoints and not _managed(self.endpoints[name]):
                raise GatewayError(
                    f"the MLflow server at {self.rest.uri} already has an endpoint {name!r} that tidyllm did not "
                    f"create; rename the route in {self.cfg.source} or delete that endpoint in MLflow")
        for route in self.cfg.routes:
            self.secret_and_definition(route)
        created, updated, unchanged = [], [], []
        for route in self.cfg.routes:
            configs = [{"model_definition_id": self.definition_ids[route.name], "linkage_type": "PRIMARY",
                        "weight": 1.0}]
            configs += [{"model_definition_id": self.definition_ids[target], "linkage_type": "FALLBACK",
                         "fallback_order": order} for order, target in enumerate(route.fallbacks)]
            fallback = {"strategy": "SEQUENTIAL", "max_attempts": len(route.fallbacks)} if route.fallbacks else None
            outcome = self.endpoint(route.name, route.endpoint_type, configs, None, fallback, route.usage_tracking,
                                    self.digests[route.name])
            {"created": created, "updated": updated, "unchanged": unchanged}[outcome].append(route.name)
        for split in self.cfg.splits:
            configs = [{"model_definition_id": self.definition_ids[target], "linkage_type": "PRIMARY",
                        "weight": pct / 100} for target, pct in split.destinations]
            outcome = self.endpoint(split.name, split.endpoint_type, configs, "REQUEST_BASED_TRAFFIC_SPLIT",
                                    None, True, None)
            {"created": created, "updated": updated, "unchanged": unchanged}[outcome].append(split.name)
        deleted = self.prune(set(wanted)) if prune else []
        return SyncReport(tuple(created), tuple(updated), tuple(unchanged), tuple(deleted))

    def secret_and_definition(self, route: Route) -> None:
        spec, name = self.specs[route.name], PREFIX + route.name
        secret = self.secrets.get(name)
        if secret is not None and (secret.get("provider") or "") != spec.provider:
            # the provider of a secret cannot be updated; a new one replaces it
            self.rest.gateway("DELETE", "secrets/delete", json={"secret_id": secret["secret_id"]})
            secret = None
        if secret is None:
            secret = self.rest.gateway("POST", "secrets/create", json={
                "secret_name": name, "secret_value": dict(spec.secret), "provider": spec.provider,
                "auth_config": dict(spec.auth_config)})["secret"]
            _log.info("created secret %s", name)
            self.touched.add(route.name)
            digest = _digest(spec.secret, secret["secret_id"])
        else:
            digest = _digest(spec.secret, secret["secret_id"])
            endpoint = self.endpoints.get(route.name)
            stored = _tags(endpoint).get(TAG_DIGEST) if endpoint else None
            if stored != digest or (secret.get("auth_config") or {}) != dict(spec.auth_config):
                # an empty map means "unchanged" to MLflow; a blank api_base clears auth_config
                self.rest.gateway("POST", "secrets/update", json={
                    "secret_id": secret["secret_id"], "secret_value": dict(spec.secret),
                    "auth_config": dict(spec.auth_config) or {"api_base": ""}})
                _log.info("updated secret %s", name)
                self.touched.add(route.name)
        self.digests[route.name] = digest
        definition = self.definitions.get(name)
        wanted = {"secret_id": secret["secret_id"], "provider": spec.provider, "model_name": spec.model_name}
        if definition is None:
            definition = self.rest.gateway("POST", "model-definitions/create",
                                           json={"name": name, **wanted})["model_definition"]
            _log.info("created model definition %s", name)
            self.touched.add(route.name)
        elif any(definition.get(k) != v for k, v in wanted.items()):
            self.rest.gateway("POST", "model-definitions/update",
                              json={"model_definition_id": definition["model_definition_id"], **wanted})
            _log.info("updated model definition %s", name)
            self.touched.add(route.name)
        self.definition_ids[route.name] = definition["model_definition_id"]

    def endpoint(self, name: str, endpoint_type: str, configs: list[dict[str, Any]], strategy: str | None,
                 fallback: dict[str, Any] | None, usage_tracking: bool, digest: str | None) -> str:
        current = self.endpoints.get(name)
        if current is not None and _strategy(current) != strategy and strategy is None:
            # MLflow cannot unset a routing strategy; replace the endpoint
            self.rest.gateway("DELETE", "endpoints/delete", json={"endpoint_id": current["endpoint_id"]})
            current = None
        body: dict[str, Any] = {"model_configs": configs, "usage_tracking": usage_tracking}
        if strategy:
            body["routing_strategy"] = strategy
        if fallback:
            body["fallback_config"] = fallback
        if current is None:
            endpoint = self.rest.gateway("POST", "endpoints/create", json={"name": name, **body})["endpoint"]
            outcome = "created"
        elif (_mappings(current) != _mappings({"model_mappings": configs}) or _strategy(current) != strategy
              or _fallback(current) != fallback or bool(current.get("usage_tracking", False)) != usage_tracking):
            endpoint = self.rest.gateway("POST", "endpoints/update",
                                         json={"endpoint_id": current["endpoint_id"], **body})["endpoint"]
            outcome = "updated"
        else:
            endpoint = current
            outcome = "updated" if name in self.touched else "unchanged"
        tags = {TAG_MANAGED: "true", TAG_ENDPOINT_TYPE: endpoint_type}
        if digest is not None:
            tags[TAG_DIGEST] = digest
        have = _tags(current) if current is not None and outcome != "created" else {}
        for key, value in tags.items():
            if have.get(key) != value:
                self.rest.gateway("POST", "endpoints/set-tag",
                                  json={"endpoint_id": endpoint["endpoint_id"], "key": key, "value": value})
        if outcome != "unchanged":
            _log.info("%s endpoint %s", outcome, name)
        return outcome

    def prune(self, wanted: set[str]) -> list[str]:
        gone = [name for name, e in self.endpoints.items() if _managed(e) and name not in wanted]
        # endpoints first: a model definition in use by any endpoint cannot be deleted
        for name in gone:
            self.rest.gateway("DELETE", "endpoints/delete", json={"endpoint_id": self.endpoints[name]["endpoint_id"]})
            _log.info("deleted endpoint %s", name)
        for name in gone:
            definition = self.definitions.get(PREFIX + name)
            if definition is not None:
                self.rest.gateway("DELETE", "model-definitions/delete",
                                  json={"model_definition_id": definition["model_definition_id"]})
            secret = self.secrets.get(PREFIX + name)
            if secret is not None:
                self.rest.gateway("DELETE", "secrets/delete", json={"secret_id": secret["secret_id"]})
        return gone


def _tags(endpoint: Mapping[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in endpoint.get("tags", [])}


def _managed(endpoint: Mapping[str, Any]) -> bool:
    return _tags(endpoint).get(TAG_MANAGED) == "true"


def _strategy(endpoint: Mapping[str, Any]) -> str | None:
    value = endpoint.get("routing_strategy")
    return None if value in (None, "", "ROUTING_STRATEGY_UNSPECIFIED") else value


def _fallback(endpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    value = endpoint.get("fallback_config") or {}
    if not value.get("strategy") or value["strategy"] == "FALLBACK_STRATEGY_UNSPECIFIED":
        return None
    return {"strategy": value["strategy"], "max_attempts": value.get("max_attempts")}


def _mappings(endpoint: Mapping[str, Any]) -> set[tuple[Any, ...]]:
    return {(m["model_definition_id"], m["linkage_type"],
             round(float(m.get("weight", 1.0)), 6) if m["linkage_type"] == "PRIMARY" else None,
             m.get("fallback_order")) for m in endpoint.get("model_mappings", [])}


def _digest(secret: Mapping[str, str], salt: str) -> str:
    """Salted, slow, one-way fingerprint of the credentials, to notice a rotated key."""
    data = json.dumps(dict(secret), sort_keys=True).encode()
    return hashlib.pbkdf2_hmac("sha256", data, salt.encode(), _DIGEST_ITERATIONS).hex()[:32]


# --- routes file -> secret + model definition ------------------------------------------------

_SYNCABLE = ("openai", "azure", "anthropic", "mistral", "gemini", "groq", "deepseek", "xai", "openrouter",
             "ollama", "typesafe", "bedrock", "amazon-bedrock", "vertex_ai", "databricks",
             "databricks-model-serving", "portkey", "litellm")


def server_spec(cfg: GatewayConfig, route: Route, environ: Mapping[str, str]) -> _ModelSpec:
    """Translate one route to the server's secret + model definition, resolving ``$VAR`` from ``environ``.

    Field names follow ``mlflow/server/gateway_api.py`` (``_build_endpoint_config``), which
    rebuilds MLflow's provider config from ``secret_value`` and ``auth_config`` at call time.
    """
    where = f"{cfg.source}: route {route.name!r}"
    config = route.mlflow_config()

    def get(key: str, source: Mapping[str, Any] = config) -> str | None:
        value = source.get(key)
        if value is None:
            return None
        ref = env_ref(value)
        if ref is None:
            return ",".join(map(str, value)) if isinstance(value, list) else str(value)
        if not environ.get(ref):
            raise GatewayConfigError(f"{where}: model.config.{key} references ${ref}, which is not set; export "
                                     f"{ref} before syncing")
        return environ[ref]

    def pick(pairs: Mapping[str, str], source: Mapping[str, Any] = config) -> dict[str, str]:
        return {new: v for old, new in pairs.items() if (v := get(old, source)) is not None}

    provider = route.provider
    if provider not in _SYNCABLE:
        raise GatewayConfigError(
            f"{where}: tidyllm cannot provision provider {provider!r} on the tracking server (MLflow maps "
            f"only {', '.join(_SYNCABLE)} natively); use provider: litellm with litellm_provider: {provider}, "
            f"or the legacy flavour")
    secret: dict[str, str]
    if provider in ("openai", "azure"):
        secret = pick({"openai_api_key": "api_key"})
        if str(config.get("openai_api_type", "openai")).lower() in ("azure", "azuread"):
            # provider "openai" with api_type keeps the upstream model name; MLflow builds the same config
            provider = "openai"
            auth = pick({"openai_api_type": "api_type", "openai_api_base": "api_base",
                         "openai_deployment_name": "deployment_name", "openai_api_version": "api_version"})
        else:
            auth = pick({"openai_api_base": "api_base", "openai_organization": "organization"})
    elif provider == "anthropic":
        secret = pick({"anthropic_api_key": "api_key"})
        auth = pick({"anthropic_version": "version", "anthropic_api_base": "api_base"})
    elif provider in ("mistral", "gemini"):
        secret, auth = pick({f"{provider}_api_key": "api_key"}), {}
    elif provider == "typesafe":
        secret, auth = pick({"typesafe_api_key": "api_key"}), pick({"typesafe_api_base": "api_base"})
    elif provider in ("bedrock", "amazon-bedrock"):
        provider, (secret, auth) = "bedrock", _bedrock(config["aws_config"], get, where)
    elif provider == "vertex_ai":
        secret = pick({"vertex_credentials": "vertex_credentials"})
        auth = pick({"vertex_project": "vertex_project", "vertex_location": "vertex_location",
                     "vertex_anthropic_betas": "vertex_anthropic_betas"})
    elif provider in ("databricks", "databricks-model-serving"):
        provider = "databricks"
        auth = pick({"host": "api_base"})
        if config.get("client_id"):
            auth |= {"auth_mode": "oauth_m2m", **pick({"client_id": "client_id"})}
            secret = pick({"client_secret": "client_secret"})
        else:
            secret = pick({"token": "api_key"})
    elif provider == "portkey":
        secret = pick({"api_key": "api_key", "portkey_config": "portkey_config",
                       "provider_api_key": "provider_api_key"})
        auth = pick({"api_base": "api_base", "portkey_provider": "portkey_provider"})
    elif provider == "litellm":
        if not config.get("litellm_provider"):
            raise GatewayConfigError(f"{where}: the tracking server needs model.config.litellm_provider "
                                     f"(e.g. cohere) to route a litellm endpoint")
        provider = str(config["litellm_provider"])
        options = config.get("litellm_auth_config") or {}
        secret = {k: v for k in options if is_secret_key(k) and (v := get(k, options)) is not None}
        auth = {k: v for k in options if not is_secret_key(k) and (v := get(k, options)) is not None}
    else:  # groq, deepseek, xai, openrouter, ollama: OpenAI-compatible
        secret, auth = pick({"api_key": "api_key"}), pick({"api_base": "api_base"})
        if provider == "ollama":
            # the server builds these providers' config with a required key; Ollama ignores it
            secret.setdefault("api_key", "ollama")
    return _ModelSpec(provider=provider, model_name=route.model_name, auth_config=auth, secret=secret)


def _bedrock(aws: Mapping[str, Any], get: Any, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """Bedrock's auth modes as the server spells them (``auth_mode`` in ``auth_config``)."""
    auth = {"aws_region_name": v} if (v := get("aws_region", aws)) else {}
    if "aws_bearer_token" in aws:
        return {"api_key": get("aws_bearer_token", aws)}, {"auth_mode": "api_key", **auth}
    if "aws_access_key_id" in aws:
        if "aws_session_token" in aws:
            raise GatewayConfigError(f"{where}: the tracking server's Bedrock provider takes no aws_session_token; "
                                     f"use long-lived keys, aws_role_arn, or the legacy flavour")
        secret = {"aws_access_key_id": get("aws_access_key_id", aws),
                  "aws_secret_access_key": get("aws_secret_access_key", aws)}
        return secret, {"auth_mode": "access_keys", **auth}
    if "aws_role_arn" in aws:
        return {}, {"auth_mode": "iam_role", "aws_role_name": get("aws_role_arn", aws), **auth}
    # boto3's default chain inside the server process (instance profile, env, ~/.aws)
    return {}, {"auth_mode": "default_chain", **auth}

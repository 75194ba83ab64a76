"""Caller context: who asks, for which department, why, for what, with which data.

LiteLLM carries it in ``metadata={...}``; :meth:`CallContext.from_metadata` validates it once
and merges the configured defaults underneath; user and department names are normalised there
(:func:`tidyllm.governance.identity.normalize_name`). Who the caller *is* — which source vouches
for the user and department — is decided by :class:`tidyllm.governance.identity.IdentityResolver`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tidyllm.governance.names import normalize_name

__all__ = ["CallContext", "CONTEXT_KEYS", "STAMP_KEY"]

CONTEXT_KEYS = ("user_id", "department", "audit_reason", "use_case", "data_sensitivity")
#: the metadata key under which tidyllm stamps its decision for the callbacks to find
STAMP_KEY = "tidyllm"


@dataclass(frozen=True)
class CallContext:
    """Validated caller context of one call."""

    user_id: str | None = None
    department: str | None = None
    audit_reason: str | None = None
    use_case: str | None = None
    data_sensitivity: str | None = None
    #: other string/number keys the caller passed (used as routing features)
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: where user and department came from: authenticated, token, declared, jupyterhub, os-user (or
    #: ``user-source/department-source`` when they differ); None when neither is known
    identity_source: str | None = None

    @classmethod
    def from_metadata(cls, metadata: Any, *, defaults: Mapping[str, str] | None = None,
                      sensitivity_classes: tuple[str, ...] = ("public", "internal", "confidential", "restricted"),
                      require_audit: bool = False) -> "CallContext":
        """Validate ``metadata`` (a dict or None) with ``defaults`` underneath."""
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, (dict, Mapping)):
            raise _error(f"metadata must be a dict like {{'user_id': 'ana', 'department': 'risk'}}, "
                         f"got {type(metadata).__name__}")
        values: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if v not in (None, "")}
        for key in CONTEXT_KEYS:
            if key in metadata and metadata[key] is not None:
                values[key] = metadata[key]
        for key in CONTEXT_KEYS:
            value = values.get(key)
            if value is not None and not isinstance(value, str):
                raise _error(f"metadata[{key!r}] must be a string, got {type(value).__name__} {value!r}")
            if isinstance(value, str) and not value.strip():
                values.pop(key)
        for key in ("user_id", "department"):
            if key in values:
                values[key] = normalize_name(values[key]) or None
        sensitivity = values.get("data_sensitivity")
        if sensitivity is not None and sensitivity not in sensitivity_classes:
            raise _error(f"metadata['data_sensitivity'] {sensitivity!r} is not a known class; "
                         f"use one of {', '.join(sensitivity_classes)}")
        if require_audit and not values.get("audit_reason"):
            raise _error("this platform requires an audit reason: pass metadata={'audit_reason': "
                         "'why you make this call', ...} (or %llm_config reason=... in a notebook)")
        extra = {k: v for k, v in metadata.items()
                 if k not in CONTEXT_KEYS and k != STAMP_KEY and isinstance(k, str)
                 and isinstance(v, (str, int, float)) and not isinstance(v, bool)
                 and k not in _LITELLM_OWN_KEYS and k not in _IDENTITY_KEYS
                 and not k.startswith(_LITELLM_OWN_PREFIXES) and not is_secret_key(k)}
        return cls(extra=extra, **{k: values.get(k) for k in CONTEXT_KEYS})

    def as_dict(self) -> dict[str, Any]:
        """The context as a flat dict (for routing features and records; without ``identity_source``)."""
        out = {k: getattr(self, k) for k in CONTEXT_KEYS if getattr(self, k) is not None}
        out.update(self.extra)
        return out


def _error(message: str) -> Exception:
    # imported here: the refusal classes are built on LiteLLM's, which is slow to import
    from tidyllm.errors import MetadataError

    return MetadataError(message)


def is_secret_key(key: str) -> bool:
    """Credential-named metadata keys (``api_key``, ``token``, ...) are never caller context: they would
    be stored in routing decisions and records (see :func:`tidyllm.redact.is_secret_key`)."""
    from tidyllm.redact import is_secret_key as secret

    return secret(key)


# Keys LiteLLM's Router and proxy add to metadata; they are not caller context.
_LITELLM_OWN_KEYS = frozenset({
    "model_group", "original_model_group", "model_group_size", "attempted_retries", "attempted_fallbacks",
    "max_retries", "deployment", "api_base", "caching_groups", "previous_models", "request_retry_count",
    "litellm_trace_id", "model_group_alias", "deployment_model_name", "user_api_key", "hidden_params",
    "tidyllm_call_id", "tidyllm_tried", "requester_ip_address", "user_agent", "endpoint", "litellm_api_version",
    "queue_time_seconds", "headers", "requester_metadata", "global_max_parallel_requests", "litellm_parent_otel_span",
})
#: prefixes of LiteLLM's own metadata keys (the proxy's authenticated key's facts)
_LITELLM_OWN_PREFIXES = ("user_api_key_", "litellm_", "tidyllm_")

# Keys that carry identity credentials: never routing features, never recorded.
_IDENTITY_KEYS = frozenset({"tidyllm_token"})

"""Keeping secrets out of the mart, the audit trail and the logs.

:func:`redact` replaces API keys, bearer tokens, basic-auth credentials and any value registered
with :func:`register_secret` (tidyllm registers the values of every ``$VAR`` a gateway config
references). :class:`RedactingFilter` applies it to log records of the ``tidyllm`` logger.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["redact", "register_secret", "register_url", "RedactingFilter", "is_secret_key", "safe_metadata",
           "safe_value"]

_PATTERNS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),                       # OpenAI/Anthropic-style keys
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"),  # Authorization header values
    re.compile(r"(?i)\b(api[_-]?key|x-api-key|authorization|password|secret|token)(\"?\s*[:=]\s*\"?)([^\s\"',}]{4,})"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                            # AWS access key ids
    re.compile(r"\btlm1\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),  # tidyllm caller tokens
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),                 # user:password@ in URLs
]
#: metadata keys whose values are credentials, never stored (api_key, x-api-key, authorization, password,
#: client_secret, access_token, aws_secret_access_key, ...)
_SECRET_KEY = re.compile(r"(?i)(api[_-]?key|apikey|authorization|passw(or)?d|secret|credential|private[_-]?key"
                         r"|cookie|(^|[_-])token($|[_-]))")
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Never let ``value`` through :func:`redact` (ignored when shorter than 4 characters)."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def register_url(url: str | None) -> None:
    """Register the password of a ``scheme://user:password@host`` URL (and its URL-decoded form)."""
    if not url or "://" not in url:
        return
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return
    if password:
        register_secret(password)
        register_secret(unquote(password))


def is_secret_key(key: object) -> bool:
    """Whether a metadata key names a credential (``api_key``, ``Authorization``, ``db_password``, ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def safe_metadata(metadata: object) -> object:
    """A copy of caller metadata without credential-named keys (at any depth) and with every remaining
    string redacted: what may be stored in ``routing_decisions`` and other tables."""
    if isinstance(metadata, dict):
        return {k: safe_metadata(v) for k, v in metadata.items() if not is_secret_key(k)}
    if isinstance(metadata, (list, tuple)):
        return [safe_metadata(v) for v in metadata]
    if isinstance(metadata, str):
        return redact(metadata)
    return metadata


def safe_value(value: object) -> object:
    """``value`` for an audit row: credential-named keys masked, registered secrets redacted."""
    if isinstance(value, dict):
        return {k: ("[REDACTED]" if is_secret_key(k) and v is not None else safe_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [safe_value(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def redact(text: str | None) -> str | None:
    """``text`` with every known secret shape and registered secret replaced by ``[REDACTED]``."""
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "[REDACTED]")
    for pattern in _PATTERNS:
        if pattern.groups == 3:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
        elif pattern.groups == 1:
            text = pattern.sub(lambda m: f"{m.group(1)} [REDACTED]", text)
        else:
            text = pattern.sub("[REDACTED]", text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True

"""Keeping secrets out of the mart, the audit trail and the logs.

:func:`redact` replaces API keys, bearer tokens, basic-auth credentials and any value registered
with :func:`register_secret` (tidyllm registers the values of every ``$VAR`` a gateway config
references). :class:`RedactingFilter` applies it to log records of the ``tidyllm`` logger.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["redact", "register_secret", "RedactingFilter"]

_PATTERNS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),                       # OpenAI/Anthropic-style keys
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"),  # Authorization header values
    re.compile(r"(?i)\b(api[_-]?key|x-api-key|authorization|password|secret|token)(\"?\s*[:=]\s*\"?)([^\s\"',}]{4,})"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                            # AWS access key ids
    re.compile(r"\btlm1\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),  # tidyllm caller tokens
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),                 # user:password@ in URLs
]
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Never let ``value`` through :func:`redact` (ignored when shorter than 4 characters)."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


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

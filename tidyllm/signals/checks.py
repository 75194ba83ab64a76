"""Deterministic checks of an answer: JSON against a schema, Python that parses, a regex, length bounds,
or a callable named by import path. Each returns a score in [0, 1] (1 = passed) and a short reason."""

from __future__ import annotations

import ast
import importlib
import json
import math
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    from tidyllm.signals.config import Check

__all__ = ["run_check", "load_callable"]

_FENCE = re.compile(r"```(?:\w+)?\n(.*?)```", re.S)
_callables: dict[str, Callable[..., Any]] = {}


def _payload(answer: str) -> str:
    """The answer, or the body of its first fenced code block (models often wrap JSON and code in one)."""
    match = _FENCE.search(answer)
    return match.group(1) if match else answer


def load_callable(path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (cached)."""
    fn = _callables.get(path)
    if fn is None:
        module, _, name = path.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(f"signals check callable {path!r} cannot be imported: {exc}") from exc
        if not callable(fn):
            raise ConfigurationError(f"signals check callable {path!r} is not callable")
        _callables[path] = fn
    return fn


def run_check(check: "Check", answer: str, request: Mapping[str, Any] | None = None) -> tuple[float, str]:
    """Score ``answer`` with ``check``: ``(score in [0, 1], reason)``."""
    if check.kind == "length":
        lo, hi = check.arg
        n = len(answer)
        ok = n >= lo and (hi is None or n <= hi)
        return float(ok), f"{n} characters" + ("" if ok else f", outside [{lo}, {hi if hi is not None else '∞'}]")
    if check.kind == "regex":
        found = check.arg.search(answer) is not None
        return float(found), "matches" if found else f"no match for {check.arg.pattern!r}"
    if check.kind == "python_parses":
        try:
            ast.parse(_payload(answer))
        except (SyntaxError, ValueError) as exc:
            return 0.0, f"does not parse: {exc.__class__.__name__}: {getattr(exc, 'msg', exc)}"
        return 1.0, "parses"
    if check.kind == "json_schema":
        import jsonschema

        try:
            value = json.loads(_payload(answer))
        except ValueError as exc:
            return 0.0, f"not JSON: {exc}"
        error = jsonschema.validators.validator_for(check.arg)(check.arg).iter_errors(value)
        first = next(iter(error), None)
        return (0.0, f"schema: {first.message}") if first is not None else (1.0, "valid")
    if check.kind == "callable":
        result = load_callable(check.arg)(answer, dict(request or {}))
        if isinstance(result, bool):
            return float(result), "passed" if result else "failed"
        if isinstance(result, (int, float)) and math.isfinite(result) and 0.0 <= result <= 1.0:
            return float(result), f"scored {result:g}"
        raise ConfigurationError(f"signals check callable {check.arg!r} returned {result!r}; "
                                 "return a bool or a number in [0, 1]")
    raise ConfigurationError(f"unknown check kind {check.kind!r}")

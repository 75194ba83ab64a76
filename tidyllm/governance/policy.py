"""Route authorisation: which departments, users and data-sensitivity classes may use which routes.

Rules come from settings (``authorization:``). A rule *applies* to a call when each of its
selectors matches (absent selector = any): ``departments``, ``users``, ``sensitivity`` (lists,
glob patterns allowed). An applying rule then constrains the route:

- ``routes``: the route (endpoint or model) must match one of these globs;
- ``deny_routes``: the route must match none of these globs;
- ``require_tags``: the route's tags must include these (e.g. ``{on_prem: "true"}``).

Department and user patterns are normalised like every call's names (case, whitespace; see
:func:`tidyllm.governance.identity.normalize_name`), so ``departments: [Risk]`` matches ``risk``.

Separately a route's own ``sensitivity`` list (from the gateway config) names the classes it
may carry. The first violated rule refuses the call with :class:`~tidyllm.RouteNotAuthorizedError`
naming it. Example::

    authorization:
      - name: confidential-stays-on-prem
        sensitivity: [confidential, restricted]
        require_tags: {on_prem: "true"}
      - name: interns-small-models-only
        departments: [interns]
        routes: ["chat-small*"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tidyllm.errors import ConfigurationError
from tidyllm.governance.names import normalize_name

if TYPE_CHECKING:
    from tidyllm.governance.context import CallContext

__all__ = ["AuthorizationPolicy", "Rule", "RouteFacts"]

_RULE_KEYS = {"name", "departments", "users", "sensitivity", "routes", "deny_routes", "require_tags"}


@dataclass(frozen=True)
class RouteFacts:
    """What authorisation needs to know about a route."""

    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    #: sensitivity classes the route may carry; empty = any
    sensitivity: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One authorisation rule (see the module docstring)."""

    name: str
    departments: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    sensitivity: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    deny_routes: tuple[str, ...] = ()
    require_tags: Mapping[str, str] = field(default_factory=dict)

    def applies(self, ctx: "CallContext") -> bool:
        return (_sel(self.departments, ctx.department) and _sel(self.users, ctx.user_id)
                and _sel(self.sensitivity, ctx.data_sensitivity))

    def violation(self, route: RouteFacts) -> str | None:
        if self.routes and not any(fnmatchcase(route.name, p) for p in self.routes):
            return f"only routes {', '.join(self.routes)} are allowed"
        if any(fnmatchcase(route.name, p) for p in self.deny_routes):
            return f"routes {', '.join(self.deny_routes)} are denied"
        missing = {k: v for k, v in self.require_tags.items() if str(route.tags.get(k)) != str(v)}
        if missing:
            return "routes must be tagged " + ", ".join(f"{k}={v}" for k, v in missing.items())
        return None


def _sel(patterns: tuple[str, ...], value: str | None) -> bool:
    if not patterns:
        return True
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def _strings(rule: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigurationError(f"authorization rule {rule!r}: {key} must be a list of strings")


def _names(patterns: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(normalize_name(p) for p in patterns)


class AuthorizationPolicy:
    """The configured rules, evaluated per call and route."""

    def __init__(self, rules: Sequence[Mapping[str, Any]] = ()) -> None:
        self.rules: list[Rule] = []
        for i, raw in enumerate(rules):
            if not isinstance(raw, Mapping):
                raise ConfigurationError(f"authorization rule #{i + 1} must be a mapping")
            name = raw.get("name") or f"rule-{i + 1}"
            unknown = set(raw) - _RULE_KEYS
            if unknown:
                raise ConfigurationError(f"authorization rule {name!r}: unknown keys {', '.join(sorted(unknown))}; "
                                         f"allowed: {', '.join(sorted(_RULE_KEYS))}")
            tags = raw.get("require_tags") or {}
            if not isinstance(tags, Mapping):
                raise ConfigurationError(f"authorization rule {name!r}: require_tags must be a mapping")
            rule = Rule(name=str(name),
                        departments=_names(_strings(name, "departments", raw.get("departments"))),
                        users=_names(_strings(name, "users", raw.get("users"))),
                        sensitivity=_strings(name, "sensitivity", raw.get("sensitivity")),
                        routes=_strings(name, "routes", raw.get("routes")),
                        deny_routes=_strings(name, "deny_routes", raw.get("deny_routes")),
                        require_tags={str(k): str(v) for k, v in tags.items()})
            if not (rule.routes or rule.deny_routes or rule.require_tags):
                raise ConfigurationError(f"authorization rule {name!r} constrains nothing: give routes, "
                                         "deny_routes or require_tags")
            self.rules.append(rule)

    def check(self, ctx: "CallContext", route: RouteFacts) -> tuple[str, str] | None:
        """None when ``route`` is allowed for ``ctx``; else ``(rule name, explanation)``."""
        if route.sensitivity and ctx.data_sensitivity and ctx.data_sensitivity not in route.sensitivity:
            return (f"route-sensitivity:{route.name}",
                    f"route {route.name!r} may carry only {', '.join(route.sensitivity)} data, "
                    f"not {ctx.data_sensitivity!r}")
        for rule in self.rules:
            if rule.applies(ctx):
                why = rule.violation(route)
                if why:
                    who = ", ".join(f"{k}={v}" for k, v in (("department", ctx.department), ("user", ctx.user_id),
                                                              ("sensitivity", ctx.data_sensitivity)) if v)
                    return rule.name, (f"rule {rule.name!r} ({who or 'any caller'}): {why}, so route "
                                       f"{route.name!r} may not be used")
        return None

    def allowed(self, ctx: "CallContext", routes: Sequence[RouteFacts]) -> list[RouteFacts]:
        """The subset of ``routes`` ``ctx`` may use."""
        return [r for r in routes if self.check(ctx, r) is None]

    def frame(self) -> Any:
        """The rules as a DataFrame."""
        import pandas as pd

        return pd.DataFrame([{"name": r.name, "departments": list(r.departments), "users": list(r.users),
                              "sensitivity": list(r.sensitivity), "routes": list(r.routes),
                              "deny_routes": list(r.deny_routes), "require_tags": dict(r.require_tags)}
                             for r in self.rules])

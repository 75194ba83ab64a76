"""One source of truth for budgets, rules, prices and rate limits: ``tidyllm.yaml`` declares, the mart holds.

Like a plan/apply tool: :meth:`DeclaredState.plan` compares what the file declares with what the mart
holds, and :meth:`DeclaredState.apply` makes the changes (``tidyllm apply [--dry-run]``; ``install()``
does it too unless ``governance.apply_on_install`` is off). The table ``declared_state`` remembers what
the file said at the last apply, so each difference has a cause:

- the file changed since the last apply, the mart did not → the file's change is applied;
- the mart changed since the last apply (``tidyllm budget set``, ``platform.budgets.set``), the file did
  not → **drift**: with ``governance.config_authority: database`` (the default) the runtime value stays
  and the drift is reported on every apply until the file agrees; with ``file`` the file's value is put
  back — reported and audited, never silently;
- both changed → a conflict, decided the same way.

Every change applied is an audit row (see :mod:`tidyllm.governance.admin`). Route definitions (from the
gateway routes file) and the ``governance`` settings live only in files: a change to them is audited
when it is first applied. Price versions are immutable (recorded costs refer to them): they are only
ever added.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import sqlalchemy as sa

from tidyllm.errors import ConfigurationError
from tidyllm.mart.schema import budgets, declared_state, prices
from tidyllm.mart.store import utcnow

if TYPE_CHECKING:
    from tidyllm.platform import Platform
    from tidyllm.settings import Settings

__all__ = ["DeclaredState", "Change", "Plan"]

log = logging.getLogger("tidyllm.governance")

#: kinds whose value in force lives in the mart and may drift from the file
MANAGED = ("budget", "rule", "price", "rate_limit")
#: kinds that live only in files; a change is audited when applied
TRACKED = ("route", "governance")


@dataclass(frozen=True)
class Change:
    """One difference between the file and the mart, and what apply does about it."""

    kind: str
    key: str
    #: add, change, remove (the file's change), drift (the mart changed at run time), conflict (both)
    action: str
    #: the mart's value now (None: absent)
    current: Any
    #: the file's value (None: absent)
    declared: Any
    #: which side wins: "file" (the declared value is applied) or "database" (the mart keeps its value)
    winner: str

    def describe(self) -> str:
        from tidyllm.governance.admin import describe_change

        if self.action in ("drift", "conflict"):
            what = _compare(self.kind, self.key, self.current, self.declared)
            side = ("the file's value is put back" if self.winner == "file"
                    else "the database's value stays (governance.config_authority: database)")
            cause = "changed at run time" if self.action == "drift" else "changed in both the file and the mart"
            return f"{self.action.upper()}: {what} — {cause}; {side}"
        return f"{self.action}: {describe_change(self.kind, self.key, self.current, self.declared)}"


@dataclass
class Plan:
    """What an apply would do (or did)."""

    changes: list[Change] = field(default_factory=list)
    #: file values to remember as applied without changing anything in force
    bookkeeping: list[tuple[str, str, Any]] = field(default_factory=list)
    applied: bool = False

    @property
    def drift(self) -> list[Change]:
        """The differences caused by runtime changes (drift and conflicts)."""
        return [c for c in self.changes if c.action in ("drift", "conflict")]

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __str__(self) -> str:
        if not self.changes:
            return "no changes: the mart matches the declared state"
        verb = "applied" if self.applied else "would apply"
        lines = [f"{len(self.changes)} difference(s); {verb}:"]
        lines += [f"  {c.describe()}" for c in self.changes]
        return "\n".join(lines)


def _compare(kind: str, key: str, current: Any, declared: Any) -> str:
    """``budget k: the mart has limit_usd 60.0, the file says 4.0`` (only the fields that differ)."""
    if current is None:
        return f"{kind} {key}: not in the mart, the file says {declared}"
    if declared is None:
        return f"{kind} {key}: the mart has {current}, the file has none"
    if isinstance(current, Mapping) and isinstance(declared, Mapping):
        keys = [k for k in sorted(set(current) | set(declared)) if current.get(k) != declared.get(k)]
        mart = ", ".join(f"{k} {current.get(k)!r}" for k in keys)
        return f"{kind} {key}: the mart has {mart}, the file says {', '.join(repr(declared.get(k)) for k in keys)}"
    return f"{kind} {key}: the mart has {current!r}, the file says {declared!r}"


def _budget_key(scope: str, name: str, period: str) -> str:
    return f"{scope}/{name}/{period}"


def _canon(value: Any) -> Any:
    """A JSON-stable form for comparisons (tuples as lists, floats as floats)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str)) if value is not None else None


class DeclaredState:
    """Plans and applies the declared state of a platform (see the module docstring)."""

    def __init__(self, platform: "Platform") -> None:
        self.platform = platform
        self._store = platform.mart.store

    # --- what each side says --------------------------------------------------------------------

    def declared(self, settings: "Settings") -> dict[str, dict[str, Any]]:
        """Kind → key → value, as the settings (and the gateway routes file) declare them."""
        from tidyllm.pricing import parse_effective

        out: dict[str, dict[str, Any]] = {k: {} for k in MANAGED + TRACKED}
        for raw in settings.budgets:
            scope = raw["scope"]
            key = _budget_key(scope, raw.get("name", "org"), raw.get("period", "month"))
            soft = raw.get("soft_threshold")
            thresholds = raw.get("thresholds")
            out["budget"][key] = {"limit_usd": float(raw["limit_usd"]),
                                  "soft_threshold": float(soft) if soft is not None else None,
                                  "thresholds": sorted({float(t) for t in thresholds}) if thresholds else None}
        for i, raw in enumerate(settings.authorization):
            out["rule"][str(raw.get("name") or f"rule-{i + 1}")] = _canon(dict(raw))
        for raw in settings.prices:
            start = parse_effective(raw.get("effective"), what=f"price of {raw['model']}: effective")
            out["price"][f"{raw['model']}@{start.isoformat()}"] = {"input_per_1m": float(raw["input_per_1m"]),
                                                                   "output_per_1m": float(raw["output_per_1m"])}
        for raw in settings.rate_limits:
            out["rate_limit"][f"{raw['scope']}/{raw.get('name', '*')}"] = _canon(dict(raw))
        config = self.platform.gateway.config
        for route in (config.routes if config is not None else ()):
            # config as written: credentials stay $VAR references, never their values
            out["route"][route.name] = _canon({"group": route.group, "provider": route.provider,
                                               "model": route.model_name, "config": dict(route.config),
                                               "tags": dict(route.tags), "sensitivity": list(route.sensitivity),
                                               "prices": [[p.input_per_1m, p.output_per_1m, str(p.effective)]
                                                          for p in route.prices]})
        for f in dataclasses.fields(settings.governance):
            out["governance"][f.name] = _canon(getattr(settings.governance, f.name))
        return out

    def _remembered(self, conn: Any) -> dict[tuple[str, str], tuple[Any, Any]]:
        rows = conn.execute(sa.select(declared_state.c.kind, declared_state.c.key, declared_state.c.file_value,
                                      declared_state.c.value)).all()
        return {(k, key): (fv, v) for k, key, fv, v in rows}  # SQLAlchemy parsed the JSON columns

    def current(self, conn: Any, remembered: Mapping[tuple[str, str], tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
        """Kind → key → value in force in the mart."""
        out: dict[str, dict[str, Any]] = {k: {} for k in MANAGED}
        for row in conn.execute(sa.select(budgets)).mappings():
            out["budget"][_budget_key(row["scope"], row["name"], row["period"])] = {
                "limit_usd": float(row["limit_usd"]), "soft_threshold": row["soft_threshold"],
                "thresholds": row["thresholds"]}
        for row in conn.execute(sa.select(prices)).mappings():
            start = row["effective_from"]
            start = start if start.tzinfo else start.replace(tzinfo=__import__("datetime").timezone.utc)
            out["price"][f"{row['model']}@{start.isoformat()}"] = {"input_per_1m": float(row["input_per_1m"]),
                                                                 "output_per_1m": float(row["output_per_1m"])}
        for (kind, key), (_, value) in remembered.items():
            if kind in ("rule", "rate_limit") and value is not None:
                out[kind][key] = value
        return out

    # --- plan and apply ---------------------------------------------------------------------------

    def plan(self, settings: "Settings | None" = None) -> Plan:
        """What :meth:`apply` would change, without changing anything."""
        settings = settings or self.platform.settings
        authority = settings.governance.config_authority
        declared = self.declared(settings)
        with self._store.begin() as conn:
            remembered = self._remembered(conn)
            current = self.current(conn, remembered)
        plan = Plan()
        for kind in MANAGED:
            keys = set(declared[kind]) | set(current[kind]) | {k for (kd, k) in remembered if kd == kind}
            for key in sorted(keys):
                f, c = _canon(declared[kind].get(key)), _canon(current[kind].get(key))
                seen = (kind, key) in remembered
                last = _canon(remembered[(kind, key)][0]) if seen else None
                if f == c:
                    if not seen or last != f:
                        plan.bookkeeping.append((kind, key, f))
                    continue
                if kind == "price" and f is None:
                    continue  # a price version not in the file stays: recorded costs refer to it
                if c == last:
                    action = "add" if c is None else ("remove" if f is None else "change")
                    plan.changes.append(Change(kind, key, action, c, f, "file"))
                elif f == last:
                    winner = "database" if kind == "price" else authority
                    plan.changes.append(Change(kind, key, "drift", c, f, winner))
                else:
                    winner = "database" if kind == "price" and c is not None else authority
                    plan.changes.append(Change(kind, key, "conflict", c, f, winner))
        for kind in TRACKED:
            for key in sorted(set(declared[kind]) | {k for (kd, k) in remembered if kd == kind}):
                f = _canon(declared[kind].get(key))
                seen = (kind, key) in remembered
                last = _canon(remembered[(kind, key)][0]) if seen else None
                if not seen and kind == "governance":
                    plan.bookkeeping.append((kind, key, f))  # the first apply records the settings it found
                elif f != last:
                    action = "add" if last is None else ("remove" if f is None else "change")
                    plan.changes.append(Change(kind, key, action, last, f, "file"))
        return plan

    def apply(self, settings: "Settings | None" = None, *, dry_run: bool = False, reason: str | None = None,
              actor: str | None = None, via: str = "apply") -> Plan:
        """Apply the declared state (see the module docstring); returns the plan, ``applied`` unless ``dry_run``.

        Each change is checked against ``governance.admins`` and audited with ``reason``."""
        settings = settings or self.platform.settings
        plan = self.plan(settings)
        if dry_run:
            return plan
        admin = self.platform.admin
        for change in plan.changes:
            if change.winner == "database":
                log.warning("%s", change.describe())
                continue
            self._apply_one(change, reason=reason, actor=actor, via=via)
            if change.action in ("drift", "conflict"):
                log.warning("%s", change.describe())
        with self._store.begin(write=True) as conn:
            # processes applying the same file at once (replicas starting together) take turns here
            self._store.lock_for_update(conn)
            now = utcnow()
            for change in plan.changes:
                if change.winner == "file" or change.action == "conflict":
                    self._remember(conn, change.kind, change.key, change.declared, now, admin.identity(actor)[0])
            for kind, key, value in plan.bookkeeping:
                self._remember(conn, kind, key, value, now, None)
        plan.applied = True
        return plan

    def _apply_one(self, change: Change, *, reason: str | None, actor: str | None, via: str) -> None:
        platform = self.platform
        value = change.declared
        if change.kind == "budget":
            scope, name, period = change.key.split("/", 2)
            if value is None:
                platform.budgets.delete(scope, name, period, reason=reason, actor=actor, via=via)
            else:
                platform.budgets.set(scope, name, value["limit_usd"], period, soft_threshold=value["soft_threshold"],
                                     thresholds=value["thresholds"], reason=reason, actor=actor, via=via)
        elif change.kind == "price":
            model, _, effective = change.key.rpartition("@")
            who, source = platform.admin.authorize("price", change.key, action="add", reason=reason, actor=actor,
                                                   new=value, via=via)
            platform.prices.set(model, value["input_per_1m"], value["output_per_1m"], effective, source="config")
            with self._store.begin(write=True) as conn:
                platform.admin.record(conn, "price", change.key, action="add", old=change.current, new=value,
                                      reason=reason, who=who, source=source, via=via)
        elif change.kind in ("rule", "rate_limit"):
            self.set_value(change.kind, change.key, value, reason=reason, actor=actor, via=via)
        else:  # route, governance: the file is the only place they live; the change is audited
            who, source = platform.admin.authorize(change.kind, change.key, action=change.action, reason=reason,
                                                   actor=actor, new=value, via=via)
            with self._store.begin(write=True) as conn:
                platform.admin.record(conn, change.kind, change.key, action=change.action, old=change.current,
                                      new=value, reason=reason, who=who, source=source, via=via)

    def set_value(self, kind: str, key: str, value: Any, *, reason: str | None = None, actor: str | None = None,
                  via: str = "api") -> None:
        """Set (or with ``value=None`` remove) an authorisation rule or a rate limit at run time, audited.

        The platform's policy and limiter pick the change up when it is next installed."""
        if kind not in ("rule", "rate_limit"):
            raise ConfigurationError(f"set_value manages rules and rate limits, not {kind!r}")
        if value is not None:
            from tidyllm.settings import _Problems, _check_entries

            problems = _Problems(f"{kind} {key!r}")
            _check_entries("authorization" if kind == "rule" else "rate_limits", (dict(value),), problems)
            problems.raise_if_any()
        value = _canon(dict(value)) if value is not None else None
        who, source = self.platform.admin.authorize(kind, key, action="set" if value else "remove", reason=reason,
                                                    actor=actor, new=value, via=via)
        with self._store.begin(write=True) as conn:
            self._store.lock_for_update(conn)
            row = conn.execute(sa.select(declared_state.c.value).where(
                declared_state.c.kind == kind, declared_state.c.key == key)).first()
            old = row[0] if row is not None else None
            if row is None:
                conn.execute(declared_state.insert().values(kind=kind, key=key, file_value=None, value=value,
                                                            updated_at=utcnow(), updated_by=who))
            else:
                conn.execute(declared_state.update().where(declared_state.c.kind == kind,
                                                           declared_state.c.key == key).values(
                    value=value, updated_at=utcnow(), updated_by=who))
            if old != value:
                self.platform.admin.record(conn, kind, key, action="set" if value else "remove", old=old, new=value,
                                           reason=reason, who=who, source=source, via=via)

    def _remember(self, conn: Any, kind: str, key: str, file_value: Any, now: Any, who: str | None) -> None:
        """Note what the file declared at this apply (the value in force is written by the change itself)."""
        row = conn.execute(sa.select(declared_state.c.key).where(declared_state.c.kind == kind,
                                                                 declared_state.c.key == key)).first()
        values: dict[str, Any] = {"file_value": file_value, "updated_at": now}
        if who is not None:
            values["updated_by"] = who
        if row is None:
            conn.execute(declared_state.insert().values(kind=kind, key=key, **values))
        else:
            conn.execute(declared_state.update().where(declared_state.c.kind == kind,
                                                       declared_state.c.key == key).values(**values))

    def has(self, kind: str) -> bool:
        """Whether the mart holds the ``kind`` ("rule", "rate_limit") state (once applied or set)."""
        with self._store.begin() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(declared_state).where(
                declared_state.c.kind == kind)).scalar_one() > 0

    def in_force(self, kind: str) -> list[dict[str, Any]]:
        """The rules (``"rule"``) or rate limits (``"rate_limit"``) in force, in key order."""
        with self._store.begin() as conn:
            rows = conn.execute(sa.select(declared_state.c.key, declared_state.c.value).where(
                declared_state.c.kind == kind).order_by(declared_state.c.key)).all()
        return [v for _, v in rows if v is not None]


"""The learning router inside the platform: the bandit behind the Router strategy, its credit and memory.

:class:`BanditChooser` wraps a :class:`~tidyllm.routing.RouteBandit` and

- chooses among the candidates the strategy offers (authorised ∩ healthy ∩ affordable) and reports
  the propensity, which the strategy stamps on the call;
- learns only from decisions it made: when a call it routed finishes, a ``routing_decisions`` row
  is written with cost, latency and failure; the reward is computed as soon as the quality is known
  (reported with the answer, or later through ``platform.feedback(call_id, score)`` /
  ``mart.learn_from_execution({"call_id": ..., "performance_score": ...})``, joined by call id);
  governance refusals never reach it;
- saves its state to ``bandit_state`` and restores it at start-up, and every ``refresh_seconds``
  folds in the rewards other processes sharing the mart recorded, so they learn from each other;
- answers ``mart.get_optimal_config("gateway", context)`` with its preferred route.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import sqlalchemy as sa

from tidyllm.errors import RoutingError
from tidyllm.mart.schema import bandit_state, routing_decisions
from tidyllm.mart.store import utcnow
from tidyllm.redact import safe_metadata
from tidyllm.routing.strategy import Decision

if TYPE_CHECKING:
    from tidyllm.governance.engine import Admission
    from tidyllm.mart import TidyMart
    from tidyllm.platform import Platform
    from tidyllm.records import CallRecord
    from tidyllm.routing.bandit import RouteBandit
    from tidyllm.settings import RoutingSettings

__all__ = ["BanditChooser"]

log = logging.getLogger("tidyllm.routing")
STATE_NAME = "gateway"
_SAVE_EVERY = 25


class BanditChooser:
    """A :class:`~tidyllm.routing.strategy.Chooser` backed by a persistent, shared RouteBandit."""

    name = "bandit"

    def __init__(self, mart: "TidyMart", bandit: "RouteBandit", settings: "RoutingSettings",
                 groups: Mapping[str, Sequence[str]] | None = None) -> None:
        self.mart = mart
        self.bandit = bandit
        self.settings = settings
        self.groups = {g: list(r) for g, r in (groups or {}).items()}
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.RLock()
        self._since_save = 0
        self._last_refresh = time.monotonic()
        self._replayed_until: Any = None
        self._restore()
        atexit.register(_save_at_exit, weakref.ref(self))

    @classmethod
    def for_platform(cls, platform: "Platform") -> "BanditChooser":
        """The chooser for ``platform``: settings from ``routing:``, wired to its governor and mart."""
        from tidyllm.routing.bandit import RouteBandit

        rs = platform.settings.routing
        bandit = RouteBandit(discount=rs.discount, floor=rs.exploration_floor,
                             exploration_cap=max(rs.max_exploration_share, rs.exploration_floor),
                             # a cap below the exploration floor cannot hold: the floor wins
                             department_caps={d: (max(c, rs.exploration_floor) if c is not None else None)
                                              for d, c in rs.exploration_share_by_department.items()} or None,
                             random_state=rs.random_state)
        groups = platform.gateway.config.groups() if platform.gateway.config is not None else {}
        chooser = cls(platform.mart, bandit, rs, {g: [r.name for r in routes] for g, routes in groups.items()})
        platform.governor.add_listener(chooser.on_finish)
        platform.mart.add_learner(chooser.on_outcome)
        platform.mart.register_optimizer("gateway", chooser.optimal_config)
        return chooser

    # --- choosing -------------------------------------------------------------------------------

    def choose(self, context: Mapping[str, Any], group: str, candidates: Sequence[str],
               prices: Mapping[str, float | None]) -> Decision:
        if not candidates:
            raise RoutingError(f"no candidate route for model group {group!r}")
        self._maybe_refresh()
        self.groups.setdefault(group, [])
        for route in candidates:
            if route not in self.groups[group]:
                self.groups[group].append(route)
        with self._lock:
            choice = self.bandit.choose(dict(context), list(candidates))
        return Decision(choice.route, float(choice.propensity), self.name, explored=bool(choice.explored),
                        model_version=int(choice.version), scores=dict(choice.scores))

    # --- credit -----------------------------------------------------------------------------------

    def _weights(self, department: str | None) -> Mapping[str, float]:
        return self.settings.weights_by_department.get(department or "", self.settings.weights)

    def _reward(self, department: str | None, quality: float | None, cost: float | None, latency_ms: float | None,
                failed: bool) -> float | None:
        from tidyllm.routing.bandit import reward

        if failed:
            return 0.0
        if quality is None:
            return None
        return reward(quality, cost_usd=max(cost or 0.0, 0.0), latency_s=max((latency_ms or 0.0) / 1000.0, 0.0),
                      weights=self._weights(department))

    def on_finish(self, record: "CallRecord", admission: "Admission | None") -> None:
        """Governor listener: log the decision of a call this chooser routed, and learn when the reward is known."""
        decision = (admission.extra or {}).get("decision") if admission is not None else None
        if not decision or decision.get("policy") != self.name:
            return
        # never store a credential a caller put in metadata (the context already drops them; defence in depth)
        features: dict[str, Any] = safe_metadata(dict(decision.get("features") or {}))  # type: ignore[assignment]
        cost = self._cost(admission, record)
        failed = not record.ok
        quality = record.reported_quality if record.ok else None
        value = self._reward(features.get("department"), quality, cost, record.latency_ms, failed)
        now = utcnow()
        with self.mart.store.begin(write=True) as conn:
            conn.execute(routing_decisions.insert().values(
                id=str(uuid.uuid4()), call_id=admission.call_id, decided_at=_parse(admission.started_at),
                department=features.get("department"), use_case=features.get("use_case"),
                model_group=decision.get("group"), context=features, candidates=decision.get("candidates") or [],
                route=admission.route, propensity=float(decision.get("propensity", 1.0)),
                explored=bool(decision.get("explored")), policy=self.name,
                model_version=int(decision.get("model_version", 0)), instance=self.instance, reward=value,
                quality=quality, cost_usd=cost, latency_ms=record.latency_ms, failed=failed,
                rewarded_at=now if value is not None else None))
        if value is not None:
            self._learn(features, admission.route, value, float(decision.get("propensity", 1.0)))

    @staticmethod
    def _cost(admission: "Admission", record: "CallRecord") -> float | None:
        if admission.input_per_1m is None or not record.ok:
            return 0.0 if not record.ok else record.litellm_cost
        return ((record.prompt_tokens or 0) * admission.input_per_1m
                + (record.completion_tokens or 0) * (admission.output_per_1m or 0.0)) / 1e6

    def on_outcome(self, outcome: Mapping[str, Any]) -> None:
        """Mart learner: late quality feedback for a call, joined to its decision by call id."""
        call_id = outcome.get("call_id")
        score = outcome.get("performance_score")
        if not call_id or score is None or outcome.get("module") != "gateway":
            return
        # read, then write: a write transaction from the start (a deferred one that read first cannot
        # take SQLite's write lock once another connection has written, and fails at once as "locked")
        with self.mart.store.begin(write=True) as conn:
            row = conn.execute(sa.select(routing_decisions).where(routing_decisions.c.call_id == call_id)
                               .order_by(routing_decisions.c.decided_at.desc())).mappings().first()
            if row is None or row["failed"]:
                return
            context = row["context"] if isinstance(row["context"], dict) else {}
            value = self._reward(row["department"], float(score), row["cost_usd"], row["latency_ms"], False)
            first = row["reward"] is None
            conn.execute(routing_decisions.update().where(routing_decisions.c.id == row["id"]).values(
                quality=float(score), reward=value, rewarded_at=utcnow()))
        if first and row["instance"] == self.instance:
            self._learn(context, row["route"], value, row["propensity"])
        elif first:
            self._maybe_refresh(force=True)

    def _learn(self, context: Mapping[str, Any], route: str, value: float, propensity: float) -> None:
        with self._lock:
            self.bandit.partial_fit([dict(context)], [route], [value], propensities=[propensity])
            self._since_save += 1
            due = self._since_save >= _SAVE_EVERY
        if due:
            self.save()

    # --- memory -----------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the bandit's state to ``bandit_state`` (also done every 25 updates and at exit)."""
        try:
            with self._lock:
                if not hasattr(self.bandit, "routes_") or self.bandit.n_updates_ == 0:
                    return
                state = self.bandit.get_state()
                version = int(self.bandit.n_updates_)
                self._since_save = 0
            now = utcnow()
            with self.mart.store.begin(write=True) as conn:
                exists = conn.execute(sa.select(bandit_state.c.name).where(bandit_state.c.name == STATE_NAME)).first()
                values = {"version": version, "updated_at": now, "last_decision_at": now, "state": state}
                if exists:
                    conn.execute(bandit_state.update().where(bandit_state.c.name == STATE_NAME).values(**values))
                else:
                    conn.execute(bandit_state.insert().values(name=STATE_NAME, **values))
            self._replayed_until = now
        except Exception:  # noqa: BLE001 - at interpreter exit the database may already be gone
            log.debug("could not save the router's state", exc_info=True)

    def _restore(self) -> None:
        with self.mart.store.begin() as conn:
            row = conn.execute(sa.select(bandit_state).where(bandit_state.c.name == STATE_NAME)).mappings().first()
        if row is not None:
            try:
                self.bandit.set_state(row["state"])
                self._replayed_until = row["last_decision_at"]
            except Exception as exc:  # noqa: BLE001 - an incompatible snapshot: relearn from the decisions
                log.warning("ignoring the saved router state (%s); relearning from logged decisions", exc)
        self._replay(since=self._replayed_until, exclude_self=False)

    def _maybe_refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_refresh < self.settings.refresh_seconds:
            return
        self._last_refresh = time.monotonic()
        self._replay(since=self._replayed_until, exclude_self=True)

    def _replay(self, since: Any, exclude_self: bool) -> None:
        """Fold in rewarded decisions recorded since ``since`` (by other processes when ``exclude_self``)."""
        query = sa.select(routing_decisions.c.context, routing_decisions.c.route, routing_decisions.c.reward,
                          routing_decisions.c.propensity, routing_decisions.c.rewarded_at).where(
            routing_decisions.c.reward.is_not(None), routing_decisions.c.policy == self.name)
        if since is not None:
            query = query.where(routing_decisions.c.rewarded_at > since)
        if exclude_self:
            query = query.where(sa.or_(routing_decisions.c.instance.is_(None),
                                       routing_decisions.c.instance != self.instance))
        with self.mart.store.begin() as conn:
            rows = conn.execute(query.order_by(routing_decisions.c.rewarded_at)).all()
        if not rows:
            return
        with self._lock:
            self.bandit.partial_fit([r[0] if isinstance(r[0], dict) else {} for r in rows], [r[1] for r in rows],
                                    [float(r[2]) for r in rows], propensities=[float(r[3]) for r in rows])
        self._replayed_until = rows[-1][4]

    # --- the seed's API ---------------------------------------------------------------------------

    def optimal_config(self, context: Mapping[str, Any]) -> dict[str, Any] | None:
        """``get_optimal_config("gateway", context)``: the preferred route of the context's model group."""
        group = context.get("model_group") or context.get("route") or "chat"
        routes = self.groups.get(group) or [r for rs in self.groups.values() for r in rs]
        if not routes:
            return None
        with self._lock:
            prefs = self.bandit.preferences(dict(context) | {"model_group": group}, routes)
            n = int(getattr(self.bandit, "n_updates_", 0)) if hasattr(self.bandit, "routes_") else 0
        best = max(prefs, key=prefs.get)
        ranked = sorted(prefs.values(), reverse=True)
        margin = ranked[0] - ranked[1] if len(ranked) > 1 else 1.0
        return {"parameters": {"preferred_route": best, "model_group": group, "route_scores": prefs},
                "confidence": round(min(1.0, n / (n + 20.0)) * min(1.0, 0.5 + margin * 5), 4),
                "samples": n, "source": "bandit"}


def _save_at_exit(ref: "weakref.ref[BanditChooser]") -> None:
    chooser = ref()
    if chooser is not None:
        chooser.save()


def _parse(value: Any) -> Any:
    import datetime as dt

    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value

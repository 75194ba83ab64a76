"""The learning router inside the platform: the bandit behind the Router strategy, its credit and memory.

:class:`BanditChooser` wraps a :class:`~tidyllm.routing.RouteBandit` and

- chooses among the candidates the strategy offers (authorised ∩ healthy ∩ affordable) and reports
  the propensity, which the strategy stamps on the call;
- learns only from decisions it made: when a call it routed finishes, a ``routing_decisions`` row
  is written with cost, latency, failure and the tracked execution the call was made in; then it learns
  from the call's quality signals (:mod:`tidyllm.signals`: LLM judges, deterministic checks, human
  feedback, scores given to the execution, failures, provider refusals, regenerations), each exactly
  once, whenever and in whatever order they arrive, each calibrated and weighted by its source;
  governance refusals never reach it;
- starts each model group from the gateway config's route ``weight`` (a prior that fades with evidence);
- saves its state to ``bandit_state`` and restores it at start-up, and every ``refresh_seconds``
  folds in the rewards other processes sharing the mart recorded, so they learn from each other;
- answers ``mart.get_optimal_config("gateway", context)`` with its preferred route.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import sqlalchemy as sa

from tidyllm.errors import RoutingError
from tidyllm.mart.schema import bandit_state, call_signals, routing_decisions
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
    from tidyllm.signals.hub import SignalHub

__all__ = ["BanditChooser", "WeightedChooser", "execution_of"]

log = logging.getLogger("tidyllm.routing")
STATE_NAME = "gateway"
_SAVE_EVERY = 25
#: prompts remembered for regeneration detection (the most recent ones, per process)
_PROMPTS_KEPT = 10_000


def execution_of(admission: "Admission | None") -> str | None:
    """The tracked execution an admitted call was made in.

    The admission gate records :func:`tidyllm.mart.tracking.current_execution_id` at admission (in the
    caller's context) as ``Admission.execution_id``; ``extra["execution_id"]`` and ``context`` are read too."""
    if admission is None:
        return None
    value = getattr(admission, "execution_id", None) or (admission.extra or {}).get("execution_id") \
        or (admission.context or {}).get("execution_id")
    return str(value) if value else None


class BanditChooser:
    """A :class:`~tidyllm.routing.strategy.Chooser` backed by a persistent, shared RouteBandit."""

    name = "bandit"

    def __init__(self, mart: "TidyMart", bandit: "RouteBandit", settings: "RoutingSettings",
                 groups: Mapping[str, Sequence[str]] | None = None, *, signals: "SignalHub | None" = None,
                 route_weights: Mapping[str, float] | None = None, persist: bool = True) -> None:
        self.mart = mart
        self.bandit = bandit
        self.settings = settings
        self.groups = {g: list(r) for g, r in (groups or {}).items()}
        #: route -> ``weight`` from the gateway config: the prior share the router starts from
        self.route_weights = dict(route_weights or {})
        self.signals = signals
        if signals is not None:
            signals.learner = self
        # regeneration detection: (user, prompt digest) -> (call id, monotonic time) of the last answer
        self._recent_prompts: "OrderedDict[tuple[str, str], tuple[str, float]]" = OrderedDict()
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.RLock()
        self._since_save = 0
        self._last_refresh = time.monotonic()
        self._replayed_until: Any = None
        self._restore()
        #: whether the bandit's state is saved to the mart (off for read-only uses: `tidyllm routes status`)
        self.persist = persist
        if persist:
            atexit.register(_save_at_exit, weakref.ref(self))

    @classmethod
    def for_reading(cls, mart: "TidyMart", settings: Any, groups: Mapping[str, Sequence[str]],
                    signals: "SignalHub | None" = None) -> "BanditChooser":
        """The chooser as its saved state and the mart's routing decisions say, over a read-only mart: it
        answers ``optimal_config`` and never writes (`tidyllm routes status` / `evaluate`)."""
        chooser = cls(mart, _bandit_for(settings.routing), settings.routing, groups, signals=signals, persist=False)
        mart.register_optimizer("gateway", chooser.optimal_config)
        return chooser

    @classmethod
    def for_platform(cls, platform: "Platform") -> "BanditChooser":
        """The chooser for ``platform``: settings from ``routing:``, wired to its governor and mart."""
        rs = platform.settings.routing
        bandit = _bandit_for(rs)
        groups = platform.gateway.config.groups() if platform.gateway.config is not None else {}
        weights = {r.name: float(r.weight) for routes in groups.values() for r in routes}
        chooser = cls(platform.mart, bandit, rs, {g: [r.name for r in routes] for g, routes in groups.items()},
                      signals=platform.signals, route_weights=weights)
        platform.governor.add_listener(chooser.on_finish)
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
        prior = {r: self.route_weights.get(r, 1.0) for r in candidates} if self.route_weights else None
        with self._lock:
            choice = self.bandit.choose(dict(context), list(candidates), prior=prior)
        return Decision(choice.route, float(choice.propensity), self.name, explored=bool(choice.explored),
                        model_version=int(choice.version), scores=dict(choice.scores))

    # --- credit -----------------------------------------------------------------------------------

    def _weights(self, department: str | None) -> Mapping[str, float]:
        return self.settings.weights_by_department.get(department or "", self.settings.weights)

    def on_finish(self, record: "CallRecord", admission: "Admission | None") -> None:
        """Governor listener: log the decision of a call this chooser routed, then learn its signals."""
        decision = (admission.extra or {}).get("decision") if admission is not None else None
        if not decision or decision.get("policy") != self.name:
            return
        # never store a credential a caller put in metadata (the context already drops them; defence in depth)
        features: dict[str, Any] = safe_metadata(dict(decision.get("features") or {}))  # type: ignore[assignment]
        cost = self._cost(admission, record)
        failed = not record.ok
        execution_id = execution_of(admission)
        with self.mart.store.begin(write=True) as conn:
            conn.execute(routing_decisions.insert().values(
                id=str(uuid.uuid4()), call_id=admission.call_id, decided_at=_parse(admission.started_at),
                department=features.get("department"), use_case=features.get("use_case"),
                model_group=decision.get("group"), context=features, candidates=decision.get("candidates") or [],
                route=admission.route, propensity=float(decision.get("propensity", 1.0)),
                explored=bool(decision.get("explored")), policy=self.name,
                model_version=int(decision.get("model_version", 0)), instance=self.instance, reward=None,
                quality=None, cost_usd=cost, latency_ms=record.latency_ms, failed=failed, rewarded_at=None,
                execution_id=execution_id))
        hub = self.signals
        if hub is None:
            return
        from tidyllm.signals import hub as sources

        call_id = admission.call_id
        if failed:
            refused = "ContentPolicy" in (record.error_type or "") or "content_filter" in (record.error_message or "")
            hub.record(call_id, sources.REFUSAL if refused else sources.FAILURE, 0.0,
                       1.0 if refused else None, data={"error_type": record.error_type})
        elif record.reported_quality is not None and hub.settings.provider_quality:
            hub.record(call_id, sources.PROVIDER, float(record.reported_quality), 1.0)
        if execution_id:
            hub.pending_execution(call_id, execution_id)
        if not failed:
            self._regeneration(call_id, features, record.messages)
        self.learn_signals(call_id)  # the signals that arrived before this decision was written

    def _regeneration(self, call_id: str, features: Mapping[str, Any], messages: Any) -> None:
        """The same user sending the same prompt again soon after: a weak negative for the earlier answer."""
        hub = self.signals
        window = hub.settings.regenerate_window_s if hub is not None else 0.0
        user = features.get("user_id")
        if hub is None or window <= 0 or not user or messages is None:
            return
        try:
            digest = hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode()).hexdigest()
        except (TypeError, ValueError):
            return
        key, now = (str(user), digest), time.monotonic()
        with self._lock:
            previous = self._recent_prompts.pop(key, None)
            self._recent_prompts[key] = (call_id, now)
            while len(self._recent_prompts) > _PROMPTS_KEPT:
                self._recent_prompts.popitem(last=False)
        if previous is not None and previous[0] != call_id and now - previous[1] <= window:
            from tidyllm.signals.hub import REGENERATE

            hub.record(previous[0], REGENERATE, 0.0, data={"regenerated_by": call_id})

    @staticmethod
    def _cost(admission: "Admission", record: "CallRecord") -> float | None:
        if admission.input_per_1m is None or not record.ok:
            return 0.0 if not record.ok else record.litellm_cost
        return ((record.prompt_tokens or 0) * admission.input_per_1m
                + (record.completion_tokens or 0) * (admission.output_per_1m or 0.0)) / 1e6

    def learn_signals(self, call_id: str) -> int:
        """Learn the signals of ``call_id`` not learned yet (none until its decision is written); returns how many.

        Each signal is claimed with one conditional ``UPDATE`` (``applied_at IS NULL``) before it is learned,
        so it reaches the bandit exactly once across threads and processes."""
        hub = self.signals
        if hub is None:
            return 0
        with self.mart.store.begin() as conn:
            row = conn.execute(sa.select(routing_decisions).where(routing_decisions.c.call_id == call_id)
                               .order_by(routing_decisions.c.decided_at.desc())).mappings().first()
            if row is None:
                return 0
            pending = conn.execute(sa.select(call_signals).where(
                call_signals.c.call_id == call_id, call_signals.c.applied_at.is_(None))).mappings().all()
        if not pending:
            return 0
        context = row["context"] if isinstance(row["context"], dict) else {}
        learned = []
        for signal in pending:
            cal = hub.calibration(signal["source"])
            weight = cal.weight(float(signal["weight"]))
            failed = signal["source"] in ("failure", "refusal")
            quality = 0.0 if failed else cal.apply(float(signal["score"]))
            value = self._reward(row["department"], quality, row["cost_usd"], row["latency_ms"], failed)
            now = utcnow()
            with self.mart.store.begin(write=True) as conn:
                claimed = conn.execute(call_signals.update().where(
                    call_signals.c.id == signal["id"], call_signals.c.applied_at.is_(None)).values(
                    applied_at=now, applied_by=self.instance, quality=quality, reward=value,
                    data={**(signal["data"] or {}), "learned_weight": weight})).rowcount
            if claimed:
                learned.append((value, weight))
        if not learned:
            return 0
        self._summarise(row["id"], call_id)
        with self._lock:
            self.bandit.partial_fit([dict(context)] * len(learned), [row["route"]] * len(learned),
                                    [v for v, _ in learned], propensities=[row["propensity"]] * len(learned),
                                    sample_weight=[w for _, w in learned])
            self._since_save += len(learned)
            due = self._since_save >= _SAVE_EVERY
        if due:
            self.save()
        return len(learned)

    def _summarise(self, decision_id: str, call_id: str) -> None:
        """The decision's quality and reward: the weighted mean of its learned signals."""
        with self.mart.store.begin(write=True) as conn:
            rows = conn.execute(sa.select(call_signals.c.quality, call_signals.c.reward, call_signals.c.data).where(
                call_signals.c.call_id == call_id, call_signals.c.applied_at.is_not(None))).all()
            weights = [float((d or {}).get("learned_weight", 1.0)) for _, _, d in rows]
            total = sum(weights)
            if total <= 0:
                return
            quality = sum(w * float(q) for (q, _, _), w in zip(rows, weights)) / total
            reward = sum(w * float(r) for (_, r, _), w in zip(rows, weights)) / total
            conn.execute(routing_decisions.update().where(routing_decisions.c.id == decision_id).values(
                quality=quality, reward=reward, rewarded_at=utcnow()))

    def _reward(self, department: str | None, quality: float | None, cost: float | None, latency_ms: float | None,
                failed: bool) -> float:
        from tidyllm.routing.bandit import reward

        if failed:
            return 0.0
        return reward(float(quality or 0.0), cost_usd=max(cost or 0.0, 0.0),
                      latency_s=max((latency_ms or 0.0) / 1000.0, 0.0), weights=self._weights(department))

    # --- memory -----------------------------------------------------------------------------------

    def save(self) -> None:
        if not self.persist:
            return
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
        """Fold in the signals learned since ``since`` (by other processes when ``exclude_self``)."""
        rd, cs = routing_decisions, call_signals
        query = (sa.select(rd.c.context, rd.c.route, cs.c.reward, rd.c.propensity, cs.c.applied_at, cs.c.data)
                 .join(rd, rd.c.call_id == cs.c.call_id)
                 .where(cs.c.applied_at.is_not(None), cs.c.reward.is_not(None), rd.c.policy == self.name))
        if since is not None:
            query = query.where(cs.c.applied_at > since)
        if exclude_self:
            query = query.where(sa.or_(cs.c.applied_by.is_(None), cs.c.applied_by != self.instance))
        with self.mart.store.begin() as conn:
            rows = conn.execute(query.order_by(cs.c.applied_at)).all()
        if not rows:
            return
        with self._lock:
            self.bandit.partial_fit([r[0] if isinstance(r[0], dict) else {} for r in rows], [r[1] for r in rows],
                                    [float(r[2]) for r in rows], propensities=[float(r[3]) for r in rows],
                                    sample_weight=[float((r[5] or {}).get("learned_weight", 1.0)) for r in rows])
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
            weighted = float(self.bandit.n_observations_) if n else 0.0
        best = max(prefs, key=prefs.get)
        ranked = sorted(prefs.values(), reverse=True)
        margin = ranked[0] - ranked[1] if len(ranked) > 1 else 1.0
        # confidence grows with the weighted (calibrated) observations, not the raw count of signals
        return {"preferred_route": best,
                "parameters": {"preferred_route": best, "model_group": group, "route_scores": prefs},
                "confidence": round(min(1.0, weighted / (weighted + 20.0)) * min(1.0, 0.5 + margin * 5), 4),
                "samples": n, "observations": round(weighted, 3), "source": "bandit"}


class WeightedChooser:
    """The non-learning traffic split (``routing.strategy: weighted``): each candidate gets the share of
    traffic its gateway-config ``weight`` says, among the candidates of the call (authorised, healthy,
    affordable); the logged propensity is that share."""

    name = "weighted"

    def __init__(self, route_weights: Mapping[str, float], random_state: int | None = None) -> None:
        import random

        self.route_weights = dict(route_weights)
        self._rng = random.Random(random_state)
        self._lock = threading.Lock()

    @classmethod
    def for_platform(cls, platform: "Platform") -> "WeightedChooser":
        """The split over ``platform``'s gateway-config route weights."""
        config = platform.gateway.config
        weights = {r.name: float(r.weight) for r in config.routes} if config is not None else {}
        return cls(weights, platform.settings.routing.random_state)

    def choose(self, context: Mapping[str, Any], group: str, candidates: Sequence[str],
               prices: Mapping[str, float | None]) -> Decision:
        if not candidates:
            raise RoutingError(f"no candidate route for model group {group!r}")
        weights = [max(self.route_weights.get(r, 1.0), 0.0) for r in candidates]
        total = sum(weights)
        with self._lock:
            pick = self._rng.choices(range(len(candidates)), weights=weights)[0]
        return Decision(candidates[pick], weights[pick] / total, self.name)


def _bandit_for(rs: "RoutingSettings") -> "RouteBandit":
    """A RouteBandit with the ``routing:`` settings."""
    from tidyllm.routing.bandit import RouteBandit

    return RouteBandit(discount=rs.discount, floor=rs.exploration_floor,
                       exploration_cap=max(rs.max_exploration_share, rs.exploration_floor),
                       # a cap below the exploration floor cannot hold: the floor wins
                       department_caps={d: (max(c, rs.exploration_floor) if c is not None else None)
                                        for d, c in rs.exploration_share_by_department.items()} or None,
                       random_state=rs.random_state)


def _save_at_exit(ref: "weakref.ref[BanditChooser]") -> None:
    chooser = ref()
    if chooser is not None:
        chooser.save()


def _parse(value: Any) -> Any:
    import datetime as dt

    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value

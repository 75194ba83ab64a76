"""``tidyllm.install()``: one governed platform per process, registered with LiteLLM.

The platform bundles the mart, prices, budgets, the authorisation policy, the audit trail, the
rate limiter, route health and the governor, and builds governed LiteLLM Routers over the MLflow
gateway's endpoints. ``install`` is idempotent (same settings → same platform, nothing registered
twice); installing with other settings replaces the previous platform; ``uninstall`` removes
tidyllm's callbacks and provider from LiteLLM.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Mapping

from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.gateway.config import GatewayConfig
    from tidyllm.routing.strategy import Chooser
    from tidyllm.settings import Settings

__all__ = ["Platform", "install", "uninstall", "current"]

log = logging.getLogger("tidyllm")

_lock = threading.RLock()
_installed: "Platform | None" = None


class Platform:
    """Everything tidyllm governs with; made by :func:`install`.

    Attributes: ``settings``, ``mart``, ``prices``, ``budgets``, ``policy``, ``audit``, ``limiter``,
    ``routes`` (endpoint health), ``governor``, ``gateway`` (config and endpoints).
    """

    def __init__(self, settings: "Settings", *, apply: bool | None = None) -> None:
        from tidyllm.gateway.health import RouteHealth
        from tidyllm.governance.admin import Administration
        from tidyllm.governance.alerts import Alerts, sinks_from_settings
        from tidyllm.governance.audit import AuditTrail
        from tidyllm.governance.budgets import BudgetLedger
        from tidyllm.governance.checkpoints import Checkpoints
        from tidyllm.governance.declared import DeclaredState
        from tidyllm.governance.engine import Governor
        from tidyllm.governance.gate import Gate
        from tidyllm.governance.spool import Spool, spool_dir_for
        from tidyllm.governance.policy import AuthorizationPolicy, RouteFacts
        from tidyllm.governance.ratelimit import RateLimiter
        from tidyllm.mart import get_tidymart
        from tidyllm.pricing import PriceBook
        from tidyllm.redact import RedactingFilter

        self.settings = settings
        gov = settings.governance
        register_secrets(settings)
        self.mart = get_tidymart(settings)
        self.prices = PriceBook(self.mart)
        self.budgets = BudgetLedger(self.mart, timezone=gov.timezone, lease_ttl_seconds=gov.lease_ttl_seconds,
                                    soft_threshold=gov.soft_threshold, credit_calls=gov.admission_credit_calls,
                                    heartbeat_seconds=gov.owner_heartbeat_seconds)
        self.policy = AuthorizationPolicy(settings.authorization)
        self.audit = AuditTrail(self.mart, capture=settings.audit.capture)
        #: who may administer, and the audit rows of every change (tidyllm.governance.admin)
        self.admin = Administration(self.audit, admins=gov.admins, require_reason=gov.require_audit,
                                    authenticated=settings.mlflow_username if settings.mlflow_password else None)
        self.budgets.admin = self.admin
        self.gateway = GatewayHandle(settings)
        register_gateway_secrets(self.gateway.config)
        facts = {}
        if self.gateway.config is not None:
            for route in self.gateway.config.routes:
                facts[route.name] = RouteFacts(route.name, dict(route.tags), tuple(route.sensitivity))
                for price in route.prices:
                    self.prices.set(route.name, price.input_per_1m, price.output_per_1m, price.effective,
                                    source="gateway-config")
        #: the declared state: plan/apply of tidyllm.yaml against the mart (tidyllm.governance.declared)
        self.state = DeclaredState(self)
        #: what the last apply did (None: not applied by this platform)
        self.last_plan = None
        if gov.apply_on_install if apply is None else apply:
            self.last_plan = self.state.apply(reason=f"declared in {settings.source or 'the settings'}",
                                              via="install")
        rules = self.state.in_force("rule") if self.state.has("rule") else list(settings.authorization)
        limits = self.state.in_force("rate_limit") if self.state.has("rate_limit") else list(settings.rate_limits)
        self.policy = AuthorizationPolicy(rules)
        self.limiter = RateLimiter(limits)
        self.routes = RouteHealth()
        self.governor = Governor(self.mart, settings=gov, defaults=settings.defaults, prices=self.prices,
                                 budgets=self.budgets, policy=self.policy, audit=self.audit, limiter=self.limiter,
                                 routes=facts, gateway_api_bases=self.gateway.api_bases(), tokens=_LiteLLMTokens(),
                                 spool=Spool(spool_dir_for(self.mart.url, gov.spool_dir)))
        #: the one admission sequence every LiteLLM entry point calls (tidyllm.governance.gate)
        self.gate = Gate(self.governor)
        self.governor.add_listener(self._health_listener)
        #: who is calling (tidyllm.governance.identity): tokens, the notebook's user, required context
        self.identity = self.governor.identity
        self.budgets.reclaim_charge = self.governor.reclaim_charge
        self.budgets.owners.start()
        # what dead processes on this host left: kept settlements replayed, their leases reclaimed
        self.governor.recover()
        al = settings.alerts
        #: budget alerts and their delivery worker (started by install(); tidyllm.governance.alerts)
        self.alerts = Alerts(self.mart, self.budgets, thresholds=al.thresholds, forecast_hours=al.forecast_hours,
                             sinks=sinks_from_settings(al, settings.smtp_password), retries=al.retries,
                             backoff_seconds=al.backoff_seconds)
        self.governor.add_listener(self._alert_listener)
        au = settings.audit
        #: signed checkpoints of the audit chain, kept outside the database (tidyllm.governance.checkpoints)
        self.checkpoints = Checkpoints(self.mart, key_file=au.key_file, checkpoint_file=au.checkpoint_file,
                                       every_rows=au.checkpoint_rows, every_minutes=au.checkpoint_minutes,
                                       mlflow_uri=au.checkpoint_mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.budgets.reconcile()
        self._callbacks: Any = None
        self._provider: Any = None
        self._router: Any = None
        self._chooser: "Chooser | None" = None
        self._signals: Any = None
        self._observer: Any = None
        self._filter = RedactingFilter()
        logging.getLogger("tidyllm").addFilter(self._filter)
        self.signals  # noqa: B018 - feedback reaches the mart's signals from the start

    def __repr__(self) -> str:
        return f"<tidyllm.Platform mart={self.mart.store.safe_url!r} gateway={self.gateway.uri!r}>"

    # --- LiteLLM registration -------------------------------------------------------------------

    def _register(self) -> None:
        from tidyllm._litellm import import_litellm
        from tidyllm.litellm_bridge.callbacks import GovernanceCallbacks
        from tidyllm.litellm_bridge.exit import settle_at_exit
        from tidyllm.litellm_bridge.provider import PROVIDER, TidyLLMProvider

        litellm = import_litellm()
        name = hashlib.sha1(self.mart.url.encode()).hexdigest()[:12]
        self._callbacks = GovernanceCallbacks(self.gate, name, self.resolve)
        litellm.logging_callback_manager.add_litellm_callback(self._callbacks)
        settle_at_exit(self.governor)
        if self.settings.governance.instrument_sync:
            from tidyllm.litellm_bridge.instrument import instrument

            instrument(self.gate, self.resolve)
        self._provider = TidyLLMProvider(self.router)
        litellm.custom_provider_map = [p for p in litellm.custom_provider_map if p.get("provider") != PROVIDER]
        litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": self._provider})
        from litellm.utils import custom_llm_setup

        custom_llm_setup()
        if self.signals.settings.judges or self.signals.settings.checks:
            from tidyllm.signals.observer import AnswerObserver

            self._observer = AnswerObserver(self.signals)
            self.governor.add_listener(self._observer)
        self.alerts.start()
        self.checkpoints.start()

    def _unregister(self) -> None:
        import sys

        litellm = sys.modules.get("litellm")
        if litellm is None:
            return
        from tidyllm.litellm_bridge.instrument import uninstrument
        from tidyllm.litellm_bridge.provider import PROVIDER

        uninstrument(self.gate)
        if self._callbacks is not None:
            litellm.logging_callback_manager.remove_callback_from_all_lists(self._callbacks)
            if self._callbacks in litellm.callbacks:
                litellm.callbacks.remove(self._callbacks)
        if self._observer is not None:
            self.governor.remove_listener(self._observer)
        self._observer = None
        litellm.custom_provider_map[:] = [p for p in litellm.custom_provider_map
                                          if p.get("custom_handler") is not self._provider]
        if PROVIDER in litellm._custom_providers and not any(p.get("provider") == PROVIDER
                                                              for p in litellm.custom_provider_map):
            litellm._custom_providers.remove(PROVIDER)
        self._callbacks = None
        self._provider = None

    # --- routing --------------------------------------------------------------------------------

    def resolve(self, model: str, api_base: str | None) -> tuple[str, bool]:
        """The route a plain SDK call goes to, and whether it is a configured gateway endpoint."""
        bases = self.governor.gateway_api_bases
        names = {r.name for r in self.gateway.config.routes} if self.gateway.config is not None else set()
        if model.startswith("openai/") and api_base and api_base.rstrip("/") in bases:
            return model.split("/", 1)[1], True
        if model in names:
            return model, True
        return model, False

    def chooser(self) -> "Chooser":
        """The routing rule the governed Routers use (``routing.strategy``)."""
        if self._chooser is None:
            if self.settings.routing.strategy == "bandit":
                from tidyllm.routing.chooser import BanditChooser

                self._chooser = BanditChooser.for_platform(self)
            elif self.settings.routing.strategy == "weighted":
                from tidyllm.routing.chooser import WeightedChooser

                self._chooser = WeightedChooser.for_platform(self)
            else:
                from tidyllm.routing.strategy import CheapestChooser

                self._chooser = CheapestChooser()
        return self._chooser

    def govern(self, router: Any, *, gateway_routes: set[str] | None = None) -> Any:
        """Attach tidyllm's governed routing strategy to any ``litellm.Router``; returns it."""
        from tidyllm.litellm_bridge.strategy import build_strategy

        router.register_plugin(build_strategy(router, self.gate, self.routes, self.chooser(),
                                              gateway_routes=gateway_routes))
        return router

    def router(self, **router_kwargs: Any) -> Any:
        """A governed ``litellm.Router`` over the MLflow gateway's endpoints (built once, then reused).

        Deployments are ``openai/<endpoint>`` at the gateway's OpenAI-compatible base, grouped by
        each route's ``group``, each with its explicit price. ``router_kwargs`` go to ``Router``
        (and force a new one)."""
        with _lock:
            if self._router is not None and not router_kwargs:
                return self._router
            from tidyllm.gateway.router import build_router

            router = build_router(self, **router_kwargs)
            if not router_kwargs:
                self._router = router
            return router

    # --- learning and feedback -----------------------------------------------------------------

    def feedback(self, call_id: str, score: float, comment: str | None = None, **fields: Any) -> str:
        """Record a human quality score in [0, 1] for a call (may arrive late, before or after the call is
        settled); the router learns it once. Returns the outcome id."""
        return self.mart.learn_from_execution({"module": "gateway", "operation": "feedback", "call_id": call_id,
                                               "performance_score": score, "signal_source": "human",
                                               **({"comment": comment} if comment is not None else {}), **fields})

    @property
    def signals(self) -> Any:
        """The :class:`~tidyllm.signals.SignalHub`: judges, checks and feedback the router learns from."""
        with _lock:
            if self._signals is None:
                from tidyllm.signals import SignalHub, parse_signals

                self._signals = SignalHub(self.mart, parse_signals(self.settings.signals),
                                          judge_call=self._judge_call, judge_routes=self._judge_routes)
                self.mart.add_learner(self._signals.on_outcome)
            return self._signals

    def _judge_call(self, judge: Any, messages: list[dict[str, str]], metadata: dict[str, Any]) -> str:
        """One judge call, governed like any other: through this platform's Router, on the judge's budget."""
        from tidyllm.litellm_bridge.records import answer_text

        response = self.router().completion(model=judge.model, messages=messages, metadata=metadata,
                                            max_tokens=judge.max_tokens)
        return answer_text(response)

    def _judge_routes(self, judge: Any) -> set[str]:
        config = self.gateway.config
        if config is None:
            return set()
        return {r.name for r in config.groups().get(judge.model, [])}

    def _alert_listener(self, record: Any, admission: Any) -> None:
        # a call finished: its spend may cross a threshold. Only wakes the worker; never blocks the call.
        if admission is not None:
            self.alerts.poke()

    def _health_listener(self, record: Any, admission: Any) -> None:
        if admission is None:
            return
        self.routes.record(admission.route, record.ok, record.latency_ms)

    def wait_for_call(self, call_id: str, timeout: float = 15.0, *, last_attempt: bool = False) -> dict[str, Any]:
        """The ``llm_calls`` row of ``call_id`` once it is settled (sync success callbacks run on LiteLLM's
        logging threads, a moment after the call returns). Raises ``TimeoutError`` after ``timeout`` s.

        With ``last_attempt``, the row of the request's last attempt: a Router retry of a named call is
        recorded as ``<call_id>#<n>``."""
        import time

        import sqlalchemy as sa

        from tidyllm.mart.schema import llm_calls

        deadline = time.monotonic() + timeout
        delay = 0.002
        # a call admitted in this process: also wait for its listeners (the router's credit) to have run
        listeners = self.governor.listeners_done.get(call_id)
        while True:
            with self.mart.store.begin() as conn:
                row = conn.execute(sa.select(llm_calls).where(llm_calls.c.id == call_id)).mappings().first()
                if last_attempt and row is not None:
                    retries = conn.execute(sa.select(llm_calls).where(llm_calls.c.id.like(f"{call_id}#%"))
                                           .order_by(llm_calls.c.started_at.desc())).mappings().first()
                    row = retries or row
            if row is not None and row["status"] != "pending":
                if listeners is not None:
                    listeners.wait(max(0.0, deadline - time.monotonic()))
                return dict(row)
            if time.monotonic() > deadline:
                raise TimeoutError(f"call {call_id} was not settled within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # --- reporting ------------------------------------------------------------------------------

    def forecast(self, hours: int = 24) -> "pd.DataFrame":
        """Predicted requests and spend per route and per department for the coming ``hours``."""
        from tidyllm.forecast import forecast

        return forecast(self.mart, hours=hours)

    def calls(self, **filters: Any) -> "pd.DataFrame":
        """The ``llm_calls`` table."""
        return self.mart.frame("llm_calls", **filters)

    def close(self) -> None:
        """Unregister from LiteLLM, give back unused admission credit and drop the log filter (the mart stays
        open for other users)."""
        if self._signals is not None:
            self._signals.close()
            self.mart.remove_learner(self._signals.on_outcome)
        self._unregister()
        self.budgets.owners.stop()
        try:
            if self.governor.spool is not None:
                self.governor.spool.drain(self.governor.apply)
            self.budgets.credit.return_all()
        except Exception:  # noqa: BLE001 - a closed database: the credit's lease expires
            logging.getLogger("tidyllm.governance").warning("could not give back admission credit", exc_info=True)
        self.alerts.stop()
        self.checkpoints.stop()
        logging.getLogger("tidyllm").removeFilter(self._filter)


class _LiteLLMTokens:
    """LiteLLM's tokenizers for the governor, imported on first use (``import litellm`` takes seconds)."""

    def __init__(self) -> None:
        self._counter: Any = None

    def _get(self) -> Any:
        if self._counter is None:
            from tidyllm.litellm_bridge.tokens import LiteLLMTokens

            self._counter = LiteLLMTokens()
        return self._counter

    def count(self, model: str, messages: Any = None, text: Any = None, tools: Any = None) -> int:
        return self._get().count(model, messages=messages, text=text, tools=tools)
def register_secrets(settings: "Settings") -> None:
    """Register every secret the settings hold with the redactor, before any call: the database and
    gateway URLs' passwords, the MLflow and SMTP passwords, and the alert webhook URL (webhook URLs
    such as Slack's are credentials themselves)."""
    from tidyllm.redact import register_secret, register_url

    register_url(settings.database_url)
    register_url(settings.gateway_uri)
    register_secret(settings.mlflow_password)
    register_secret(settings.smtp_password)
    register_secret(settings.alerts.webhook_url)


def register_gateway_secrets(config: "GatewayConfig | None") -> None:
    """Register the values of the credentials (``$VAR`` references) a gateway routes file names."""
    if config is None:
        return
    from tidyllm.redact import register_secret

    for name in config.secret_refs():
        register_secret(os.environ.get(name))


class GatewayHandle:
    """The configured MLflow gateway: its routes file, URI, flavour and endpoints."""

    def __init__(self, settings: "Settings") -> None:
        self.uri = settings.gateway_uri.rstrip("/") if settings.gateway_uri else None
        self.mode = settings.gateway_mode
        self.config: "GatewayConfig | None" = None
        self._auth = (settings.mlflow_username, settings.mlflow_password)
        if settings.gateway_config:
            from tidyllm.gateway.config import load_gateway_config

            self.config = load_gateway_config(settings.gateway_config)

    @property
    def api_base(self) -> str | None:
        """The OpenAI-compatible base LiteLLM calls (``/v1`` legacy, ``/gateway/mlflow/v1`` server)."""
        if self.uri is None:
            return None
        return f"{self.uri}/v1" if self.mode == "legacy" else f"{self.uri}/gateway/mlflow/v1"

    def api_bases(self) -> tuple[str, ...]:
        """Every base a call to the gateway uses: the chat base and, on the tracking server, the OpenAI
        passthrough it serves embeddings on (:func:`tidyllm.gateway.client.embeddings_api_base`)."""
        if self.uri is None or self.api_base is None:
            return ()
        from tidyllm.gateway.client import embeddings_api_base

        return tuple(dict.fromkeys((self.api_base, embeddings_api_base(self.uri, self.mode))))

    def auth_headers(self) -> dict[str, str]:
        """Basic-auth headers for an authenticated server gateway (empty without credentials)."""
        user, password = self._auth
        if not (user and password):
            return {}
        from tidyllm.gateway.client import auth_headers

        return auth_headers(user, password)

    def endpoints(self) -> "pd.DataFrame":
        """What the running gateway serves (either flavour)."""
        import pandas as pd

        from tidyllm.gateway.client import list_endpoints

        if self.uri is None:
            raise ConfigurationError("no gateway_uri configured: start one with `tidyllm gateway start` and set "
                                     "TIDYLLM_GATEWAY_URI (or gateway_uri in tidyllm.yaml)")
        user, password = self._auth
        rows = list_endpoints(self.uri, mode=self.mode, auth=(user, password) if user and password else None)
        return pd.DataFrame(rows)


def install(config: "str | Mapping[str, Any] | Settings | None" = None, **overrides: Any) -> Platform:
    """Install tidyllm governance into LiteLLM and return the platform.

    ``config`` is a ``tidyllm.yaml`` path, a mapping or :class:`~tidyllm.Settings`; keyword
    arguments override settings. Calling it again with the same settings returns the same
    platform and registers nothing twice; with different settings the previous one is replaced.
    """
    global _installed
    from tidyllm.settings import load_settings

    settings = load_settings(config, **overrides)
    with _lock:
        if _installed is not None and _installed.settings == settings and _installed._callbacks is not None:
            return _installed
        if _installed is not None:
            _installed.close()
            _installed = None
        platform = Platform(settings)
        platform._register()
        _installed = platform
        return platform


def uninstall() -> None:
    """Remove tidyllm's callbacks and ``tidyllm/`` provider from LiteLLM."""
    global _installed
    with _lock:
        if _installed is not None:
            _installed.close()
            _installed = None


def current() -> Platform | None:
    """The installed platform, if any."""
    return _installed

"""A local stack for demos, notebooks, examples and tests: provider simulator + real MLflow gateway + platform.

Nothing here reaches a real provider: every route of the bundled gateway config points at the
provider **simulator**. A real deployment runs ``tidyllm gateway start`` (or syncs a tracking
server) with its own routes file and only sets ``gateway_uri``/``gateway_config``.

>>> with LocalStack(latency_scale=0) as stack:            # doctest: +SKIP
...     stack.platform.router().completion(model="chat", messages=[...], metadata={...})
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from tidyllm.gateway.processes import GatewayProcess
    from tidyllm.gateway.simulator import Simulator
    from tidyllm.platform import Platform

__all__ = ["LocalStack", "bundled_gateway_config", "bundled_settings"]

_DATA = Path(__file__).with_name("examples_data")


def bundled_gateway_config() -> Path:
    """The example routes file (every route on the provider simulator)."""
    return _DATA / "gateway.yaml"


def bundled_settings() -> Path:
    """The example ``tidyllm.yaml`` (department budgets and authorisation rules) the demo uses."""
    return _DATA / "tidyllm.yaml"


class LocalStack:
    """Start the simulator, an MLflow gateway over it, and install a governed platform; stop them all.

    ``mode`` is the gateway flavour (``"legacy"`` or ``"server"``); ``settings`` (a path, mapping or
    Settings) and ``overrides`` configure the platform — ``gateway_uri``, ``gateway_mode`` and
    ``gateway_config`` are filled in from what was started.
    """

    def __init__(self, *, mode: str = "legacy", gateway_config: str | Path | None = None,
                 profiles: Any = None, seed: int = 0, latency_scale: float = 1.0,
                 settings: Any = None, data_dir: str | Path | None = None, auth: tuple[str, str] | None = None,
                 report_quality: bool = True, **overrides: Any) -> None:
        self.mode = mode
        self.gateway_config = Path(gateway_config) if gateway_config else bundled_gateway_config()
        self.profiles = profiles
        self.seed = seed
        self.latency_scale = latency_scale
        self.settings = settings
        self.data_dir = data_dir
        self.auth = auth
        #: whether the simulator reports each answer's quality with it (off: learn from judges and feedback)
        self.report_quality = report_quality
        self.overrides: Mapping[str, Any] = overrides
        self.simulator: "Simulator | None" = None
        self.gateway: "GatewayProcess | None" = None
        self.platform: "Platform | None" = None

    def start(self) -> "LocalStack":
        """Start everything (the gateway takes a few seconds); returns ``self``."""
        import tidyllm
        from tidyllm.gateway.processes import start_gateway
        from tidyllm.gateway.simulator import Simulator

        try:
            self.simulator = Simulator(self.profiles, seed=self.seed, latency_scale=self.latency_scale,
                                       report_quality=self.report_quality).start()
            env = {"TIDYLLM_SIMULATOR_URL": self.simulator.url}
            self.gateway = start_gateway(str(self.gateway_config), mode=self.mode, env=env,
                                         data_dir=self.data_dir, auth=self.auth)
            extra: dict[str, Any] = {"gateway_uri": self.gateway.uri, "gateway_mode": self.mode,
                                     "gateway_config": str(self.gateway_config)}
            if self.auth:
                extra.update(mlflow_username=self.auth[0], mlflow_password=self.auth[1])
            self.platform = tidyllm.install(self.settings, **{**extra, **self.overrides})
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Uninstall the platform and stop the gateway and the simulator (idempotent)."""
        import tidyllm

        if self.platform is not None:
            tidyllm.uninstall()
            self.platform = None
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

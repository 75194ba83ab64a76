"""``tidyllm gateway``: run an MLflow AI Gateway from a routes file, provision one, list what one serves."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import click

from tidyllm.errors import GatewayError


def _settings() -> Any:
    from tidyllm.settings import load_settings

    return load_settings()


def _auth(settings: Any) -> tuple[str, str] | None:
    from tidyllm.gateway.client import resolve_auth

    return resolve_auth(settings.mlflow_username, settings.mlflow_password)


def _default_data_dir() -> Path:
    from tidyllm.settings import default_database_url

    # next to the default mart, so one TIDYLLM_HOME holds everything a local install keeps
    return Path(default_database_url().removeprefix("sqlite:///")).parent / "mlflow-server"


@click.group("gateway", context_settings={"help_option_names": ["-h", "--help"]})
def gateway() -> None:
    """Run, provision and inspect MLflow AI Gateways (legacy YAML server or tracking server)."""


@gateway.command("start")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Routes file (seed or MLflow 3 format). Default: gateway_config from tidyllm.yaml.")
@click.option("--mode", type=click.Choice(["legacy", "server"]), default=None,
              help="legacy: `mlflow gateway start`; server: `mlflow server` with its AI Gateway. "
                   "Default: gateway_mode from tidyllm.yaml (legacy).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port to bind (default: a free one).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="MLflow worker processes.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Server mode: database, KEK passphrase and log (default: $TIDYLLM_HOME/mlflow-server).")
@click.option("--basic-auth", is_flag=True,
              help="Server mode: turn on MLflow's basic-auth app; the admin is MLFLOW_TRACKING_USERNAME / "
                   "MLFLOW_TRACKING_PASSWORD.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for /health.")
def start(config_path: Path | None, mode: str | None, host: str, port: int | None, workers: int,
          data_dir: Path | None, basic_auth: bool, timeout: float) -> None:
    """Start a gateway serving the routes file, in the foreground until Ctrl-C or SIGTERM."""
    from tidyllm.gateway.processes import start_gateway

    settings = _settings()
    mode = mode or settings.gateway_mode
    config: Any = config_path or settings.gateway_config
    auth = _auth(settings) if basic_auth else None
    if basic_auth and auth is None:
        raise GatewayError("--basic-auth needs the admin credentials: set MLFLOW_TRACKING_USERNAME and "
                           "MLFLOW_TRACKING_PASSWORD")
    if basic_auth and mode != "server":
        raise GatewayError("--basic-auth needs --mode server (the legacy gateway has no authentication)")

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # so `finally` stops the gateway on SIGTERM too

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        gw = start_gateway(config, mode=mode, host=host, port=port, workers=workers, timeout=timeout,
                           data_dir=(data_dir or _default_data_dir()) if mode == "server" else None, auth=auth)
        try:
            click.echo(f"MLflow {mode} gateway at {gw.uri}")
            click.echo(f"LiteLLM: model='openai/<endpoint>', api_base='{gw.api_base}'")
            if mode == "server":
                click.echo(f"data: {gw.data_dir}")
            click.echo("Ctrl-C to stop")
            gw.wait()
            raise GatewayError(f"the gateway stopped answering; last lines of its log:\n{gw.log_tail()}")
        finally:
            gw.stop()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)


@gateway.command("sync")
@click.option("--server", "server_uri", default=None,
              help="Tracking server URI, e.g. http://127.0.0.1:5000. Default: gateway_uri from tidyllm.yaml.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Routes file. Default: gateway_config from tidyllm.yaml.")
@click.option("--prune", is_flag=True, help="Delete endpoints tidyllm created earlier that left the file.")
def sync(server_uri: str | None, config_path: Path | None, prune: bool) -> None:
    """Provision the tracking server's AI Gateway from the routes file (idempotent)."""
    from tidyllm.gateway.sync import sync_gateway

    settings = _settings()
    server_uri = server_uri or settings.gateway_uri
    config: Any = config_path or settings.gateway_config
    if not server_uri:
        raise GatewayError("no server: pass --server URI or set gateway_uri in tidyllm.yaml")
    if not config:
        raise GatewayError("no routes file: pass --config FILE or set gateway_config in tidyllm.yaml")
    report = sync_gateway(server_uri, config, prune=prune, auth=_auth(settings))
    click.echo(str(report))


@gateway.command("endpoints")
@click.option("--uri", default=None, help="Gateway URI. Default: gateway_uri from tidyllm.yaml.")
@click.option("--mode", type=click.Choice(["legacy", "server"]), default=None, help="Default: detected.")
def endpoints(uri: str | None, mode: str | None) -> None:
    """List the endpoints a running gateway serves."""
    from tidyllm.gateway.client import list_endpoints

    settings = _settings()
    uri = uri or settings.gateway_uri
    if not uri:
        raise GatewayError("no gateway: pass --uri URI or set gateway_uri in tidyllm.yaml")
    rows = list_endpoints(uri, mode=mode, auth=_auth(settings))
    header = ("name", "endpoint_type", "provider", "model")
    table = [header] + [tuple(str(row.get(k) or "-") for k in header) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())

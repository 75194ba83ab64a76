"""``tidyllm proxy``: LiteLLM's proxy server over the MLflow gateway, governed by tidyllm, keys from the mart."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import click

from tidyllm.cli._common import load, settings_options
from tidyllm.errors import GatewayError


@click.command("proxy")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=4000, show_default=True,
              help="Port to bind; 0 picks a free one.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Proxy worker processes (each checks keys and budgets in the shared mart).")
@click.option("--print-config", "print_config", is_flag=True,
              help="Write the generated LiteLLM config (to --output, or stdout) and exit, for teams that run the "
                   "proxy themselves.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --print-config: the file to write (mode 0600).")
@click.option("--litellm-keys", is_flag=True,
              help="With --print-config: leave out tidyllm's key check, for a proxy that authenticates with "
                   "LiteLLM's own virtual keys (their team is the department).")
@click.option("--key-cache-seconds", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long an accepted key is trusted before the mart is read again (a revocation takes "
                   "effect within this time).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for the proxy to answer.")
@settings_options
def proxy(host: str, port: int, workers: int, print_config: bool, output: Path | None, litellm_keys: bool,
          key_cache_seconds: float, timeout: float, config: str | None, database_url: str | None) -> None:
    """Run LiteLLM's proxy with a model for every gateway route and group, tidyllm's governance and keys.

    The routes come from gateway_config and the gateway from gateway_uri (tidyllm.yaml or TIDYLLM_*);
    clients use any OpenAI SDK with base_url http://HOST:PORT/v1 and a key from `tidyllm keys create`."""
    from tidyllm.platform import Platform
    from tidyllm.proxy.config import proxy_config, write_config

    settings = load(config, database_url)
    platform = Platform(settings)
    try:
        if print_config:
            cfg = proxy_config(platform, keys=not litellm_keys, with_secrets=False)
            if output is not None:
                write_config(cfg, output)
                click.echo(f"wrote {output}", err=True)
            else:
                import yaml

                click.echo(yaml.safe_dump(cfg, sort_keys=False), nl=False)
            if platform.gateway.auth_headers():
                click.echo("note: the gateway's basic-auth header is left out; add it as litellm_params."
                           "extra_headers (Authorization) from your secret store", err=True)
            return
        cfg = proxy_config(platform)
    finally:
        platform.close()
    _run(cfg, host, port or None, workers, key_cache_seconds, timeout, settings, database_url)


def _run(cfg: dict, host: str, port: int | None, workers: int, key_cache_seconds: float, timeout: float,
         settings: object, database_url: str | None) -> None:
    from tidyllm.proxy.process import start_proxy

    env = {"TIDYLLM_PROXY_KEY_CACHE_SECONDS": str(key_cache_seconds)}
    source = getattr(settings, "source", None)
    if source:
        env["TIDYLLM_CONFIG"] = str(Path(source).resolve())
    if database_url:
        env["TIDYLLM_DATABASE_URL"] = database_url

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # so `finally` stops the proxy on SIGTERM too

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        proc = start_proxy(cfg, host=host, port=port, workers=workers, env=env, timeout=timeout)
        try:
            groups = sorted({d["model_name"] for d in cfg["model_list"]})
            click.echo(f"LiteLLM proxy at {proc.uri} (OpenAI SDK: base_url='{proc.uri}/v1')")
            click.echo(f"models: {', '.join(groups)}")
            click.echo("keys: `tidyllm keys create --user USER --department DEPT`; Ctrl-C to stop")
            sys.stdout.flush()
            proc.wait(echo=lambda line: click.echo(line))
            raise GatewayError(f"the LiteLLM proxy stopped answering; last lines of its log:\n{proc.log_tail()}")
        finally:
            proc.stop()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)

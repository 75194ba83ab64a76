"""``tidyllm simulate``: run the provider simulator (an OpenAI-compatible stand-in for real providers)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8900, show_default=True, type=click.IntRange(0, 65535),
              help="Port to bind; 0 picks a free one (printed on start).")
@click.option("--profiles", "profiles_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Model profiles YAML (default: the example bundled with tidyllm).")
@click.option("--seed", default=0, show_default=True, help="Seed of the simulated errors, latencies and answers.")
@click.option("--latency-scale", default=1.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Multiply every simulated delay (0 = answer at once).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def simulate(host: str, port: int, profiles_path: Path | None, seed: int, latency_scale: float,
             verbose: bool) -> None:
    """Serve simulated LLM models over an OpenAI-compatible API until Ctrl-C or SIGTERM.

    This is a provider SIMULATOR for demos, tests and benchmarks, not a real provider. Point MLflow
    gateway endpoints at it with `provider: openai` and `openai_api_base: <printed URL>`, or LiteLLM
    with `model="openai/<model>"` and `api_base=<printed URL>`.
    """
    from tidyllm.gateway.simulator import Simulator, load_profiles

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    profiles = load_profiles(profiles_path)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    with Simulator(profiles, seed=seed, host=host, port=port, latency_scale=latency_scale) as sim:
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            click.echo(f"tidyllm provider simulator (not a real provider) serving {', '.join(profiles)} at {sim.url}")
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    click.echo("tidyllm provider simulator stopped")

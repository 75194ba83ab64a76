"""``tidyllm demo``: the platform end to end on this machine, offline (see :mod:`tidyllm.demo`)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import click


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C: the demo's `finally` blocks stop what it started
    raise KeyboardInterrupt


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--requests", "requests", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Requests in the simulated workload.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the workload and the simulator.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("tidyllm-demo"),
              show_default=True, help="Directory for the demo's mart, dashboard (index.html) and log.")
@click.option("--server", is_flag=True, help="Use the MLflow tracking-server AI Gateway instead of the legacy one.")
@click.option("--workers", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Concurrent requests.")
@click.option("--sim-quality", is_flag=True,
              help="Let the simulator report each answer's quality (by default the router learns only from the "
                   "judge, checks, feedback and failures, as with real providers).")
@click.option("--judge-sample", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of answers the simulated LLM judge scores.")
def demo(requests: int, seed: int, out: Path, server: bool, workers: int, sim_quality: bool,
         judge_sample: float) -> None:
    """Run a realistic governed, learning workload against the provider simulator and write the dashboard.

    Starts the provider simulator and a real MLflow AI Gateway (no network needed), installs the bundled
    example governance (department budgets, authorisation rules), sends the workload through the
    learning router, takes one endpoint down mid-run, then prints a summary and writes OUT/index.html.
    """
    from tidyllm.demo import run_demo

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run_demo(requests=requests, seed=seed, out=out, server=server, workers=workers,
                          sim_quality=sim_quality, judge_sample=judge_sample, echo=lambda line: click.echo(line))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: the gateway and the simulator were stopped", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(result.summary_text)

"""``tidyllm routes``: what the learning router prefers, and what other policies would have earned."""

from __future__ import annotations

from typing import Any

import click

from tidyllm.cli._common import Reader, echo_frame, reader, settings_options


@click.group()
def routes() -> None:
    """The learning router's preferences and off-policy evaluation."""


def _decisions(p):  # type: ignore[no-untyped-def]
    frame = p.mart.frame("routing_decisions", parse_json=True)
    if frame.empty:
        raise click.ClickException("no routing decisions in this mart yet: route some calls through "
                                   "platform.router() (or run `tidyllm demo`) first")
    return frame


class _RoutesReader:
    """What the routes commands read, over the mart opened read-only (nothing is written)."""

    def __init__(self, r: Reader) -> None:
        from tidyllm.platform import GatewayHandle
        from tidyllm.signals import SignalHub, parse_signals

        self.settings = r.settings
        self.mart = r.mart
        config = GatewayHandle(r.settings).config
        self.groups = {g: [x.name for x in members] for g, members in config.groups().items()} if config else {}
        self.signals = SignalHub(r.mart, parse_signals(r.settings.signals))
        self._chooser: Any = None

    def chooser(self) -> Any:
        if self._chooser is None:
            from tidyllm.routing.chooser import BanditChooser

            self._chooser = BanditChooser.for_reading(self.mart, self.settings, self.groups, self.signals)
        return self._chooser


@routes.command()
@settings_options
def status(config: str | None, database_url: str | None) -> None:
    """Route share, mean reward and the bandit's preferred route per department and use case (read-only)."""
    p = _RoutesReader(reader(config, database_url))
    decisions = _decisions(p)
    share = (decisions.groupby(["department", "use_case", "route"], dropna=False)
             .agg(calls=("route", "size"), mean_reward=("reward", "mean")).reset_index())
    click.echo("Routing decisions per context:")
    echo_frame(share)
    chooser = p.chooser() if p.settings.routing.strategy == "bandit" else None
    if chooser is None:
        return
    rows = []
    for (dept, use_case, group), _ in decisions.groupby(["department", "use_case", "model_group"], dropna=False):
        context = {k: v for k, v in {"department": dept, "use_case": use_case, "model_group": group}.items()
                   if isinstance(v, str)}
        best = p.mart.get_optimal_config("gateway", context)
        rows.append({**context, "preferred_route": best["parameters"].get("preferred_route"),
                     "confidence": best["confidence"], "samples": best["samples"]})
    import pandas as pd

    click.echo("\nPreferred route per context (bandit):")
    echo_frame(pd.DataFrame(rows))
    signals = p.mart.frame("call_signals")
    if not signals.empty:
        counts = (signals.assign(learned=signals["applied_at"].notna())
                  .groupby("source").agg(signals=("score", "size"), mean_score=("score", "mean"),
                                         learned=("learned", "sum")).reset_index())
        click.echo("\nQuality signals per source:")
        echo_frame(counts)
    agreement = pd.DataFrame(p.signals.agreement())
    if not agreement.empty:
        click.echo("\nJudge–human agreement (judge scores on calls humans labelled; calibrated = corrected "
                   "by the line human ≈ intercept + slope·judge):")
        echo_frame(agreement)


@routes.command()
@click.option("--bootstrap", default=200, show_default=True, help="Bootstrap resamples for the intervals.")
@click.option("--seed", default=0, show_default=True)
@settings_options
def evaluate(bootstrap: int, seed: int, config: str | None, database_url: str | None) -> None:
    """Estimate (IPS, SNIPS, doubly robust) what the current bandit and each fixed route would have earned
    (read-only)."""
    from tidyllm.routing import evaluate as ope

    p = _RoutesReader(reader(config, database_url))
    decisions = _decisions(p)
    policies: list = [route for route in sorted(decisions["route"].unique())]
    if p.settings.routing.strategy == "bandit":
        policies.insert(0, p.chooser().bandit)
    for policy in policies:
        click.echo(str(ope(policy, decisions, n_bootstrap=bootstrap, random_state=seed)))
        click.echo("")

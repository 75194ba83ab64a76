"""The unified dashboard: one self-contained HTML page over a mart (the seed's "single view").

:func:`write_report` reads any mart — SQLite or PostgreSQL, through a
:class:`~tidyllm.platform.Platform`, a :class:`~tidyllm.mart.TidyMart` or a database URL — and
writes ``index.html``: spend by department with budget lines, budget burn and projected
exhaustion, refusals, route share per context over time, latency/cost/errors per route, the
router's learning curve, the audit chain's state, tracked executions by module and the load
forecast. Charts are PNG images drawn with matplotlib's Agg backend and embedded as base64, so
the page needs no network and no JavaScript library (one small inline script counts the charts).
``tidyllm report --out DIR`` is the command-line form; ``docs/dashboard.md`` explains each chart.

>>> write_report(platform, "dashboard")          # doctest: +SKIP
PosixPath('dashboard/index.html')
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from tidyllm.money import usd

if TYPE_CHECKING:
    from tidyllm.report.data import ReportData

__all__ = ["write_report", "save_report", "render_html"]

_TEMPLATE = Path(__file__).with_name("template.html")

#: one sentence per chart: what it shows and how to read it (also in docs/dashboard.md)
_WHAT = {
    "chart-spend": "Settled spend of each department since the start of its current budget window, step by "
                   "step as calls finished; the dashed red line is the department's hard budget.",
    "chart-budget-burn": "Each budget's share used in its current window (solid: settled; hatched: reserved "
                         "by calls in flight) and when it runs out if spending continues at the rate observed "
                         "since the window's first call.",
    "chart-refusals": "Calls governance refused before any provider saw them, by department and reason "
                      "(budget, authorisation, metadata, rate limit), and their cumulative count.",
    "chart-route-share": "For the busiest department / use-case contexts, which gateway endpoint served the "
                         "calls, in eight slices of equal numbers of calls from oldest to latest: learning and "
                         "outages show as shifts.",
    "chart-routes": "Per endpoint: latency (p50 and p95 of every attempt), mean cost of an answered call, and "
                    "the share of attempts that failed at the provider.",
    "chart-learning": "Reward (quality, cost and latency in [0, 1]; 0 for a failed call) of the learning "
                      "router's decisions in order, and how often it explored a route that was not its best guess.",
    "chart-audit": "Rows appended to the hash-chained audit trail over time, by governance decision; the "
                   "title says whether the whole chain verified when this page was written.",
    "chart-executions": "Blocks recorded with mart.track_execution, per module, by final status, with the "
                        "median duration.",
    "chart-forecast": "Requests and spend per hour through the gateway: the last seven days, then the "
                      "forecast per route (Poisson regression on hour of day and day of week).",
}


def write_report(source: Any, out_dir: str | Path, *, forecast_hours: int = 24, title: str | None = None,
                 now: dt.datetime | None = None, timezone: str = "UTC") -> Path:
    """Write the dashboard for ``source`` (a Platform, a TidyMart or a database URL) into ``out_dir``.

    Returns the path of ``index.html``. The page is self-contained (charts embedded as PNG).
    ``forecast_hours`` is the load forecast's horizon; ``now`` fixes the page's clock (tests);
    ``timezone`` is where budget periods start when ``source`` is not a Platform."""
    from tidyllm.report.data import gather

    return save_report(gather(source, forecast_hours=forecast_hours, now=now, timezone=timezone), out_dir,
                       title=title)


def save_report(data: "ReportData", out_dir: str | Path, *, title: str | None = None) -> Path:
    """Write the dashboard for already gathered ``data`` (:func:`tidyllm.report.data.gather`) into
    ``out_dir``; returns the path of ``index.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render_html(data, title=title), encoding="utf-8")
    return path


def render_html(data: "ReportData", *, title: str | None = None) -> str:
    """The dashboard page for already gathered ``data``."""
    from tidyllm import __version__
    from tidyllm.report.charts import render

    charts = render(data)
    extras: dict[str, Callable[["ReportData"], str]] = {
        "chart-spend": _departments_table, "chart-budget-burn": _burn_table, "chart-refusals": _refusal_table,
        "chart-learning": _learning_text, "chart-audit": _audit_text, "chart-executions": _executions_table,
        "chart-forecast": _forecast_text}
    sections, nav = [], []
    for cid, heading, alt, png in charts:
        anchor = cid.removeprefix("chart-")
        img = base64.b64encode(png).decode("ascii")
        extra = extras.get(cid, lambda _d: "")(data)
        sections.append(
            f'<section id="{anchor}"><h2>{html.escape(heading)}</h2><p class="what">{html.escape(_WHAT[cid])}</p>'
            f'<figure><img id="{cid}" alt="{html.escape(alt)}" src="data:image/png;base64,{img}"></figure>'
            f"{extra}</section>")
        nav.append(f'<a href="#{anchor}">{html.escape(heading)}</a>')
    page = Template(_TEMPLATE.read_text(encoding="utf-8"))
    return page.substitute(
        title=html.escape(title or "tidyllm — LLM usage, governance and routing"), version=__version__,
        generated=f"{data.generated_at:%Y-%m-%d %H:%M:%S} UTC", source=html.escape(data.source),
        kpis=_kpis(data), nav="".join(nav), sections="\n".join(sections), chart_count=str(len(charts)))


# --- small HTML helpers -------------------------------------------------------------------------

def _usd(value: Any) -> str:
    return usd(value)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.0f}%"


def _when(value: Any) -> str:
    import pandas as pd

    return "–" if value is None or pd.isna(value) else f"{value:%Y-%m-%d %H:%M} UTC"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{html.escape(str(v))}</td>' if i in numeric else f"<td>{v}</td>"
                        if isinstance(v, _Markup) else f"<td>{html.escape(str(v))}</td>" for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Markup(str):
    """Already-escaped HTML for a table cell."""


def _kpis(data: "ReportData") -> str:
    calls = data.calls
    ok = data.audit.ok
    items = [
        (f"{len(calls):,}", "governed call attempts"),
        (f"{int((calls['status'] == 'success').sum()):,}", "answered"),
        (f"{len(data.refused):,}", "refused before a provider"),
        (f"{int((calls['status'] == 'failure').sum()):,}", "failed at a provider"),
        (_usd(float(calls["cost_usd"].fillna(0).sum())), "spend"),
        (f'<span class="{"ok" if ok else "bad"}">{"verified" if ok else "BROKEN"}</span>',
         f"audit chain ({data.audit.rows:,} rows)"),
    ]
    return "".join(f'<div class="kpi"><b>{value}</b><span>{html.escape(label)}</span></div>' for value, label in items)


# --- per-section details ---------------------------------------------------------------------------

def _departments_table(data: "ReportData") -> str:
    calls = data.calls
    if calls.empty:
        return ""
    budgets = data.budgets[data.budgets["scope"] == "department"].set_index("name")
    rows = []
    for dept, group in calls.groupby(calls["department"].fillna("(none)")):
        spend = float(group["cost_usd"].fillna(0).sum())
        limit = budgets["limit_usd"].get(dept, float("nan"))
        rows.append([dept, len(group), int((group["status"] == "success").sum()),
                     int((group["status"] == "refused").sum()), _usd(spend), _usd(limit),
                     _pct(float(budgets["spent_usd"].get(dept, float("nan"))) / limit if limit == limit else math.nan)])
    return _table(["department", "attempts", "answered", "refused", "spend (all time)", "budget", "used this period"],
                  rows, numeric=(1, 2, 3, 4, 5, 6))


def _burn_table(data: "ReportData") -> str:
    from tidyllm.report.data import budget_burn

    burn = budget_burn(data)
    if burn.empty:
        return ""
    rows = []
    for r in burn.itertuples():
        css = {"exhausted": "bad", "at risk": "warn"}.get(r.state, "ok")
        rows.append([f"{r.scope}: {r.name}", r.period, _usd(r.limit_usd), _usd(r.spent_usd), _usd(r.reserved_usd),
                     _usd(r.remaining_usd), f"{_usd(r.rate_usd_per_hour)}/h", r.budget_refusals,
                     _Markup(f'<span class="{css}">{html.escape(r.state)}</span>'), _when(r.exhausts_at)])
    return _table(["budget", "period", "limit", "spent", "reserved", "remaining", "burn rate", "refusals", "state",
                   "exhausted / runs out"], rows, numeric=(2, 3, 4, 5, 6, 7))


def _refusal_table(data: "ReportData") -> str:
    refused = data.refused
    if refused.empty:
        return ""
    grouped = refused.groupby([refused["error_type"].fillna("refused"), refused["department"].fillna("(none)")])
    rows = [[reason, dept, len(g), _when(g["started_at"].min())] for (reason, dept), g in grouped]
    return _table(["reason", "department", "refusals", "first"], rows, numeric=(2,))


def _ground_truth_text(learning: dict[str, Any]) -> str:
    """The demo's learning figures (simulation ground truth), explained."""
    lo, hi = learning["difference_ci"]
    verdict = ("the interval excludes zero: the router learned to do better than any single route" if lo > 0 else
               "the interval includes zero: no significant gain yet" if hi >= 0 else
               "the router did worse than the best single route")
    curve = " ".join("–" if v is None else f"{v:.2f}" for v in learning.get("learning_curve", []))
    share = learning.get("outage_route_share") or {}
    outage = ""
    if learning.get("outage_route"):
        outage = (f" Traffic to {html.escape(str(learning['outage_route']))} (the route that went down), among the "
                  f"requests it could serve: {_pct(share.get('before'))} before its outage, "
                  f"{_pct(share.get('during'))} during, {_pct(share.get('after'))} after it recovered.")
    return (f"<p><b>Did the router learn?</b> In the simulation the expected reward of every route for every "
            f"request is known, so the router can be compared with always using one route on the very same "
            f"requests (after the first {learning['warmup_requests']:,}, while it still explores): learning router "
            f"{learning['router_value']:.3f}, best fixed route {html.escape(str(learning['best_fixed_route']))} "
            f"{learning['best_fixed_value']:.3f}, best possible {learning['oracle_value']:.3f}; difference "
            f"{learning['difference']:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}] — {verdict}. Learning curve "
            f"(share of the best possible reward, per tenth of the run): {curve}.{outage} It learned without the "
            "simulator reporting quality: from a sampled LLM judge, checks, a few human ratings and failures "
            "(<code>call_signals</code>).</p>")


def _learning_text(data: "ReportData") -> str:
    summary = data.reward
    truth = _ground_truth_text(data.learning) if data.learning.get("router_value") is not None else ""
    if "logged" not in summary:
        return truth + f"<p>{html.escape(summary['note'])}</p>"
    text = truth + (f"<p>{summary['rewarded']:,} rewarded decisions; mean reward {summary['logged']:.3f}; "
            f"{_pct(summary['explored'])} of decisions explored.</p>")
    fixed = summary.get("fixed") or {}
    if fixed:
        rows = [[f"always {route}", f"{e['value']:.3f}", f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]"]
                for route, e in sorted(fixed.items(), key=lambda kv: -kv[1]["value"])]
        rows.insert(0, ["learning router (logged, last third)", f"{summary['last_third']:.3f}", "on-policy"])
        text += ("<p>On the last third of the decisions, what each fixed route would have earned (doubly "
                 "robust off-policy estimate, 95% bootstrap interval):</p>"
                 + _table(["policy", "mean reward", "interval"], rows, numeric=(1,)))
    return text


def _audit_text(data: "ReportData") -> str:
    result = data.audit
    if result.ok:
        return f'<p class="ok">{html.escape(str(result))}</p>'
    return f'<p class="bad">{html.escape(str(result))} — run <code>tidyllm audit verify</code> and investigate.</p>'


def _executions_table(data: "ReportData") -> str:
    ex = data.executions
    if ex.empty:
        return ""
    rows = []
    for (module, operation), g in ex.groupby(["module", "operation"]):
        rows.append([module, operation, len(g), int((g["status"] == "success").sum()),
                     int((g["status"] == "error").sum()), f"{g['duration_ms'].median():.0f} ms"])
    rows.sort(key=lambda r: (-int(r[2]), r[0], r[1]))
    return _table(["module", "operation", "runs", "success", "error", "median duration"], rows[:20],
                  numeric=(2, 3, 4, 5))


def _forecast_text(data: "ReportData") -> str:
    if data.forecast is None:
        return f"<p>{html.escape(data.forecast_error or 'no forecast')}</p>"
    fc = data.forecast
    m = fc.attrs.get("metrics", {})
    text = (f"<p>Model: {html.escape(str(fc.attrs.get('model')))}, fitted on {fc.attrs.get('history_hours')} hours "
            f"of history. Held-out error on the newest {m.get('test_hours')} hours: MAE "
            f"{m.get('mae_requests', float('nan')):.2f} requests per series-hour (same hour yesterday: "
            f"{m.get('baseline_mae_requests', float('nan')):.2f}), MAPE {_pct(m.get('mape_requests'))} and WAPE "
            f"{_pct(m.get('wape_requests'))} of the hourly load; spend MAPE {_pct(m.get('mape_spend'))}, WAPE "
            f"{_pct(m.get('wape_spend'))}.</p>")
    totals = fc.groupby(["dimension", "name"])[["requests", "spend_usd"]].sum().reset_index()
    hours = fc["hour"].nunique()
    rows = [[d, n, f"{r:,.0f}", _usd(s)] for d, n, r, s in totals.itertuples(index=False)]
    return text + _table(["by", "name", f"requests, next {hours} h", f"spend, next {hours} h"], rows, numeric=(2, 3))

"""The dashboard's charts: matplotlib figures drawn off-screen (Agg), returned as PNG bytes.

No pyplot: figures are built with :class:`matplotlib.figure.Figure` directly, so drawing changes no
global state and works in any thread, without a display. Every function takes the
:class:`~tidyllm.report.data.ReportData` and returns PNG bytes; an empty mart gives a chart that
says what is missing rather than an error.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tidyllm.money import usd

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from tidyllm.report.data import ReportData

__all__ = ["CHARTS", "render"]

_WIDTH = 11.0
# text.parse_math off: department, user, route and model names are user input, and a name with dollar signs
# (mathtext) would crash the page or render as a formula; every text in the charts is plain text
_STYLE = {"text.parse_math": False, "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.spines.top": False,
          "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
          "legend.frameon": False, "figure.facecolor": "white"}
_STATE_COLORS = {"exhausted": "#d62728", "at risk": "#ff7f0e", "ok": "#2ca02c"}


def _figure(nrows: int = 1, ncols: int = 1, height: float = 3.2, width: float = _WIDTH, **kw: Any
            ) -> tuple["Figure", Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _png(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    # light compression: a few hundred kB more per page, but seconds less to write on a busy machine
    fig.savefig(buf, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _empty(ax: "Axes", text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#666", wrap=True,
            transform=ax.transAxes)


def _empty_chart(text: str, height: float = 2.0) -> bytes:
    """A chart that only says what is missing (for an empty mart)."""
    fig, axes = _figure(height=height)
    _empty(axes[0][0], text)
    return _png(fig)


def _palette(names: Iterable[str], cmap: str = "tab10") -> dict[str, Any]:
    from matplotlib import colormaps

    colors = colormaps[cmap].colors
    return {name: colors[i % len(colors)] for i, name in enumerate(sorted(set(names)))}


def _dates(ax: "Axes") -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _usd(value: float, _pos: Any = None) -> str:
    if value == 0:
        return "$0"
    if abs(value) >= 100:
        return f"${value:,.0f}"  # axis ticks: whole dollars read better at this size
    return usd(value)


def _naive(series: "pd.Series") -> "pd.Series":
    """UTC timestamps without a zone (matplotlib's date axis wants one convention; all times are UTC)."""
    return series.dt.tz_convert("UTC").dt.tz_localize(None)


# --- 1. spend by department with budget lines --------------------------------------------------

def spend(data: "ReportData") -> bytes:
    """Cumulative spend of each department in its current budget window, with its budget as a dashed line."""
    from matplotlib.ticker import FuncFormatter

    budgets = data.budgets[data.budgets["scope"] == "department"].set_index("name")
    calls = data.calls[data.calls["cost_usd"].fillna(0) > 0]
    departments = list(calls.groupby("department")["cost_usd"].sum().sort_values(ascending=False).index[:8])
    if not departments:
        return _empty_chart("no spend recorded yet", height=2.4)
    ncols = min(4, len(departments))
    nrows = math.ceil(len(departments) / ncols)
    fig, axes = _figure(nrows, ncols, height=2.6 * nrows)
    colors = _palette(departments, "Set2")
    for i, dept in enumerate(departments):
        ax = axes[i // ncols][i % ncols]
        mine = calls[calls["department"] == dept]
        limit = budgets["limit_usd"].get(dept)
        if limit is not None:
            mine = mine[mine["started_at"] >= budgets["window_start"][dept]]
        times = _naive(mine["ended_at"].fillna(mine["started_at"]))
        order = times.argsort()
        ax.step(times.iloc[order], mine["cost_usd"].iloc[order].cumsum(), where="post", color=colors[dept], lw=2,
                label="spend")
        if limit is not None:
            ax.axhline(limit, color="#d62728", ls="--", lw=1.2,
                       label=f"budget {_usd(limit)}/{budgets['period'][dept]}")
        ax.set_title(dept)
        ax.yaxis.set_major_formatter(FuncFormatter(_usd))
        ax.set_ylim(bottom=0)
        _dates(ax)
        ax.legend(loc="upper left")
    for j in range(len(departments), nrows * ncols):
        axes[j // ncols][j % ncols].set_axis_off()
    return _png(fig)


# --- 2. budget burn and forecast exhaustion ----------------------------------------------------

def budget_burn(data: "ReportData") -> bytes:
    """Share of each budget used (spent + reserved) and when it runs out at the current burn rate."""
    from tidyllm.report.data import budget_burn as burn_table

    burn = burn_table(data)
    if burn.empty:
        return _empty_chart("no budgets configured")
    burn = burn.sort_values("used", ascending=True)
    fig, axes = _figure(height=0.45 * len(burn) + 1.2)
    ax = axes[0][0]
    labels = [f"{r.scope}: {r.name}" if r.scope != "org" else "org" for r in burn.itertuples()]
    spent = (burn["spent_usd"] / burn["limit_usd"]).clip(upper=1.5) * 100
    reserved = (burn["reserved_usd"] / burn["limit_usd"]).clip(lower=0, upper=1.5) * 100
    colors = [_STATE_COLORS[s] for s in burn["state"]]
    ax.barh(labels, spent, color=colors, alpha=0.85, label="spent")
    ax.barh(labels, reserved, left=spent, color=colors, alpha=0.35, hatch="//", label="reserved")
    ax.axvline(100, color="#333", lw=1)
    for y, r in enumerate(burn.itertuples()):
        if r.state == "exhausted":
            when = f"exhausted {r.exhausts_at:%b %d %H:%M} UTC" if not _isnat(r.exhausts_at) else "exhausted"
        elif r.state == "at risk":
            when = f"runs out ~{r.exhausts_at:%b %d %H:%M} UTC at {_usd(r.rate_usd_per_hour)}/hour"
        else:
            when = f"lasts the {r.period}" if r.rate_usd_per_hour > 0 else "no spend yet"
        ax.text(min(max(spent.iloc[y] + reserved.iloc[y], 0) + 2, 152), y,
                f"{_usd(r.spent_usd)} of {_usd(r.limit_usd)} · {when}", va="center", fontsize=8)
    ax.set_xlim(0, 230)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("% of the budget used in the current window")
    ax.grid(axis="y", visible=False)
    return _png(fig)


def _isnat(value: Any) -> bool:
    import pandas as pd

    return value is None or pd.isna(value)


# --- 3. refusals ----------------------------------------------------------------------------------

def refusals(data: "ReportData") -> bytes:
    """Refused calls per department by reason, and their cumulative count over time."""
    refused = data.refused
    if refused.empty:
        return _empty_chart("no refusals: every governed call was admitted")
    fig, axes = _figure(1, 2, height=3.0)
    left, right = axes[0]
    table = refused.assign(department=refused["department"].fillna("(none)"),
                           reason=refused["error_type"].fillna("refused")) \
        .groupby(["department", "reason"]).size().unstack(fill_value=0)
    reasons = _palette(table.columns, "Set1")
    bottom = None
    for reason in table.columns:
        left.bar(table.index, table[reason], bottom=bottom, color=reasons[reason], label=reason)
        bottom = table[reason] if bottom is None else bottom + table[reason]
    left.set_title("refused calls by department and reason")
    left.legend()
    depts = _palette(refused["department"].fillna("(none)"), "Set2")
    for dept, group in refused.groupby(refused["department"].fillna("(none)")):
        times = _naive(group["started_at"]).sort_values()
        right.step(times, range(1, len(times) + 1), where="post", color=depts[dept], lw=2, label=dept)
    right.set_title("cumulative refusals over time")
    _dates(right)
    right.legend()
    return _png(fig)


# --- 4. route share per context over time -------------------------------------------------------

def route_share(data: "ReportData") -> bytes:
    """For the busiest contexts (department / use case), the share of each route in eight successive
    slices of the context's calls (equal numbers of calls, oldest first)."""
    import numpy as np
    import pandas as pd

    routed = data.routed
    if routed.empty:
        return _empty_chart("no routed calls yet")
    context = routed["department"].fillna("(none)") + " / " + routed["use_case"].fillna("(none)")
    top = list(context.value_counts().index[:6])
    ncols = min(3, len(top))
    nrows = math.ceil(len(top) / ncols)
    fig, axes = _figure(nrows, ncols, height=2.5 * nrows + 0.4)
    colors = _palette(data.calls["route"].dropna(), "tab10")
    bins = 8
    for i, ctx in enumerate(top):
        ax = axes[i // ncols][i % ncols]
        mine = routed[context == ctx].sort_values("started_at", kind="stable")
        # slices by call count, not by clock time: a mart may hold months of history and a burst of
        # learning in its last minutes, and both should be readable
        slot = pd.Series(np.arange(len(mine)) * bins // max(len(mine), 1), index=mine.index)
        share = mine.groupby([slot, mine["route"]]).size().unstack(fill_value=0)
        share = share.reindex(range(bins), fill_value=0)
        totals = share.sum(axis=1).replace(0, float("nan"))
        share = share.div(totals, axis=0).fillna(0) * 100
        # one filled area per route (not one bar per route and slice): cheap to draw, easy to read
        ax.stackplot(share.index, share.T.to_numpy(), colors=[colors.get(r) for r in share.columns], step="mid")
        ax.set_title(f"{ctx} ({len(mine)} calls)")
        ax.set_ylim(0, 100)
        ax.set_xlim(0, bins - 1)
        ax.set_xticks([0, bins - 1], ["oldest", "latest"])
        ax.set_ylabel("% of calls")
        ax.grid(axis="x", visible=False)
    for j in range(len(top), nrows * ncols):
        axes[j // ncols][j % ncols].set_axis_off()
    handles = [_patch(colors[r]) for r in sorted(colors)]
    fig.legend(handles, sorted(colors), loc="outside upper center", ncols=len(colors))
    return _png(fig)


def _patch(color: Any) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=color)


# --- 5. latency, cost and errors per route -----------------------------------------------------

def routes(data: "ReportData") -> bytes:
    """Latency (p50 and p95), mean cost per answered call and error rate of every route."""
    from matplotlib.ticker import FuncFormatter

    routed = data.routed
    if routed.empty:
        return _empty_chart("no routed calls yet")
    ok = routed[routed["status"] != "failure"]
    by = routed.groupby("route")
    stats = by["latency_ms"].quantile(0.5).to_frame("p50").join(by["latency_ms"].quantile(0.95).rename("p95"))
    stats["cost"] = ok.groupby("route")["cost_usd"].mean()
    stats["errors"] = by["status"].apply(lambda s: (s == "failure").mean() * 100)
    stats["calls"] = by.size()
    stats = stats.sort_index()
    colors = _palette(data.calls["route"].dropna(), "tab10")
    fig, axes = _figure(1, 3, height=3.0)
    lat, cost, err = axes[0]
    x = range(len(stats))
    lat.bar([i - 0.2 for i in x], stats["p50"], width=0.4, color=[colors[r] for r in stats.index], label="p50")
    lat.bar([i + 0.2 for i in x], stats["p95"], width=0.4, color=[colors[r] for r in stats.index], alpha=0.45,
            label="p95")
    lat.set_title("latency (ms)")
    lat.legend()
    cost.bar(x, stats["cost"].fillna(0), color=[colors[r] for r in stats.index])
    cost.set_title("mean cost per answered call")
    cost.yaxis.set_major_formatter(FuncFormatter(_usd))
    err.bar(x, stats["errors"], color=[colors[r] for r in stats.index])
    err.set_title("error rate (% of attempts)")
    for ax in (lat, cost, err):
        ax.set_xticks(list(x), [f"{r}\n{int(n)} calls" for r, n in zip(stats.index, stats["calls"])], fontsize=8)
        ax.grid(axis="x", visible=False)
    return _png(fig)


# --- 6. the learning curve ----------------------------------------------------------------------

def learning(data: "ReportData") -> bytes:
    """Reward of the router's decisions in order (rolling and cumulative mean), and how often it explored."""
    decisions = data.decisions[data.decisions["reward"].notna()].reset_index(drop=True)
    if decisions.empty:
        return _empty_chart("no rewarded routing decisions yet (routing.strategy: bandit logs them)")
    n = len(decisions)
    window = max(10, n // 20)
    fig, axes = _figure(1, 2, height=3.0, width_ratios=[3, 1])
    curve, explore = axes[0]
    reward = decisions["reward"].astype(float)
    x = range(1, n + 1)
    curve.plot(x, reward.rolling(window, min_periods=1).mean(), color="#1f77b4", lw=2,
               label=f"rolling mean ({window} decisions)")
    curve.plot(x, reward.expanding().mean(), color="#555", lw=1, ls="--", label="cumulative mean")
    failed = decisions["failed"].fillna(False).astype(bool).to_numpy()
    if failed.any():
        curve.scatter([i + 1 for i in range(n) if failed[i]], [0.02] * int(failed.sum()), marker="|",
                      color="#d62728", label="failed call (reward 0)")
    curve.set_ylim(0, 1)
    curve.set_xlabel("routing decision")
    curve.set_ylabel("reward")
    curve.set_title("learning curve: reward per decision")
    curve.legend(loc="lower right")
    explored = decisions["explored"].fillna(False).astype(float)
    explore.plot(x, explored.rolling(window, min_periods=1).mean() * 100, color="#9467bd", lw=2)
    explore.set_ylim(0, 100)
    explore.set_title("exploring decisions (%)")
    explore.set_xlabel("routing decision")
    return _png(fig)


# --- 7. the audit chain ---------------------------------------------------------------------------

def audit(data: "ReportData") -> bytes:
    """Audit rows written over time, by governance decision (allowed, refused, unenforced)."""
    rows = data.audit_rows
    if rows.empty:
        return _empty_chart("the audit trail is empty")
    fig, axes = _figure(height=2.8)
    ax = axes[0][0]
    colors = {"allowed": "#2ca02c", "refused": "#d62728", "unenforced": "#ff7f0e"}
    for decision, group in rows.groupby("decision"):
        times = _naive(group["recorded_at"]).sort_values()
        ax.step(times, range(1, len(times) + 1), where="post", lw=2, color=colors.get(decision, "#555"),
                label=f"{decision} ({len(group)})")
    state = "verified" if data.audit.ok else f"BROKEN at seq {data.audit.first_broken_seq}"
    ax.set_title(f"audit rows over time — hash chain {state} ({data.audit.rows} rows)",
                 color="#2ca02c" if data.audit.ok else "#d62728")
    ax.set_ylabel("rows (cumulative)")
    _dates(ax)
    ax.legend(loc="upper left")
    return _png(fig)


# --- 8. tracked executions by module ---------------------------------------------------------------

def executions(data: "ReportData") -> bytes:
    """Tracked executions (``mart.track_execution``) per module, by status, with their median duration."""
    ex = data.executions
    if ex.empty:
        return _empty_chart("no tracked executions yet (mart.track_execution records them)")
    table = ex.groupby(["module", "status"]).size().unstack(fill_value=0)
    table = table.loc[table.sum(axis=1).sort_values().index]
    durations = ex.groupby("module")["duration_ms"].median()
    fig, axes = _figure(height=0.5 * len(table) + 1.2)
    ax = axes[0][0]
    colors = {"success": "#2ca02c", "error": "#d62728", "running": "#1f77b4"}
    left = None
    for status in table.columns:
        ax.barh(table.index, table[status], left=left, color=colors.get(status, "#999"), label=status)
        left = table[status] if left is None else left + table[status]
    for y, module in enumerate(table.index):
        median = durations.get(module)
        label = f"{int(table.loc[module].sum())} runs" + (f" · median {median:.0f} ms" if median == median else "")
        ax.text(table.loc[module].sum(), y, "  " + label, va="center", fontsize=8)
    ax.set_xlim(0, table.sum(axis=1).max() * 1.35)
    ax.set_xlabel("executions")
    ax.legend(loc="lower right")
    ax.grid(axis="y", visible=False)
    return _png(fig)


# --- 9. the load forecast ---------------------------------------------------------------------------

def forecast(data: "ReportData") -> bytes:
    """Requests and spend per hour: recent history, then the model's forecast per route."""
    import pandas as pd
    from matplotlib.ticker import FuncFormatter

    from tidyllm.forecast import load_history

    history = load_history(data.calls)
    colors = _palette(data.calls["route"].dropna(), "tab10")
    fig, axes = _figure(2, 1, height=5.0, sharex=True)
    req, cost = axes[0][0], axes[1][0]
    if data.forecast is None:
        if history.empty:
            _empty(req, "no calls yet")
            cost.set_axis_off()
            return _png(fig)
        span = history["started_at"].max() - history["started_at"].min()
        freq, unit = _bin_for(span)
        slot = history["started_at"].dt.floor(freq)
        per = history.groupby([history["route"], slot])["cost_usd"].agg(["size", "sum"])
        grid = pd.date_range(slot.min(), slot.max(), freq=freq)
        for route in sorted(history["route"].unique()):
            mine = per.loc[route].reindex(grid, fill_value=0)  # a quiet slot is a zero, not a gap
            t = grid.tz_localize(None)
            req.plot(t, mine["size"], marker="o", ms=3, color=colors.get(route), label=route)
            cost.plot(t, mine["sum"], marker="o", ms=3, color=colors.get(route))
        req.set_title(f"requests per {unit} so far — too little history for a forecast yet")
        req.set_ylabel(f"requests / {unit}")
        cost.set_ylabel(f"spend / {unit}")
    else:
        fc = data.forecast[data.forecast["dimension"] == "route"]
        first = fc["hour"].min()
        past = history[history["started_at"] >= first - pd.Timedelta(days=7)]
        hourly = past.groupby(past["started_at"].dt.floor("h")).agg(requests=("cost_usd", "size"),
                                                                    spend=("cost_usd", "sum"))
        hourly = hourly.reindex(pd.date_range(first - pd.Timedelta(days=7), first, freq="h", inclusive="left"),
                                fill_value=0)
        t_past = hourly.index.tz_localize(None)
        req.plot(t_past, hourly["requests"], color="#333", lw=1, label="history (all routes)")
        cost.plot(t_past, hourly["spend"], color="#333", lw=1)
        pivot_r = fc.pivot(index="hour", columns="name", values="requests")
        pivot_s = fc.pivot(index="hour", columns="name", values="spend_usd")
        t_next = pivot_r.index.tz_localize(None)
        req.stackplot(t_next, pivot_r.T.to_numpy(), labels=list(pivot_r.columns),
                      colors=[colors.get(c) for c in pivot_r.columns], alpha=0.8)
        cost.stackplot(t_next, pivot_s.T.to_numpy(), colors=[colors.get(c) for c in pivot_s.columns], alpha=0.8)
        m = data.forecast.attrs.get("metrics", {})
        req.set_title(f"requests per hour: last 7 days and the next {len(pivot_r)} h forecast per route "
                      f"(held-out MAE {m.get('mae_requests', float('nan')):.2f}, "
                      f"MAPE {100 * m.get('mape_requests', float('nan')):.0f}%)")
        req.set_ylabel("requests / hour")
        cost.set_ylabel("spend / hour")
        req.axvline(t_next[0], color="#999", ls=":")
        cost.axvline(t_next[0], color="#999", ls=":")
    cost.yaxis.set_major_formatter(FuncFormatter(_usd))
    _dates(cost)
    req.legend(loc="upper left", ncols=3)
    return _png(fig)


def _bin_for(span: Any) -> tuple[str, str]:
    """A time slot giving about twenty points over ``span``: (pandas frequency, label)."""
    seconds = max(span.total_seconds(), 1.0) / 20
    for limit, freq, unit in ((1, "1s", "second"), (5, "5s", "5 seconds"), (10, "10s", "10 seconds"),
                              (30, "30s", "30 seconds"), (60, "min", "minute"), (300, "5min", "5 minutes"),
                              (900, "15min", "15 minutes")):
        if seconds <= limit:
            return freq, unit
    return "h", "hour"


#: (element id, section title, alt text, drawing function), in page order
CHARTS: tuple[tuple[str, str, str, Callable[["ReportData"], bytes]], ...] = (
    ("chart-spend", "Spend by department", "cumulative spend per department this budget period, with budget lines",
     spend),
    ("chart-budget-burn", "Budget burn and exhaustion", "share of each budget used and projected exhaustion date",
     budget_burn),
    ("chart-refusals", "Refusals", "refused calls by department and reason, and over time", refusals),
    ("chart-route-share", "Route share per context", "share of each route over time for the busiest contexts",
     route_share),
    ("chart-routes", "Routes: latency, cost, errors", "latency p50/p95, mean cost and error rate per route",
     routes),
    ("chart-learning", "Learning curve", "reward of routing decisions over time and exploration share", learning),
    ("chart-audit", "Audit chain", "audit rows over time by decision, and the hash chain's state", audit),
    ("chart-executions", "Tracked executions by module", "tracked executions per module by status", executions),
    ("chart-forecast", "Load forecast", "hourly requests and spend: history and forecast per route", forecast),
)


def render(data: "ReportData") -> list[tuple[str, str, str, bytes]]:
    """Draw every chart: ``[(id, title, alt, png_bytes), ...]`` in page order."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        return [(cid, title, alt, fn(data)) for cid, title, alt, fn in CHARTS]

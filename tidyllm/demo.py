"""``tidyllm demo``: the whole platform on one machine, offline, in about a minute.

It starts the provider **simulator** and a real MLflow AI Gateway over it
(:class:`~tidyllm.stack.LocalStack`), installs governance from the bundled example settings
(department budgets — marketing's is tiny — and authorisation rules), and sends a realistic
workload through the learning router: four departments (each running its requests from its own
application, tracked with ``mart.track_execution``), five use cases, confidential risk data that
must stay on premises, marketing running out of budget on the way, and one endpoint
(the busiest hosted one at the time) going down for a fifth of the run, then recovering. The router
learns from quality signals (below), cost, latency and failures.

Then it prints a summary read back from the mart (spend and refusals per department, route share
per context before and after learning, the router's reward against the best fixed route, the
audit chain) and writes the dashboard (:func:`tidyllm.report.write_report`). Every process it
started is stopped on the way out, also on Ctrl-C and SIGTERM.

The simulator does **not** report quality with its answers here (``--sim-quality`` turns that back on):
the router learns as it would from real providers, from an LLM judge scoring a sample of the answers
through a governed judge route on its own budget (a simulated judge: the answer's true quality plus noise
and a bias towards one model), a deterministic check (answers to questions short enough), a little
simulated human feedback, and failures. The summary then measures, from the
simulation's ground truth, whether the learning paid: the router against the best fixed route with a 95 %
interval, the learning curve, and the outage route's traffic before, during and after its outage; it is
also written to ``OUT/summary.json``.

>>> result = run_demo(requests=200, out="tidyllm-demo")     # doctest: +SKIP
>>> print(result.summary_text)                                # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from tidyllm.errors import ConfigurationError
from tidyllm.money import usd

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.platform import Platform
    from tidyllm.report.data import ReportData

__all__ = ["DemoRequest", "DemoResult", "Department", "DEPARTMENTS", "Outcome", "Summary", "make_workload", "send",
           "run_workload", "summarise", "format_summary", "busiest_hosted_route", "run_demo", "DEMO_DB"]

#: the mart file the demo writes in its output directory
DEMO_DB = "tidyllm-demo.db"
#: the outage covers this share of the run (by requests completed); it hits the busiest hosted route
OUTAGE_WINDOW = (0.3, 0.45)
#: seconds an endpoint that failed stays out before a probe (10 s and 5 s outside the compressed demo)
DEMO_COOLDOWN_S = 1.0
#: share of answered requests a simulated human rates (true quality + a little noise)
HUMAN_RATE = 0.05
#: the simulated judge: an on-premises model (it may see confidential data), noisy, favouring sim-claude
JUDGE_PROFILE = {"description": "simulated LLM judge (scores an answer: true quality + noise + bias)",
                 "latency": {"base_ms": 60, "per_output_token_ms": 2, "jitter": 0.2},
                 "output_tokens": {"min": 2, "max": 4}, "quality": 0.8,
                 "judge": {"noise": 0.1, "bias": {"sim-claude": 0.05}}}
JUDGE_ROUTE = {"name": "judge", "route_type": "llm/v1/chat", "group": "judge",
               "model": {"provider": "openai", "name": "sim-judge",
                         "config": {"openai_api_key": "simulator-accepts-any-key",
                                    "openai_api_base": "$TIDYLLM_SIMULATOR_URL"}},
               "price": {"input_per_1m": 0.30, "output_per_1m": 1.20, "effective": "2025-01-01"},
               "tags": ["on_prem"], "sensitivity": ["public", "internal", "confidential"]}
#: the demo's quality per use case (the simulator's bundled profiles otherwise): the cheap model is good
#: enough for questions, summaries and extraction; only the premium one writes good code and analysis
DEMO_QUALITY = {
    "sim-gpt-small": {"qa": 0.90, "summarise": 0.88, "extraction": 0.92, "code": 0.45, "analysis": 0.35},
    "sim-gpt-large": {"qa": 0.88, "summarise": 0.87, "extraction": 0.86, "code": 0.95, "analysis": 0.95},
    "sim-claude": {"qa": 0.86, "summarise": 0.88, "extraction": 0.80, "code": 0.72, "analysis": 0.75},
    "sim-onprem-llama": {"qa": 0.70, "summarise": 0.68, "extraction": 0.72, "code": 0.55, "analysis": 0.55},
}
#: the judge's department and its own budget: a refused judge call never touches the answered one
JUDGE_DEPARTMENT, JUDGE_BUDGET_USD = "evaluation", 1.0


def demo_signals(judge_sample: float) -> dict[str, Any]:
    """The demo's ``signals:`` settings: the judge, the checks, the source weights."""
    return {"judges": [{"name": "quality", "model": "judge", "department": JUDGE_DEPARTMENT, "use_case": "judge",
                        "sample": {"default": judge_sample}, "weight": 0.5}],
            "checks": {"qa": [{"name": "brief", "length": {"max": 1200}}]},
            "human_weight": 1.0}


@dataclass(frozen=True)
class Department:
    """One department of the simulated workload: its share of requests and what it asks for."""

    name: str
    share: float
    users: tuple[str, ...]
    reasons: tuple[str, ...]
    use_cases: Mapping[str, float]
    sensitivity: Mapping[str, float]
    #: words of the document attached to each prompt (min, max)
    document_words: tuple[int, int] = (40, 400)


DEPARTMENTS: tuple[Department, ...] = (
    Department("risk", 0.30, ("ana", "ben", "chloe"), ("MVR peer review", "model validation evidence"),
               {"qa": 0.35, "analysis": 0.45, "extraction": 0.20}, {"internal": 0.6, "confidential": 0.4}),
    Department("finance", 0.25, ("dev", "eli"), ("quarterly close commentary", "variance analysis"),
               {"analysis": 0.40, "extraction": 0.35, "summarise": 0.25}, {"internal": 1.0}),
    Department("marketing", 0.20, ("fay", "gus"), ("campaign copy", "competitor digest"),
               {"summarise": 0.60, "qa": 0.40}, {"public": 1.0}, document_words=(600, 1500)),
    Department("research", 0.25, ("hal", "ivy"), ("literature review", "prototype code"),
               {"code": 0.50, "summarise": 0.30, "qa": 0.20}, {"public": 0.3, "internal": 0.7}),
)

# What each use case asks and how long an answer it allows (max_tokens).
_TASKS: dict[str, tuple[tuple[str, ...], int]] = {
    "qa": (("What does the attached policy say about {topic}?",
            "Answer briefly: which controls cover {topic}?"), 200),
    "summarise": (("Summarise the following document about {topic} in five bullet points.",
                   "Write a short digest of this report on {topic} for executives."), 300),
    "code": (("Write a Python function that validates {topic} records and add unit tests.",
              "Refactor this SQL query about {topic} and explain the change."), 400),
    "analysis": (("Analyse the drivers of {topic} in the figures below and flag anomalies.",
                  "Compare the two scenarios for {topic} and recommend one, with reasons."), 400),
    "extraction": (("Extract counterparty, amount and date for every {topic} item below as JSON.",
                    "List every {topic} figure mentioned below with its unit."), 150),
}
_TOPICS = ("credit exposure", "liquidity coverage", "model drift", "vendor contracts", "customer churn",
           "interest rate risk", "campaign performance", "data retention", "fraud alerts", "capital planning")
_WORDS = ("the", "quarter", "exposure", "increased", "across", "portfolio", "segments", "while", "limits",
          "remained", "within", "appetite", "management", "expects", "further", "review", "of", "model",
          "assumptions", "and", "controls", "before", "year", "end", "reporting", "deadlines", "approved")


@dataclass(frozen=True)
class DemoRequest:
    """One request of the workload."""

    index: int
    department: str
    user_id: str
    use_case: str
    data_sensitivity: str
    audit_reason: str
    messages: tuple[Mapping[str, str], ...]
    max_tokens: int

    def metadata(self) -> dict[str, str]:
        """The caller context tidyllm governs by."""
        return {"user_id": self.user_id, "department": self.department, "audit_reason": self.audit_reason,
                "use_case": self.use_case, "data_sensitivity": self.data_sensitivity}

    @property
    def context(self) -> str:
        """``department/use_case``: the context route shares are reported by."""
        return f"{self.department}/{self.use_case}"


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def make_workload(n: int, seed: int = 0, departments: Sequence[Department] = DEPARTMENTS) -> list[DemoRequest]:
    """``n`` requests drawn reproducibly from ``departments`` (same ``seed``, same workload)."""
    if n < 1:
        raise ConfigurationError(f"the workload needs at least one request, got {n}")
    rng = random.Random(seed)
    shares = {d.name: d.share for d in departments}
    by_name = {d.name: d for d in departments}
    out = []
    for i in range(n):
        dept = by_name[_pick(rng, shares)]
        use_case = _pick(rng, dept.use_cases)
        templates, max_tokens = _TASKS[use_case]
        question = rng.choice(templates).format(topic=rng.choice(_TOPICS))
        # prompt sizes vary by an order of magnitude, as they do in practice (marketing sends long briefs)
        document = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*dept.document_words)))
        out.append(DemoRequest(
            index=i, department=dept.name, user_id=rng.choice(dept.users), use_case=use_case,
            data_sensitivity=_pick(rng, dept.sensitivity), audit_reason=rng.choice(dept.reasons),
            messages=({"role": "system", "content": f"You assist the {dept.name} team."},
                      {"role": "user", "content": f"{question}\n\n{document}"}),
            max_tokens=max_tokens))
    return out


@dataclass(frozen=True)
class Outcome:
    """What happened to one request."""

    request: DemoRequest
    status: str  # ok | refused | failed
    call_id: str
    route: str | None = None
    quality: float | None = None
    error: str | None = None


#: the application each department runs its requests from (the module of its tracked executions)
APPS = {"risk": "mvr_review", "finance": "close_commentary", "marketing": "campaign_studio",
        "research": "research_assistant"}


def send(platform: "Platform", router: Any, request: DemoRequest,
         rater: Callable[[str, str, DemoRequest], None] | None = None) -> Outcome:
    """Send one request through the governed router, as a tracked execution of its department's app.

    The router learns from the signals on the answer (judges, checks, failures; with ``--sim-quality`` the
    quality the simulator reports with it); ``rater(call_id, answer, request)`` plays a user who rates
    some answers with ``platform.feedback(call_id, score)``."""
    from tidyllm.errors import GovernanceError
    from tidyllm.litellm_bridge.records import answer_text, usage_of

    call_id = str(uuid.uuid4())
    metadata: dict[str, Any] = {**request.metadata(), "tidyllm_call_id": call_id}
    app = APPS.get(request.department, request.department)
    try:
        with platform.mart.track_execution(app, request.use_case, request.metadata()) as tracker:
            resp = router.completion(model="chat", messages=[dict(m) for m in request.messages],
                                     max_tokens=request.max_tokens, metadata=metadata,
                                     # the simulator scores quality per use case; MLflow forwards body fields
                                     extra_body={"metadata": {"use_case": request.use_case}})
            # retries get their own call id (<id>#<n>): the row of the attempt that answered names its route
            row = platform.wait_for_call(call_id, last_attempt=True)
            usage = usage_of(resp)
            quality = usage.get("tidyllm_sim_quality")
            step = {"call_id": row["id"], "route": row["route"], "tokens": usage.get("total_tokens"),
                    "quality": quality}
            tracker.record_step("llm_completion", step)
            tracker.record_result({"route": step["route"], "quality": quality})
        if rater is not None:
            rater(step["call_id"], answer_text(resp), request)
    except GovernanceError as exc:
        return Outcome(request, "refused", call_id, error=type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - the provider failed on every attempt: count it and go on
        return Outcome(request, "failed", call_id, error=type(exc).__name__)
    return Outcome(request, "ok", step["call_id"], route=step["route"], quality=quality)


def run_workload(platform: "Platform", router: Any, workload: Sequence[DemoRequest], *, workers: int = 8,
                 events: Mapping[int, Callable[[], None]] | None = None, progress: bool = True,
                 rater: Callable[[str, str, DemoRequest], None] | None = None) -> list[Outcome]:
    """Run ``workload`` on ``workers`` threads, in order; ``events[k]`` runs once ``k`` requests are done
    (the demo's outage starts and ends this way). Returns the outcomes in request order."""
    from tqdm import tqdm

    events = dict(events or {})
    outcomes: list[Outcome | None] = [None] * len(workload)
    pending: set[Future[Outcome]] = set()
    it = iter(workload)
    done = refused = 0
    bar = tqdm(total=len(workload), desc="requests", unit="req", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidyllm-demo")
    try:
        def submit_next() -> None:
            request = next(it, None)
            if request is not None:
                future = pool.submit(send, platform, router, request, rater)
                pending.add(future)

        # keep exactly `workers` requests in flight, so the events land where they are scheduled
        for _ in range(workers):
            submit_next()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                pending.discard(future)
                outcome = future.result()
                outcomes[outcome.request.index] = outcome
                done += 1
                refused += outcome.status == "refused"
                bar.update(1)
                bar.set_postfix(refused=refused, refresh=False)
                action = events.pop(done, None)
                if action is not None:
                    action()
                submit_next()
    finally:
        # Ctrl-C: drop what has not started and wait for the few calls in flight (short, bounded by the
        # router's timeout), so nothing is left talking to a gateway that is about to stop
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return [o for o in outcomes if o is not None]


# --- the summary, read back from the mart --------------------------------------------------------

@dataclass
class Summary:
    """The demo's results, all read from the mart."""

    departments: "pd.DataFrame"
    route_share: "pd.DataFrame"
    reward: dict[str, Any]
    audit: Any
    outage: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    #: from the simulation's ground truth (:func:`tidyllm.report.learning.learning_summary`)
    learning: dict[str, Any] = field(default_factory=dict)
    #: quality signals per source: count, learned, mean score
    signals: dict[str, Any] = field(default_factory=dict)


def _wait_settled(platform: "Platform", timeout: float = 30.0) -> None:
    """LiteLLM runs success callbacks on its logging threads: wait until no call is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        calls = platform.mart.frame("llm_calls", columns=["status"], status="pending")
        if calls.empty:
            return
        time.sleep(0.1)


def _shares(frame: "pd.DataFrame") -> str:
    if frame.empty:
        return "-"
    counts = frame["route"].value_counts()
    total = counts.sum()
    return ", ".join(f"{route} {100 * n / total:.0f}%" for route, n in counts.head(3).items())


def summarise(data: "ReportData", outcomes: Sequence[Outcome] = (), *, outage: Mapping[str, Any] | None = None,
              strategy: str = "bandit") -> Summary:
    """The run as read back from the mart (``data`` from :func:`tidyllm.report.data.gather`): per-department
    spend and refusals, route share per context in the first and last third of the run, reward against
    the best fixed route, the audit chain."""
    import pandas as pd

    calls = data.calls.sort_values("started_at", kind="stable")
    budgets = data.budgets[data.budgets["scope"] == "department"].set_index("name")
    rows = []
    for dept, group in calls.groupby("department", sort=True):
        refused = group[group["status"] == "refused"]
        limit = budgets["limit_usd"].get(dept, math.nan)
        spent = float(group["cost_usd"].fillna(0).sum())
        rows.append({"department": dept, "requests": int(group["id"].str.split("#").str[0].nunique()),
                     "answered": int((group["status"] == "success").sum()),
                     "failed": int((group["status"] == "failure").sum()),
                     "refused": len(refused),
                     "refused_budget": int((refused["error_type"] == "BudgetExceededError").sum()),
                     "spend_usd": spent, "budget_usd": limit,
                     "used": spent / limit if limit and limit > 0 else math.nan,
                     "first_refusal": refused["started_at"].min() if len(refused) else pd.NaT})
    departments = pd.DataFrame(rows)

    routed = calls[calls["status"].isin(["success", "failure"])].copy()
    # confidential data has one authorised route: show it as its own context, not as a routing choice
    restricted = routed["data_sensitivity"].isin(["confidential", "restricted"])
    routed["context"] = (routed["department"].fillna("?") + "/" + routed["use_case"].fillna("?")
                         + restricted.map({True: " (confidential)", False: ""}))
    n = len(routed)
    first, last = routed.iloc[: n // 3], routed.iloc[n - n // 3:]
    share_rows = []
    for context, count in routed["context"].value_counts().items():
        share_rows.append({"context": context, "calls": int(count),
                           "first_third": _shares(first[first["context"] == context]),
                           "last_third": _shares(last[last["context"] == context])})
    route_share = pd.DataFrame(share_rows, columns=["context", "calls", "first_third", "last_third"])

    totals = {"calls": len(calls), "answered": int((calls["status"] == "success").sum()),
              "refused": int((calls["status"] == "refused").sum()),
              "failed_attempts": int((calls["status"] == "failure").sum()),
              "spend_usd": float(calls["cost_usd"].fillna(0).sum()),
              "strategy": strategy}
    if outcomes:
        totals["requests"] = len(outcomes)
        totals["requests_ok"] = sum(1 for o in outcomes if o.status == "ok")
        totals["requests_refused"] = sum(1 for o in outcomes if o.status == "refused")
        totals["requests_failed"] = sum(1 for o in outcomes if o.status == "failed")
    out_info = dict(outage or {})
    if out_info.get("started_at") is not None:
        during = calls[(calls["started_at"] >= out_info["started_at"])
                       & (calls["started_at"] <= out_info.get("ended_at", calls["started_at"].max()))]
        tried = during[during["route"] == out_info["route"]]
        out_info.update(attempts_on_route=len(tried), failed_on_route=int((tried["status"] == "failure").sum()),
                        share_during=_shares(during[during["status"].isin(["success", "failure"])]))
    return Summary(departments, route_share, data.reward, data.audit, out_info, totals)


def _table(frame: "pd.DataFrame", formats: Mapping[str, Callable[[Any], str]] | None = None) -> str:
    """A plain-text table (no extra dependency; readable in any terminal and in CI logs)."""
    formats = dict(formats or {})
    cols = list(frame.columns)
    cells = [[formats.get(c, _cell)(v) for c, v in zip(cols, row)] for row in frame.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join([line, rule, *body])


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "$-") and not text.endswith("Z")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if hasattr(value, "strftime"):
        return "-" if str(value) == "NaT" else value.strftime("%H:%M:%S")
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_summary(summary: Summary) -> str:
    """The summary as plain-text tables."""
    t = summary.totals
    lines = ["", "== Spend and refusals per department =="]
    if not summary.departments.empty:
        lines.append(_table(summary.departments, {
            "spend_usd": usd, "budget_usd": usd,
            "used": lambda v: "-" if v != v else f"{100 * v:.0f}%"}))
    lines += ["", f"== Route share per context ({t.get('strategy')} router): first third vs last third of the run =="]
    lines.append(_table(summary.route_share))
    o = summary.outage
    if o:
        lines += ["", "== Outage ==",
                  f"{o['model']} (endpoint {o['route']}, the busiest hosted route when it went down) was down "
                  f"from request {o['from']} to {o['to']}: "
                  f"{o.get('failed_on_route', 0)} of {o.get('attempts_on_route', 0)} attempts on {o['route']} "
                  f"failed and were retried elsewhere; route share during the outage: {o.get('share_during', '-')}"]
    r = summary.reward
    lines += ["", "== Reward (quality, cost and latency in [0, 1]; 0 for a failure) =="]
    if "logged" in r:
        lines.append(f"learning router: {r['logged']:.3f} on average over {r['rewarded']} rewarded decisions "
                     f"({100 * r['explored']:.0f}% of them exploring)")
        lines.append("on the last third of the decisions, had every call gone to one fixed route (doubly robust "
                     "off-policy estimate, 95% interval):")
        for route, est in sorted(r.get("fixed", {}).items(), key=lambda kv: -kv[1]["value"]):
            mark = "  <- best fixed route" if route == r.get("best_fixed_route") else ""
            lines.append(f"  always {route:<12} {est['value']:.3f}  [{est['ci_low']:.3f}, {est['ci_high']:.3f}]{mark}")
        if "best_fixed" in r:
            gain = r["last_third"] - r["best_fixed"]
            lines.append(f"learning router on the same decisions: {r['last_third']:.3f} ({gain:+.3f} against the "
                         f"best fixed route, {r['best_fixed_route']})")
    else:
        lines.append(r.get("note", "no rewards"))
    if summary.signals:
        lines += ["", "== Quality signals the router learned from =="]
        for source, info in sorted(summary.signals.items()):
            lines.append(f"  {source:<22} {info['signals']:>5} signals, {info['learned']:>5} learned, "
                         f"mean score {info['mean_score']:.3f}")
        for row in summary.totals.get("agreement", []):
            if row.get("pairs"):
                corr = "-" if row["correlation"] is None else f"{row['correlation']:.2f}"
                lines.append(f"  judge-human agreement ({row['source']}): {row['pairs']} calls rated by both, "
                             f"correlation {corr}, judge bias {row['bias']:+.3f}"
                             + (" (calibrated)" if row["calibrated"] else ""))
    lg = summary.learning
    if lg.get("router_value") is not None:
        lo, hi = lg["difference_ci"]
        verdict = "the learning router is better" if lo > 0 else ("worse" if hi < 0 else "no significant difference")
        lines += ["", "== Learning (expected reward of every route for every request, from the simulation's truth) ==",
                  f"after the first {lg['warmup_requests']} requests ({lg['compared_requests']} compared): learning "
                  f"router {lg['router_value']:.4f}, best fixed route {lg['best_fixed_route']} "
                  f"{lg['best_fixed_value']:.4f}, oracle {lg['oracle_value']:.4f}",
                  f"difference {lg['difference']:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]: {verdict}",
                  "learning curve (share of the oracle per tenth of the run): "
                  + " ".join("-" if v is None else f"{v:.3f}" for v in lg["learning_curve"])]
        share = lg.get("outage_route_share") or {}
        if share:
            fmt = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
            lines.append(f"traffic to {lg['outage_route']} (of the requests it could serve): before the outage "
                         f"{fmt(share.get('before'))}, during {fmt(share.get('during'))}, after "
                         f"{fmt(share.get('after'))}, last tenth of the run {fmt(share.get('last_tenth'))}")
    lines += ["", "== Audit ==", str(summary.audit)]
    lines += ["", f"requests: {t.get('requests', t['calls'])}, answered {t.get('requests_ok', t['answered'])}, "
                  f"refused {t.get('requests_refused', t['refused'])}, failed after retries "
                  f"{t.get('requests_failed', 0)}; provider attempts that failed: {t['failed_attempts']}; "
                  f"spend {usd(t['spend_usd'])}"]
    return "\n".join(lines)


# --- the whole demo ----------------------------------------------------------------------------

@dataclass
class DemoResult:
    """What :func:`run_demo` did."""

    out_dir: Path
    report: Path
    database_url: str
    summary: Summary
    summary_text: str
    elapsed_s: float
    startup_s: float
    workload_s: float
    strategy: str


def busiest_hosted_route(platform: "Platform", recent: int = 100) -> tuple[str, str]:
    """``(route, simulated model)`` of the route that served most of the last ``recent`` answered calls,
    among routes not tagged ``on_prem`` (taking the only on-premises route down would leave confidential
    requests nowhere to go, which is a different story)."""
    config = platform.gateway.config
    assert config is not None
    hosted = {r.name: r.model_name for r in config.routes
              if "on_prem" not in r.tags and r.group == "chat"}
    calls = platform.mart.frame("llm_calls", columns=["route"], order_by="-started_at", limit=recent,
                                status="success")
    counts = calls["route"][calls["route"].isin(list(hosted))].value_counts()
    route = str(counts.index[0]) if len(counts) else sorted(hosted)[0]
    return route, hosted[route]


def _capture_logs(path: Path) -> Callable[[], None]:
    """Send tidyllm's and LiteLLM's log records to ``path`` instead of the terminal; returns the undo."""
    import logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in ("tidyllm", "LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False

    def undo() -> None:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()

    return undo


def run_demo(*, requests: int = 1000, seed: int = 0, out: str | Path = "tidyllm-demo", server: bool = False,
             workers: int = 8, latency_scale: float = 0.05, progress: bool = True,
             echo: Callable[[str], None] = print, strategy: str | None = None, sim_quality: bool = False,
             judge_sample: float = 0.5) -> DemoResult:
    """Run the demo end to end (see the module docstring); returns what it did.

    ``out`` receives a fresh mart (``tidyllm-demo.db``, replaced if present), the dashboard
    (``index.html``), ``summary.json`` and the log (``demo.log``). ``server`` uses the MLflow tracking-server
    gateway instead of the legacy one. ``strategy`` overrides ``routing.strategy`` of the bundled settings.
    ``sim_quality`` lets the simulator report each answer's quality (the router then learns from it too);
    ``judge_sample`` is the share of answers the judge scores."""
    import dataclasses
    import json

    from tidyllm.gateway.simulator import load_profiles, parse_profiles
    from tidyllm.report import save_report
    from tidyllm.report.data import gather
    from tidyllm.stack import LocalStack, bundled_gateway_config, bundled_settings

    if requests < 10:
        raise ConfigurationError(f"--requests must be at least 10 for a meaningful demo, got {requests}")
    t0 = time.perf_counter()
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    db = out_dir / DEMO_DB
    for suffix in ("", "-wal", "-shm"):  # a fresh mart each run: budgets and learning start from zero
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    database_url = f"sqlite:///{db}"
    # the seed also seeds the router's exploration (thread timing still varies the exact run)
    # exploration costs reward while the estimates are still noisy (sparse, judged signals): cap it at 10 %
    routing: dict[str, Any] = {"random_state": seed, "max_exploration_share": 0.1,
                               **({"strategy": strategy} if strategy else {})}
    overrides: dict[str, Any] = {"database_url": database_url, "routing": routing,
                                 "signals": demo_signals(judge_sample)}
    workload = make_workload(requests, seed)
    mode = "server" if server else "legacy"
    gateway_file = _demo_gateway(out_dir, bundled_gateway_config())
    profiles = {name: dataclasses.replace(p, quality={**p.quality, **DEMO_QUALITY.get(name, {})})
                for name, p in load_profiles().items()}
    profiles.update(parse_profiles({"models": {"sim-judge": JUDGE_PROFILE}}))
    stack = LocalStack(mode=mode, latency_scale=latency_scale, seed=seed, settings=str(bundled_settings()),
                       gateway_config=gateway_file, profiles=profiles, report_quality=sim_quality,
                       data_dir=out_dir / "mlflow-server" if server else None, **overrides)
    restore_logs: Callable[[], None] = lambda: None  # noqa: E731 - replaced once the log file is set up
    try:
        echo(f"starting the provider simulator and an MLflow AI Gateway ({mode}) ...")
        _start(stack)
        # the warnings of a thousand calls (e.g. LiteLLM on custom prices) belong in a file, not between
        # the tables; LiteLLM attached its own terminal handler when it was imported, just now
        restore_logs = _capture_logs(out_dir / "demo.log")
        platform, simulator = stack.platform, stack.simulator
        assert platform is not None and simulator is not None
        platform.budgets.set("department", JUDGE_DEPARTMENT, JUDGE_BUDGET_USD, "month")
        # the run compresses time (latencies × latency_scale): so do the circuit breaker's and LiteLLM's
        # cool-downs, or a route that recovered would stay out for a third of the run
        from tidyllm.gateway.health import RouteHealth

        platform.routes = RouteHealth(cooldown_s=DEMO_COOLDOWN_S)
        router = platform.router(cooldown_time=DEMO_COOLDOWN_S)
        rater = _simulated_rater(platform, simulator, seed)
        startup_s = time.perf_counter() - t0
        echo(f"gateway {stack.gateway.uri if stack.gateway else '?'} ready after {startup_s:.1f} s; sending "
             f"{requests} requests from {len({r.department for r in workload})} departments "
             f"({platform.settings.routing.strategy} router, {workers} threads)")
        outage: dict[str, Any] = {"from": int(requests * OUTAGE_WINDOW[0]), "to": int(requests * OUTAGE_WINDOW[1])}

        def outage_on() -> None:
            from tidyllm.mart.store import utcnow

            outage["route"], outage["model"] = busiest_hosted_route(platform)
            simulator.set_outage(outage["model"], True)
            outage["started_at"] = utcnow()

        def outage_off() -> None:
            from tidyllm.mart.store import utcnow

            simulator.set_outage(outage["model"], False)
            outage["ended_at"] = utcnow()

        t1 = time.perf_counter()
        outcomes = run_workload(platform, router, workload, workers=workers, progress=progress,
                                events={outage["from"]: outage_on, outage["to"]: outage_off}, rater=rater)
        workload_s = time.perf_counter() - t1
        _wait_settled(platform)
        time.sleep(0.2)  # LiteLLM's logging threads hand the last answers to the signal worker just after settling
        platform.signals.drain(60.0)  # the judge's last scores
        data = gather(platform)
        summary = summarise(data, outcomes, outage=outage, strategy=platform.settings.routing.strategy)
        summary.learning = _learning(platform, simulator, outcomes, outage, latency_scale)
        summary.signals = _signal_counts(platform)
        summary.totals["agreement"] = platform.signals.agreement()
        summary.totals["judge"] = dict(platform.signals.stats)
        data.learning = summary.learning
        report = save_report(data, out_dir)
        text = format_summary(summary)
        (out_dir / "summary.json").write_text(json.dumps(summary_json(summary), indent=1, default=str),
                                              encoding="utf-8")
        elapsed = time.perf_counter() - t0
        text += (f"\n\nsummary:   {out_dir / 'summary.json'}"
                 f"\nworkload: {requests} requests in {workload_s:.1f} s ({requests / workload_s:.0f} req/s); "
                 f"total {elapsed:.1f} s including gateway start\nmart:      {database_url}\n"
                 f"dashboard: {report}\nlog:       {out_dir / 'demo.log'}")
        return DemoResult(out_dir, report, database_url, summary, text, elapsed, startup_s, workload_s,
                          platform.settings.routing.strategy)
    finally:
        stack.stop()
        restore_logs()


def _demo_gateway(out_dir: Path, bundled: Path) -> Path:
    """The bundled gateway routes plus the demo's judge route, written to ``out_dir``."""
    import yaml

    data = yaml.safe_load(bundled.read_text(encoding="utf-8"))
    data["routes"] = [*data["routes"], JUDGE_ROUTE]
    path = out_dir / "gateway.yaml"
    path.write_text("# the bundled routes plus the demo's judge route (written by tidyllm demo)\n"
                    + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _simulated_rater(platform: "Platform", simulator: Any, seed: int) -> Callable[[str, str, DemoRequest], None]:
    """A user who rates about ``HUMAN_RATE`` of the answers: the answer's true quality plus a little noise."""
    import threading

    rng = random.Random(seed + 7)
    lock = threading.Lock()

    def rate(call_id: str, answer: str, request: DemoRequest) -> None:
        with lock:
            rated, noise = rng.random() < HUMAN_RATE, rng.gauss(0.0, 0.03)
        truth = simulator.true_quality(answer)
        if rated and truth is not None:
            platform.feedback(call_id, min(1.0, max(0.0, truth + noise)))

    return rate


def _learning(platform: "Platform", simulator: Any, outcomes: Sequence[Outcome], outage: Mapping[str, Any],
              latency_scale: float) -> dict[str, Any]:
    """The learning figures from the simulation's ground truth (:mod:`tidyllm.report.learning`)."""
    from tidyllm.report.learning import Request, learning_summary

    config = platform.gateway.config
    assert config is not None
    chat = [r for r in config.routes if r.group == "chat"]
    model_of = {r.name: r.model_name for r in chat}
    prices = {}
    for r in chat:
        price = platform.prices.lookup(r.name)
        prices[r.name] = (price.input_per_1m, price.output_per_1m) if price else (0.0, 0.0)
    answered = [o for o in outcomes if o.status == "ok" and o.route in model_of]
    calls = platform.mart.frame("llm_calls", columns=["id", "prompt_tokens"], id=[o.call_id for o in answered])
    import pandas as pd

    tokens = {i: int(t) for i, t in zip(calls["id"], calls["prompt_tokens"]) if not pd.isna(t)}
    gov = platform.governor
    requests = []
    for o in answered:
        ctx = gov.context(o.request.metadata())
        allowed = tuple(r for r in model_of if gov.check_authorized(ctx, r) is None)
        requests.append(Request(o.request.index, o.request.department, o.request.use_case,
                                int(tokens.get(o.call_id) or 0), o.request.max_tokens, str(o.route), allowed))
    rs = platform.settings.routing
    return learning_summary(requests, profiles=simulator.profiles, model_of=model_of, prices=prices,
                            weights_of=lambda d: rs.weights_by_department.get(d, rs.weights),
                            latency_scale=latency_scale,
                            outage={"route": outage.get("route"), "from": outage["from"], "to": outage["to"]})


def _signal_counts(platform: "Platform") -> dict[str, Any]:
    signals = platform.mart.frame("call_signals", columns=["source", "score", "applied_at"])
    out = {}
    for source, group in signals.groupby("source"):
        out[str(source)] = {"signals": len(group), "learned": int(group["applied_at"].notna().sum()),
                            "mean_score": float(group["score"].mean())}
    return out


def summary_json(summary: Summary) -> dict[str, Any]:
    """What ``OUT/summary.json`` holds: totals (spend, refusals), per-department spend and refusals, the
    learning figures, the signals and the outage."""
    departments = summary.departments.to_dict(orient="records") if not summary.departments.empty else []
    return {"totals": {k: v for k, v in summary.totals.items() if k != "agreement"},
            "departments": departments, "learning": summary.learning, "signals": summary.signals,
            "judge_human_agreement": summary.totals.get("agreement", []), "outage": summary.outage,
            "reward_estimate": {k: v for k, v in summary.reward.items() if k != "fixed"}}


def _start(stack: Any) -> None:
    """Start the stack while LiteLLM is imported on another thread: the gateway starts in its own
    process, so the seconds of both overlap instead of adding up."""
    import threading

    import tidyllm.gateway.processes  # noqa: F401 - imported here first, so the two threads share no import
    import tidyllm.gateway.simulator  # noqa: F401
    import tidyllm.platform  # noqa: F401
    from tidyllm._litellm import import_litellm

    importer = threading.Thread(target=import_litellm, name="tidyllm-import-litellm", daemon=True)
    importer.start()
    try:
        stack.start()
    finally:
        importer.join()

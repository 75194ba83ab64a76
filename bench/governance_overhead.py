"""Latency tidyllm's governance adds to a LiteLLM Router call, on SQLite and PostgreSQL, and governed throughput.

The same ``Router.completion`` (one deployment answering with LiteLLM's ``mock_response``, so no network
and no provider) is made by two worker processes in lock-step — call *i* by the plain worker, then call
*i* by the governed one (who goes first alternates) — so both see the same machine load:

- ``plain``: ``litellm.Router(model_list)``, tidyllm not installed;
- ``governed``: ``platform.govern(litellm.Router(model_list))`` after ``tidyllm.install(database_url=...)``,
  with a price for the deployment and a department budget, so every call is authorised, rate-limit
  checked, priced and reserved before LiteLLM answers, then settled and audited on LiteLLM's logging
  thread after it returns. A busy caller like this one is admitted from admission credit (a block of
  32 worst cases reserved in one write transaction, tidyllm.governance.credit); ``--credit-calls 0``
  measures the per-call path (one write transaction before every call).

Each worker times its own calls (the pipe between driver and workers is outside the timing). Reported:
median and p95 per side, the median and p95 of the per-pair difference (added latency), and the ratio of
medians. This is done ``--rounds`` times (default 3), each time with a fresh pair of workers and a fresh
database, and the median over the rounds is reported with every round's figure: on a shared machine a pair
of processes can be lucky or unlucky for its whole life (single runs of the same code measured anywhere
from 1.1 to 2.3 ms). Afterwards the governed worker waits until every call is settled and checks the mart: one
``llm_calls`` row per call, all ``success``, nothing reserved, the audit chain verifies.

Throughput: 4 governed processes on PostgreSQL make calls as fast as they can against one shared
department budget; calls/s = all calls / (last end - first start), and the same including the time until
the last settle landed.

Targets on this 2-core machine: <= 1 ms added median on SQLite, <= 2 ms on PostgreSQL.

Run::

    PYTHONPATH=. .venv/bin/python bench/governance_overhead.py --calls 500 \\
        --postgres-url postgresql+psycopg://user@127.0.0.1:5432/db --out bench/results/governance.json

PostgreSQL comes from ``--postgres-url`` or ``TIDYLLM_BENCH_POSTGRES_URL`` (a fresh database is created on
that server and dropped afterwards); without one, the PostgreSQL parts are skipped with a note.
``--profile N`` also profiles N governed calls in-process (cProfile) and prints where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import percentile, postgres_database, print_header, print_load, write_results  # noqa: E402
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MESSAGES = [{"role": "user", "content": "Summarise the peer review findings in two sentences."}]
META = {"user_id": "ana", "department": "risk", "audit_reason": "MVR peer review", "use_case": "qa"}
DEPLOYMENT = "bench-mock"
PRICE_PER_1M = (1.0, 2.0)  # input, output USD per 1M tokens: tidyllm's price and LiteLLM's, as platform.router() does
MODEL_LIST = [{"model_name": "chat",
               "litellm_params": {"model": f"openai/{DEPLOYMENT}", "mock_response": "A mocked answer.",
                                  "api_key": "not-used-mock-response",
                                  # without a price LiteLLM runs its zero-cost diagnostic on every call (~3 ms)
                                  "input_cost_per_token": PRICE_PER_1M[0] / 1e6,
                                  "output_cost_per_token": PRICE_PER_1M[1] / 1e6},
               "model_info": {"id": DEPLOYMENT}}]


# --------------------------------------------------------------------------------------- workers


def _router(governed: bool, url: str | None) -> tuple[Any, Any]:
    """(call, platform or None) — the same call, governed or not: a Router call (``--path router``) or a
    plain sync ``litellm.completion`` (``--path sync``, governed by tidyllm's sync instrumentation)."""
    from tidyllm._litellm import import_litellm

    litellm = import_litellm()
    sync = os.environ.get("TIDYLLM_BENCH_PATH") == "sync"  # set by --path
    router = litellm.Router(model_list=[dict(d) for d in MODEL_LIST], num_retries=0)
    params = MODEL_LIST[0]["litellm_params"]

    def call() -> Any:
        if sync:
            return litellm.completion(messages=MESSAGES, max_tokens=32, metadata=dict(META), **params)
        return router.completion(model="chat", messages=MESSAGES, max_tokens=32, metadata=dict(META))

    if not governed:
        return call, None
    import tidyllm

    credit = os.environ.get("TIDYLLM_BENCH_CREDIT_CALLS")  # set by --credit-calls
    platform = tidyllm.install(database_url=url, routing={"strategy": "cheapest"},
                               governance={"admission_credit_calls": int(credit)} if credit else {})
    platform.prices.set(DEPLOYMENT, *PRICE_PER_1M)
    platform.prices.set(f"openai/{DEPLOYMENT}", *PRICE_PER_1M)  # the sync call's route is the model name
    platform.budgets.set("department", "risk", 1_000_000.0, "month")
    if not sync:
        platform.govern(router)
    return call, platform


def _call(call: Any) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000


def _settle(platform: Any, expected: int, timeout: float = 300.0) -> dict[str, Any]:
    """Wait until the callbacks settled every call; check the mart."""
    deadline = time.monotonic() + timeout
    while True:
        calls = platform.mart.sql("SELECT status, COUNT(*) AS n FROM llm_calls GROUP BY status")
        counts = {str(r["status"]): int(r["n"]) for r in calls.to_dict("records")}
        if counts.get("pending", 0) == 0 and sum(counts.values()) >= expected:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    status = platform.budgets.status(scope="department", name="risk").iloc[0]
    return {"calls": counts, "reserved_usd": float(status["reserved_usd"]), "spent_usd": float(status["spent_usd"]),
            "audit_ok": bool(platform.audit.verify().ok)}


def worker(kind: str, url: str | None, warmup: int, calls: int) -> None:
    """Line protocol on stdin/stdout: ``call`` -> elapsed ms; ``end`` -> JSON check; ``go`` -> run ``calls``."""
    router, platform = _router(kind != "plain", url)
    for _ in range(warmup):
        _call(router)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "call":
            print(f"{_call(router):.6f}", flush=True)
        elif cmd == "go":  # throughput: as fast as possible
            start = time.time()
            for _ in range(calls):
                _call(router)
            end = time.time()
            print(json.dumps({"start": start, "end": end, "calls": calls}), flush=True)
        elif cmd == "end":
            check = _settle(platform, 0) if platform is not None else {}
            check["settled_at"] = time.time()
            print(json.dumps(check), flush=True)
            return


class Worker:
    """A worker subprocess driven over its stdin/stdout."""

    def __init__(self, kind: str, url: str | None, warmup: int, calls: int = 0) -> None:
        cmd = [sys.executable, __file__, "--worker", kind, "--warmup", str(warmup), "--calls", str(calls)]
        if url:
            cmd += ["--url", url]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     bufsize=1)
        self.kind = kind

    def ask(self, command: str | None = None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.kind} worker died (exit {self.proc.wait()})")
        return line.strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------------------------ measurements


def interleaved(url: str, calls: int, warmup: int) -> dict[str, Any]:
    """Plain vs governed Router calls in lock-step; per-side and added-latency statistics."""
    plain, governed = Worker("plain", None, warmup), Worker("governed", url, warmup)
    try:
        assert plain.ask() == "ready" and governed.ask() == "ready"
        p_ms: list[float] = []
        g_ms: list[float] = []
        for i in range(calls):
            pair = (plain, governed) if i % 2 == 0 else (governed, plain)
            for w in pair:
                (p_ms if w is plain else g_ms).append(float(w.ask("call")))
        check = json.loads(governed.ask("end"))
        plain.ask("end")
    finally:
        plain.close()
        governed.close()
    added = [g - p for g, p in zip(g_ms, p_ms)]
    return {
        "calls": calls,
        "plain": {"median_ms": statistics.median(p_ms), "p95_ms": percentile(p_ms, 0.95),
                  "mean_ms": statistics.fmean(p_ms)},
        "governed": {"median_ms": statistics.median(g_ms), "p95_ms": percentile(g_ms, 0.95),
                     "mean_ms": statistics.fmean(g_ms)},
        "added_median_ms": statistics.median(added),
        "added_p95_ms": percentile(added, 0.95),
        "median_difference_ms": statistics.median(g_ms) - statistics.median(p_ms),
        "ratio_of_medians": statistics.median(g_ms) / statistics.median(p_ms),
        "mart_check": check,
    }


def rounds(url_for: Any, calls: int, warmup: int, n: int) -> dict[str, Any]:
    """:func:`interleaved` ``n`` times, each with a fresh pair of workers (and a fresh database from
    ``url_for()``): on a shared machine one pair of processes can land in a lucky or unlucky state for
    its whole life, so the result is the median over the rounds, with every round kept."""
    runs = [interleaved(url_for(), calls, warmup) for _ in range(n)]
    keys = ("added_median_ms", "added_p95_ms", "median_difference_ms", "ratio_of_medians")
    summary = {k: statistics.median(r[k] for r in runs) for k in keys}
    for side in ("plain", "governed"):
        summary[side] = {k: statistics.median(r[side][k] for r in runs) for k in ("median_ms", "p95_ms", "mean_ms")}
    return {"calls": calls, "rounds": runs, **summary}


def throughput(url: str, processes: int, calls: int, warmup: int) -> dict[str, Any]:
    """``processes`` governed workers making ``calls`` each as fast as they can, against one budget."""
    workers = [Worker("governed", url, warmup, calls) for _ in range(processes)]
    try:
        for w in workers:
            assert w.ask() == "ready"
        for w in workers:  # start them together
            assert w.proc.stdin is not None
            w.proc.stdin.write("go\n")
            w.proc.stdin.flush()
        runs = [json.loads(w.ask()) for w in workers]
        checks = [json.loads(w.ask("end")) for w in workers]
    finally:
        for w in workers:
            w.close()
    start = min(r["start"] for r in runs)
    end = max(r["end"] for r in runs)
    settled = max(c["settled_at"] for c in checks)
    total = sum(r["calls"] for r in runs)
    return {"processes": processes, "calls_per_process": calls, "total_calls": total,
            "calls_per_s": total / (end - start), "calls_per_s_including_settle": total / (settled - start),
            "wall_s": end - start, "mart_check": checks[-1]}


def profile(url: str, calls: int, warmup: int, top: int = 30) -> str:
    """cProfile of ``calls`` governed calls in this process; the top functions by cumulative time."""
    import cProfile
    import io
    import pstats

    router, platform = _router(True, url)
    for _ in range(warmup):
        _call(router)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        _call(router)
    prof.disable()
    _settle(platform, 0)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    stats.print_stats(top)
    import tidyllm

    tidyllm.uninstall()
    return buf.getvalue()


def _fresh_mart(url: str) -> None:
    """Create the schema once before the workers start (as a deployment would)."""
    from tidyllm.mart import TidyMart

    TidyMart(url).close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="measured calls per side (default 500)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh worker pairs per backend; the median over rounds is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls per worker first (default 50)")
    parser.add_argument("--postgres-url", default=os.environ.get("TIDYLLM_BENCH_POSTGRES_URL"),
                        help="PostgreSQL server to create a scratch database on (default $TIDYLLM_BENCH_POSTGRES_URL)")
    parser.add_argument("--processes", type=int, default=4, help="governed processes for throughput (default 4)")
    parser.add_argument("--throughput-calls", type=int, default=300,
                        help="calls per process in the throughput run (default 300)")
    parser.add_argument("--credit-calls", type=int, default=None, metavar="N",
                        help="governance.admission_credit_calls of the governed workers (default: tidyllm's, 32; "
                             "0 admits every call with its own write transaction)")
    parser.add_argument("--path", choices=["router", "sync"], default="router",
                        help="the governed Router (default), or plain sync litellm.completion governed by the "
                             "sync instrumentation")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also cProfile N governed calls on SQLite in-process and print the top functions")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "governance.json"),
                        help="JSON output (default bench/results/governance.json)")
    parser.add_argument("--worker", choices=["plain", "governed"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.url, args.warmup, args.calls)
        return 0

    if args.credit_calls is not None:
        os.environ["TIDYLLM_BENCH_CREDIT_CALLS"] = str(args.credit_calls)  # the workers inherit it
    os.environ["TIDYLLM_BENCH_PATH"] = args.path
    load_before = os.getloadavg()
    results: dict[str, Any] = {"interleaved": {}, "throughput": None, "notes": [],
                               "admission_credit_calls": args.credit_calls, "path": args.path}
    with tempfile.TemporaryDirectory(prefix="tidyllm-governance-bench-") as tmp:
        made = iter(range(1_000_000))

        def sqlite_url() -> str:
            url = f"sqlite:///{Path(tmp) / f'mart{next(made)}.db'}"
            _fresh_mart(url)
            return url

        print(f"SQLite: {args.rounds} round(s) of {args.calls} plain + {args.calls} governed calls, "
              "interleaved ...", flush=True)
        results["interleaved"]["sqlite"] = rounds(sqlite_url, args.calls, args.warmup, args.rounds)
        if args.profile:
            prof_url = f"sqlite:///{Path(tmp) / 'profile.db'}"
            _fresh_mart(prof_url)
            print(f"profiling {args.profile} governed calls on SQLite ...", flush=True)
            results["profile_sqlite"] = profile(prof_url, args.profile, args.warmup)
    if args.postgres_url:
        drops: list[Any] = []

        def pg_url() -> str:
            url, drop = postgres_database(args.postgres_url)
            drops.append(drop)
            _fresh_mart(url)
            return url

        try:
            print(f"PostgreSQL: {args.rounds} round(s) of {args.calls} plain + {args.calls} governed calls, "
                  "interleaved ...", flush=True)
            results["interleaved"]["postgresql"] = rounds(pg_url, args.calls, args.warmup, args.rounds)
        finally:
            for drop in drops:
                drop()
    if args.postgres_url and args.processes > 0:
        pg_url, drop = postgres_database(args.postgres_url)
        try:
            _fresh_mart(pg_url)
            print(f"PostgreSQL: throughput of {args.processes} governed processes ...", flush=True)
            results["throughput"] = throughput(pg_url, args.processes, args.throughput_calls, args.warmup)
        finally:
            drop()
    if not args.postgres_url:
        results["notes"].append("PostgreSQL skipped: no --postgres-url or TIDYLLM_BENCH_POSTGRES_URL")
    load_after = os.getloadavg()

    targets = {"sqlite": 1.0, "postgresql": 2.0}
    print()
    what = "Router.completion" if args.path == "router" else "plain sync litellm.completion (instrumented)"
    print(f"{what} with mock_response: plain vs governed, {args.calls} calls each, interleaved; "
          f"median over {args.rounds} round(s) (each round's added median in brackets)")
    print_header(f"{'backend':<11} {'plain med':>9} {'plain p95':>9} {'gov med':>8} {'gov p95':>8} "
                 f"{'added med':>9} {'added p95':>9} {'ratio':>6} {'target':>7}  mart check  rounds")
    for backend, r in results["interleaved"].items():
        checks = [x["mart_check"] for x in r["rounds"]]
        ok = all(c["calls"] == {"success": args.calls + args.warmup} and abs(c["reserved_usd"]) < 1e-12
                 and c["audit_ok"] for c in checks)
        r["meets_target"] = r["added_median_ms"] <= targets[backend]
        each = ", ".join(f"{x['added_median_ms']:.2f}" for x in r["rounds"])
        print(f"{backend:<11} {r['plain']['median_ms']:>9.2f} {r['plain']['p95_ms']:>9.2f} "
              f"{r['governed']['median_ms']:>8.2f} {r['governed']['p95_ms']:>8.2f} {r['added_median_ms']:>9.2f} "
              f"{r['added_p95_ms']:>9.2f} {r['ratio_of_medians']:>6.2f} {'<= %g' % targets[backend]:>7}  "
              f"{'ok' if ok else checks}  [{each}]")
    if results["throughput"]:
        t = results["throughput"]
        print(f"\nPostgreSQL, {t['processes']} governed processes x {t['calls_per_process']} calls: "
              f"{t['calls_per_s']:.0f} calls/s returned, {t['calls_per_s_including_settle']:.0f} calls/s "
              f"including settle (mart check: {t['mart_check']})")
    for note in results["notes"]:
        print(f"note: {note}")
    print_load(load_before, load_after)
    if "profile_sqlite" in results:
        print("\ncProfile of governed calls on SQLite (cumulative):")
        print(results["profile_sqlite"])

    write_results(args.out, "governance_overhead",
                  {"calls": args.calls, "warmup": args.warmup, "targets_added_median_ms": targets, **results},
                  load_before, load_after, ("tidyllm", "litellm", "sqlalchemy", "psycopg"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

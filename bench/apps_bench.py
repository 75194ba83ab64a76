"""The applications' cost estimates against their actual cost, and their wall time, on the bundled samples.

Starts the local stack (provider simulator with the samples' scripted answers, no latency, a real MLflow
legacy gateway, a SQLite mart), runs each application once per model name and prints, per run: calls,
the estimate before work, the actual cost from ``llm_calls``, their ratio and the wall time. A ratio must be
>= 1 (the estimate is a worst case); on one route it should stay under 2. Writes JSON.

    python bench/apps_bench.py [--out bench/results/apps.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_header, print_load, write_results  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/apps.json")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import tidyllm.apps as apps
    from tidyllm.stack import LocalStack

    who = {"user_id": "bench", "department": "bench", "audit_reason": "apps benchmark"}
    schema = {"type": "object", "properties": {"owner": {"type": "string"}, "effective_date": {"type": "string"}}}
    pdf, docx, policies = apps.sample_path("mvr_rm_pd_v3.pdf"), apps.sample_path("mvr_rm_pd_v3.docx"), \
        apps.sample_path("policies")
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, \
            LocalStack(profiles=apps.simulator_profiles(latency=False), latency_scale=0,
                       database_url=f"sqlite:///{tmp}/mart.db", routing={"strategy": "cheapest"}) as stack:
        stack.platform.budgets.set("department", "bench", 100.0, "month")
        index = apps.Index("bench", **who)

        def measure(app: str, model: str, fn: Callable[[], Any], calls: Callable[[Any], int],
                    estimate: Callable[[Any], float], actual: Callable[[Any], float]) -> None:
            t0 = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - t0
            est, act = estimate(result), actual(result)
            rows.append({"app": app, "model": model, "calls": calls(result), "estimate_usd": est, "actual_usd": act,
                         "ratio": est / act if act else float("nan"), "seconds": seconds})

        for model in ("chat-small", "chat-onprem", "chat"):
            measure("mvr_review pdf", model, lambda: apps.mvr_review(pdf, model=model, **who),
                    lambda r: len(r.findings), lambda r: r.estimate.total_usd, lambda r: r.actual_usd)
            measure("mvr_review docx", model, lambda: apps.mvr_review(docx, model=model, **who),
                    lambda r: len(r.findings), lambda r: r.estimate.total_usd, lambda r: r.actual_usd)
            measure("summarise docx", model, lambda: apps.summarise(docx, model=model, **who),
                    lambda r: len(r.parts) + 1, lambda r: r.estimate.total_usd, lambda r: r.actual_usd)
            measure("extract policies", model, lambda: apps.extract(policies, schema, model=model, **who),
                    len, lambda r: r.attrs["estimate"].total_usd, lambda r: r.attrs["actual_usd"])
        measure("ask consensus", "chat", lambda: apps.ask("What is 6 times 7?", **who),
                lambda r: len(r.votes), lambda r: r.estimate.total_usd, lambda r: r.actual_usd)
        measure("ask cascade", "chat", lambda: apps.ask("What is 6 times 7?", strategy="cascade", **who),
                lambda r: len(r.votes), lambda r: r.estimate.total_usd, lambda r: r.actual_usd)
        measure("rag add", "embed", lambda: index.add([policies, docx]),
                lambda r: r.estimate.calls, lambda r: r.estimate.total_usd, lambda r: r.actual_usd)
        index.close()
    load_after = os.getloadavg()
    header = f"{'application':<18} {'model':<12} {'calls':>5} {'estimate $':>12} {'actual $':>12} {'ratio':>6} {'s':>6}"
    print_header(header)
    for r in rows:
        print(f"{r['app']:<18} {r['model']:<12} {r['calls']:>5} {r['estimate_usd']:>12.6f} {r['actual_usd']:>12.6f} "
              f"{r['ratio']:>6.2f} {r['seconds']:>6.1f}")
    print_load(load_before, load_after)
    write_results(args.out, "apps", {"runs": rows}, load_before, load_after,
                  ["tidyllm", "litellm", "mlflow", "pypdf", "python-docx", "sqlite-vec"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What administration costs: an audited budget change, an alert evaluation over many budgets, signing a
checkpoint, and `audit verify` (chain + checkpoints + call rows) over a large trail. SQLite in a temporary
folder; prints a table and writes bench/results/admin.json.

    PYTHONPATH=. .venv/bin/python bench/admin_bench.py [--budgets 500] [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` runs of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, default=500)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "admin.json"))
    args = parser.parse_args()

    import logging
    import os

    logging.getLogger("tidyllm").setLevel(logging.ERROR)  # the soft warnings of hundreds of budgets

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TIDYLLM_HOME"] = tmp
        from tidyllm.governance.checkpoints import verify_trail
        from tidyllm.governance.context import CallContext
        from tidyllm.mart.store import utcnow
        from tidyllm.platform import Platform
        from tidyllm.settings import load_settings

        p = Platform(load_settings(database_url=f"sqlite:///{Path(tmp) / 'bench.db'}", alerts={"log": False}))
        results: dict[str, float] = {}
        n = [0]

        def audited_set() -> None:
            n[0] += 1
            p.budgets.set("department", "risk", 10.0 + n[0], reason="bench")

        results["budgets.set, audited (ms)"] = timed(audited_set, 50) * 1e3
        for i in range(args.budgets):
            p.budgets.set("department", f"d{i}", 100.0)
        with p.mart.store.tx() as tx:
            for i in range(args.budgets):
                p.budgets.charge(tx, CallContext(department=f"d{i}"), None, None, 10.0 + (i % 90), utcnow())
        start = time.perf_counter()
        fired = p.alerts.evaluate()
        results[f"alerts.evaluate, {args.budgets} budgets, {len(fired)} new alerts (ms)"] = \
            (time.perf_counter() - start) * 1e3
        results[f"alerts.evaluate, {args.budgets} budgets, nothing new (ms)"] = timed(p.alerts.evaluate, 5) * 1e3
        with p.mart.store.begin(write=True) as conn:
            for i in range(args.rows):
                p.audit.append(conn, {"call_id": f"c{i}", "recorded_at": utcnow(), "decision": "allowed",
                                      "status": "success", "cost_usd": 0.001})
        results["checkpoint signed and appended (ms)"] = timed(lambda: p.checkpoints.checkpoint(), 20) * 1e3
        rows = p.checkpoints.head()["rows"]
        results[f"audit verify, {rows:,} rows + checkpoints (s)"] = timed(lambda: verify_trail(p.mart, p.checkpoints), 3)
        p.close()
        p.mart.close()
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budgets": args.budgets, "rows": args.rows, "results": results}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

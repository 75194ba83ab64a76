"""Latency tidyllm adds to LiteLLM's proxy: the same request through the proxy alone and through `tidyllm proxy`.

Both proxies are LiteLLM's own server (``python -m litellm.proxy.proxy_cli``), over the same MLflow legacy
gateway and provider simulator (answers at once), with the same ``model_list`` (tidyllm's generated one):

- ``plain``: the proxy alone as LiteLLM ships it — its master key, no tidyllm callbacks, LiteLLM's routing;
- ``noop-auth``: the proxy alone authenticating as ``tidyllm proxy`` does (a ``custom_auth``, which skips
  LiteLLM's own key checks) with a function that looks nothing up (``bench/_proxy_noop_auth.py``);
- ``tidyllm``: ``tidyllm proxy`` — a key from the mart (``custom_auth``), the identity hook, the governed
  routing strategy, a department budget reserved before and settled after every call, the audit row.

Requests rotate, one at a time, over the three (the order rotates per round), so all see the same machine
load; each is timed by the client (httpx, keep-alive) from send to the last byte. Reported: median and p95
per side, and the median and p95 of the per-round difference — the latency the proxy with tidyllm adds over
each baseline (the no-op-auth one isolates tidyllm's own work: key lookup, identity, governance, audit). Target on this 2-core machine: <= 2 ms median added with a
PostgreSQL mart. Afterwards: one settled ``llm_calls`` row per tidyllm call, nothing reserved, the audit
chain verifies.

Run::

    PYTHONPATH=. .venv/bin/python bench/proxy_bench.py --calls 300 \\
        --postgres-url postgresql+psycopg://user@127.0.0.1:5432/db --out bench/results/proxy.json

PostgreSQL comes from ``--postgres-url`` or ``TIDYLLM_BENCH_POSTGRES_URL`` (a fresh database on that server,
dropped afterwards); without one the mart is a SQLite file, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
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

BODY = {"model": "chat-small", "max_tokens": 50,
        "messages": [{"role": "user", "content": "Summarise the peer review findings in two sentences."}],
        "metadata": {"audit_reason": "MVR peer review", "use_case": "qa"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="requests per side (after --warmup)")
    parser.add_argument("--warmup", type=int, default=30, help="requests per side not timed")
    parser.add_argument("--postgres-url", default=os.environ.get("TIDYLLM_BENCH_POSTGRES_URL"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "proxy.json"))
    args = parser.parse_args()

    import httpx
    import yaml

    from tidyllm.gateway.processes import start_gateway
    from tidyllm.gateway.simulator import Simulator, parse_profiles
    from tidyllm.mart import TidyMart
    from tidyllm.platform import Platform
    from tidyllm.proxy.config import proxy_config
    from tidyllm.proxy.keys import KeyStore
    from tidyllm.proxy.process import start_proxy
    from tidyllm.settings import load_settings
    from tidyllm.stack import bundled_gateway_config

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tidyllm-proxy-bench-"))
    drop = None
    if args.postgres_url:
        url, drop = postgres_database(args.postgres_url)
        backend = "postgresql"
    else:
        url, backend = f"sqlite:///{tmp / 'mart.db'}", "sqlite"
    names = ("sim-gpt-small", "sim-gpt-large", "sim-claude", "sim-onprem-llama")
    profiles = parse_profiles({"models": {**{n: {"latency": {"base_ms": 0}, "output_tokens": {"min": 20, "max": 20}}
                                              for n in names},
                                          "sim-embed": {"kind": "embedding", "latency": {"base_ms": 0}}}})
    sim = Simulator(profiles, latency_scale=0).start()
    gateway = start_gateway(str(bundled_gateway_config()), env={"TIDYLLM_SIMULATOR_URL": sim.url})
    proxies = []
    try:
        settings_file = tmp / "tidyllm.yaml"
        settings_file.write_text(yaml.safe_dump({"database_url": url, "gateway_uri": gateway.uri,
                                                 "gateway_config": str(bundled_gateway_config())}))
        settings = load_settings(str(settings_file))
        platform = Platform(settings)
        platform.budgets.set("department", "risk", 1000.0, "month")
        _, key = KeyStore(platform.mart, platform.audit).create(department="risk", user_id="ana")
        governed_cfg = proxy_config(platform)
        plain_cfg = {"model_list": governed_cfg["model_list"], "router_settings": governed_cfg["router_settings"],
                     "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"}}
        noop_cfg = {**plain_cfg, "general_settings": {**plain_cfg["general_settings"],
                                                       "custom_auth": "_proxy_noop_auth.accept_all"}}
        platform.close()
        master = "sk-" + secrets.token_hex(24)
        env = {"TIDYLLM_CONFIG": str(settings_file), "LITELLM_MASTER_KEY": master,
               "TIDYLLM_PROXY_KEY_CACHE_SECONDS": "5",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                           os.environ.get("PYTHONPATH")]))}
        print("starting the three proxies (LiteLLM's server takes 15-40 s to start) ...", flush=True)
        for cfg in (plain_cfg, noop_cfg, governed_cfg):
            proxies.append(start_proxy(cfg, env=env))
        plain, noop, governed = proxies

        sides = {"plain": (plain, master), "noop-auth": (noop, "any"), "tidyllm": (governed, key)}
        clients = {name: httpx.Client(base_url=f"{p.uri}/v1", headers={"Authorization": f"Bearer {k}"}, timeout=60)
                   for name, (p, k) in sides.items()}

        def once(name: str) -> float:
            start = time.perf_counter()
            response = clients[name].post("/chat/completions", json=BODY)
            elapsed = (time.perf_counter() - start) * 1000.0
            if response.status_code != 200:
                raise SystemExit(f"{name} proxy answered {response.status_code}: {response.text[:500]}")
            return elapsed

        order = list(sides)
        for _ in range(args.warmup):
            for name in order:
                once(name)
        times: dict[str, list[float]] = {name: [] for name in sides}
        diffs: dict[str, list[float]] = {"plain": [], "noop-auth": []}
        for i in range(args.calls):
            turn = order[i % 3:] + order[:i % 3]
            round_ = {name: once(name) for name in turn}
            for name, ms in round_.items():
                times[name].append(ms)
            for base in diffs:
                diffs[base].append(round_["tidyllm"] - round_[base])

        mart = TidyMart(url)
        import sqlalchemy as sa

        from tidyllm.governance.audit import AuditTrail
        from tidyllm.mart.schema import llm_calls

        expected = args.calls + args.warmup
        deadline = time.monotonic() + 60
        while True:
            with mart.store.begin() as conn:
                statuses = dict(conn.execute(sa.select(llm_calls.c.status, sa.func.count())
                                             .group_by(llm_calls.c.status)).all())
            if statuses.get("success", 0) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        from tidyllm.governance.budgets import BudgetLedger

        window = BudgetLedger(mart).status(scope="department", name="risk").iloc[0]
        verified = bool(AuditTrail(mart).verify())
        mart.close()
        for client in clients.values():
            client.close()
    finally:
        for proc in proxies:
            proc.stop()
        gateway.stop()
        sim.stop()
        if drop is not None:
            drop()
        shutil.rmtree(tmp, ignore_errors=True)

    load_after = os.getloadavg()
    rows = {name: {"median_ms": statistics.median(v), "p95_ms": percentile(v, 0.95)} for name, v in times.items()}
    added = {base: {"median_ms": statistics.median(d), "p95_ms": percentile(d, 0.95)} for base, d in diffs.items()}
    print()
    print_header(f"{'side':<34}{'median ms':>12}{'p95 ms':>10}   ({args.calls} rotating requests per side, "
                 f"mart on {backend})")
    for name, label in (("plain", "proxy alone (master key)"), ("noop-auth", "proxy alone (no-op custom_auth)"),
                        ("tidyllm", "tidyllm proxy")):
        print(f"{label:<34}{rows[name]['median_ms']:>12.2f}{rows[name]['p95_ms']:>10.2f}")
    for base, label in (("plain", "added over master-key proxy"), ("noop-auth", "added over no-op-auth proxy")):
        print(f"{label:<34}{added[base]['median_ms']:>12.2f}{added[base]['p95_ms']:>10.2f}   (per-round difference)")
    print(f"calls settled: {statuses}; department reserved after: ${float(window['reserved_usd']):.6f}; "
          f"audit chain verifies: {verified}")
    print_load(load_before, load_after)
    write_results(args.out, "proxy_bench", {
        "backend": backend, "calls": args.calls, "warmup": args.warmup, "sides": rows,
        "added_over": added, "settled": statuses,
        "reserved_after_usd": float(window["reserved_usd"]), "audit_verified": verified,
        "target_added_median_ms": 2.0}, load_before, load_after, ["litellm", "mlflow", "tidyllm", "sqlalchemy",
                                                                  "psycopg"])


if __name__ == "__main__":
    main()

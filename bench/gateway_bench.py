"""Per-call latency of a LiteLLM chat call: straight to the provider simulator, through the legacy MLflow
gateway, and through the tracking-server AI Gateway — side by side, in one run.

What runs: tidyllm's provider SIMULATOR in its own process (``tidyllm simulate``; no real provider;
``--latency-scale 0`` by default, so it answers at once and what is measured is the client + HTTP + gateway
path, not a model), one ``mlflow gateway start``
and one ``mlflow server`` serving the bundled example routes (tidyllm/examples_data/gateway.yaml), and plain
``litellm.completion`` calls (no tidyllm governance installed):

- ``direct``: ``model="openai/sim-gpt-small"``, ``api_base=<simulator>/v1``;
- ``legacy``: ``model="openai/chat-small"``, ``api_base=<gateway>/v1``;
- ``server``: ``model="openai/chat-small"``, ``api_base=<server>/gateway/mlflow/v1``.

The three paths are called round-robin (direct, legacy, server, direct, ...) after a warm-up, so load on
the machine affects them alike. Reported per path: median, p95, mean and the median added over ``direct``.

Run::

    PYTHONPATH=. .venv/bin/python bench/gateway_bench.py --calls 200 --out bench/results/gateway.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from _common import percentile, print_header, print_load, write_results  # noqa: E402

MESSAGES = [{"role": "user", "content": "Summarise the peer review findings in two sentences."}]
PATHS = ("direct", "legacy", "server")


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "median_ms": statistics.median(ms), "p95_ms": percentile(ms, 0.95),
            "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "max_ms": max(ms)}


def steady_profiles_file(folder: Path) -> Path:
    """The bundled simulator profiles without random errors, 429 bursts or outages (nothing to retry)."""
    import yaml

    from tidyllm.gateway.simulator import bundled_profiles_path

    data = yaml.safe_load(bundled_profiles_path().read_text())
    for profile in data["models"].values():
        for key in ("rpm", "rate_limits", "outages"):
            profile.pop(key, None)
        profile["error_rate"] = 0.0
        profile["stream_failure_rate"] = 0.0
    path = folder / "steady-profiles.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def simulator_process(folder: Path, latency_scale: float) -> Iterator[str]:
    """``tidyllm simulate`` in its own process (so it takes no CPU time from the measured client); its URL."""
    cmd = [sys.executable, "-c", "from tidyllm.cli import main; main()", "simulate", "--port", "0",
           "--profiles", str(steady_profiles_file(folder)), "--latency-scale", str(latency_scale)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if " at http" not in line:
            raise SystemExit(f"the provider simulator did not start: {line}{proc.stdout.read()}")
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="measured calls per path (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured calls per path first (default 10)")
    parser.add_argument("--latency-scale", type=float, default=0.0,
                        help="multiplies the simulator's profile latencies (default 0: answer at once)")
    parser.add_argument("--route", default="chat-small", help="gateway route to call (default chat-small)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each call (default 32)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "gateway.json"),
                        help="JSON output (default bench/results/gateway.json)")
    args = parser.parse_args(argv)

    from tidyllm._litellm import import_litellm
    from tidyllm.gateway.config import load_gateway_config
    from tidyllm.gateway.processes import start_gateway
    from tidyllm.gateway.simulator import SimulatorClient
    from tidyllm.stack import bundled_gateway_config

    litellm = import_litellm()
    config = bundled_gateway_config()
    routes = {r.name: r for r in load_gateway_config(config).routes}
    if args.route not in routes:
        parser.error(f"--route {args.route!r} is not in {config}; routes: {', '.join(routes)}")
    sim_model = routes[args.route].model_name  # the simulator model behind the route

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tidyllm-gateway-bench-") as tmp, \
            simulator_process(Path(tmp), args.latency_scale) as sim_url:
        sim = SimulatorClient(sim_url)
        env = {"TIDYLLM_SIMULATOR_URL": sim_url}
        print(f"provider simulator at {sim_url}; starting the legacy gateway and the tracking server ...",
              flush=True)
        with start_gateway(str(config), mode="legacy", env=env) as legacy, \
                start_gateway(str(config), mode="server", env=env, data_dir=Path(tmp) / "server",
                              timeout=180) as server:
            startup_s = time.perf_counter() - started
            targets: dict[str, tuple[str, str]] = {
                "direct": (f"openai/{sim_model}", sim_url),
                "legacy": (f"openai/{args.route}", legacy.api_base),
                "server": (f"openai/{args.route}", server.api_base),
            }

            def caller(path: str) -> Callable[[], Any]:
                model, base = targets[path]
                return lambda: litellm.completion(model=model, api_base=base, api_key="simulator-accepts-any-key",
                                                  messages=MESSAGES, max_tokens=args.max_tokens)

            calls = {p: caller(p) for p in PATHS}
            for _ in range(args.warmup):
                for p in PATHS:
                    calls[p]()
            hits_before = sim.hits(sim_model)
            samples: dict[str, list[float]] = {p: [] for p in PATHS}
            errors = {p: 0 for p in PATHS}
            for i in range(args.calls):
                order = PATHS[i % 3:] + PATHS[:i % 3]  # rotate who goes first, too
                for p in order:
                    t0 = time.perf_counter()
                    try:
                        resp = calls[p]()
                    except Exception as exc:  # noqa: BLE001 - a benchmark counts failures instead of stopping
                        errors[p] += 1
                        print(f"{p}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                        continue
                    samples[p].append((time.perf_counter() - t0) * 1000)
                    if resp.usage.completion_tokens <= 0:
                        raise SystemExit(f"{p}: a response without usage: {resp}")
            served = sim.hits(sim_model) - hits_before
    load_after = os.getloadavg()

    results: dict[str, Any] = {}
    base_median = statistics.median(samples["direct"]) if samples["direct"] else float("nan")
    for p in PATHS:
        if not samples[p]:
            results[p] = {"n": 0, "errors": errors[p]}
            continue
        s = summary(samples[p])
        s["added_median_ms"] = s["median_ms"] - base_median
        s["errors"] = errors[p]
        results[p] = s

    print()
    print(f"LiteLLM chat call latency, {args.calls} calls per path, interleaved (simulator latency scale "
          f"{args.latency_scale:g}, route {args.route} -> {sim_model})")
    header = f"{'path':<8} {'median ms':>10} {'p95 ms':>9} {'mean ms':>9} {'+median vs direct':>18} {'errors':>7}"
    print_header(header)
    for p in PATHS:
        r = results[p]
        if not r.get("n"):
            print(f"{p:<8} {'-':>10} {'-':>9} {'-':>9} {'-':>18} {r['errors']:>7}")
            continue
        print(f"{p:<8} {r['median_ms']:>10.2f} {r['p95_ms']:>9.2f} {r['mean_ms']:>9.2f} "
              f"{r['added_median_ms']:>+18.2f} {r['errors']:>7}")
    print(f"\nsimulator requests during the measured run: {served} (expected {3 * args.calls - sum(errors.values())})")
    print_load(load_before, load_after)

    write_results(args.out, "gateway", {
        "calls_per_path": args.calls, "warmup_per_path": args.warmup, "latency_scale": args.latency_scale,
        "route": args.route, "simulator_model": sim_model, "max_tokens": args.max_tokens,
        "results": results, "simulator_requests": served, "gateway_startup_s": startup_s,
    }, load_before, load_after, packages=("tidyllm", "litellm", "mlflow", "httpx"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TidyMart: tracked executions per second, and a million step rows into a typed DataFrame.

1. Tracked executions/s — each one is the seed's pattern: ``track_execution`` + 3 ``record_step`` +
   ``record_result``; on SQLite and PostgreSQL, in one process and in 4 processes at once (total
   executions / wall time from the common start to the last finish; the processes wait at a barrier
   after importing and opening the mart, so start-up is not counted).
2. ``mart.frame("execution_steps")`` over 1,000,000 rows: the rows are bulk-inserted first (SQLite:
   ``executemany``; PostgreSQL: ``COPY``; not timed), then the read is timed ``--repeat`` times with a
   fresh ``TidyMart`` each time; the dtypes are checked.

Targets on this 2-core machine: >= 1,500 tracked executions/s single-process on SQLite; 1,000,000 step
rows into a typed DataFrame in <= 1.5 s on SQLite.

Single-process rates are also given per CPU-second of the benchmark process (``time.process_time``):
on a shared machine the wall-clock rate falls with other people's load, the CPU-time rate much less
(SQLite work runs in-process; PostgreSQL's server-side work is not in that figure).

Run::

    PYTHONPATH=. .venv/bin/python bench/mart_bench.py --out bench/results/mart.json \\
        --postgres-url postgresql+psycopg://user@127.0.0.1:5432/db

PostgreSQL comes from ``--postgres-url`` or ``TIDYLLM_BENCH_POSTGRES_URL`` (a scratch database is created on
that server and dropped afterwards); without one the PostgreSQL rows are skipped with a note.
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
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import postgres_database, print_header, print_load, write_results  # noqa: E402

EXPECTED_DTYPES = {"id": "object", "execution_id": "object", "seq": "Int64", "name": "object", "data": "object",
                   "recorded_at": "datetime64[us, UTC]"}


# ------------------------------------------------------------------------------ tracked executions


def track(mart: Any, n: int, worker: int = 0) -> None:
    """``n`` tracked executions of 3 steps and a result each."""
    for i in range(n):
        with mart.track_execution("bench", "tracked_call", {"worker": worker, "i": i, "route": "chat"}) as t:
            t.record_step("prepare", {"prompt_tokens": 42})
            t.record_step("mlflow_execution", {"tokens_used": 128, "route": "chat-small"})
            t.record_step("postprocess", {"ok": True})
            t.record_result({"status": "ok", "i": i})


def worker(url: str, n: int, index: int) -> None:
    """A tracking process: open the mart, wait for ``go`` on stdin, run, print start/end times."""
    from tidyllm.mart import TidyMart

    mart = TidyMart(url)
    track(mart, 5, worker=index)  # warm the pool and the statement caches
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    track(mart, n, worker=index)
    print(json.dumps({"start": start, "end": time.time(), "n": n}), flush=True)
    mart.close()


def tracked_single(url: str, n: int) -> dict[str, Any]:
    from tidyllm.mart import TidyMart

    mart = TidyMart(url)
    try:
        track(mart, 20)
        before = _count(mart)
        t0, c0 = time.perf_counter(), time.process_time()
        track(mart, n)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = _count(mart)
    finally:
        mart.close()
    _check_rows(before, rows, n)
    return {"processes": 1, "executions": n, "seconds": elapsed, "executions_per_s": n / elapsed,
            "cpu_seconds": cpu, "executions_per_cpu_s": n / cpu}


def tracked_multi(url: str, n_per_process: int, processes: int) -> dict[str, Any]:
    from tidyllm.mart import TidyMart

    mart = TidyMart(url)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, str(n_per_process), str(w)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for w in range(processes)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", "a tracking worker failed"
        before = _count(mart)  # after the workers' warm-up executions
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        runs = []
        for p in procs:
            assert p.stdout is not None
            runs.append(json.loads(p.stdout.readline()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.wait(timeout=120)
    if any(p.returncode for p in procs):
        raise SystemExit("a tracking worker failed; see its error above")
    total = sum(r["n"] for r in runs)
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    _check_rows(before, _count(mart), total)
    mart.close()
    return {"processes": processes, "executions": total, "seconds": wall, "executions_per_s": total / wall}


def _count(mart: Any) -> tuple[int, int]:
    ex = mart.sql("SELECT COUNT(*) AS n FROM executions WHERE module = 'bench'")["n"].iloc[0]
    st = mart.sql("SELECT COUNT(*) AS n FROM execution_steps s JOIN executions e ON e.id = s.execution_id "
                  "WHERE e.module = 'bench'")["n"].iloc[0]
    return int(ex), int(st)


def _check_rows(before: tuple[int, int], after: tuple[int, int], n: int) -> None:
    if (after[0] - before[0], after[1] - before[1]) != (n, 3 * n):
        raise SystemExit(f"expected {n} executions and {3 * n} steps written, found "
                         f"{after[0] - before[0]} and {after[1] - before[1]}")


# ------------------------------------------------------------------------------ a million rows


def step_rows(n: int) -> Iterator[tuple[Any, ...]]:
    """``n`` step rows (4 per execution), UUID-shaped ids in insertion order, timestamps 1 ms apart."""
    for i in range(n):
        e = i // 4
        us = i * 1000
        sec, micro = divmod(us, 1_000_000)
        day, sec = divmod(sec, 86_400)
        hour, sec = divmod(sec, 3600)
        minute, sec = divmod(sec, 60)
        yield (f"{i:08x}-0000-4000-8000-{i:012x}", f"{e:08x}-0000-4000-8000-{e:012x}", i % 4,
               ("prepare", "mlflow_execution", "postprocess", "result")[i % 4],
               '{"tokens_used": %d, "route": "chat-small"}' % (i % 997),
               f"2025-01-{1 + day:02d} {hour:02d}:{minute:02d}:{sec:02d}.{micro:06d}")


def execution_rows(n_steps: int) -> Iterator[tuple[Any, ...]]:
    for e in range((n_steps + 3) // 4):
        yield (f"{e:08x}-0000-4000-8000-{e:012x}", "bulk", "load", '{"route": "chat"}', "success",
               "2025-01-01 00:00:00.000000", "2025-01-01 00:00:01.000000", 1000.0, '{"ok": true}', None, None)


EXEC_COLUMNS = ("id", "module", "operation", "context", "status", "started_at", "ended_at", "duration_ms", "result",
                "error_type", "error_message")
STEP_COLUMNS = ("id", "execution_id", "seq", "name", "data", "recorded_at")


def bulk_insert_sqlite(path: str, n: int) -> float:
    import sqlite3

    t0 = time.perf_counter()
    conn = sqlite3.connect(path, timeout=60)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        with conn:
            conn.executemany(f"INSERT INTO executions ({', '.join(EXEC_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(EXEC_COLUMNS))})", execution_rows(n))
            conn.executemany(f"INSERT INTO execution_steps ({', '.join(STEP_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(STEP_COLUMNS))})", step_rows(n))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - t0


def bulk_insert_postgres(url: str, n: int) -> float:
    import psycopg
    import sqlalchemy as sa

    dsn = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY executions ({', '.join(EXEC_COLUMNS)}) FROM STDIN") as copy:
            for row in execution_rows(n):
                copy.write_row(row)
        with cur.copy(f"COPY execution_steps ({', '.join(STEP_COLUMNS)}) FROM STDIN") as copy:
            for row in step_rows(n):
                copy.write_row(row)
        cur.execute("ANALYZE executions")
        cur.execute("ANALYZE execution_steps")
    return time.perf_counter() - t0


def frame_load(url: str, n: int, repeat: int) -> dict[str, Any]:
    """Time ``frame("execution_steps")`` over ``n`` bulk-inserted rows, ``repeat`` times."""
    from tidyllm.mart import TidyMart

    TidyMart(url).close()
    if url.startswith("sqlite"):
        insert_s = bulk_insert_sqlite(url.split("sqlite:///", 1)[1], n)
    else:
        insert_s = bulk_insert_postgres(url, n)
    times, cpu = [], []
    for _ in range(repeat):
        mart = TidyMart(url)
        t0, c0 = time.perf_counter(), time.process_time()
        df = mart.frame("execution_steps")
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        mart.close()
        dtypes = {c: str(t) for c, t in df.dtypes.items()}
        if len(df) != n or dtypes != EXPECTED_DTYPES:
            raise SystemExit(f"frame has {len(df)} rows and dtypes {dtypes}; expected {n} and {EXPECTED_DTYPES}")
        del df
    return {"rows": n, "insert_s_untimed": insert_s, "seconds": times, "best_s": min(times),
            "median_s": statistics.median(times), "cpu_seconds": cpu, "median_cpu_s": statistics.median(cpu),
            "dtypes": EXPECTED_DTYPES}


# ------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executions", type=int, default=3000,
                        help="tracked executions, single process (default 3000)")
    parser.add_argument("--processes", type=int, default=4, help="processes of the multi-process run (default 4)")
    parser.add_argument("--per-process", type=int, default=1000,
                        help="tracked executions per process in the multi-process run (default 1000)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="step rows read into a frame (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed frame reads (default 3)")
    parser.add_argument("--postgres-url", default=os.environ.get("TIDYLLM_BENCH_POSTGRES_URL"),
                        help="PostgreSQL server for a scratch database (default $TIDYLLM_BENCH_POSTGRES_URL)")
    parser.add_argument("--skip-frame", action="store_true", help="only the tracked-execution runs")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "mart.json"),
                        help="JSON output (default bench/results/mart.json)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    results: dict[str, Any] = {"tracked": [], "frame": {}, "notes": []}
    with tempfile.TemporaryDirectory(prefix="tidyllm-mart-bench-") as tmp:
        backends: list[tuple[str, str, Any]] = [("sqlite", f"sqlite:///{Path(tmp) / 'track.db'}", None)]
        if args.postgres_url:
            backends.append(("postgresql", *postgres_database(args.postgres_url)))
        else:
            results["notes"].append("PostgreSQL skipped: no --postgres-url or TIDYLLM_BENCH_POSTGRES_URL")
        try:
            for name, url, _ in backends:
                print(f"{name}: {args.executions} tracked executions, 1 process ...", flush=True)
                results["tracked"].append({"backend": name, **tracked_single(url, args.executions)})
                print(f"{name}: {args.processes} x {args.per_process} tracked executions ...", flush=True)
                results["tracked"].append({"backend": name, **tracked_multi(url, args.per_process, args.processes)})
        finally:
            for _, _, drop in backends:
                if drop is not None:
                    drop()
        if not args.skip_frame:
            frame_backends: list[tuple[str, str, Any]] = [("sqlite", f"sqlite:///{Path(tmp) / 'frame.db'}", None)]
            if args.postgres_url:
                frame_backends.append(("postgresql", *postgres_database(args.postgres_url)))
            try:
                for name, url, _ in frame_backends:
                    print(f"{name}: bulk-inserting {args.rows:,} step rows, then timing frame() ...", flush=True)
                    results["frame"][name] = frame_load(url, args.rows, args.repeat)
            finally:
                for _, _, drop in frame_backends:
                    if drop is not None:
                        drop()
    load_after = os.getloadavg()

    print()
    print("Tracked executions (1 execution + 3 steps + result each)")
    header = f"{'backend':<11} {'processes':>9} {'executions':>10} {'seconds':>8} {'exec/s':>8} {'exec/CPU-s':>10}"
    print_header(header)
    for r in results["tracked"]:
        per_cpu = f"{r['executions_per_cpu_s']:>10.0f}" if "executions_per_cpu_s" in r else f"{'-':>10}"
        print(f"{r['backend']:<11} {r['processes']:>9} {r['executions']:>10} {r['seconds']:>8.2f} "
              f"{r['executions_per_s']:>8.0f} {per_cpu}")
    single_sqlite = next(r for r in results["tracked"] if r["backend"] == "sqlite" and r["processes"] == 1)
    print(f"target: >= 1,500 exec/s single-process SQLite -> "
          f"{'met' if single_sqlite['executions_per_s'] >= 1500 else 'MISSED'}")
    if results["frame"]:
        print()
        print(f"frame('execution_steps') over {args.rows:,} rows (typed: {EXPECTED_DTYPES})")
        header = f"{'backend':<11} {'best s':>7} {'median s':>9} {'median CPU s':>13} {'all runs s':>22}"
        print_header(header)
        for name, r in results["frame"].items():
            runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
            print(f"{name:<11} {r['best_s']:>7.2f} {r['median_s']:>9.2f} {r['median_cpu_s']:>13.2f} {runs:>22}")
        if "sqlite" in results["frame"] and args.rows == 1_000_000:
            met = results["frame"]["sqlite"]["median_s"] <= 1.5
            print(f"target: 1,000,000 rows <= 1.5 s on SQLite (median) -> {'met' if met else 'MISSED'}")
    for note in results["notes"]:
        print(f"note: {note}")
    print_load(load_before, load_after)

    targets = {"tracked_executions_per_s_single_sqlite": 1500, "frame_1m_rows_sqlite_s": 1.5}
    write_results(args.out, "mart", {**results, "targets": targets}, load_before, load_after,
                  packages=("tidyllm", "sqlalchemy", "pandas", "pyarrow", "psycopg", "adbc-driver-postgresql"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

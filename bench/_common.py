"""Helpers shared by the benchmark scripts: a scratch PostgreSQL database, percentiles, the results
table's header, and the JSON file every script writes (command, machine, load average, versions).

Imported by the scripts as ``from _common import ...`` (they run as ``python bench/<script>.py``, so
this folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable


def postgres_database(base_url: str) -> tuple[str, Callable[[], None]]:
    """A fresh database on ``base_url``'s server and a function that drops it."""
    import psycopg
    import sqlalchemy as sa

    base = sa.engine.make_url(base_url)
    if base.drivername == "postgresql":
        base = base.set(drivername="postgresql+psycopg")
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"tidyllm_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return base.set(database=name).render_as_string(hide_password=False), drop


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def versions(packages: Iterable[str]) -> dict[str, str]:
    """``{package: installed version or "not installed"}``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def print_header(header: str) -> None:
    """A results table's header line, underlined."""
    print(header)
    print("-" * len(header))


def print_load(before: tuple[float, ...], after: tuple[float, ...]) -> None:
    print(f"load average before/after: {before[0]:.2f} / {after[0]:.2f} on {os.cpu_count()} CPUs")


def write_results(path: str | Path, benchmark: str, fields: dict[str, Any], load_before: tuple[float, ...],
                  load_after: tuple[float, ...], packages: Iterable[str]) -> None:
    """Write ``{benchmark, command, **fields, machine, versions, measured_at}`` as JSON to ``path``."""
    out = {"benchmark": benchmark, "command": " ".join([Path(sys.executable).name, *sys.argv]), **fields,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "loadavg_before": load_before, "loadavg_after": load_after},
           "versions": versions(packages), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")

"""Red team: the settlement write fails (database locked past its timeout, disk full, server restarting).

On the old main a failed settlement was logged once and dropped: answered calls were never charged (with
admission credit, 29 calls answered after the disk filled and none was recorded). Now the write is kept in
the process's journal and retried; if the process ends first, the next one on this host replays it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.gateway.simulator import Simulator

from adversarial._redteam import META, MSG, ROUTES, assert_books_agree, books, sim_prices
from adversarial.test_forged_admission import _settled
from govhelpers import sim_router

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=5, latency_scale=0.0) as s:
        yield s


class _Outage:
    """The database refuses every settlement write while ``down`` is set (as a locked or full one does)."""

    def __init__(self, platform: Any) -> None:
        self.down = threading.Event()
        self.refused = 0
        original = platform.governor.apply

        def apply(op: Any) -> bool:
            if self.down.is_set():
                self.refused += 1
                raise sqlite3.OperationalError("database is locked")
            return original(op)

        platform.governor.apply = apply


def test_refused_settlements_are_kept_and_retried(db_url: str, sim: Simulator) -> None:
    sim.reset_stats()
    platform = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
    try:
        platform.budgets.set("department", "risk", 5.0, "month")
        router = sim_router(platform, sim.url, routes=ROUTES)
        outage = _Outage(platform)
        outage.down.set()
        for _ in range(30):  # a busy caller: most of these are admitted from credit
            router.completion(model="chat", messages=MSG, max_tokens=16, metadata=dict(META))
        # the calls returned to their caller although nothing could be written
        deadline = time.monotonic() + 10
        while outage.refused < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outage.refused >= 30 and platform.governor.spool.pending > 0
        outage.down.clear()  # the database is back: the retry thread writes what was kept
        platform.budgets.credit.return_all()
        _settled(platform, 30)
        b = books(platform, sim, sim_prices())
        assert b.answered == 30
        assert_books_agree(b, limit=5.0)
        assert platform.audit.verify().ok
    finally:
        tidyllm.uninstall()


CHILD = r"""
import sqlite3, sys
sys.path.insert(0, sys.argv[3])
import tidyllm
from govhelpers import sim_router
from adversarial._redteam import META, MSG, ROUTES
platform = tidyllm.install(database_url=sys.argv[1], routing={"strategy": "cheapest"})
router = sim_router(platform, sys.argv[2], routes=ROUTES)
def refuse(op):
    raise sqlite3.OperationalError("disk I/O error")
platform.governor.apply = refuse  # the disk filled: no settlement can be written before this process ends
for _ in range(12):
    router.completion(model="chat", messages=MSG, max_tokens=16, metadata=dict(META))
"""


def test_a_process_that_ends_with_kept_settlements_is_replayed_by_the_next(db_url: str, sim: Simulator) -> None:
    sim.reset_stats()
    platform = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
    try:
        platform.budgets.set("department", "risk", 5.0, "month")
        done = subprocess.run([sys.executable, "-c", CHILD, db_url, sim.url, str(TESTS)], capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert books(platform, sim, sim_prices()).charged_rows < 12  # the child could write none of them
        assert platform.governor.recover() >= 1  # what the next process on this host does at start-up
        platform.budgets.reconcile()
        b = books(platform, sim, sim_prices())
        assert b.answered == 12
        assert_books_agree(b, limit=5.0)
        assert b.reserved_usd == pytest.approx(0.0, abs=1e-12)
        assert platform.audit.verify().ok
        assert not list(platform.governor.spool.directory.glob("*.jsonl")) or all(
            p.name == platform.governor.spool.path.name for p in platform.governor.spool.directory.glob("*.jsonl"))
    finally:
        tidyllm.uninstall()

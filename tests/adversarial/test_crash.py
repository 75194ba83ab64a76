"""Red team: a process dies while its calls are at the provider.

On the old main the lease expired after its TTL and the reserved amount was *released*: settled spend 0.995x
the limit while the upstream billed 1.055x; and a killed process's admission-credit block (about half of a
small budget) stayed reserved for the whole lease, refusing every other caller for 302.8 s at the default TTL.
Now a dead owner's leases are reclaimed at once: its in-flight calls are charged at their worst case, the rest
goes back, so the others are admitted within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
import pytest
import sqlalchemy as sa

import tidyllm
from tidyllm.gateway.simulator import Simulator

from adversarial._redteam import META, MSG, assert_books_agree, books
from govhelpers import CALL_ROWS

TESTS = Path(__file__).resolve().parents[1]
SLOW = {"ep-slow": ("sim-gpt-large", 10.0, 30.0)}

BUSY = r"""
import sys, threading
sys.path.insert(0, sys.argv[3])
import tidyllm
from govhelpers import sim_router
from adversarial._redteam import META, MSG
platform = tidyllm.install(database_url=sys.argv[1], routing={"strategy": "cheapest"})
router = sim_router(platform, sys.argv[2], routes={"ep-slow": ("sim-gpt-large", 10.0, 30.0)}, timeout=120)
def call():
    router.completion(model="chat", messages=MSG, max_tokens=50, metadata=dict(META))
threads = [threading.Thread(target=call) for _ in range(6)]
for t in threads:
    t.start()
    threading.Event().wait(0.2)   # a busy caller: the second call on takes an admission-credit block
for t in threads:
    t.join()
"""


def test_a_killed_process_is_charged_for_what_reached_the_provider_and_frees_the_rest(db_url: str) -> None:
    with Simulator(seed=9, latency_scale=30.0) as slow:  # answers take ~45 s: the process dies first
        platform = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
        try:
            platform.budgets.set("department", "risk", 0.2, "month")
            platform.prices.set("ep-slow", 10.0, 30.0)
            proc = subprocess.Popen([sys.executable, "-c", BUSY, db_url, slow.url, str(TESTS)],
                                    stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 90
                while slow.stats()["total"] < 6:  # every call is at the provider
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, slow.stats()
                    time.sleep(0.1)
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            held = platform.budgets.status().iloc[0]
            assert held["reserved_usd"] > 0.05  # the first call's lease and a credit block
            # another caller needs the money: admitted at once, not after the 300 s lease
            started = time.monotonic()
            gov = platform.governor
            admission = gov.admit(ctx=gov.context(dict(META)), route="ep-slow", requested_model="chat",
                                  messages=MSG, max_tokens=50)
            assert time.monotonic() - started < 5.0 and admission.reservation_id
            with platform.mart.store.begin() as conn:
                rows = conn.execute(sa.text("SELECT status, cost_usd, reserved_usd FROM llm_calls "
                                            "WHERE id <> :me"), {"me": admission.call_id}).all()
            assert len(rows) == 6 and {r[0] for r in rows} == {"unsettled"}  # every call the provider got
            # the six calls are charged at their worst case; the block's unused credit went back
            charged = sum(r[1] for r in rows)
            status = platform.budgets.status().iloc[0]
            assert status["spent_usd"] == pytest.approx(charged)
            assert status["reserved_usd"] == pytest.approx(admission.reserved_usd)
            # the provider bills what it answered: never more than what tidyllm charged
            stats = slow.stats()
            billed = (stats["billed"]["sim-gpt-large"]["prompt_tokens"] * 10.0
                      + stats["billed"]["sim-gpt-large"]["completion_tokens"] * 30.0) / 1e6
            assert charged >= billed
            audit = platform.audit.frame(decision=CALL_ROWS)
            assert (audit["status"] == "unsettled").sum() == 6 and platform.audit.verify().ok
        finally:
            tidyllm.uninstall()

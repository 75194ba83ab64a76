"""Red team: a script that makes its calls and exits at once.

On the old main, a script that made its calls with ``asyncio.run(...)`` and exited lost the settlement of
its last calls (``cannot schedule new futures after interpreter shutdown``): they stayed ``pending`` with
no audit row, and their reservations later went back to the budget. Admission-credit calls left no row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.gateway.simulator import Simulator

from adversarial._redteam import assert_books_agree, books, sim_prices

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[3])
import litellm, tidyllm
from govhelpers import sim_router
from adversarial._redteam import META, MSG, ROUTES
platform = tidyllm.install(database_url=sys.argv[1], routing={"strategy": "cheapest"})
platform.prices.set("openai/sim-gpt-small", 1.0, 2.0)
router = sim_router(platform, sys.argv[2], routes=ROUTES)
plain = dict(model="openai/sim-gpt-small", api_base=sys.argv[2], api_key="sk-test-not-real", messages=MSG,
             max_tokens=16, metadata=dict(META))

async def main():
    # a busy caller (admission credit), then plain acompletion calls (the pre-call hook), all at once
    await asyncio.gather(*(router.acompletion(model="chat", messages=MSG, max_tokens=16, metadata=dict(META))
                           for _ in range(12)))
    await asyncio.gather(*(litellm.acompletion(**plain) for _ in range(6)))

asyncio.run(main())
# exit right away: the last success events are still queued in LiteLLM
"""


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=3, latency_scale=0.0) as s:
        yield s


def test_calls_made_right_before_exit_are_settled_and_audited(db_url: str, sim: Simulator) -> None:
    sim.reset_stats()
    platform = tidyllm.install(database_url=db_url)
    try:
        platform.budgets.set("department", "risk", 5.0, "month")
        done = subprocess.run([sys.executable, "-c", SCRIPT, db_url, sim.url, str(TESTS)],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "cannot schedule new futures" not in done.stderr
        b = books(platform, sim, sim_prices())
        assert b.answered == 18
        assert_books_agree(b, limit=5.0)
        assert b.reserved_usd == pytest.approx(0.0, abs=1e-12)  # the credit block went back at exit
        assert platform.audit.verify().ok
    finally:
        tidyllm.uninstall()

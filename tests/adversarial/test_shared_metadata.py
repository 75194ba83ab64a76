"""Red team: one ``metadata`` dict reused across calls, threads and coroutines (a very common pattern).

On the old main the Router wrote its stamp into the caller's own dict: later calls passed unadmitted and
unrecorded, and concurrent calls overwrote each other's stamps (1-4 of 20 answered calls were recorded).
tidyllm now works on its own copy: the caller's dict never changes, and every call is its own."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import pytest

import tidyllm
from tidyllm.gateway.simulator import Simulator

from govhelpers import sim_router
from adversarial._redteam import META, MSG, ROUTES, assert_books_agree, books, sim_prices
from adversarial.test_forged_admission import _settled


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=11, latency_scale=0.0) as s:
        yield s


@pytest.fixture
def platform(db_url: str, sim: Simulator) -> Iterator[Any]:
    sim.reset_stats()
    p = tidyllm.install(database_url=db_url, routing={"strategy": "cheapest"})
    p.budgets.set("department", "risk", 5.0, "month")
    yield p
    tidyllm.uninstall()


def test_one_dict_reused_in_a_loop_threads_and_coroutines(platform: Any, sim: Simulator) -> None:
    router = sim_router(platform, sim.url, routes=ROUTES)
    md = dict(META)
    for _ in range(5):
        router.completion(model="chat", messages=MSG, max_tokens=16, metadata=md)
    threads = [threading.Thread(target=router.completion, kwargs=dict(model="chat", messages=MSG, max_tokens=16,
                                                                      metadata=md)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    async def many() -> None:
        await asyncio.gather(*(router.acompletion(model="chat", messages=MSG, max_tokens=16, metadata=md)
                               for _ in range(7)))

    asyncio.run(many())
    assert "tidyllm" not in md and "tidyllm_tried" not in md  # never written into the caller's dict
    platform.budgets.credit.return_all()
    _settled(platform, 20)
    b = books(platform, sim, sim_prices())
    assert b.answered == 20
    assert_books_agree(b, limit=5.0)
    assert platform.audit.verify().ok

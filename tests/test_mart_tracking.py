"""track_execution's write path: one transaction per block, running rows for long blocks, failures."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from tidyllm.errors import StorageError
from tidyllm.mart import TidyMart, tracking
from tidyllm.mart.schema import execution_steps, executions


def _wait_until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _raw_rows(mart: TidyMart, table: sa.Table) -> list[Any]:
    with mart.store.begin() as conn:
        return conn.execute(sa.select(table)).all()


def test_a_short_block_is_one_write_with_everything(mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[Any, ...]] = []
    real = tracking._write
    monkeypatch.setattr(tracking, "_write", lambda store, ex, running, steps: (
        writes.append((ex, running, steps)), real(store, ex, running, steps))[1])
    with mart.track_execution("m", "op", {"k": [1, 2], "when": dt.date(2025, 1, 2)}) as t:
        t.record_step("a", {"x": 1.5})
        t.record_step("b")
        t.record_result({"ok": True})
    assert len(writes) == 1 and writes[0][1] == [] and len(writes[0][2]) == 2  # no separate running row
    row = _raw_rows(mart, executions)[0]._mapping
    assert row["status"] == "success" and row["context"] == {"k": [1, 2], "when": "2025-01-02"}
    assert row["result"] == {"ok": True} and row["error_type"] is None and row["error_message"] is None
    # what SQLAlchemy reads back is what the tracker measured, timezone and microseconds included
    started = row["started_at"] if row["started_at"].tzinfo else row["started_at"].replace(tzinfo=dt.timezone.utc)
    assert started == t._started_at and row["duration_ms"] >= 0
    steps = sorted(_raw_rows(mart, execution_steps), key=lambda r: r.seq)
    assert [(s.seq, s.name, s.data) for s in steps] == [(0, "a", {"x": 1.5}), (1, "b", {})]
    recorded = steps[0].recorded_at
    recorded = recorded if recorded.tzinfo else recorded.replace(tzinfo=dt.timezone.utc)
    assert recorded == t.steps[0]["recorded_at"]


def test_result_none_is_null_and_values_match_sqlalchemy_encoding(mart: TidyMart) -> None:
    with mart.track_execution("m", "op") as t:
        pass
    with mart.store.begin() as conn:  # SQL NULL, not the JSON text "null"
        assert conn.execute(sa.text("SELECT COUNT(*) FROM executions WHERE result IS NULL")).scalar() == 1
        if mart.store.dialect == "sqlite":
            text = conn.execute(sa.text("SELECT started_at FROM executions")).scalar()
            assert text == t._started_at.strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's SQLite format
    ex = mart.executions()
    assert ex["started_at"].iloc[0] == pd.Timestamp(t._started_at)


def test_a_long_block_is_visible_while_it_runs(mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "RUNNING_ROW_AFTER_S", 0.05)
    with mart.track_execution("slow", "op", {"i": 1}) as t:
        t.record_step("first", {})
        _wait_until(lambda: not mart.executions().empty, "the running row never appeared")
        running = mart.executions().iloc[0]
        assert running["id"] == t.execution_id and running["status"] == "running"
        assert pd.isna(running["ended_at"]) and running["context"] == '{"i":1}'
        assert mart.steps().empty  # steps come with the end of the block
        t.record_result(42)
    done = mart.executions()
    assert len(done) == 1 and done.iloc[0]["status"] == "success" and done.iloc[0]["result"] == "42"
    assert done.iloc[0]["started_at"] == running["started_at"] and len(mart.steps()) == 1


def test_many_long_blocks_at_once(mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "RUNNING_ROW_AFTER_S", 0.02)
    trackers = [mart.track_execution("many", "op", {"i": i}) for i in range(20)]
    for t in trackers:
        t.__enter__()
    _wait_until(lambda: len(mart.executions()) == 20, "the running rows never appeared")
    assert set(mart.executions()["status"]) == {"running"}
    for i, t in enumerate(trackers):
        t.__exit__(None, None, None) if i % 2 else t.__exit__(ValueError, ValueError("odd"), None)
    ex = mart.executions()
    assert len(ex) == 20 and sorted(ex["status"]) == ["error"] * 10 + ["success"] * 10


KILLED = """
import os, sys, time
from tidyllm.mart import TidyMart, tracking
tracking.RUNNING_ROW_AFTER_S = 0.05
mart = TidyMart(sys.argv[1])
with mart.track_execution("doomed", "op", {"pid": os.getpid()}) as t:
    t.record_step("started", {})
    time.sleep(0.5)
    os._exit(9)  # the process dies inside the block: no __exit__, no final row
"""


def test_a_killed_process_leaves_its_running_row(db_url: str) -> None:
    TidyMart(db_url).close()
    proc = subprocess.run([sys.executable, "-c", KILLED, db_url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    ex = TidyMart(db_url).executions()
    assert len(ex) == 1 and ex.iloc[0]["status"] == "running" and pd.isna(ex.iloc[0]["ended_at"])


def test_keyboard_interrupt_is_recorded_and_reraised(mart: TidyMart) -> None:
    with pytest.raises(KeyboardInterrupt):
        with mart.track_execution("m", "op"):
            raise KeyboardInterrupt
    row = mart.executions().iloc[0]
    assert row["status"] == "error" and row["error_type"] == "KeyboardInterrupt"


def _fail_step_inserts(mart: TidyMart) -> None:
    with mart.store.begin() as conn:
        if mart.store.dialect == "sqlite":
            conn.execute(sa.text("CREATE TRIGGER no_steps BEFORE INSERT ON execution_steps "
                                 "BEGIN SELECT RAISE(ABORT, 'steps refused'); END"))
        else:
            conn.execute(sa.text("CREATE FUNCTION no_steps() RETURNS trigger AS $$ BEGIN "
                                 "RAISE EXCEPTION 'steps refused'; END $$ LANGUAGE plpgsql"))
            conn.execute(sa.text("CREATE TRIGGER no_steps BEFORE INSERT ON execution_steps "
                                 "FOR EACH ROW EXECUTE FUNCTION no_steps()"))


def test_a_failed_write_is_a_storage_error_and_writes_nothing(mart: TidyMart) -> None:
    _fail_step_inserts(mart)
    with pytest.raises(StorageError, match="steps refused"):
        with mart.track_execution("m", "op") as t:
            t.record_step("s", {})
    assert mart.executions().empty  # one transaction: the execution row went with the steps
    with mart.track_execution("m", "op"):  # the pooled connection is usable again
        pass
    assert len(mart.executions()) == 1

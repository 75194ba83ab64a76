"""mart.frame on SQLite: the column-wise read gives exactly the frame the row-by-row read gives."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest
import sqlalchemy as sa

from tidyllm.mart import TidyMart, frames
from tidyllm.mart.schema import TABLES, llm_calls


@pytest.fixture
def sqlite_mart(tmp_path: Path) -> Iterator[TidyMart]:
    mart = TidyMart(f"sqlite:///{tmp_path / 'frames.db'}")
    yield mart
    mart.close()


def _both(mart: TidyMart, monkeypatch: pytest.MonkeyPatch, table: str, **kwargs: Any) -> pd.DataFrame:
    """The frame column-wise, after checking it against the row-by-row read and that it went column-wise."""
    used: list[bool] = []
    real = frames._sqlite_columnar

    def spy(*args: Any, **kw: Any) -> Any:
        out = real(*args, **kw)
        used.append(out is not None)
        return out

    monkeypatch.setattr(frames, "_sqlite_columnar", spy)
    fast = mart.frame(table, **kwargs)
    monkeypatch.setattr(frames, "_sqlite_columnar", lambda *a, **k: None)
    slow = mart.frame(table, **kwargs)
    monkeypatch.setattr(frames, "_sqlite_columnar", real)
    pd.testing.assert_frame_equal(fast, slow, check_exact=True)
    assert [str(t) for t in fast.dtypes] == [str(t) for t in slow.dtypes]
    _both.column_wise = bool(used and used[0])  # type: ignore[attr-defined]
    return fast


def _populate(mart: TidyMart, n: int = 40) -> None:
    for i in range(n):
        try:
            with mart.track_execution(f"mod{i % 3}", "op", {"i": i, "text": "ünïcödé ✓", "q": "it's \"quoted\""}) as t:
                for s in range(i % 4):
                    t.record_step(f"step{s}", {"s": s, "big": 10 ** 18 + s, "f": 0.1 + 0.2})
                if i % 5 == 0:
                    raise ValueError(f"failure {i}")
                t.record_result(None if i % 2 else {"i": i})
        except ValueError:
            pass


def test_tracked_tables_column_wise_match_row_wise(sqlite_mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    _populate(sqlite_mart)
    ex = _both(sqlite_mart, monkeypatch, "executions")
    assert _both.column_wise and len(ex) == 40  # type: ignore[attr-defined]
    assert ex["error_type"].isna().sum() == 32 and ex["result"].isna().sum() == 24  # NULLs stay None
    assert ex["error_type"].dropna().eq("ValueError").all()
    steps = _both(sqlite_mart, monkeypatch, "execution_steps", parse_json=True)
    assert _both.column_wise and len(steps) == 60  # type: ignore[attr-defined]
    assert steps["data"].iloc[0]["big"] >= 10 ** 18 and str(steps["seq"].dtype) == "Int64"
    _both(sqlite_mart, monkeypatch, "executions", module="mod1", columns=["id", "duration_ms", "started_at"])
    _both(sqlite_mart, monkeypatch, "executions", module=["mod0", "mod2"], limit=5)
    _both(sqlite_mart, monkeypatch, "execution_steps", name="step2", parse_json=True)
    _both(sqlite_mart, monkeypatch, "executions", module="nobody")


def test_every_table_empty_or_not(sqlite_mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    for table in TABLES:
        _both(sqlite_mart, monkeypatch, table)
    now = dt.datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=dt.timezone.utc)
    with sqlite_mart.store.begin() as conn:
        conn.execute(llm_calls.insert(), [
            {"id": f"call-{i}", "started_at": now, "ended_at": None if i % 2 else now, "call_type": "completion",
             "status": "success", "stream": bool(i % 3), "prompt_tokens": None if i % 4 else i,
             "cost_usd": [0.1 + 0.2, 1e-300, 123456789.123456789, None, -0.0, 2.5e-7][i % 6],
             "latency_ms": float(i)} for i in range(30)])
    calls = _both(sqlite_mart, monkeypatch, "llm_calls")
    assert _both.column_wise  # type: ignore[attr-defined]
    assert calls["cost_usd"].iloc[0] == 0.1 + 0.2 and calls["cost_usd"].iloc[1] == 1e-300  # floats exact
    assert calls["ended_at"].isna().sum() == 15 and calls["prompt_tokens"].isna().sum() == 22
    assert calls["started_at"].iloc[0] == pd.Timestamp(now) and calls["stream"].sum() == 20


def test_many_blocks_with_gaps_on_the_worker_thread(sqlite_mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "_CHUNK_ROWS", 7)
    monkeypatch.setattr(frames, "_READ_AHEAD", True)
    _populate(sqlite_mart, 200)
    with sqlite_mart.store.begin() as conn:  # holes in the rowids: an empty range, then sparse ones
        conn.execute(sa.text("DELETE FROM execution_steps WHERE rowid BETWEEN 20 AND 80 OR rowid % 5 = 0"))
        conn.execute(sa.text("DELETE FROM executions WHERE rowid > 30 AND rowid < 120"))
    steps = _both(sqlite_mart, monkeypatch, "execution_steps")
    ex = _both(sqlite_mart, monkeypatch, "executions")
    assert _both.column_wise and len(ex) == 111 and steps["id"].is_unique  # type: ignore[attr-defined]
    assert list(steps.index) == list(range(len(steps)))


def test_values_it_cannot_represent_go_row_by_row(sqlite_mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    with sqlite_mart.track_execution("m", "op") as t:
        t.record_step("has \x1f the separator", {"x": 1})
    _both(sqlite_mart, monkeypatch, "execution_steps")
    assert not _both.column_wise  # type: ignore[attr-defined]
    with sqlite_mart.store.begin() as conn:
        conn.execute(sa.text("UPDATE execution_steps SET name = 'plain', seq = 2.5"))  # not an integer
    _both(sqlite_mart, monkeypatch, "execution_steps")
    assert not _both.column_wise  # type: ignore[attr-defined]
    with sqlite_mart.store.begin() as conn:
        conn.execute(sa.text("UPDATE execution_steps SET seq = 0"))
    _both(sqlite_mart, monkeypatch, "execution_steps")
    assert _both.column_wise  # type: ignore[attr-defined]


def test_other_timestamp_spellings_parse_as_row_by_row(sqlite_mart: TidyMart,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [("2026-01-05 09:30:00+00:00", None), ("2026-01-05T10:30:00.5+02:00", "2026-01-05 09:30:00"),
            ("2024-02-29 23:59:59.999999", "2024-02-29 23:59:59.999999")]
    with sqlite_mart.store.begin() as conn:
        for i, (started, ended) in enumerate(rows):
            conn.execute(sa.text("INSERT INTO executions (id, module, operation, context, status, started_at, "
                                 "ended_at) VALUES (:id, 'm', 'op', '{}', 'success', :s, :e)"),
                         {"id": str(uuid.uuid4()), "s": started, "e": ended})
    ex = _both(sqlite_mart, monkeypatch, "executions")
    assert _both.column_wise  # type: ignore[attr-defined]
    assert list(ex["started_at"]) == [pd.Timestamp("2026-01-05 09:30", tz="UTC"),
                                      pd.Timestamp("2026-01-05 08:30:00.5", tz="UTC"),
                                      pd.Timestamp("2024-02-29 23:59:59.999999", tz="UTC")]
    with sqlite_mart.store.begin() as conn:
        conn.execute(sa.text("UPDATE executions SET started_at = '2025-02-30 00:00:00.000000'"))
    with pytest.raises(ValueError):  # no 30 February, either way
        sqlite_mart.frame("executions")


def test_a_whole_table_read_is_one_snapshot(sqlite_mart: TidyMart, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "_CHUNK_ROWS", 5)
    _populate(sqlite_mart, 100)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            with sqlite_mart.store.begin() as conn:
                conn.execute(sa.text("UPDATE execution_steps SET seq = seq + 1000"))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(10):
            seq = sqlite_mart.frame("execution_steps")["seq"]
            assert len(set(seq // 1000)) == 1  # every row from the same committed state
    finally:
        stop.set()
        thread.join()


def test_frames_keep_their_dtypes_on_both_backends(mart: TidyMart) -> None:
    """The same documented dtypes on both backends (the PostgreSQL read is Arrow-native)."""
    _populate(mart, 10)
    ex, steps = mart.executions(), mart.steps()
    assert str(ex["started_at"].dtype) == "datetime64[us, UTC]" and ex["duration_ms"].dtype == "float64"
    assert ex["error_type"].dtype == object and str(steps["seq"].dtype) == "Int64"
    assert {type(v) for v in ex["result"]} <= {str, type(None)}

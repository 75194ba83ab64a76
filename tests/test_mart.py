"""TidyMart: tracking, outcomes, frames, migrations, errors — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from tidyllm.mart.store import HEAD_REVISION

from tidyllm.errors import ConfigurationError, SchemaVersionError, StorageError
from tidyllm.mart import TidyMart, get_tidymart
from tidyllm.mart.store import HEAD_REVISION

DATA = Path(__file__).parent / "data"


def test_seed_track_execution_example_runs_as_written(mart: TidyMart) -> None:
    # The seed's example, apart from imports (docs/seed: TidyMartMLFlowIntegration.track_mlflow_request)
    route, request_data, user_context = "chat", {"model": "gpt"}, {"user_id": "ana", "department": "risk"}
    with mart.track_execution("gateway", "mlflow_query", {
        "route": route,
        "model": request_data.get("model"),
        "user_id": user_context.get("user_id"),
        "department": user_context.get("department")
    }) as tracker:
        tracker.record_step("mlflow_execution", {
            "route_used": route,
            "tokens_used": 12,
            "cost_usd": 0.0004,
            "latency_ms": 230,
        })
        tracker.record_result({"choices": [], "usage": {"total_tokens": 12}})
    ex = mart.executions()
    assert len(ex) == 1
    row = ex.iloc[0]
    assert row["id"] == tracker.execution_id and row["status"] == "success"
    assert row["module"] == "gateway" and row["operation"] == "mlflow_query"
    assert row["duration_ms"] >= 0 and row["ended_at"] >= row["started_at"]
    ctx = mart.frame("executions", parse_json=True).iloc[0]["context"]
    assert ctx["department"] == "risk" and ctx["route"] == "chat"
    steps = mart.frame("execution_steps", parse_json=True)
    assert list(steps["name"]) == ["mlflow_execution"] and steps.iloc[0]["data"]["tokens_used"] == 12
    assert tracker.steps[0]["name"] == "mlflow_execution"


def test_exception_is_recorded_and_reraised(mart: TidyMart) -> None:
    with pytest.raises(KeyError):
        with mart.track_execution("workflow", "analysis", {}) as tracker:
            tracker.record_step("started", {})
            raise KeyError("missing-field")
    row = mart.executions().iloc[0]
    assert row["status"] == "error" and row["error_type"] == "KeyError" and "missing-field" in row["error_message"]
    assert len(mart.steps(execution_id=tracker.execution_id)) == 1


def test_tracking_in_threads_and_async(mart: TidyMart) -> None:
    def work(i: int) -> None:
        with mart.track_execution("threads", "op", {"i": i}) as t:
            for s in range(3):
                t.record_step(f"s{s}", {"i": i})
            t.record_result(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    async def main() -> None:
        async def one(i: int) -> None:
            async with mart.track_execution("async", "op", {"i": i}) as t:
                t.record_step("awaited", {"i": i})
                await asyncio.sleep(0)
                t.record_result({"i": i})

        await asyncio.gather(*(one(i) for i in range(5)))

    asyncio.run(main())
    ex = mart.executions()
    assert (ex["module"] == "threads").sum() == 8 and (ex["module"] == "async").sum() == 5
    assert set(ex["status"]) == {"success"}
    assert len(mart.steps()) == 8 * 3 + 5


def test_bad_tracking_input_is_a_clear_error(mart: TidyMart) -> None:
    with pytest.raises(TypeError, match="module"):
        mart.track_execution("", "op")
    with pytest.raises(TypeError, match="mapping"):
        mart.track_execution("m", "op", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert mart.executions().empty


def test_learn_and_optimal_config(mart: TidyMart) -> None:
    assert mart.get_optimal_config("gateway", {"department": "risk"}) == {
        "parameters": {}, "confidence": 0.0, "samples": 0, "source": "default"}
    for score in (0.9, 0.8, 0.85):
        mart.learn_from_execution({"module": "gateway", "operation": "mlflow_route", "route": "chat-a",
                                   "performance_score": score, "department": "risk", "latency_ms": 200})
    mart.learn_from_execution({"module": "gateway", "route": "chat-b", "performance_score": 0.95,
                               "department": "risk"})
    mart.learn_from_execution({"module": "gateway", "route": "chat-c", "performance_score": 1.0,
                               "department": "finance"})
    best = mart.get_optimal_config("gateway", {"department": "risk", "use_case": "qa"})
    assert best["source"] == "history" and best["parameters"] == {"route": "chat-b"}
    assert best["preferred_route"] == "chat-b"  # the seed's key, at the top level too
    assert best["samples"] == 1 and 0 < best["confidence"] < 1
    assert mart.get_optimal_config("gateway", {"department": "finance"})["parameters"] == {"route": "chat-c"}
    out = mart.outcomes(parse_json=True)
    assert len(out) == 5 and out["performance_score"].dtype == "float64"
    assert out.iloc[0]["data"]["latency_ms"] == 200


def test_learn_rejects_bad_outcomes_and_writes_nothing(mart: TidyMart) -> None:
    for bad, match in [({}, "module"), ({"module": "g", "performance_score": 1.5}, r"\[0, 1\]"),
                       ({"module": "g", "performance_score": "high"}, "number"),
                       ({"module": "g", "context": "risk"}, "mapping")]:
        with pytest.raises(ConfigurationError, match=match):
            mart.learn_from_execution(bad)
    assert mart.outcomes().empty


def test_registered_optimizer_answers_for_its_module(mart: TidyMart) -> None:
    mart.register_optimizer("gateway", lambda ctx: {"parameters": {"preferred_route": "x"}, "confidence": 0.5,
                                                    "samples": 3, "source": "bandit"})
    assert mart.get_optimal_config("gateway", {})["source"] == "bandit"
    assert mart.get_optimal_config("other", {})["source"] == "default"
    seen = []
    mart.add_learner(seen.append)
    mart.learn_from_execution({"module": "gateway", "route": "r", "performance_score": 0.5})
    assert seen and seen[0]["parameters"] == {"route": "r"}


def test_frames_have_real_dtypes_even_when_empty(mart: TidyMart) -> None:
    for table in mart.tables():
        df = mart.frame(table)
        assert df.empty
    calls = mart.frame("llm_calls")
    assert str(calls["started_at"].dtype) == "datetime64[us, UTC]"
    assert calls["cost_usd"].dtype == "float64" and str(calls["prompt_tokens"].dtype) == "Int64"
    assert str(calls["stream"].dtype) == "boolean"


def test_frame_filters_and_errors(mart: TidyMart) -> None:
    for module in ("a", "b", "b"):
        with mart.track_execution(module, "op"):
            pass
    assert len(mart.frame("executions", module="b")) == 2
    assert len(mart.frame("executions", module=["a", "b"])) == 3
    assert len(mart.frame("executions", limit=1, order_by="-started_at")) == 1
    with pytest.raises(ConfigurationError, match="unknown mart table"):
        mart.frame("nope")
    with pytest.raises(ConfigurationError, match="no column"):
        mart.frame("executions", colour="red")


def test_get_tidymart_uses_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'via-settings.db'}"
    m1 = get_tidymart(database_url=url)
    assert m1 is get_tidymart(database_url=url)
    (tmp_path / "tidyllm.yaml").write_text(f"database_url: {url}\n")
    assert get_tidymart() is m1


def test_default_database_location(tmp_path: Path) -> None:
    mart = get_tidymart()
    assert str(tmp_path / "home" / "tidyllm.db") in mart.url
    assert (tmp_path / "home" / "tidyllm.db").exists()


def test_old_database_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    shutil.copy(DATA / "mart_0001.db", db)
    with pytest.raises(SchemaVersionError, match="tidyllm db upgrade"):
        TidyMart(f"sqlite:///{db}", upgrade=False)
    mart = TidyMart(f"sqlite:///{db}")
    assert mart.store.current_revision() == HEAD_REVISION
    ex = mart.executions()
    assert list(ex["id"]) == ["11111111-1111-1111-1111-111111111111"]
    assert ex["started_at"].iloc[0] == pd.Timestamp("2026-01-05 09:30", tz="UTC")
    assert mart.get_optimal_config("gateway", {"department": "risk"})["parameters"] == {"route": "chat-a"}
    assert mart.frame("llm_calls").empty  # tables of 0002 now exist


def test_cli_db_upgrade_and_path(tmp_path: Path) -> None:
    db = tmp_path / "cli-old.db"
    shutil.copy(DATA / "mart_0001.db", db)
    from click.testing import CliRunner

    from tidyllm.cli import main

    result = CliRunner().invoke(main, ["db", "upgrade", "--database-url", f"sqlite:///{db}"])
    assert result.exit_code == 0, result.output
    assert f"schema at {HEAD_REVISION}" in result.output
    result = CliRunner().invoke(main, ["db", "path"])
    assert result.exit_code == 0 and "tidyllm.db" in result.output


def test_newer_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    TidyMart(f"sqlite:///{db}").close()
    eng = sa.create_engine(f"sqlite:///{db}")
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0999'"))
    eng.dispose()
    with pytest.raises(SchemaVersionError, match="newer than this tidyllm"):
        TidyMart(f"sqlite:///{db}")


def test_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "theirs.db"
    eng = sa.create_engine(f"sqlite:///{db}")
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE executions (x INTEGER)"))
    with pytest.raises(StorageError, match="not a tidyllm mart"):
        TidyMart(f"sqlite:///{db}")
    with eng.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["executions"]
    eng.dispose()


def test_bad_urls_and_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a database URL"):
        TidyMart("not a url")
    with pytest.raises(ConfigurationError, match="supports sqlite and postgresql"):
        TidyMart("mysql://u@h/db")
    with pytest.raises(ConfigurationError, match="in-memory"):
        TidyMart("sqlite://")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0":
            # root ignores directory permissions: use a path under a regular file instead
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = blocker / "sub" / "t.db"
        else:
            target = locked / "sub" / "t.db"
        with pytest.raises(StorageError, match="folder"):
            TidyMart(f"sqlite:///{target}")
        assert not (locked / "sub").exists()
    finally:
        locked.chmod(0o700)


def test_failed_open_leaves_no_created_folders(tmp_path: Path) -> None:
    # the folders can be created but the file cannot (its name is longer than the file system allows)
    target = tmp_path / "fresh" / "deep" / ("x" * 300 + ".db")
    with pytest.raises(StorageError, match="cannot open the mart"):
        TidyMart(f"sqlite:///{target}")
    assert not (tmp_path / "fresh").exists()


WORKER = """
import sys
from tidyllm.mart import TidyMart
mart = TidyMart(sys.argv[1])
for i in range({n}):
    with mart.track_execution("load", "op", {{"worker": int(sys.argv[2]), "i": i}}) as t:
        for s in range(3):
            t.record_step("step", {{"s": s}})
        t.record_result({{"i": i}})
"""


def _run_workers(url: str, processes: int, n: int) -> None:
    code = WORKER.format(n=n)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(w)], stderr=subprocess.PIPE, text=True)
             for w in range(processes)]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not any("locked" in e for e in errors)


def test_four_processes_write_without_losing_rows(db_url: str) -> None:
    TidyMart(db_url).close()  # create the schema once, as a deployment would
    _run_workers(db_url, 4, 500)
    mart = TidyMart(db_url)
    ex = mart.executions()
    assert len(ex) == 2000 and set(ex["status"]) == {"success"}
    assert len(mart.steps()) == 6000
    assert mart.sql("SELECT COUNT(DISTINCT execution_id) AS n FROM execution_steps")["n"].iloc[0] == 2000


def test_concurrent_first_open_creates_schema_once(db_url: str) -> None:
    _run_workers(db_url, 4, 5)
    assert len(TidyMart(db_url).executions()) == 20


def test_migrations_build_exactly_the_declared_schema(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tidyllm.mart.schema import metadata

    mart = TidyMart(db_url)
    with mart.store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    # server-side comment support differs by backend; anything else is a schema drift
    assert [d for d in diffs if not str(d[0]).startswith("modify_table_comment")
            and not (isinstance(d, list) and str(d[0][0]).startswith("modify_comment"))] == []
    mart.close()


def test_first_open_that_loses_the_race_to_another_process_opens_the_mart(db_url: str, monkeypatch: Any) -> None:
    """Process B reads "no schema version", then process A creates the whole schema, then B goes on:
    B must open the mart A made (the check runs again under the migration lock), not call it foreign."""
    from tidyllm.mart.store import HEAD_REVISION, Store

    TidyMart(db_url).close()  # process A, already done
    real = Store.current_revision
    first = [True]

    def stale_then_real(self: Any, conn: Any = None) -> Any:
        if first[0] and conn is None:
            first[0] = False
            return None  # what B read before A committed
        return real(self, conn)

    monkeypatch.setattr(Store, "current_revision", stale_then_real)
    mart = TidyMart(db_url)
    assert not first[0] and mart.store.current_revision() == HEAD_REVISION
    mart.close()

"""Shared fixtures: hermetic environment, SQLite and PostgreSQL marts, LiteLLM global-state restore."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

# Offline price map for every litellm import in the test process and its children.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

POSTGRES_URL = os.environ.get("TIDYLLM_TEST_POSTGRES_URL")
REQUIRE_POSTGRES = os.environ.get("TIDYLLM_REQUIRE_POSTGRES") == "1"


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No user home, no stray settings file, no inherited tidyllm variables."""
    for var in list(os.environ):
        if var.startswith("TIDYLLM_") and var not in ("TIDYLLM_TEST_POSTGRES_URL", "TIDYLLM_REQUIRE_POSTGRES"):
            monkeypatch.delenv(var)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("TIDYLLM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    yield


def _import_litellm() -> Any:
    from tidyllm._litellm import import_litellm

    return import_litellm()


_LITELLM = _import_litellm()
_LITELLM_LISTS = ("callbacks", "success_callback", "failure_callback", "_async_success_callback",
                  "_async_failure_callback", "input_callback", "service_callback", "custom_provider_map")


@pytest.fixture(autouse=True)
def _no_leaked_execution() -> Iterator[None]:
    """A test must not leave the process inside a tracked execution: later calls would be attributed to it."""
    yield
    from tidyllm.mart.tracking import _current

    leaked = _current.get()
    _current.set(None)
    assert leaked is None, f"the test left tracked execution {leaked} open in this context"


@pytest.fixture(autouse=True)
def _restore_litellm() -> Iterator[None]:
    """Put LiteLLM's process-global callback lists, provider map and price map back after each test."""
    # LiteLLM is imported once for the session (see below) so there is always a state to restore
    litellm = _LITELLM
    saved = {name: list(getattr(litellm, name)) for name in _LITELLM_LISTS if hasattr(litellm, name)}
    saved_cost = dict(litellm.model_cost)
    yield
    # restore each list exactly (never remove_callback_from_all_lists: it would also take a callback a
    # module-scoped fixture registered out of litellm.callbacks)
    for name, before in saved.items():
        getattr(litellm, name)[:] = before
    # ... but never resurrect the callbacks of a platform that was replaced or uninstalled meanwhile:
    # a stale governor would admit (and settle into its own mart) the calls of later tests
    from tidyllm.platform import current

    live = current()
    if live is None:
        from tidyllm.litellm_bridge.instrument import uninstrument

        uninstrument()  # no platform: LiteLLM's sync functions are its own again
    keep_cb = live._callbacks if live is not None else None
    keep_provider = live._provider if live is not None else None
    for name in saved:
        items = getattr(litellm, name)
        items[:] = [c for c in items
                    if not (getattr(c, "tidyllm_platform", None) and c is not keep_cb)
                    and not (isinstance(c, dict) and c.get("provider") == "tidyllm"
                             and c.get("custom_handler") is not keep_provider)]
    litellm.model_cost.clear()
    litellm.model_cost.update(saved_cost)
    try:
        from litellm.utils import custom_llm_setup

        custom_llm_setup()
    except Exception:  # noqa: BLE001 - older/newer litellm without it
        pass


def _new_postgres_database() -> str:
    import psycopg
    import sqlalchemy as sa

    base = sa.engine.make_url(POSTGRES_URL)
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return base.set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(url: str) -> None:
    import psycopg
    import sqlalchemy as sa

    target = sa.engine.make_url(url)
    admin = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)')


def postgres_url_or_skip() -> str:
    """A fresh PostgreSQL database URL; skips locally without a server, fails in CI."""
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail("TIDYLLM_REQUIRE_POSTGRES=1 but TIDYLLM_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL server: set TIDYLLM_TEST_POSTGRES_URL (.ci/postgres.sh starts one)")
    return _new_postgres_database()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    url = postgres_url_or_skip()
    yield url
    _drop_postgres_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mart.db'}"
        return
    url = postgres_url_or_skip()
    yield url
    _drop_postgres_database(url)


@pytest.fixture
def mart(db_url: str) -> Iterator[Any]:
    """A TidyMart on SQLite and on PostgreSQL."""
    from tidyllm.mart import TidyMart

    m = TidyMart(db_url)
    yield m
    m.close()

"""Load forecasting: a known daily pattern is recovered, the error is measured, short history is refused."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tidyllm.forecast import InsufficientHistoryError, forecast

NOW = pd.Timestamp("2025-03-03 00:00", tz="UTC")  # a Monday


def busy(hour: int, weekday: int) -> float:
    """Expected hourly requests of route chat-a: a working-day peak at 14:00, half as much at weekends."""
    base = 2.0 + 18.0 * math.exp(-(((hour - 14) / 3.0) ** 2))
    return base * (0.5 if weekday >= 5 else 1.0)


def synthetic_calls(days: int = 21, seed: int = 0) -> pd.DataFrame:
    """Calls on two routes: chat-a follows ``busy``; chat-b is flat (5 per hour). Departments split 70/30."""
    rng = np.random.default_rng(seed)
    hours = pd.date_range(NOW - pd.Timedelta(days=days), NOW, freq="h", inclusive="left")
    rows = []
    for t in hours:
        for route, lam, cost in (("chat-a", busy(t.hour, t.weekday()), 0.01), ("chat-b", 5.0, 0.001)):
            for _ in range(rng.poisson(lam)):
                rows.append({"started_at": t + pd.Timedelta(seconds=int(rng.integers(0, 3600))), "route": route,
                             "department": "risk" if rng.random() < 0.7 else "finance", "status": "success",
                             "cost_usd": cost})
    rows.append({"started_at": NOW - pd.Timedelta(hours=3), "route": "chat-a", "department": "risk",
                 "status": "refused", "cost_usd": None})  # refusals never reach the gateway: not load
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def result() -> pd.DataFrame:
    return forecast(synthetic_calls(), hours=24, now=NOW.to_pydatetime())


def series(frame: pd.DataFrame, dimension: str, name: str, column: str = "requests") -> pd.Series:
    part = frame[(frame["dimension"] == dimension) & (frame["name"] == name)]
    return part.set_index(part["hour"].dt.hour)[column]


def test_shape_and_horizon(result: pd.DataFrame) -> None:
    assert list(result.columns) == ["hour", "dimension", "name", "requests", "spend_usd"]
    assert set(zip(result["dimension"], result["name"])) == {
        ("route", "chat-a"), ("route", "chat-b"), ("department", "risk"), ("department", "finance")}
    hours = sorted(result["hour"].unique())
    assert len(hours) == 24 and hours[0] == NOW and hours[-1] == NOW + pd.Timedelta(hours=23)
    assert (result["requests"] >= 0).all() and (result["spend_usd"] >= 0).all()


def test_recovers_the_daily_pattern(result: pd.DataFrame) -> None:
    a = series(result, "route", "chat-a")
    expected = pd.Series({h: busy(h, NOW.weekday()) for h in range(24)})
    # within 25 % of the true rate at every hour of the busy part of the day, and 1.5 requests elsewhere
    for hour in range(24):
        tolerance = max(0.25 * expected[hour], 1.5)
        assert abs(a[hour] - expected[hour]) <= tolerance, (hour, a[hour], expected[hour])
    assert a.idxmax() in (13, 14, 15)
    b = series(result, "route", "chat-b")
    assert b.between(3.5, 6.5).all()  # flat series stays flat
    # spend follows requests times the route's price
    assert series(result, "route", "chat-a", "spend_usd")[14] == pytest.approx(0.01 * a[14], rel=0.25)


def test_departments_split_the_load(result: pd.DataFrame) -> None:
    routes = result[result["dimension"] == "route"]["requests"].sum()
    departments = result[result["dimension"] == "department"]["requests"].sum()
    assert departments == pytest.approx(routes, rel=0.05)
    risk = result[result["name"] == "risk"]["requests"].sum()
    assert risk / departments == pytest.approx(0.7, abs=0.05)


def test_error_on_held_out_history_is_reported(result: pd.DataFrame) -> None:
    m = result.attrs["metrics"]
    assert m["train_hours"] + m["test_hours"] == result.attrs["history_hours"] == 21 * 24
    assert m["test_hours"] == round(0.2 * 21 * 24)
    # Poisson noise alone gives an MAE near 1.5-2 requests per series-hour here; the model must do
    # better than "same hour yesterday" (which carries two noise terms) and keep the load error small
    assert 0 < m["mae_requests"] < m["baseline_mae_requests"]
    assert 0 < m["wape_requests"] < 0.3
    assert 0 < m["mape_requests"] < 0.5
    assert m["mae_spend_usd"] > 0 and 0 < m["wape_spend"] < 0.35
    assert result.attrs["history_calls"] > 5000
    assert "PoissonRegressor" in result.attrs["model"]


def test_a_random_pattern_is_not_learned() -> None:
    """The held-out error is measured honestly: shuffling the hours destroys the pattern and the model
    can no longer beat the baseline by much, so a broken metric (e.g. scoring on training data) would show."""
    calls = synthetic_calls(days=14, seed=1)
    shuffled = calls.copy()
    rng = np.random.default_rng(2)
    hours = shuffled["started_at"].dt.floor("h")
    unique = hours.unique()
    mapping = dict(zip(unique, rng.permutation(unique)))
    shuffled["started_at"] = hours.map(mapping) + (shuffled["started_at"] - hours)
    real = forecast(calls, hours=6, now=NOW.to_pydatetime()).attrs["metrics"]
    noise = forecast(shuffled, hours=6, now=NOW.to_pydatetime()).attrs["metrics"]
    assert noise["mae_requests"] > 1.3 * real["mae_requests"]


def test_too_little_history_is_a_clear_error() -> None:
    calls = synthetic_calls(days=21)
    recent = calls[calls["started_at"] >= NOW - pd.Timedelta(hours=10)]
    with pytest.raises(InsufficientHistoryError, match=r"10 complete hour\(s\).*at least 48 hours"):
        forecast(recent, now=NOW.to_pydatetime())
    with pytest.raises(InsufficientHistoryError, match="no calls through the gateway yet"):
        forecast(calls.iloc[0:0], now=NOW.to_pydatetime())
    current_hour = pd.DataFrame([{"started_at": NOW + pd.Timedelta(minutes=5), "route": "r", "department": "d",
                                  "status": "success", "cost_usd": 0.1}])
    with pytest.raises(InsufficientHistoryError, match="in the current hour"):
        forecast(current_hour, now=(NOW + pd.Timedelta(minutes=30)).to_pydatetime())


def test_bad_arguments() -> None:
    from tidyllm.errors import TidyLLMError

    calls = synthetic_calls(days=3)
    with pytest.raises(TidyLLMError, match="hours must be"):
        forecast(calls, hours=0, now=NOW.to_pydatetime())
    with pytest.raises(TidyLLMError, match="holdout"):
        forecast(calls, holdout=0.9, now=NOW.to_pydatetime())
    with pytest.raises(TidyLLMError, match="lacks column"):
        forecast(calls.drop(columns=["route"]), now=NOW.to_pydatetime())


def insert_calls(url: str, calls: pd.DataFrame) -> None:
    """Write ``calls`` into a mart's llm_calls table through its schema."""
    from tidyllm.mart import TidyMart
    from tidyllm.mart.schema import llm_calls

    mart = TidyMart(url)
    rows = [{"id": str(uuid.uuid4()), "started_at": r.started_at.to_pydatetime(), "call_type": "completion",
             "department": r.department, "route": r.route, "status": r.status, "stream": False,
             "cost_usd": None if pd.isna(r.cost_usd) else float(r.cost_usd)} for r in calls.itertuples()]
    with mart.store.begin() as conn:
        conn.execute(llm_calls.insert(), rows)
    mart.close()


def test_from_a_mart(db_url: str) -> None:
    """``forecast(mart)`` reads llm_calls (SQLite and PostgreSQL); same history, same forecast as the DataFrame."""
    from tidyllm.mart import TidyMart

    calls = synthetic_calls(days=4, seed=3)
    insert_calls(db_url, calls)
    mart = TidyMart(db_url)
    from_mart = forecast(mart, hours=12, now=NOW.to_pydatetime())
    from_frame = forecast(calls, hours=12, now=NOW.to_pydatetime())
    pd.testing.assert_frame_equal(from_mart, from_frame)
    assert from_mart.attrs["metrics"] == from_frame.attrs["metrics"]
    mart.close()


def test_cli(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from tidyllm.cli import main

    missing = CliRunner().invoke(main, ["forecast", "--database-url", f"sqlite:///{tmp_path / 'nope.db'}"])
    assert missing.exit_code == 1 and "no mart at" in missing.output
    assert not (tmp_path / "nope.db").exists()

    # history ending in the current hour: the CLI forecasts from now
    current = pd.Timestamp(dt.datetime.now(dt.timezone.utc)).floor("h")
    calls = synthetic_calls(days=3, seed=4)
    calls = calls.assign(started_at=calls["started_at"] + (current - NOW))
    url = f"sqlite:///{tmp_path / 'mart.db'}"
    insert_calls(url, calls[calls["started_at"] >= current - pd.Timedelta(hours=10)])
    short = CliRunner().invoke(main, ["forecast", "--database-url", url])
    assert short.exit_code == 1 and "10 complete hour(s)" in short.output and "at least 48 hours" in short.output

    url = f"sqlite:///{tmp_path / 'history.db'}"
    insert_calls(url, calls)
    out_csv = tmp_path / "forecast.csv"
    ok = CliRunner().invoke(main, ["forecast", "--hours", "6", "--database-url", url, "--csv", str(out_csv)])
    assert ok.exit_code == 0, ok.output
    assert "held-out error: requests MAE" in ok.output and "MAPE" in ok.output
    assert "chat-a" in ok.output and "finance" in ok.output
    written = pd.read_csv(out_csv)
    assert len(written) == 6 * 4 and set(written["name"]) == {"chat-a", "chat-b", "risk", "finance"}

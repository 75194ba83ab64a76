"""Load forecasting: requests and spend per route and per department for the coming hours.

The seed's "TidyMart predicts MLflow Gateway load". From the mart's ``llm_calls`` history, calls
that reached the gateway (status ``success``, ``failure`` or ``unenforced``; refusals never leave
the process) are counted per hour, per route and per department. For every such series two
scikit-learn Poisson regressions (log link, so effects multiply) are fitted on calendar features:
hour of day, day of week, and hour of day separately for weekends (weekend days often have their
own daily shape). One predicts requests per hour, the other spend per hour.

The model is first evaluated on held-out history: it is fitted on the oldest 80 % of the hours
and scored on the newest 20 % (mean absolute error per series-hour; mean absolute percentage error
and weighted absolute percentage error of the total hourly load), next to a "same hour yesterday"
baseline; then it is refitted on
all the history and asked for the next ``hours`` hours, starting with the current one.

>>> frame = forecast(mart, hours=24)                        # doctest: +SKIP
>>> frame.attrs["metrics"]["mape_requests"]                 # doctest: +SKIP
0.12
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, Any

from tidyllm.errors import InsufficientHistoryError, TidyLLMError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["forecast", "load_history", "InsufficientHistoryError", "GATEWAY_STATUSES"]

#: statuses of calls that reached the gateway and so count as load
GATEWAY_STATUSES = ("success", "failure", "unenforced")
#: what the fitted model is, for the result's attrs and the CLI
MODEL_DESCRIPTION = "PoissonRegressor per series on hour-of-day, day-of-week and weekend x hour-of-day"


def load_history(source: Any) -> "pd.DataFrame":
    """The call history a forecast is made from: ``started_at``, ``route``, ``department``,
    ``cost_usd`` of every call that reached the gateway.

    ``source`` is a :class:`~tidyllm.mart.TidyMart`, a :class:`~tidyllm.platform.Platform`
    (its mart) or a DataFrame shaped like the ``llm_calls`` table."""
    import pandas as pd

    columns = ["started_at", "route", "department", "status", "cost_usd"]
    if isinstance(source, pd.DataFrame):
        missing = {"started_at", "route", "department"} - set(source.columns)
        if missing:
            raise TidyLLMError(f"call history lacks column(s) {sorted(missing)}; pass the llm_calls table "
                               "(mart.frame('llm_calls'))")
        calls = source.copy()
        for col in ("status", "cost_usd"):
            if col not in calls:
                calls[col] = "success" if col == "status" else 0.0
    else:
        mart = getattr(source, "mart", source)
        if not hasattr(mart, "frame"):
            raise TidyLLMError(f"forecast needs a TidyMart, a Platform or an llm_calls DataFrame, "
                               f"got {type(source).__name__}")
        calls = mart.frame("llm_calls", columns=columns)
    calls = calls[calls["status"].isin(GATEWAY_STATUSES)]
    out = pd.DataFrame({
        "started_at": pd.to_datetime(calls["started_at"], utc=True),
        "route": calls["route"].fillna("(none)").astype(str),
        "department": calls["department"].fillna("(none)").astype(str),
        "cost_usd": pd.to_numeric(calls["cost_usd"], errors="coerce").fillna(0.0).astype(float),
    })
    return out.reset_index(drop=True)


def _hourly(history: "pd.DataFrame", hours: "pd.DatetimeIndex") -> dict[tuple[str, str], "pd.DataFrame"]:
    """Requests and spend per hour of ``hours`` for every (dimension, name) series, zeros filled in."""
    import pandas as pd

    bucket = history["started_at"].dt.floor("h")
    series: dict[tuple[str, str], pd.DataFrame] = {}
    for dimension in ("route", "department"):
        grouped = history.groupby([history[dimension], bucket])["cost_usd"].agg(["size", "sum"])
        for name in sorted(history[dimension].unique()):
            part = grouped.loc[name].reindex(hours, fill_value=0)
            series[(dimension, name)] = pd.DataFrame({"requests": part["size"].astype(float).to_numpy(),
                                                      "spend_usd": part["sum"].astype(float).to_numpy()},
                                                     index=hours)
    return series


def _features(hours: "pd.DatetimeIndex") -> "np.ndarray":
    import numpy as np

    hour, dow = hours.hour.to_numpy(), hours.day_of_week.to_numpy()
    weekend_hour = np.where(dow >= 5, 24 + hour, hour)
    return np.column_stack([hour, dow, weekend_hour])


def _model() -> Any:
    from sklearn.linear_model import PoissonRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    # hours never seen in training (a new weekday-hour) fall back to the other effects
    return make_pipeline(OneHotEncoder(handle_unknown="ignore"),
                         PoissonRegressor(alpha=1e-3, solver="newton-cholesky", max_iter=200))


def _fit_predict(train_x: "np.ndarray", y: "np.ndarray", test_x: "np.ndarray") -> "np.ndarray":
    """Fit one series and predict; an all-zero series predicts zeros (Poisson needs some mass)."""
    import numpy as np

    total = float(y.sum())
    if total <= 0:
        return np.zeros(len(test_x))
    # spend is in dollars per hour, often far below 1: scale it to a mean of 1 so the fixed
    # regularisation strength means the same thing for every series
    scale = total / len(y)
    model = _model().fit(train_x, y / scale)
    return np.clip(model.predict(test_x) * scale, 0.0, None)


def _metrics(series: dict[tuple[str, str], "pd.DataFrame"], split: int, x: "np.ndarray") -> dict[str, float]:
    import numpy as np

    errors: dict[str, list[float]] = {"requests": [], "spend_usd": [], "baseline": []}
    totals_true: dict[str, Any] = {"requests": 0.0, "spend_usd": 0.0}
    totals_pred: dict[str, Any] = {"requests": 0.0, "spend_usd": 0.0}
    for (dimension, _), frame in series.items():
        for target in ("requests", "spend_usd"):
            y = frame[target].to_numpy()
            pred = _fit_predict(x[:split], y[:split], x[split:])
            errors[target].extend(np.abs(pred - y[split:]))
            if dimension == "route":  # every gateway call has exactly one route: routes sum to the total load
                totals_true[target] = totals_true[target] + y[split:]
                totals_pred[target] = totals_pred[target] + pred
            if target == "requests":
                # "same hour yesterday": the seasonal naive forecast the model has to beat
                errors["baseline"].extend(np.abs(y[split - 24:len(y) - 24] - y[split:]))

    def percentage(target: str) -> tuple[float, float]:
        """MAPE over the hours with load, and WAPE (total absolute error / total load): an hour with a
        single cheap call makes MAPE explode, WAPE weighs hours by their load."""
        actual, pred = np.asarray(totals_true[target], float), np.asarray(totals_pred[target], float)
        keep = actual > 0
        if not keep.any():
            return math.nan, math.nan
        error = np.abs(pred - actual)
        return float(np.mean(error[keep] / actual[keep])), float(error.sum() / actual.sum())

    (mape_requests, wape_requests), (mape_spend, wape_spend) = percentage("requests"), percentage("spend_usd")
    return {"mae_requests": float(np.mean(errors["requests"])), "mape_requests": mape_requests,
            "wape_requests": wape_requests, "mae_spend_usd": float(np.mean(errors["spend_usd"])),
            "mape_spend": mape_spend, "wape_spend": wape_spend,
            "baseline_mae_requests": float(np.mean(errors["baseline"]))}


def forecast(source: Any, hours: int = 24, *, min_history_hours: int = 48, holdout: float = 0.2,
             now: dt.datetime | None = None) -> "pd.DataFrame":
    """Predict requests and spend per route and per department for the next ``hours`` hours.

    Parameters
    ----------
    source:
        A :class:`~tidyllm.mart.TidyMart`, a :class:`~tidyllm.platform.Platform` or an ``llm_calls``
        DataFrame.
    hours:
        How many hours to forecast, starting with the current (incomplete) hour.
    min_history_hours:
        Complete hours of history needed (the first call's hour up to the current hour); at least
        48 so the held-out part still has a day before it for the baseline.
    holdout:
        Share of the newest history hours held out to measure the error.
    now:
        The current time (UTC; default: now). History is every complete hour before it.

    Returns a DataFrame with one row per forecast hour and series: ``hour`` (UTC start of the
    hour), ``dimension`` (``"route"`` or ``"department"``), ``name``, ``requests``, ``spend_usd``.
    ``frame.attrs`` holds ``metrics`` (``mae_requests`` per series-hour, ``mape_requests`` and
    ``wape_requests`` of the total hourly load, the same three for spend, ``baseline_mae_requests``
    of "same hour yesterday", ``train_hours``, ``test_hours``), ``history_hours``,
    ``history_start``, ``model`` and ``generated_at``.

    Raises :class:`InsufficientHistoryError` when there is too little history.
    """
    import pandas as pd

    if not isinstance(hours, int) or isinstance(hours, bool) or not 1 <= hours <= 24 * 31:
        raise TidyLLMError(f"hours must be a whole number of hours between 1 and 744, got {hours!r}")
    if not 0.05 <= holdout <= 0.5:
        raise TidyLLMError(f"holdout must be between 0.05 and 0.5 (a share of the history), got {holdout!r}")
    min_history_hours = max(int(min_history_hours), 48)
    everything = load_history(source)
    now_ts = pd.Timestamp(now if now is not None else dt.datetime.now(dt.timezone.utc))
    now_ts = now_ts.tz_localize("UTC") if now_ts.tzinfo is None else now_ts.tz_convert("UTC")
    current = now_ts.floor("h")
    history = everything[everything["started_at"] < current]
    if history.empty:
        recent = (f"only the {len(everything)} call(s) since {everything['started_at'].min():%H:%M} UTC, in the "
                  "current hour" if len(everything) else "no calls through the gateway yet")
        raise InsufficientHistoryError(
            f"no complete hour of call history to forecast from ({recent}); a forecast needs at least "
            f"{min_history_hours} hours of history to learn the daily pattern and measure its error")
    start = history["started_at"].min().floor("h")
    span = int((current - start) / pd.Timedelta(hours=1))
    if span < min_history_hours:
        have = _duration(history["started_at"].max() - history["started_at"].min())
        raise InsufficientHistoryError(
            f"the mart holds {span} complete hour(s) of call history (calls over {have}); a forecast needs at "
            f"least {min_history_hours} hours of history to learn the daily pattern and measure its error. "
            "Run it again once the gateway has served traffic for a few days")
    past = pd.date_range(start, periods=span, freq="h")
    future = pd.date_range(current, periods=hours, freq="h")
    series = _hourly(history, past)
    x_past, x_future = _features(past), _features(future)
    split = int(round(span * (1.0 - holdout)))
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # dozens of tiny fits: BLAS threads only fight each other (10x slower on a busy two-core machine)
    with threadpool_limits(limits=1, user_api="blas"):
        metrics = _metrics(series, split, x_past)
        rows = []
        for (dimension, name), frame in series.items():
            predicted = {target: _fit_predict(x_past, frame[target].to_numpy(), x_future)
                         for target in ("requests", "spend_usd")}
            rows.append(pd.DataFrame({"hour": future, "dimension": dimension, "name": name,
                                      "requests": predicted["requests"], "spend_usd": predicted["spend_usd"]}))
    metrics.update(train_hours=split, test_hours=span - split)
    result = pd.concat(rows, ignore_index=True)
    result["hour"] = result["hour"].astype("datetime64[us, UTC]")
    result = result.sort_values(["dimension", "name", "hour"], ignore_index=True)
    result.attrs.update(metrics=metrics, history_hours=span, history_start=start.to_pydatetime(),
                        model=MODEL_DESCRIPTION, generated_at=now_ts.to_pydatetime(),
                        history_calls=int(len(history)))
    return result


def _duration(delta: Any) -> str:
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.0f} seconds"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"

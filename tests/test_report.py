"""The unified dashboard: built from a governed workload's mart, rendered in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest

import tidyllm
from tidyllm.report import write_report
from tidyllm.report.charts import CHARTS
from tidyllm.stack import bundled_gateway_config, bundled_settings

N_CHARTS = len(CHARTS)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def insert_history(mart: Any, days: int = 7, seed: int = 0) -> int:
    """Calls of past days with a daily pattern (so the load forecast has history), written through the schema.
    They end an hour before now, so they never touch the current budget window's live numbers."""
    from tidyllm.mart.schema import llm_calls

    rng = np.random.default_rng(seed)
    end = pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(hours=1)
    rows = []
    for t in pd.date_range(end - pd.Timedelta(days=days), end, freq="h", inclusive="left"):
        for route, base in (("chat-small", 6.0), ("chat-large", 2.0)):
            for _ in range(rng.poisson(base * (3.0 if 9 <= t.hour < 18 else 1.0))):
                rows.append({"id": str(uuid.uuid4()), "started_at": (t + pd.Timedelta(minutes=int(rng.integers(60))))
                             .to_pydatetime(), "call_type": "completion", "department": "finance", "route": route,
                             "status": "success", "stream": False, "cost_usd": 0.0005 if route == "chat-small" else 0.004})
    with mart.store.begin() as conn:
        conn.execute(llm_calls.insert(), rows)
    return len(rows)


@pytest.fixture(scope="module")
def workload_mart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A platform over the bundled settings and routes, its Router calling the provider simulator directly
    (no MLflow process: the gateway is tested elsewhere), after the demo's workload and a week of history."""
    import litellm

    from tidyllm.demo import make_workload, run_workload
    from tidyllm.gateway.config import load_gateway_config
    from tidyllm.gateway.simulator import Simulator

    home = tmp_path_factory.mktemp("report")
    with Simulator(seed=0, latency_scale=0) as sim:
        platform = tidyllm.install(str(bundled_settings()), database_url=f"sqlite:///{home / 'mart.db'}",
                                   gateway_config=str(bundled_gateway_config()),
                                   routing={"random_state": 0, "refresh_seconds": 0})
        try:
            config = load_gateway_config(str(bundled_gateway_config()))
            model_list = [{"model_name": r.group, "litellm_params": {"model": f"openai/{r.model_name}",
                                                                     "api_base": sim.url, "api_key": "sim"},
                           "model_info": {"id": r.name, "tidyllm_route": r.name}}
                          for r in config.routes if r.group == "chat"]
            router = platform.govern(litellm.Router(model_list=model_list, num_retries=1))
            # smaller than the bundled one, so marketing runs out within this short workload whatever it routes to
            platform.budgets.set("department", "marketing", 0.0005)
            t0 = time.perf_counter()
            outcomes = run_workload(platform, router, make_workload(160, seed=5), workers=4, progress=False)
            for o in outcomes:
                if o.status == "ok":
                    platform.wait_for_call(o.call_id)
            insert_history(platform.mart)
            print(f"workload of 160 requests: {time.perf_counter() - t0:.1f} s")
            yield platform, outcomes, home
        finally:
            tidyllm.uninstall()


@pytest.fixture(scope="module")
def page(workload_mart: Any) -> Path:
    platform, _, home = workload_mart
    return write_report(platform, home / "dashboard")


def test_page_is_self_contained_with_every_chart(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    ids = re.findall(r'<img id="(chart-[a-z-]+)" alt="([^"]+)" src="data:image/png;base64,', text)
    assert [i for i, _ in ids] == [cid for cid, *_ in CHARTS]
    assert all(alt for _, alt in ids)
    # nothing to fetch: no external script, stylesheet, image or font
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<script src" not in text and "@import" not in text


def test_page_reports_the_workload(workload_mart: Any, page: Path) -> None:
    platform, outcomes, _ = workload_mart
    text = page.read_text(encoding="utf-8")
    calls = platform.calls()
    assert f"<b>{len(calls):,}</b><span>governed call attempts" in text
    assert "audit chain verified" in text and f"{len(platform.audit.frame()):,} rows intact" in text
    # marketing's tiny budget ran out: exhausted in the burn table, its refusals counted
    refused = sum(1 for o in outcomes if o.status == "refused" and o.request.department == "marketing")
    assert refused > 0
    assert re.search(r"department: marketing</td>.*?<span class=\"bad\">exhausted</span>", text, re.S)
    assert "BudgetExceededError</td><td>marketing</td>" in text
    # the org budget did not refuse anything, so it is not marked exhausted
    assert not re.search(r"org: org</td>(?:(?!</tr>).)*exhausted", text, re.S)
    # tracked executions: one module per department's application
    for module in ("mvr_review", "close_commentary", "campaign_studio", "research_assistant"):
        assert f"<td>{module}</td>" in text
    # the week of history gives a real forecast with its held-out error
    assert "Held-out error on the newest" in text and "MAPE" in text
    assert "rewarded decisions; mean reward" in text


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / f'profile-{uuid.uuid4().hex[:6]}'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "TZ": "UTC"})


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_every_chart_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    from PIL import Image

    url = page.resolve().as_uri()
    dom = _chromium(url, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None
    # the page's own script counted the images that decoded (naturalWidth > 0) after load
    assert f'data-charts="{N_CHARTS}"' in body.group(0), body.group(0)
    assert "Uncaught" not in dom.stderr, [line for line in dom.stderr.splitlines() if "Uncaught" in line]

    shot = tmp_path / "dashboard.png"
    run = _chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1400,4000", "--hide-scrollbars")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 4000)
    # a rendered page, not a blank one: many distinct colours (charts) across the screenshot
    colours = image.resize((350, 1000)).getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 500
    keep = os.environ.get("DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_a_script_error_would_be_caught(tmp_path: Path) -> None:
    """The console check above can fail: a page whose script throws is reported as Uncaught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><script>window.addEventListener("load", () => { notDefined(); });</script>'
                   "</body></html>")
    run = _chromium(bad.as_uri(), tmp_path, "--dump-dom")
    assert "Uncaught ReferenceError" in run.stderr


def test_any_mart_by_url_sqlite_and_postgres(db_url: str, tmp_path: Path) -> None:
    """The page builds from a bare database URL (no platform), empty or not, on SQLite and PostgreSQL."""
    from tidyllm.mart import TidyMart

    mart = TidyMart(db_url)
    empty = write_report(db_url, tmp_path / "empty").read_text(encoding="utf-8")
    assert empty.count('<img id="chart-') == N_CHARTS
    assert "no call history" in empty or "no calls through the gateway yet" in empty
    with mart.track_execution("etl", "load_documents", {"department": "risk"}) as tracker:
        tracker.record_step("read", {"rows": 3})
    insert_history(mart, days=3, seed=1)
    full = write_report(db_url, tmp_path / "full").read_text(encoding="utf-8")
    assert full.count('<img id="chart-') == N_CHARTS
    assert "<td>etl</td><td>load_documents</td>" in full
    assert "Held-out error on the newest" in full
    mart.close()


def test_a_broken_audit_chain_is_shown(tmp_path: Path) -> None:
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'mart.db'}"
    platform = tidyllm.install({"database_url": url, "routing": {"strategy": "cheapest"}})
    try:
        platform.budgets.set("department", "risk", 1.0)
        with platform.mart.store.begin(write=True) as conn:
            for i in range(3):
                platform.audit.append(conn, {"call_id": f"c{i}", "recorded_at": pd.Timestamp.now(tz="UTC"),
                                             "decision": "allowed", "status": "success", "cost_usd": 0.01})
        # 4: setting the budget is audited too
        assert "audit chain verified: 4 rows intact" in write_report(platform, tmp_path / "ok").read_text()
        with platform.mart.store.begin(write=True) as conn:
            conn.execute(sa.text("UPDATE audit_log SET cost_usd = 0.0 WHERE call_id = 'c1'"))
        text = write_report(platform, tmp_path / "broken").read_text(encoding="utf-8")
    finally:
        tidyllm.uninstall()
    assert ">BROKEN<" in text and "audit chain BROKEN at row seq=3" in text


def test_cli_report(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tidyllm.cli import main
    from tidyllm.mart import TidyMart

    missing = CliRunner().invoke(main, ["report", "--out", str(tmp_path / "x"), "--database-url",
                                        f"sqlite:///{tmp_path / 'nope.db'}"])
    assert missing.exit_code == 1 and "no mart at" in missing.output
    url = f"sqlite:///{tmp_path / 'mart.db'}"
    mart = TidyMart(url)
    insert_history(mart, days=2, seed=2)
    mart.close()
    ok = CliRunner().invoke(main, ["report", "--out", str(tmp_path / "site"), "--database-url", url])
    assert ok.exit_code == 0, ok.output
    assert "dashboard written" in ok.output
    assert (tmp_path / "site" / "index.html").read_text(encoding="utf-8").count('<img id="chart-') == N_CHARTS

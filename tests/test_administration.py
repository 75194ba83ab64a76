"""Administration you can trust: settings validated whole, one source of truth (plan/apply with drift),
audited changes with an admins restriction, and read commands that are really read-only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import tidyllm
from tidyllm.cli import main
from tidyllm.errors import AdministrationError, ConfigurationError, StorageError
from tidyllm.governance.admin import os_user
from tidyllm.settings import load_settings


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def admin_rows(platform: Any) -> Any:
    audit = platform.mart.frame("audit_log", parse_json=True)
    return audit[audit["decision"].isin(["admin", "admin_refused"])].reset_index(drop=True)


# --- settings validated whole, before anything is opened ---------------------------------------------


def test_one_error_lists_every_problem_with_file_entry_and_did_you_mean(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    cfg = tmp_path / "tidyllm.yaml"
    cfg.write_text(f"""
database_url: sqlite:///{db}
governanse: {{require_audit: true}}
budgets:
  - {{scope: org, limit_usd: 100}}
  - {{scope: department, name: risk, limit_usd: 4}}
  - {{scope: department, name: ops, limit_usd: 5, perod: day}}
  - {{scope: department, name: hr, limit_usd: .nan}}
  - {{scope: team, name: x, limit_usd: 1}}
prices:
  - {{model: ep, input_per_1m: .inf, output_per_1m: 2}}
rate_limits:
  - {{scope: user, name: ana, rpm: 0}}
governance:
  lease_ttl_seconds: 0
  unpriced_by_department: {{risk: maybe}}
  soft_threshold: .nan
routing: {{exploration_floor: .inf}}
""")
    with pytest.raises(ConfigurationError) as info:
        tidyllm.install(str(cfg))
    message = str(info.value)
    assert message.startswith(f"{cfg}: ") and "problems (nothing was applied)" in message
    for expected in [
        "unknown setting 'governanse' (did you mean 'governance'?)",
        "budgets[2] (department 'ops'): unknown key 'perod' (did you mean 'period'?)",
        "budgets[3] (department 'hr'): limit_usd must be a number (finite), got nan",
        "budgets[4] (team 'x'): scope must be one of org, department, user, route, model, got 'team'",
        "prices[0] (ep): input_per_1m must be a number (finite), got inf",
        "rate_limits[0] (user 'ana'): rpm must be a positive whole number, got 0",
        "governance.lease_ttl_seconds must be more than 0, got 0",
        "governance.unpriced_by_department.risk must be one of refuse, allow; got 'maybe'",
        "governance.soft_threshold must be a number (finite), got nan",
        "routing.exploration_floor must be a number (finite), got inf",
    ]:
        assert expected in message, (expected, message)
    assert not db.exists()  # nothing opened, nothing written


@pytest.mark.parametrize("text, match", [
    ("governance: {lease_ttl_seconds: -5}\n", "governance.lease_ttl_seconds must be more than 0"),
    ("governance: {lease_ttl_seconds: .inf}\n", r"lease_ttl_seconds must be a number \(finite\), got inf"),
    ("governance: {unpriced_by_department: {risk: maybe}}\n", "unpriced_by_department.risk must be one of refuse, allow"),
    ("governance: {default_max_tokens: .nan}\n", r"default_max_tokens must be a whole number \(finite\)"),
    ("routing: {weights: {quality: .nan}}\n", r"routing.weights.quality must be a finite number"),
    ("governance: {config_authority: files}\n", r"config_authority must be one of database, file; got 'files' "
                                                  r"\(did you mean 'file'\?\)"),
    ("alerts: {thresholds: [0.5, .nan]}\n", r"alerts.thresholds must be fractions"),
])
def test_governance_numbers_and_choices_are_checked_at_load(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "tidyllm.yaml").write_text(text)
    with pytest.raises(ConfigurationError, match=match):
        load_settings()


def test_repr_and_magics_config_mask_the_database_password(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(database_url="postgresql+psycopg://ana:pg-s3cret-pw@db.example/tidyllm")
    assert "pg-s3cret-pw" not in repr(s) and "ana:***@db.example" in repr(s)


# --- one source of truth: plan, apply, drift ----------------------------------------------------------


def _yaml(tmp_path: Path, url: str, limit: float, *, authority: str = "database", extra: str = "") -> Path:
    cfg = tmp_path / "tidyllm.yaml"
    cfg.write_text(f"""
database_url: {url}
governance: {{config_authority: {authority}}}
budgets:
  - {{scope: department, name: risk, limit_usd: {limit}}}
authorization:
  - {{name: interns-small, departments: [interns], routes: [ep-small]}}
rate_limits:
  - {{scope: user, name: ana, rpm: 60}}
{extra}""")
    return cfg


def _limit(platform: Any) -> float:
    return float(platform.budgets.status(scope="department", name="risk").iloc[0]["limit_usd"])


def test_runtime_change_is_audited_and_not_reverted_by_the_next_install(db_url: str, tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, db_url, 4.0)
    p = tidyllm.install(str(cfg))
    assert _limit(p) == 4.0
    first = admin_rows(p)
    assert list(first["rule"]) == ["budget:department/risk/month", "rule:interns-small", "rate_limit:user/ana"]
    tidyllm.uninstall()

    result = run("budget", "set", "department", "risk", "60", "--reason", "quarter close", "--config", str(cfg))
    assert result.exit_code == 0, result.output

    p = tidyllm.install(str(cfg))  # the file still says 4.0
    assert _limit(p) == 60.0  # not silently reverted
    drift = p.last_plan.drift
    assert [(c.kind, c.key, c.winner) for c in drift] == [("budget", "department/risk/month", "database")]
    assert drift[0].describe() == ("DRIFT: budget department/risk/month: the mart has limit_usd 60.0, the file says "
                                   "4.0 — changed at run time; the database's value stays "
                                   "(governance.config_authority: database)")
    rows = admin_rows(p)
    change = rows.iloc[-1]
    assert change["decision"] == "admin" and change["rule"] == "budget:department/risk/month"
    assert change["audit_reason"] == "quarter close" and change["user_id"] == os_user()
    assert change["extra"]["old"]["limit_usd"] == 4.0 and change["extra"]["new"]["limit_usd"] == 60.0
    assert change["extra"]["actor_source"] == "os" and change["extra"]["via"] == "cli"
    assert p.audit.verify().ok
    tidyllm.uninstall()

    # `tidyllm apply --dry-run` reports the drift and changes nothing; the file authority puts the file back
    result = run("apply", "--dry-run", "--config", str(cfg))
    assert result.exit_code == 0 and "DRIFT: budget department/risk/month" in result.output
    assert "the database's value stays" in result.output
    cfg = _yaml(tmp_path, db_url, 4.0, authority="file")
    result = run("apply", "--dry-run", "--config", str(cfg))
    assert "the file's value is put back" in result.output
    result = run("apply", "--reason", "back to plan", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    p = tidyllm.install(str(cfg))
    assert _limit(p) == 4.0 and not p.last_plan
    rows = admin_rows(p)
    back = rows[rows["rule"] == "budget:department/risk/month"].iloc[-1]
    assert back["audit_reason"] == "back to plan" and back["extra"]["old"]["limit_usd"] == 60.0
    # the governance setting that changed is audited too
    setting = rows[rows["rule"] == "governance:config_authority"].iloc[-1]
    assert (setting["extra"]["old"], setting["extra"]["new"]) == ("database", "file")


def test_file_changes_apply_and_rules_follow_the_mart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = _yaml(tmp_path, url, 4.0)
    p = tidyllm.install(str(cfg))
    assert [r.name for r in p.policy.rules] == ["interns-small"] and p.limiter.limits[0].rpm == 60
    tidyllm.uninstall()
    cfg = _yaml(tmp_path, url, 8.0)  # the file changed, the mart did not: applied
    result = run("apply", "--dry-run", "--config", str(cfg))
    assert "change: budget department/risk/month: limit_usd 4.0 → 8.0" in result.output
    p = tidyllm.install(str(cfg))
    assert _limit(p) == 8.0 and [c.action for c in p.last_plan.changes] == ["change"]
    # a rule changed at run time stays in force (database authority) and is audited
    p.state.set_value("rule", "interns-small", {"name": "interns-small", "departments": ["interns"],
                                                "routes": ["ep-small", "ep-large"]}, reason="pilot")
    tidyllm.uninstall()
    p = tidyllm.install(str(cfg))
    assert p.policy.rules[0].routes == ("ep-small", "ep-large")
    assert [(c.kind, c.action) for c in p.last_plan.drift] == [("rule", "drift")]
    assert admin_rows(p).iloc[-1]["audit_reason"] == "pilot"  # the drift itself changed nothing: no row
    with pytest.raises(ConfigurationError, match="constrains nothing"):
        p.state.set_value("rule", "empty", {"name": "empty", "departments": ["x"]})


def test_admins_restrict_changes_with_an_audited_refusal(db_url: str) -> None:
    p = tidyllm.install(database_url=db_url, governance={"admins": ["alice", "group:finops"]})
    with pytest.raises(AdministrationError, match=r"'mallory' may not change budget 'department/risk/month': only "
                                                  r"governance.admins \(alice, group:finops\)"):
        p.budgets.set("department", "risk", 1000, actor="mallory", reason="because")
    assert p.budgets.status().empty  # nothing written
    p.budgets.set("department", "risk", 50, actor="alice", reason="Q3 plan")
    rows = admin_rows(p)
    assert list(rows["decision"]) == ["admin_refused", "admin"]
    refused = rows.iloc[0]
    assert refused["user_id"] == "mallory" and refused["status"] == "refused"
    assert "may not change" in refused["error"] and refused["extra"]["new"]["limit_usd"] == 1000.0
    assert rows.iloc[1]["user_id"] == "alice" and rows.iloc[1]["extra"]["actor_source"] == "caller"
    assert p.audit.verify().ok


def test_cli_needs_a_reason_when_require_audit_is_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    cfg = tmp_path / "tidyllm.yaml"
    cfg.write_text(f"database_url: {url}\ngovernance: {{require_audit: true}}\n")
    result = run("budget", "set", "department", "risk", "60", "--config", str(cfg))
    assert result.exit_code == 1 and "needs a reason because governance.require_audit is on" in result.output
    result = run("budget", "set", "department", "risk", "60", "--reason", "close", "--config", str(cfg))
    assert result.exit_code == 0
    result = run("audit", "export", "--format", "jsonl", "--decision", "admin_refused", "--database-url", url)
    assert json.loads(result.output.splitlines()[0])["rule"] == "budget:department/risk/month"


# --- read-only means read-only --------------------------------------------------------------------


def test_mart_sql_cannot_write(db_url: str) -> None:
    p = tidyllm.install(database_url=db_url)
    p.budgets.set("department", "risk", 5.0)
    before = p.mart.sql("SELECT count(*) AS n FROM budgets").iloc[0]["n"]
    for statement in ["DELETE FROM budgets", "UPDATE budgets SET limit_usd = 0",
                      "DROP TABLE budget_events", "CREATE TABLE evil (x int)"]:
        with pytest.raises(StorageError):
            p.mart.sql(statement)
    assert p.mart.sql("SELECT count(*) AS n FROM budgets").iloc[0]["n"] == before
    assert _limit(p) == 5.0
    p.budgets.set("department", "risk", 6.0)  # the mart itself still writes
    if db_url.startswith("sqlite"):
        with pytest.raises(StorageError):
            p.mart.sql(f"ATTACH DATABASE '{db_url.removeprefix('sqlite:///')}-evil' AS evil")
        assert not Path(db_url.removeprefix("sqlite:///") + "-evil").exists()


def test_read_commands_never_create_or_touch_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "mart.db"
    for args in (["audit", "verify"], ["budget", "show"], ["audit", "export"], ["report", "--out", str(tmp_path / "r")]):
        result = run(*args, "--database-url", f"sqlite:///{missing}")
        assert result.exit_code == 1 and "no mart at" in result.output, (args, result.output)
    assert not missing.parent.exists()
    theirs = tmp_path / "theirs.db"
    eng = sa.create_engine(f"sqlite:///{theirs}")
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE customers (id int)"))
    for args in (["audit", "verify"], ["budget", "show"]):
        result = run(*args, "--database-url", f"sqlite:///{theirs}")
        assert result.exit_code == 1 and "is not a tidyllm mart" in result.output, result.output
    with eng.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["customers"]
    eng.dispose()


def test_read_only_mart_on_postgres_refuses_writes(postgres_url: str) -> None:
    from tidyllm.mart import TidyMart

    TidyMart(postgres_url).close()
    ro = TidyMart(postgres_url, read_only=True)
    try:
        assert ro.frame("budgets").empty
        with pytest.raises(StorageError, match="read-only"):
            with ro.store.begin(write=True):
                pass
        with pytest.raises(StorageError, match="read-only transaction"):
            with ro.store.begin() as conn:
                conn.execute(sa.text("DELETE FROM budgets"))
    finally:
        ro.close()

"""The `tidyllm` command: budget, audit, db — errors as one line and exit code 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tidyllm.cli import main


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for name in ("audit", "budget", "db", "gateway", "routes", "simulate"):
        assert name in result.output


def test_budget_set_and_show(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    result = run("budget", "set", "department", "risk", "50", "--database-url", url)
    assert result.exit_code == 0 and "department 'risk': $50.00 per month" in result.output
    run("budget", "set", "user", "ana", "5", "--period", "day", "--database-url", url)
    result = run("budget", "show", "--database-url", url)
    assert result.exit_code == 0
    assert "risk" in result.output and "ana" in result.output and "remaining_usd" in result.output


def test_budget_errors_are_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    result = CliRunner().invoke(main, ["budget", "set", "--database-url", url, "department", "risk", "--", "-5"])
    assert result.exit_code == 1 and result.output.strip().startswith("error: limit_usd must be a finite number")
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["budget", "set", "team", "risk", "5", "--database-url", url])
    assert result.exit_code == 2 and "team" in result.output  # click's own usage error


def test_audit_verify_export_show(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from tidyllm.governance.context import CallContext
    from tidyllm.platform import Platform
    from tidyllm.settings import load_settings

    url = f"sqlite:///{tmp_path / 'a.db'}"
    from tidyllm.errors import BudgetExceededError

    p = Platform(load_settings(database_url=url))
    p.budgets.set("department", "risk", 0.0)
    p.prices.set("ep", 1.0, 2.0)
    for i in range(3):  # refusals are audited without any provider: a quick way to fill the trail
        with pytest.raises(BudgetExceededError):
            p.governor.admit(ctx=CallContext(user_id="ana", department="risk"), route="ep", requested_model="chat",
                             messages=[{"role": "user", "content": str(i)}], gateway=False, call_id=f"call-{i}")
    result = run("audit", "verify", "--database-url", url)
    # the budget change is audited too: 1 administrative row + 3 refusals
    assert result.exit_code == 0 and "4 rows intact" in result.output
    out = tmp_path / "audit.jsonl"
    result = run("audit", "export", "--format", "jsonl", "--department", "risk", "-o", str(out), "--database-url", url)
    assert result.exit_code == 0 and len(out.read_text().splitlines()) == 4
    decisions = [json.loads(line)["decision"] for line in out.read_text().splitlines()]
    assert decisions == ["admin", "refused", "refused", "refused"]
    result = run("audit", "show", "call-1", "--database-url", url)
    assert result.exit_code == 0 and "call-1" in result.output and "refused" in result.output
    with p.mart.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET department = 'finance' WHERE seq = 2"))
    result = CliRunner().invoke(main, ["audit", "verify", "--database-url", url])
    assert result.exit_code == 1 and "BROKEN at row seq=2" in result.output


def test_bad_settings_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "tidyllm.yaml").write_text("audit: {capture: everything}\n")
    result = CliRunner().invoke(main, ["budget", "show"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "audit.capture must be one of none, hash, full" in result.output

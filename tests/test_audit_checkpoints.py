"""Signed checkpoints: an audit trail that survives a database writer. Each attack a writer without the key
can make — edit and re-chain, delete and re-chain, truncate, wipe, reorder — fails `tidyllm audit verify`
naming the first checkpoint it contradicts, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import tidyllm
from tidyllm.cli import main
from tidyllm.errors import BudgetExceededError
from tidyllm.governance.audit import GENESIS, content_digest
from tidyllm.governance.context import CallContext
from tidyllm.mart.schema import audit_log


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def refuse(platform: Any, n: int, start: int = 0) -> None:
    """``n`` refused calls: each leaves a call row and an audit row, with no provider involved."""
    for i in range(start, start + n):
        with pytest.raises(BudgetExceededError):
            platform.governor.admit(ctx=CallContext(user_id="ana", department="risk"), route="ep",
                                    requested_model="chat", messages=[{"role": "user", "content": str(i)}],
                                    gateway=False, call_id=f"call-{i}")


def rechain(engine: Any) -> None:
    """What a database writer without the key can do: recompute every digest and the head (the hash is public)."""
    with engine.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(audit_log).order_by(audit_log.c.seq)).mappings()]
        prev = GENESIS
        for row in rows:
            digest = content_digest(prev, row)
            conn.execute(sa.text("UPDATE audit_log SET prev_digest = :p, digest = :d WHERE seq = :s"),
                         {"p": prev, "d": digest, "s": row["seq"]})
            prev = digest
        conn.execute(sa.text("UPDATE audit_head SET digest = :d, rows = :n, seq = :s"),
                     {"d": prev, "n": len(rows), "s": rows[-1]["seq"] if rows else 0})


@pytest.fixture
def trail(db_url: str, tmp_path: Path) -> Iterator[tuple[Any, Path, str]]:
    """A platform whose trail has 4 rows at the first checkpoint and 9 at the second (1 admin + 8 refusals)."""
    cfg = tmp_path / "tidyllm.yaml"
    key = tmp_path / "custody" / "audit.key"
    cfg.write_text(f"database_url: {db_url}\naudit: {{key_file: {key}, checkpoint_rows: 0, checkpoint_minutes: 0}}\n")
    p = tidyllm.install(str(cfg))
    p.budgets.set("department", "risk", 0.0)
    p.prices.set("ep", 1.0, 2.0)
    refuse(p, 3)
    result = run("audit", "checkpoint", "--config", str(cfg))
    assert result.exit_code == 0 and "checkpoint signed: 4 rows" in result.output, result.output
    refuse(p, 5, start=3)
    assert run("audit", "checkpoint", "--config", str(cfg)).exit_code == 0
    yield p, cfg, db_url
    tidyllm.uninstall()


def test_key_is_owner_only_and_an_intact_trail_verifies(trail: tuple[Any, Path, str]) -> None:
    p, cfg, _ = trail
    key = Path(p.settings.audit.key_file)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    lines = [json.loads(x) for x in p.checkpoints.checkpoint_file.read_text().splitlines()]
    assert [(c["rows"], c["calls"], c["seq"]) for c in lines] == [(4, 3, 4), (9, 8, 9)]
    result = run("audit", "verify", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert "audit chain verified: 9 rows intact; 2 signed checkpoints agree" in result.output


ATTACKS = {
    # each: (SQL, whether to re-chain afterwards, the checkpoint line first contradicted, what is said)
    "edit-rechain-early": (["UPDATE audit_log SET cost_usd = 99 WHERE seq = 2"], True, 1, "edited and re-chained"),
    "edit-rechain-late": (["UPDATE audit_log SET user_id = 'mallory' WHERE seq = 6"], True, 2, "edited and re-chained"),
    "delete-rechain": (["DELETE FROM audit_log WHERE seq = 7"], True, 2, "counts 8 rows, fewer than the 9 signed"),
    "replace-rechain": (["UPDATE audit_log SET decision = 'allowed' WHERE seq = 9"], True, 2,
                        "no longer has the signed digest"),
    "truncate": (["DELETE FROM audit_log WHERE seq > 5"], True, 2, "fewer than the 9 signed"),
    "wipe": (["DELETE FROM audit_log", "DELETE FROM audit_head"], False, 1, "fewer than the 4 signed"),
    "reorder": (["UPDATE audit_log SET seq = 100 WHERE seq = 2", "UPDATE audit_log SET seq = 2 WHERE seq = 3",
                 "UPDATE audit_log SET seq = 3 WHERE seq = 100"], True, 1, "re-chained, reordered or replaced"),
    "delete-calls": (["DELETE FROM llm_calls WHERE id = 'call-7'"], False, 2, "call rows were deleted"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_database_writer_cannot_hide_an_attack(trail: tuple[Any, Path, str], attack: str) -> None:
    p, cfg, _ = trail
    statements, chain_again, line, said = ATTACKS[attack]
    engine = p.mart.store.engine
    with engine.begin() as conn:
        for sql in statements:
            conn.execute(sa.text(sql))
    if chain_again:
        rechain(engine)
        assert p.audit.verify().ok  # the hash chain alone is fooled
    result = run("audit", "verify", "--config", str(cfg))
    assert result.exit_code == 1, result.output
    assert f"audit trail CONTRADICTS checkpoint {p.checkpoints.checkpoint_file}:{line}" in result.output
    assert said in result.output


def test_an_edited_checkpoint_file_is_caught(trail: tuple[Any, Path, str]) -> None:
    p, cfg, _ = trail
    path = p.checkpoints.checkpoint_file
    lines = path.read_text().splitlines()
    forged = json.loads(lines[1]) | {"rows": 3}
    path.write_text(lines[0] + "\n" + json.dumps(forged) + "\n")
    result = run("audit", "verify", "--config", str(cfg))
    assert result.exit_code == 1 and ":2" in result.output and "signature does not verify" in result.output


def test_without_a_checkpoint_a_wiped_trail_is_still_caught_by_the_call_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    p = tidyllm.install(database_url=url)
    try:
        p.budgets.set("department", "risk", 0.0)
        p.prices.set("ep", 1.0, 2.0)
        refuse(p, 4)
        with p.mart.store.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM audit_log"))
            conn.execute(sa.text("DELETE FROM audit_head"))
        result = run("audit", "verify", "--database-url", url)
        assert result.exit_code == 1
        assert "INCOMPLETE: 4 finished calls in llm_calls have no audit row" in result.output
    finally:
        tidyllm.uninstall()


def test_checkpoints_by_row_count_in_the_background_and_into_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = tidyllm.install(database_url=f"sqlite:///{tmp_path / 'b.db'}",
                        audit={"checkpoint_rows": 3, "checkpoint_minutes": 0, "checkpoint_mlflow_uri": mlflow_uri})
    try:
        p.budgets.set("department", "risk", 0.0)
        p.prices.set("ep", 1.0, 2.0)
        refuse(p, 2)
        assert p.checkpoints.due()
        p.checkpoints.checkpoint(reason="scheduled")  # what the worker does when due
        assert not p.checkpoints.due()
        line = json.loads(p.checkpoints.checkpoint_file.read_text().splitlines()[-1])
        assert line["rows"] == 3 and p.checkpoints.signature_ok(line | {"line": 1})
        client = MlflowClient(tracking_uri=mlflow_uri)
        experiment = client.get_experiment_by_name("tidyllm-audit-checkpoints")
        runs = client.search_runs([experiment.experiment_id])
        artifact = client.download_artifacts(runs[0].info.run_id, f"checkpoint-{line['seq']}.json", str(tmp_path))
        assert json.loads(Path(artifact).read_text())["signature"] == line["signature"]
    finally:
        tidyllm.uninstall()

"""Identity pieces on their own: name normalisation, settings, the token key and CLI, the budget-name migration.
(The red-team proofs through real LiteLLM entry points are in tests/adversarial/test_identity.py.)"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tidyllm.cli import main
from tidyllm.errors import ConfigurationError, StorageError, TokenError
from tidyllm.governance.identity import IdentityResolver, normalize_name, session_identity
from tidyllm.governance.tokens import TokenKey, parse_ttl
from tidyllm.settings import load_settings


@pytest.mark.parametrize("raw, expected", [
    ("Risk", "risk"), ("  risk  ", "risk"), ("Risk\t Management", "risk management"),
    ("RISK\u00a0MANAGEMENT", "risk management"), ("ri\u200bsk", "risk"), ("Ｒｉｓｋ", "risk"),
    ("risk-management", "risk-management"), ("Straße", "strasse"),
])
def test_normalize_name(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


def test_settings_require_identity_and_names(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.governance.require == ("department",) and s.governance.identity == "declared"
    assert s.governance.key_path() == Path(os.environ["TIDYLLM_HOME"]) / "token.key"
    assert load_settings({"governance": {"require": [], "require_audit": True}}).governance.required() == (
        "audit_reason",)
    monkeypatch.setenv("TIDYLLM_REQUIRE", "department, user_id,audit_reason")
    monkeypatch.setenv("TIDYLLM_IDENTITY", "verified")
    monkeypatch.setenv("TIDYLLM_TOKEN", "tlm1.secret-value.sig")
    s = load_settings({"governance": {"user_departments": {" Ana ": "RISK"},
                                      "unpriced_by_department": {"Risk ": "allow"}},
                       "routing": {"weights_by_department": {"Risk": {"quality": 1.0}}}})
    assert s.governance.require == ("department", "user_id", "audit_reason")
    assert s.governance.identity == "verified" and s.governance.token == "tlm1.secret-value.sig"
    assert "secret-value" not in repr(s)
    assert s.governance.user_departments == {"ana": "risk"}
    assert s.governance.unpriced_by_department == {"risk": "allow"}
    assert dict(s.routing.weights_by_department) == {"risk": {"quality": 1.0}}


@pytest.mark.parametrize("section, match", [
    ({"require": ["department", "team"]}, "governance.require: unknown key 'team'"),
    ({"identity": "trusted"}, "governance.identity must be one of declared, verified"),
    ({"unpriced_by_department": {"Risk": "allow", "risk ": "refuse"}}, "names 'risk' twice"),
    ({"user_departments": {"ana": 3}}, "user_departments.ana must be a department name"),
])
def test_bad_identity_settings_name_the_key(section: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        load_settings({"governance": section})


def test_token_key_file_is_private_and_tokens_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "k" / "token.key"
    key = TokenKey.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigurationError, match="already exists"):
        TokenKey.create(path)
    token = key.issue(" Ana ", "Risk", ttl_seconds=parse_ttl("8h"))
    claims = TokenKey.load(path).verify(token)
    assert (claims.user_id, claims.department, claims.key_id) == ("ana", "risk", key.key_id)
    assert claims.expires_at - claims.issued_at == 8 * 3600
    with pytest.raises(TokenError) as info:
        key.verify(key.issue("ana", None, ttl_seconds=10, now=time.time() + 3600))
    assert info.value.kind == "malformed" and "in the future" in str(info.value)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        TokenKey.load(path)
    assert repr(key) == f"<TokenKey {key.key_id}>"


@pytest.mark.parametrize("ttl, seconds", [("8h", 28800), ("30m", 1800), ("7d", 604800), ("2w", 1209600),
                                          ("3600", 3600), ("90s", 90)])
def test_parse_ttl(ttl: str, seconds: int) -> None:
    assert parse_ttl(ttl) == seconds


@pytest.mark.parametrize("ttl", ["0", "-1h", "8 hours", ""])
def test_parse_ttl_refuses_nonsense(ttl: str) -> None:
    with pytest.raises(ConfigurationError, match="positive duration"):
        parse_ttl(ttl)


def test_cli_token_issue_and_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    issued = runner.invoke(main, ["token", "issue", "--user", "Ana", "--department", "Risk", "--ttl", "1h"])
    assert issued.exit_code == 0, issued.output
    token = issued.stdout.strip().splitlines()[-1]
    assert token.startswith("tlm1.") and "created the platform's token key" in issued.stderr
    assert stat.S_IMODE((Path(os.environ["TIDYLLM_HOME"]) / "token.key").stat().st_mode) == 0o600
    ok = runner.invoke(main, ["token", "verify", token])
    assert ok.exit_code == 0 and '"department": "risk"' in ok.stdout and '"user_id": "ana"' in ok.stdout
    bad = runner.invoke(main, ["token", "verify"], input=token[:-3] + "AAA\n")
    assert bad.exit_code == 1 and bad.stderr.startswith("invalid (tampered): ")
    assert runner.invoke(main, ["token", "issue", "--user", "ana", "--ttl", "0"]).exit_code == 1


def test_session_identity_prefers_jupyterhub() -> None:
    assert session_identity({"JUPYTERHUB_USER": " Ana "}).user_id == "ana"
    assert session_identity({"JUPYTERHUB_USER": " Ana "}).source == "jupyterhub"
    assert session_identity({}).source == "os-user"


def test_declared_mode_sources_in_order(tmp_path: Path) -> None:
    key = TokenKey.create(tmp_path / "token.key")
    resolver = IdentityResolver(require=(), key_file=tmp_path / "token.key")
    from tidyllm.governance.identity import Identity

    resolver.set_session(Identity("jovyan", source="os-user"))
    assert resolver.resolve({}).identity_source == "os-user"
    assert resolver.resolve({"user_id": "ana"}).user_id == "ana"  # a declaration beats the OS account
    ctx = resolver.resolve({"user_id": "bob", "department": "ops", "tidyllm_token": key.issue("ana", "risk",
                                                                                                ttl_seconds=60)})
    assert (ctx.user_id, ctx.department, ctx.identity_source) == ("ana", "risk", "token")  # the token beats both
    ctx = resolver.resolve({"department": "ops", "tidyllm_token": key.issue("ana", None, ttl_seconds=60)})
    assert (ctx.department, ctx.identity_source) == ("ops", "token/declared")
    assert "tidyllm_token" not in ctx.as_dict() and "identity_source" not in ctx.as_dict()


def _old_mart(url: str, names: list[tuple[str, str]]) -> None:
    """A mart at revision 0003 (before 0004_identity: made by downgrading a new one with the migrations' own
    downgrade steps) holding budgets named as older tidyllm stored them."""
    from alembic import command
    from alembic.config import Config

    from tidyllm.mart import TidyMart
    from tidyllm.mart import store as store_module

    mart = TidyMart(url)
    with mart.store.engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(store_module.__file__).with_name("migrations")))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
        for i, (scope, name) in enumerate(names):
            conn.execute(sa.text("INSERT INTO budgets (id, scope, name, period, limit_usd, created_at, updated_at) "
                                 "VALUES (:id, :scope, :name, 'month', 5.0, :now, :now)"),
                         {"id": f"b{i}", "scope": scope, "name": name, "now": "2026-12-01 00:00:00"})
    mart.close()


def test_migration_normalises_budget_names(db_url: str) -> None:
    from tidyllm.mart import TidyMart

    _old_mart(db_url, [("department", " Risk  Management"), ("user", "ANA"), ("route", "Chat-Large")])
    mart = TidyMart(db_url)
    with mart.store.engine.connect() as conn:
        rows = sorted(tuple(r) for r in conn.execute(sa.text("SELECT scope, name FROM budgets")))
    assert rows == [("department", "risk management"), ("route", "Chat-Large"), ("user", "ana")]
    mart.close()


def test_migration_stops_on_budgets_that_become_one(db_url: str) -> None:
    from tidyllm.mart import TidyMart

    _old_mart(db_url, [("department", "Risk"), ("department", "risk")])
    with pytest.raises(StorageError, match="budgets 'Risk' and 'risk' are the same department"):
        TidyMart(db_url)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:  # nothing half-written: still 0003, both budgets as they were
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0003"
        assert sorted(r[0] for r in conn.execute(sa.text("SELECT name FROM budgets"))) == ["Risk", "risk"]
    engine.dispose()


def test_authenticated_identity_follows_tasks_and_threads() -> None:
    import asyncio

    from tidyllm.governance.identity import Identity, authenticated, current_authenticated, set_authenticated

    async def handler() -> tuple:
        set_authenticated(Identity("Dora", "Treasury"))  # as a web framework's auth dependency would
        inner = await asyncio.to_thread(current_authenticated)
        task = await asyncio.create_task(asyncio.sleep(0, current_authenticated()))
        return inner, task

    inner, task = asyncio.run(handler())
    assert inner == task == Identity("dora", "treasury")
    assert current_authenticated() is None  # the request's context, not the process's
    with authenticated(Identity("ana")):
        assert current_authenticated() == Identity("ana", None, "authenticated")
    assert current_authenticated() is None
    with pytest.raises(TypeError, match="tidyllm Identity"):
        set_authenticated({"user_id": "ana"})  # type: ignore[arg-type]


def test_a_bad_token_is_refused_even_beside_an_authenticated_identity(tmp_path: Path) -> None:
    from tidyllm.errors import MetadataError
    from tidyllm.governance.identity import Identity

    key = TokenKey.create(tmp_path / "token.key")
    resolver = IdentityResolver(key_file=tmp_path / "token.key")
    expired = key.issue("ana", "risk", ttl_seconds=1, now=time.time() - 60)
    with pytest.raises(MetadataError) as info:
        resolver.resolve({"tidyllm_token": expired}, authenticated=Identity("carol", "ops"))
    assert info.value.rule == "identity:token-expired"
    valid = key.issue("ana", "risk", ttl_seconds=60)
    ctx = resolver.resolve({"tidyllm_token": valid}, authenticated=Identity("carol", "ops"))
    assert (ctx.user_id, ctx.department, ctx.identity_source) == ("carol", "ops", "authenticated")

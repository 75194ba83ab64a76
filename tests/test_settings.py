"""Settings: precedence (argument > environment > file > default) and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidyllm.errors import ConfigurationError
from tidyllm.settings import Settings, load_settings


def test_defaults(tmp_path: Path) -> None:
    s = load_settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'home' / 'tidyllm.db'}"
    assert s.gateway_uri is None and s.audit.capture == "hash" and s.governance.unpriced == "refuse"
    assert s.source is None


def test_precedence_argument_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "tidyllm.yaml"
    cfg.write_text("database_url: sqlite:///file.db\ngateway_uri: http://file:5000\n"
                   "defaults: {user_id: ana, department: risk}\ngovernance: {require_audit: true}\n")
    s = load_settings()
    assert s.database_url == "sqlite:///file.db" and s.defaults["department"] == "risk"
    assert s.governance.require_audit is True and s.source == str(cfg)
    monkeypatch.setenv("TIDYLLM_DATABASE_URL", "sqlite:///env.db")
    monkeypatch.setenv("TIDYLLM_DEPARTMENT", "finance")
    monkeypatch.setenv("TIDYLLM_REQUIRE_AUDIT", "false")
    s = load_settings()
    assert s.database_url == "sqlite:///env.db" and s.gateway_uri == "http://file:5000"
    assert s.defaults == {"user_id": "ana", "department": "finance"}
    assert s.governance.require_audit is False
    s = load_settings(database_url="sqlite:///arg.db", governance={"require_audit": True})
    assert s.database_url == "sqlite:///arg.db" and s.governance.require_audit is True


def test_explicit_path_and_mapping(tmp_path: Path) -> None:
    other = tmp_path / "conf" / "team.yaml"
    other.parent.mkdir()
    other.write_text("audit: {capture: full}\n")
    assert load_settings(other).audit.capture == "full"
    assert load_settings({"audit": {"capture": "none"}}).audit.capture == "none"
    s = load_settings(Settings(), gateway_mode="server")
    assert s.gateway_mode == "server"
    assert s.replace(gateway_uri="http://x").gateway_uri == "http://x"


@pytest.mark.parametrize("text, match", [
    ("colour: blue\n", r"tidyllm.yaml: unknown setting 'colour'; allowed: .*database_url"),
    ("audit: {capture: everything}\n", r"audit.capture must be one of none, hash, full"),
    ("governance: {timezone: Mars/Olympus}\n", r"governance.timezone 'Mars/Olympus' is not a known IANA"),
    ("governance: {lease_ttl_seconds: soon}\n", r"governance.lease_ttl_seconds must be a number"),
    ("governance: {require_audit: maybe}\n", r"governance.require_audit must be true or false"),
    ("governance: {nope: 1}\n", r"unknown setting governance.nope"),
    ("budgets: {department: risk}\n", r"'budgets' must be a list of mappings"),
    ("defaults: {department: 3}\n", r"defaults.department must be a string"),
    ("- a\n- b\n", r"top level must be a mapping"),
    ("database_url: [1\n", r"not valid YAML"),
    ("gateway_mode: cloud\n", r"gateway_mode must be one of legacy, server"),
])
def test_bad_file_names_file_key_and_allowed(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "tidyllm.yaml").write_text(text)
    with pytest.raises(ConfigurationError, match=match) as info:
        load_settings()
    assert "tidyllm.yaml" in str(info.value)


def test_missing_file_and_bad_argument() -> None:
    with pytest.raises(ConfigurationError, match="cannot read settings file"):
        load_settings("does-not-exist.yaml")
    with pytest.raises(ConfigurationError, match="argument: unknown setting 'databse_url'"):
        load_settings(databse_url="sqlite:///x.db")


def test_secrets_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")
    s = load_settings()
    assert s.mlflow_password == "hunter2-secret" and "hunter2-secret" not in repr(s)

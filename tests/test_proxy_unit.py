"""The proxy's parts that need no proxy process: keys in the mart, the generated config, the refusal mapping,
the log filter, the CLI, and money as people read it. (tests/test_proxy_e2e.py runs the real proxy.)"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tidyllm.cli import main
from tidyllm.errors import ConfigurationError
from tidyllm.money import usd


@pytest.mark.parametrize("amount, text", [
    (0, "$0.00"), (0.006, "$0.006"), (0.004, "$0.004"), (0.00523, "$0.00523"), (0.0000012, "$0.0000012"),
    (0.5, "$0.50"), (0.1234, "$0.123"), (1, "$1.00"), (50, "$50.00"), (1234.567, "$1,234.57"),
    (-0.004, "-$0.004"), (0.00004 - 0.00003999999999999999, "$0.00"), (-6.8e-21, "$0.00"), (None, "-"), (float("nan"), "-"), (0.9999, "$1.00")])
def test_usd_never_shows_zero_for_a_non_zero_amount(amount: Any, text: str) -> None:
    assert usd(amount) == text


def test_usd_with_fixed_decimals_shows_what_changed() -> None:
    assert usd(3.999989, 6) == "$3.999989"


def test_budget_refusal_and_cli_show_sub_cent_limits(tmp_path: Path) -> None:
    from tidyllm.governance.budgets import Refusal

    msg = Refusal("b", "department", "risk", "month", 0.006, 0.00523, 0.0, 0.0008).message()
    assert msg.startswith("department 'risk' has $0.00077 left of $0.006 this month (spent $0.00523, reserved $0.00)")
    assert "needs up to $0.0008." in msg
    result = CliRunner().invoke(main, ["budget", "set", "department", "risk", "0.006",
                                       "--database-url", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 0 and result.output == "department 'risk': $0.006 per month (audited)\n"


@pytest.fixture
def store(mart: Any) -> Any:
    from tidyllm.governance.audit import AuditTrail
    from tidyllm.proxy.keys import KeyStore

    return KeyStore(mart, AuditTrail(mart), cache_seconds=0)


def test_key_is_shown_once_and_stored_hashed(store: Any, mart: Any) -> None:
    import sqlalchemy as sa

    from tidyllm.mart.schema import audit_log, proxy_keys
    from tidyllm.proxy.keys import hash_key

    row, key = store.create(department="risk", user_id="ana", ttl="90d", routes=["chat*"], actor="ops")
    assert key.startswith("sk-tidy-") and len(key) == 8 + 43
    assert row["prefix"] == key[:14] and "key_hash" not in row
    assert row["expires_at"] - row["created_at"] == dt.timedelta(days=90)
    with mart.store.begin() as conn:
        stored = conn.execute(sa.select(proxy_keys)).mappings().one()
        audit = conn.execute(sa.select(audit_log)).mappings().all()
    assert stored["key_hash"] == hash_key(key) and key not in str(dict(stored))
    assert [(a["decision"], a["rule"], a["department"], a["user_id"]) for a in audit] == [
        ("admin", "proxy_key:created", "risk", "ana")]
    assert key not in str([dict(a) for a in audit]) and "by ops" in audit[0]["audit_reason"]
    identity = store.check(f"Bearer {key}")
    assert (identity.department, identity.user_id, identity.routes) == ("risk", "ana", ("chat*",))
    assert identity.allows("chat-small") and not identity.allows("embed")
    frame = store.list()
    assert list(frame["state"]) == ["live"] and "key_hash" not in frame.columns


def test_refused_keys_are_audited_and_revocation_and_rotation_take_effect(store: Any, mart: Any) -> None:
    from tidyllm.proxy.keys import KeyRefused

    row, key = store.create(department="ops", user_id="bo")
    with pytest.raises(KeyRefused, match="unknown API key") as unknown:
        store.check("sk-tidy-guessed-key", client="10.0.0.7", route="/v1/chat/completions")
    assert unknown.value.reason == "unknown"
    with pytest.raises(KeyRefused, match="no API key"):
        store.check(None)
    new, new_key = store.rotate(row["id"][:8], actor="ops")
    with pytest.raises(KeyRefused, match="was revoked; use the key that replaced it"):
        store.check(key)
    assert store.check(new_key).department == "ops"
    store.revoke(new["id"])
    store.revoke(new["id"])  # idempotent: one audit row
    with pytest.raises(KeyRefused, match="was revoked"):
        store.check(new_key)
    from tidyllm.governance.audit import AuditTrail

    trail = AuditTrail(mart)
    frame = trail.frame()
    assert list(zip(frame["decision"], frame["rule"])) == [
        ("admin", "proxy_key:created"), ("refused", "proxy_key:unknown"), ("refused", "proxy_key:missing"),
        ("admin", "proxy_key:rotated"), ("refused", "proxy_key:revoked"), ("admin", "proxy_key:revoked"),
        ("refused", "proxy_key:revoked")]
    refused = trail.frame(decision="refused")
    assert list(refused["status"]) == ["refused"] * 4
    assert "sk-tidy-guessed-key" not in str(trail.frame().to_dict())
    assert trail.verify()
    assert list(store.list(include_revoked=True)["state"]) == ["revoked", "revoked"]


def test_expired_key_is_refused(store: Any) -> None:
    from tidyllm.proxy.keys import KeyRefused

    _, key = store.create(department="risk", ttl=dt.timedelta(seconds=-1))
    with pytest.raises(KeyRefused, match="expired at .* rotate it"):
        store.check(key)


@pytest.mark.parametrize("ttl", ["90", "0d", "1y", "soon"])
def test_bad_ttl_names_the_fix(ttl: str) -> None:
    from tidyllm.proxy.keys import parse_ttl

    with pytest.raises(ConfigurationError, match="use a number and a unit like 90d"):
        parse_ttl(ttl)


def test_bad_key_input_is_refused_before_writing(store: Any) -> None:
    with pytest.raises(ConfigurationError, match="non-empty department"):
        store.create(department=" ")
    with pytest.raises(ConfigurationError, match="not the key itself"):
        store.revoke("sk-tidy-abcdef")
    with pytest.raises(ConfigurationError, match="no key with id"):
        store.revoke("deadbeef")
    assert store.list().empty


def test_keys_cli_create_list_revoke_rotate(tmp_path: Path) -> None:
    db = ["--database-url", f"sqlite:///{tmp_path / 'keys.db'}"]
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "--user", "ana", "--department", "risk", "--ttl", "90d",
                                   "--routes", "chat*", *db])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("sk-tidy-") and "shown this once" in created.stderr
    listed = runner.invoke(main, ["keys", "list", *db])
    assert "risk" in listed.output and key not in listed.output and key[:14] in listed.output
    key_id = listed.output.splitlines()[1].split()[0]
    rotated = runner.invoke(main, ["keys", "rotate", key_id, *db])
    assert rotated.exit_code == 0 and rotated.stdout.strip().startswith("sk-tidy-")
    assert runner.invoke(main, ["keys", "revoke", key_id, *db]).output.startswith("revoked key")
    bad = runner.invoke(main, ["keys", "revoke", "nope-not-an-id", *db])
    assert bad.exit_code == 1 and "no key with id" in bad.output


def test_print_config_lists_every_route_and_group(tmp_path: Path) -> None:
    from tidyllm.stack import bundled_gateway_config

    settings = tmp_path / "tidyllm.yaml"
    settings.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path / 'm.db'}",
                                        "gateway_uri": "http://127.0.0.1:5999",
                                        "gateway_config": str(bundled_gateway_config())}))
    result = CliRunner().invoke(main, ["proxy", "--print-config", "--config", str(settings)])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    names = {d["model_name"] for d in cfg["model_list"]}
    assert names == {"chat", "embed", "chat-large", "chat-small", "chat-claude", "chat-onprem"}
    chat = [d for d in cfg["model_list"] if d["model_name"] == "chat"]
    assert len(chat) == 4 and all(d["litellm_params"]["api_base"] == "http://127.0.0.1:5999/v1" for d in chat)
    small = next(d for d in cfg["model_list"] if d["model_name"] == "chat-small")
    assert small["litellm_params"]["model"] == "openai/chat-small"
    assert small["litellm_params"]["input_cost_per_token"] == pytest.approx(0.15e-6)
    assert cfg["litellm_settings"]["callbacks"] == ["tidyllm.proxy.runtime.proxy_handler_instance"]
    assert cfg["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY",
                                       "custom_auth": "tidyllm.proxy.runtime.user_api_key_auth"}
    out = tmp_path / "litellm.yaml"
    teams = CliRunner().invoke(main, ["proxy", "--print-config", "--litellm-keys", "--output", str(out),
                                      "--config", str(settings)])
    assert teams.exit_code == 0 and (out.stat().st_mode & 0o777) == 0o600
    assert "custom_auth" not in yaml.safe_load(out.read_text())["general_settings"]


def test_refusals_map_to_the_status_an_sdk_expects() -> None:
    import litellm

    from tidyllm import errors
    from tidyllm.proxy.errors import KeyRefusedError, find_refusal, http_error

    budget = errors.BudgetExceededError("department 'risk' has $0.001 left", scope="department", name="risk")
    budget.rule = "budget:department:risk:month"
    assert http_error(budget) == (429, "insufficient_quota", {"x-tidyllm-rule": "budget:department:risk:month"})
    rate = errors.RateLimitedError("slow down", retry_after=2.2)
    assert http_error(rate)[:2] == (429, "rate_limit_exceeded") and http_error(rate)[2]["retry-after"] == "3"
    assert http_error(errors.RouteNotAuthorizedError("no"))[:2] == (403, "permission_denied")
    assert http_error(errors.UnpricedModelError("no price"))[:2] == (403, "permission_denied")
    assert http_error(errors.MetadataError("needs an audit reason"))[:2] == (400, "invalid_request_error")
    claim = errors.MetadataError("bound to risk")
    claim.rule = "proxy_identity:department"
    assert http_error(claim)[:2] == (403, "permission_denied")
    assert http_error(KeyRefusedError("revoked", reason="revoked"))[:2] == (401, "auth_error")
    # LiteLLM re-wraps: the refusal is found through the chain
    try:
        try:
            raise budget
        except Exception as inner:
            raise litellm.BadRequestError("wrapped", model="m", llm_provider="openai") from inner
    except Exception as outer:
        assert find_refusal(outer) is budget
    assert find_refusal(ValueError("x")) is None


def test_log_filter_keeps_one_line_per_refusal() -> None:
    from tidyllm import errors
    from tidyllm.proxy.hooks import RefusalLogFilter

    f = RefusalLogFilter()
    err = errors.BudgetExceededError("department 'x' has $0.001 left")

    def record(msg: str, args: Any = (), exc: Any = None) -> logging.LogRecord:
        return logging.LogRecord("LiteLLM Proxy", logging.ERROR, __file__, 1, msg, args,
                                 (type(exc), exc, None) if exc else None)

    assert not f.filter(record("Exception occured - %s - %s", ("call-1", err)))
    assert not f.filter(record("boom", exc=err))
    assert f.filter(record("a provider timed out"))
    RefusalLogFilter.remember("unknown API key; ask your platform team")
    assert not f.filter(record("user_api_key_auth(): Exception occured - unknown API key; ask your platform team"))

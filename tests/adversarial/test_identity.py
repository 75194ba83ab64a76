"""Red team: who is calling. Callers that leave out their department, spell it differently, claim another
one, or present an expired, altered or foreign token — through a governed litellm Router (sync and async)
and plain ``litellm.acompletion``, with the provider simulator counting every request that reaches it."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import tidyllm
from tidyllm.errors import BudgetExceededError, MetadataError, RateLimitedError, RouteNotAuthorizedError
from tidyllm.gateway.simulator import Simulator
from tidyllm.governance.identity import Identity, authenticated
from tidyllm.governance.tokens import TokenKey

from govhelpers import CALL_ROWS, sim_router

MSG = [{"role": "user", "content": "Summarise the liquidity stress results in two sentences."}]
PATHS = ["router-sync", "router-async", "acompletion"]


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=0, latency_scale=0) as s:
        yield s


@pytest.fixture
def key(tmp_path: Path) -> TokenKey:
    """The platform's token key, in a 0600 file outside the database."""
    return TokenKey.create(tmp_path / "keys" / "token.key")


def install(tmp_path: Path, **governance: Any) -> Any:
    """A platform on a fresh SQLite mart; ``governance`` adds to the section."""
    return tidyllm.install(database_url=f"sqlite:///{tmp_path / 'mart.db'}", routing={"strategy": "cheapest"},
                           governance={"token_key_file": str(tmp_path / "keys" / "token.key"), **governance})


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    yield lambda **governance: install(tmp_path, **governance)
    tidyllm.uninstall()


def call(platform: Any, sim: Simulator, path: str, metadata: dict[str, Any], **kwargs: Any) -> Any:
    """One governed call through ``path``; returns LiteLLM's response."""
    import litellm

    from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

    md = dict(metadata)
    if path == "router-sync":
        return sim_router(platform, sim.url).completion(model="chat", messages=MSG, metadata=md, **kwargs)

    async def go() -> Any:
        try:
            if path == "router-async":
                return await sim_router(platform, sim.url).acompletion(model="chat", messages=MSG, metadata=md,
                                                                       **kwargs)
            platform.prices.set("openai/sim-gpt-small", 1.0, 2.0)
            return await litellm.acompletion(model="openai/sim-gpt-small", api_base=sim.url,
                                             api_key="sk-test-not-real", messages=MSG, metadata=md, **kwargs)
        finally:
            # async success callbacks run on this loop after the call returns: let them settle it
            await asyncio.sleep(0)
            await GLOBAL_LOGGING_WORKER.flush()

    return asyncio.run(go())


def refused(platform: Any, sim: Simulator, path: str, metadata: dict[str, Any], error: type = MetadataError) -> Any:
    """Make a call that must be refused before the provider: returns the error."""
    sim.reset_stats()
    with pytest.raises(error) as info:
        call(platform, sim, path, metadata)
    assert sim.hits() == 0, "a refused call reached the provider"
    return info.value


def last_audit(platform: Any) -> dict[str, Any]:
    audit = platform.audit.frame(decision=CALL_ROWS)
    assert platform.audit.verify().ok
    return audit.iloc[-1].to_dict()


# --- a call with no department ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_no_department_is_refused_by_default(make: Callable[..., Any], sim: Simulator, path: str) -> None:
    platform = make()
    platform.budgets.set("department", "risk", 5.0, "month")
    err = refused(platform, sim, path, {"user_id": "ana", "audit_reason": "stress test"})
    assert err.rule == "identity:missing-department"
    assert "requires a department on every call" in str(err) and "\n" not in str(err).split("\n\nLiteLLM")[0]
    row = last_audit(platform)
    assert (row["decision"], row["rule"], row["user_id"]) == ("refused", "identity:missing-department", "ana")


@pytest.mark.parametrize("path", PATHS)
def test_no_department_is_never_cheaper_even_when_not_required(make: Callable[..., Any], sim: Simulator,
                                                                path: str) -> None:
    platform = make(require=[])
    call(platform, sim, path, {"user_id": "ana"}, max_tokens=5)  # no department budget yet: nothing to escape
    platform.budgets.set("department", "risk", 5.0, "month")
    err = refused(platform, sim, path, {"user_id": "ana"})
    assert err.rule == "identity:missing-department" and "department budgets are set" in str(err)
    assert last_audit(platform)["rule"] == "identity:missing-department"


# --- a department in another case, with spaces ----------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_department_spelt_differently_is_charged_to_its_budget(make: Callable[..., Any], sim: Simulator,
                                                               path: str) -> None:
    platform = make()
    platform.budgets.set("department", "Risk  Management ", 5.0, "month")
    assert list(platform.budgets.status()["name"]) == ["risk management"]
    md = {"user_id": " Ana ", "department": "  RISK\tmanagement", "tidyllm_call_id": f"spelt-{path}"}
    sim.reset_stats()
    resp = call(platform, sim, path, md, max_tokens=20)
    assert sim.hits() == 1
    row = platform.wait_for_call(f"spelt-{path}")
    assert (row["department"], row["user_id"], row["status"]) == ("risk management", "ana", "success")
    cost = (resp.usage.prompt_tokens * 1.0 + resp.usage.completion_tokens * 2.0) / 1e6
    status = platform.budgets.status(scope="department", name="RISK MANAGEMENT").iloc[0]
    assert status["spent_usd"] == pytest.approx(cost) and status["reserved_usd"] == 0
    # and over its limit the same spelling is refused by that budget
    platform.budgets.set("department", "risk management", 0.0, "month")
    err = refused(platform, sim, path, {"department": "Risk Management"}, error=BudgetExceededError)
    assert err.rule == "budget:department:risk management:month"


def test_rules_and_rate_limits_match_normalised_names(tmp_path: Path, sim: Simulator) -> None:
    platform = tidyllm.install(
        database_url=f"sqlite:///{tmp_path / 'mart.db'}", routing={"strategy": "cheapest"},
        authorization=[{"name": "interns-no-premium", "departments": [" Interns"], "deny_routes": ["ep-large"]},
                       {"name": "no-one-but-ana", "users": ["BOB"], "deny_routes": ["ep-*"]}],
        rate_limits=[{"scope": "department", "name": "Interns ", "rpm": 1}])
    try:
        router = sim_router(platform, sim.url, routes={"ep-large": ("sim-gpt-large", 10.0, 30.0)})
        with pytest.raises(RouteNotAuthorizedError, match="interns-no-premium"):
            router.completion(model="chat", messages=MSG, metadata={"department": "INTERNS"})
        with pytest.raises(RouteNotAuthorizedError, match="no-one-but-ana"):
            router.completion(model="chat", messages=MSG, metadata={"department": "risk", "user_id": " bob"})
        small = sim_router(platform, sim.url, routes={"ep-small": ("sim-gpt-small", 1.0, 2.0)})
        small.completion(model="chat", messages=MSG, max_tokens=5, metadata={"department": "interns"})
        with pytest.raises(RateLimitedError, match="department 'interns'"):
            small.completion(model="chat", messages=MSG, max_tokens=5, metadata={"department": "Interns"})
    finally:
        tidyllm.uninstall()


# --- claiming another department in verified mode -----------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_verified_mode_refuses_and_audits_another_department(make: Callable[..., Any], sim: Simulator,
                                                             key: TokenKey, path: str) -> None:
    platform = make(identity="verified")
    platform.budgets.set("department", "risk", 0.0, "month")  # risk's money is gone: claim to be treasury
    platform.budgets.set("department", "treasury", 50.0, "month")
    token = key.issue("ana", "risk", ttl_seconds=3600)
    err = refused(platform, sim, path, {"tidyllm_token": token, "department": "treasury"})
    assert err.rule == "identity:department-mismatch"
    assert "declared department 'treasury' disagrees with department 'risk'" in str(err)
    row = last_audit(platform)
    assert (row["decision"], row["rule"], row["department"]) == ("refused", "identity:department-mismatch", "treasury")
    # the token's own department, declared or not, is charged: and risk has nothing left
    err = refused(platform, sim, path, {"tidyllm_token": token}, error=BudgetExceededError)
    assert err.rule == "budget:department:risk:month"
    # and a call that only declares who it is carries no verified identity at all
    err = refused(platform, sim, path, {"user_id": "ana", "department": "treasury"})
    assert err.rule == "identity:unverified"


@pytest.mark.parametrize("path", PATHS)
def test_authenticated_identity_from_the_entry_point(make: Callable[..., Any], sim: Simulator, path: str) -> None:
    platform = make(identity="verified")
    platform.budgets.set("department", "ops", 5.0, "month")
    with authenticated(Identity("Carol", "Ops")):
        err = refused(platform, sim, path, {"department": "risk"})
        assert err.rule == "identity:department-mismatch" and "verified by authenticated" in str(err)
        sim.reset_stats()
        call(platform, sim, path, {"tidyllm_call_id": f"auth-{path}"}, max_tokens=5)
    assert sim.hits() == 1
    row = platform.wait_for_call(f"auth-{path}")
    assert (row["user_id"], row["department"]) == ("carol", "ops")
    assert platform.budgets.status(scope="department", name="ops").iloc[0]["spent_usd"] > 0
    for md in ({}, {"user_id": "carol", "department": "ops"}):  # outside the block: no verified identity
        with pytest.raises(MetadataError, match="verifies identity"):
            platform.governor.context(md)


def test_verified_mode_directory_gives_a_verified_user_its_department(make: Callable[..., Any], key: TokenKey) -> None:
    platform = make(identity="verified", user_departments={"Ana": "Risk"})
    ctx = platform.governor.context({"tidyllm_token": key.issue("ana", None, ttl_seconds=60)})
    assert (ctx.user_id, ctx.department, ctx.identity_source) == ("ana", "risk", "token")
    with pytest.raises(MetadataError) as info:
        platform.governor.context({"tidyllm_token": key.issue("bob", None, ttl_seconds=60), "department": "risk"})
    assert info.value.rule == "identity:department-unverified"


# --- expired, tampered and other platforms' tokens -------------------------------------------------------------

def _tampered(key: TokenKey) -> str:
    """A valid token for an intern, its claims rewritten to say department risk (signature kept)."""
    prefix, body, signature = key.issue("ana", "interns", ttl_seconds=3600).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["dept"] = "risk"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{prefix}.{forged}.{signature}"


TOKENS: dict[str, Callable[[TokenKey], str]] = {
    "expired": lambda key: key.issue("ana", "risk", ttl_seconds=60, now=time.time() - 3600),
    "tampered": _tampered,
    "wrong-platform": lambda key: TokenKey(secrets.token_bytes(32)).issue("ana", "risk", ttl_seconds=3600),
}


@pytest.mark.parametrize("mode", ["declared", "verified"])
@pytest.mark.parametrize("kind", list(TOKENS))
@pytest.mark.parametrize("path", PATHS)
def test_bad_tokens_are_refused_and_audited(make: Callable[..., Any], sim: Simulator, key: TokenKey, path: str,
                                            kind: str, mode: str) -> None:
    platform = make(identity=mode)
    platform.budgets.set("department", "risk", 5.0, "month")
    token = TOKENS[kind](key)
    err = refused(platform, sim, path, {"tidyllm_token": token, "department": "risk", "audit_reason": "alm run"})
    assert err.rule == f"identity:token-{kind}"
    assert token not in str(err)
    row = last_audit(platform)
    assert (row["decision"], row["rule"], row["status"]) == ("refused", f"identity:token-{kind}", "refused")
    # the token is a credential: it is in no row of the mart
    for frame in (platform.calls(), platform.audit.frame(decision=CALL_ROWS)):
        assert token not in frame.to_json(date_format="iso")


def test_process_token_from_the_environment(tmp_path: Path, key: TokenKey, sim: Simulator,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDYLLM_TOKEN", key.issue("svc-alm", "Treasury", ttl_seconds=600))
    platform = install(tmp_path, identity="verified")
    try:
        ctx = platform.governor.context({"audit_reason": "nightly ALM"})
        assert (ctx.user_id, ctx.department, ctx.identity_source) == ("svc-alm", "treasury", "token")
        assert "TIDYLLM_TOKEN" not in repr(platform.settings) and "tlm1." not in repr(platform.settings)
        with pytest.raises(MetadataError, match="disagrees"):
            platform.governor.context({"department": "risk"})
        # a token in the call's metadata speaks for that call
        other = key.issue("ana", "risk", ttl_seconds=60)
        assert platform.governor.context({"tidyllm_token": other}).department == "risk"
    finally:
        tidyllm.uninstall()


# --- the notebook: %load_ext installs the platform ---------------------------------------------------------------

def test_load_ext_installs_the_platform_and_governs_every_litellm_call(
        tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    import litellm
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    (tmp_path / "tidyllm.yaml").write_text(
        f"database_url: sqlite:///{tmp_path / 'nb.db'}\n"
        "budgets: [{scope: department, name: Risk, limit_usd: 0.0, period: month}]\n"
        "prices: [{model: openai/sim-gpt-small, input_per_1m: 1.0, output_per_1m: 2.0}]\n")
    monkeypatch.setenv("JUPYTERHUB_USER", "Ana.Hub")
    tidyllm.uninstall()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    try:
        shell.run_line_magic("load_ext", "tidyllm")
        platform = tidyllm.platform.current()
        assert platform is not None and platform.mart.url.endswith("nb.db")
        assert platform._callbacks in litellm.callbacks
        assert platform.identity.session == Identity("ana.hub", source="jupyterhub")
        # a plain LiteLLM call in the first cell, no metadata: the notebook's identity applies
        shell.run_line_magic("llm_config", "department=' RISK ' reason='peer review'")
        shell.run_line_magic("llm_config", "reason='peer review'")  # unchanged: the notebook's context stays whole
        assert platform.identity.notebook == {"department": " RISK ", "audit_reason": "peer review"}
        sim.reset_stats()
        result = shell.run_cell(
            "import asyncio, litellm\n"
            f"asyncio.run(litellm.acompletion(model='openai/sim-gpt-small', api_base='{sim.url}', "
            "api_key='sk-test-not-real', messages=[{'role': 'user', 'content': 'hello'}]))")
        assert isinstance(result.error_in_exec, BudgetExceededError)
        assert sim.hits() == 0
        row = platform.audit.frame(decision=CALL_ROWS).iloc[-1]
        assert (row["decision"], row["department"], row["user_id"]) == ("refused", "risk", "ana.hub")
        assert platform.governor.context({}).identity_source == "jupyterhub/declared"
        shell.run_line_magic("unload_ext", "tidyllm")
        assert platform.identity.session is None and platform.identity.notebook == {}
    finally:
        InteractiveShell.clear_instance()
        tidyllm.uninstall()

"""Helpers shared by the tests that run a whole local stack (provider simulator + legacy MLflow gateway +
SQLite mart): simulator profiles that answer at once, the module-scoped ``stack`` fixture and a
department's budget. A plain module, imported as ``from _fixtures import ...`` (like ``govhelpers``)."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator, Mapping

import pytest

from tidyllm.gateway.simulator import ModelProfile, parse_profiles
from tidyllm.stack import LocalStack

#: the chat models behind the bundled gateway config's routes (its embed route uses ``sim-embed``)
CHAT_MODELS = ("sim-gpt-small", "sim-gpt-large", "sim-claude", "sim-onprem-llama")


def instant_profiles(chat: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ModelProfile]:
    """The bundled gateway's simulator models with no latency; ``chat`` adds fields to every chat model's
    profile, ``extra`` adds fields to the named models' profiles."""
    spec: dict[str, dict[str, Any]] = {name: {"latency": {"base_ms": 0}, **(chat or {})} for name in CHAT_MODELS}
    spec["sim-embed"] = {"kind": "embedding", "latency": {"base_ms": 0}}
    for name, fields in (extra or {}).items():
        spec[name] = {**spec[name], **fields}
    return parse_profiles({"models": spec})


def stack_fixture(profiles: dict[str, ModelProfile], tmp_name: str) -> Callable[..., Any]:
    """A module-scoped ``stack`` fixture: a :class:`LocalStack` on ``profiles`` (latency scale 0), a fresh
    SQLite mart and the ``cheapest`` routing strategy. Assign it in a test module: ``stack = stack_fixture(...)``."""

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
        db = tmp_path_factory.mktemp(tmp_name) / "mart.db"
        with LocalStack(profiles=profiles, latency_scale=0, database_url=f"sqlite:///{db}",
                        routing={"strategy": "cheapest"}) as s:
            yield s

    return stack


def new_department(stack: LocalStack, prefix: str, limit: float) -> str:
    """A department of its own (``<prefix>-<random>``) with a monthly budget of ``limit`` USD."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    assert stack.platform is not None
    stack.platform.budgets.set("department", name, limit, "month")
    return name


def budget_status(stack: LocalStack, dept: str) -> Any:
    """The department's budget row (spent_usd, reserved_usd, ...)."""
    return stack.platform.budgets.status(scope="department", name=dept).iloc[0]

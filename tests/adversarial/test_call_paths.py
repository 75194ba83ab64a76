"""Red team: the call paths that used to escape enforcement.

On the old main a plain sync ``litellm.completion`` / ``embedding`` could not be stopped (LiteLLM swallows
every callback exception on that path): it was only recorded as ``unenforced``, and jupyter-ai's ``%%ai``
(which calls ``litellm.completion``) pushed a department to 5.6x its limit with no user or department.
``install()`` now instruments LiteLLM's sync entry points, and ``%load_ext tidyllm`` installs the platform,
so every LiteLLM call in a notebook is governed with the notebook's identity from the first cell."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import wrapt

import tidyllm
from tidyllm.errors import BudgetExceededError
from tidyllm.gateway.simulator import Simulator

from adversarial._redteam import META, MSG, assert_books_agree, books
from govhelpers import CALL_ROWS
from adversarial.test_forged_admission import _settled


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(seed=17, latency_scale=0.0) as s:
        yield s


def test_sync_completion_embedding_and_text_completion_over_budget_never_reach_the_provider(
        db_url: str, sim: Simulator) -> None:
    import litellm

    sim.reset_stats()
    platform = tidyllm.install(database_url=db_url)
    try:
        platform.prices.set("openai/sim-gpt-small", 1.0, 2.0)
        platform.prices.set("openai/sim-embed", 0.02, 0.0)
        platform.budgets.set("department", "risk", 1e-9, "month")
        common = dict(api_base=sim.url, api_key="sk-test-not-real", metadata=dict(META))
        with pytest.raises(BudgetExceededError):
            litellm.completion(model="openai/sim-gpt-small", messages=MSG, **common)
        with pytest.raises(BudgetExceededError):
            litellm.completion("openai/sim-gpt-small", MSG, **common)  # positional arguments too
        with pytest.raises(BudgetExceededError):
            litellm.embedding(model="openai/sim-embed", input=["a", "b"], **common)
        with pytest.raises(BudgetExceededError):
            litellm.text_completion(prompt="Summarise", model="openai/sim-gpt-small", **common)
        assert sim.stats()["total"] == 0
        assert list(platform.audit.frame(decision=CALL_ROWS)["status"]) == ["refused"] * 4
        # with room, the same calls are governed, charged and audited like any other
        platform.budgets.set("department", "risk", 1.0, "month")
        litellm.completion(model="openai/sim-gpt-small", messages=MSG, max_tokens=16, **common)
        litellm.embedding(model="openai/sim-embed", input=["a", "b"], **common)
        _settled(platform, 2)
        b = books(platform, sim, {"sim-gpt-small": (1.0, 2.0), "sim-embed": (0.02, 0.0)})
        assert b.answered == 2
        assert_books_agree(b, limit=1.0)
        tidyllm.uninstall()
        assert not isinstance(litellm.completion, wrapt.FunctionWrapper)  # uninstall puts LiteLLM's own back
    finally:
        tidyllm.uninstall()


def test_jupyter_ai_magic_is_governed_with_the_notebook_identity(tmp_path: Path, sim: Simulator,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """jupyter-ai's ``%%ai`` (its LiteLLM-based magics package, from the package index) in a real IPython
    shell with ``%load_ext tidyllm``: refused over budget with tidyllm's one-line message and the provider
    never hit; with room, governed as the notebook's user and department, and audited."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    (tmp_path / "tidyllm.yaml").write_text(
        f"database_url: sqlite:///{tmp_path / 'nb.db'}\n"
        "budgets: [{scope: department, name: risk, limit_usd: 0.0, period: month}]\n"
        "prices: [{model: openai/sim-gpt-small, input_per_1m: 1.0, output_per_1m: 2.0},\n"
        "         {model: sim-gpt-small, input_per_1m: 1.0, output_per_1m: 2.0}]\n")
    monkeypatch.setenv("JUPYTERHUB_USER", "ana")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    tidyllm.uninstall()
    sim.reset_stats()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    try:
        shell.run_line_magic("load_ext", "tidyllm")
        shell.run_line_magic("llm_config", "department=risk reason='peer review'")
        shell.run_line_magic("load_ext", "jupyter_ai_magic_commands")
        shell.run_line_magic("ai", f"alias simchat openai/sim-gpt-small --api-base {sim.url}")
        refused = shell.run_cell_magic("ai", "simchat", "Summarise the model validation findings.")
        assert "department 'risk' has $0" in str(refused) and "tidyllm budget set department risk" in str(refused)
        assert sim.stats()["total"] == 0
        platform = tidyllm.platform.current()
        platform.budgets.set("department", "risk", 1.0, "month")
        answered = shell.run_cell_magic("ai", "simchat", "Summarise the model validation findings.")
        assert answered is not None and "Error" not in str(answered)
        _settled(platform, 1)
        rows = platform.audit.frame(decision=CALL_ROWS)
        assert list(rows["status"]) == ["refused", "success"]
        assert set(rows["user_id"]) == {"ana"} and set(rows["department"]) == {"risk"}
        call = platform.mart.frame("llm_calls", status="success").iloc[0]
        assert call["identity_source"] and call["user_id"] == "ana"
        b = books(platform, sim, {"sim-gpt-small": (1.0, 2.0)})
        assert_books_agree(b, limit=1.0)
    finally:
        InteractiveShell.clear_instance()
        tidyllm.uninstall()

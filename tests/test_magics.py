"""The IPython magics, driven through a real ``InteractiveShell`` against a real local stack
(provider simulator + legacy MLflow gateway + governed platform), one stack for the module."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tidyllm.governance.audit import hash_content
from tidyllm.magics._render import LLMResult, Receipt, budget_figure, extract_code, interpolate, remaining_usd, usd

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 'user=ana department=risk reason="MVR peer review" use_case=qa'
SETTINGS = {
    "defaults": {"user_id": "demo-user"},
    "governance": {"require_audit": True, "default_max_tokens": 256},
    "budgets": [{"scope": "org", "name": "org", "limit_usd": 50.0, "period": "month"},
                {"scope": "department", "name": "risk", "limit_usd": 4.0, "period": "month"},
                {"scope": "department", "name": "finance", "limit_usd": 2.0, "period": "month"},
                {"scope": "department", "name": "marketing", "limit_usd": 0.05, "period": "month"}],
    "authorization": [{"name": "marketing-no-premium", "departments": ["marketing"], "deny_routes": ["chat-large"]}],
    # the cheapest-route rule: the same route for the same request, so assertions can name it
    "routing": {"strategy": "cheapest"},
}


@pytest.fixture(scope="module", autouse=True)
def fresh_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An ``ipython`` process with ``--InteractiveShellApp.extensions=['tidyllm']`` running a session script
    over a tidyllm.yaml whose gateway is not running. Started first and left running while the module's
    stack starts (it needs a few seconds of its own); its test reads the result."""
    import socket

    tmp = tmp_path_factory.mktemp("fresh")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # free once closed: nothing listens there
    gateway_yaml = REPO / "tidyllm" / "examples_data" / "gateway.yaml"
    (tmp / "tidyllm.yaml").write_text(textwrap.dedent(f"""\
        gateway_uri: http://127.0.0.1:{dead}
        gateway_config: {gateway_yaml}
        database_url: sqlite:///{tmp / 'first.db'}
        defaults: {{user_id: ana, department: risk}}
        governance: {{require_audit: true}}
        budgets: [{{scope: department, name: risk, limit_usd: 1.0, period: month}}]
        """))
    script = tmp / "session.py"
    script.write_text(textwrap.dedent(f"""\
        import tidyllm.platform
        ip = get_ipython()
        print("autoloaded:", "llm" in ip.magics_manager.magics["cell"], tidyllm.platform.current() is None)
        ip.run_cell('%%llm -r "offline try" -m gpt-4o-mini --mock "governed offline"\\nhello')
        print("installed:", tidyllm.platform.current().mart.url)
        ip.run_cell('%%llm -r "gateway try"\\nhello')
        ip.run_line_magic("llm_config", "database_url=sqlite:///{tmp / 'second.db'}")
        ip.run_cell('%%llm -r "second mart" -m gpt-4o-mini --mock ok --no-receipt\\nhello')
        print("reinstalled:", tidyllm.platform.current().mart.url)
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIDYLLM_", "MLFLOW_TRACKING_"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", IPYTHONDIR=str(tmp / "ipython"), PYTHONPATH=str(REPO),
               TIDYLLM_HOME=str(tmp / "home"))
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=nocolor",
                                 "--HistoryManager.hist_file=:memory:", "--InteractiveShellApp.extensions=['tidyllm']",
                                 str(script)], cwd=tmp, env=env, stdout=out, stderr=err)
    yield {"proc": proc, "dir": tmp, "dead": dead, "gateway_yaml": gateway_yaml}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Simulator (no random errors, so every assertion is deterministic) + legacy gateway + platform."""
    from tidyllm.gateway.simulator import load_profiles
    from tidyllm.stack import LocalStack

    profiles = {name: dataclasses.replace(p, error_rate=0.0, stream_failure_rate=0.0, rate_limits=(), outages=())
                for name, p in load_profiles().items()}
    db = tmp_path_factory.mktemp("mart") / "mart.db"
    with LocalStack(latency_scale=0, profiles=profiles, settings=SETTINGS, database_url=f"sqlite:///{db}") as s:
        # built now, so the Router's own LiteLLM callbacks belong to the state each test restores to
        s.platform.router()
        yield s


@pytest.fixture
def ip(stack: Any) -> Iterator[Any]:
    """A fresh IPython shell with ``%load_ext tidyllm`` and the notebook context of user ana, risk."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "tidyllm")
    shell.run_line_magic("llm_config", CONTEXT)
    yield shell
    shell.run_line_magic("unload_ext", "tidyllm")
    InteractiveShell.clear_instance()


def cell(ip: Any, line: str, body: str) -> Any:
    """Run ``%%llm line`` over ``body`` as a notebook cell would; returns the cell's value."""
    result = ip.run_cell(f"%%llm {line}\n{body}", store_history=True)
    result.raise_error()
    return result.result


def usage_error(ip: Any, source: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a cell that must fail with one ``UsageError`` line (no traceback); return its message."""
    from IPython.core.error import UsageError

    capsys.readouterr()
    result = ip.run_cell(source)
    assert isinstance(result.error_in_exec or result.error_before_exec, UsageError)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), err
    return lines[0].removeprefix("UsageError: ")


def mart_row(platform: Any, call_id: str) -> dict[str, Any]:
    return platform.mart.frame("llm_calls", id=call_id).iloc[0].to_dict()


# --- loading ----------------------------------------------------------------------------------------------

def test_load_ext_registers_every_magic_and_unload_removes_them(ip: Any) -> None:
    magics = ip.magics_manager.magics
    assert "llm" in magics["cell"] and "llm" in magics["line"]
    assert {"llm_config", "llm_budget", "llm_routes", "llm_audit"} <= set(magics["line"])
    ip.run_line_magic("config", "LLMMagics.format = 'text'")
    assert ip.magics_manager.registry["LLMMagics"].format == "text"
    ip.run_line_magic("unload_ext", "tidyllm")
    assert "llm" not in magics["cell"] and "llm_budget" not in magics["line"]
    ip.run_line_magic("load_ext", "tidyllm")
    assert "llm" in magics["cell"]


def test_unload_detaches_the_settlement_listener(ip: Any, stack: Any) -> None:
    cell(ip, "--mock hi", "hello")
    magics = ip.magics_manager.registry["LLMMagics"]
    ((platform, watch),) = magics._watches.values()
    assert platform is stack.platform and watch in platform.governor._listeners
    ip.run_line_magic("unload_ext", "tidyllm")
    ip.run_line_magic("load_ext", "tidyllm")
    assert watch not in platform.governor._listeners


def test_help_lists_every_magic_and_option(ip: Any, stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    hits = stack.simulator.hits()
    ip.run_line_magic("llm", "--help")
    text = capsys.readouterr().out
    for item in ("%%llm", "%llm_config", "%llm_budget", "%llm_routes", "%llm_audit", "--mock", "--route",
                 "--stream", "--no-receipt", "--use-case", "--sensitivity", "--max-tokens", "-o NAME",
                 "markdown,text,code,json,html", "--plot", "--verify", "gateway_config"):
        assert item in text, item
    ip.run_line_magic("llm", "")
    assert capsys.readouterr().out == text
    ip.run_cell("%%llm --help\nthis prompt is not sent")
    assert capsys.readouterr().out == text
    assert stack.simulator.hits() == hits
    assert "cell magic" in usage_error(ip, "%llm what is VaR", capsys)


# --- %%llm: the governed call and its receipt --------------------------------------------------------------

def test_cell_call_is_governed_and_its_receipt_equals_the_mart(ip: Any, stack: Any) -> None:
    platform = stack.platform
    hits = stack.simulator.hits()
    result = cell(ip, "-o resp", "What is value at risk?")
    assert isinstance(result, LLMResult) and result.text and stack.simulator.hits() == hits + 1
    receipt = result.receipt
    assert isinstance(receipt, Receipt)
    row = mart_row(platform, receipt.call_id)
    assert row["status"] == "success" and row["route"] == receipt.route == "chat-onprem"
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (row["prompt_tokens"], row["completion_tokens"])
    assert receipt.cost_usd == row["cost_usd"] > 0 and receipt.latency_ms == row["latency_ms"]
    budget = platform.budgets.status(scope="department", name="risk").iloc[0]
    assert (receipt.budget_scope, receipt.budget_name) == ("department", "risk")
    assert receipt.remaining_usd == budget["remaining_usd"] and receipt.limit_usd == budget["limit_usd"] == 4.0
    line = str(receipt)
    assert f"{row['prompt_tokens']} in + {row['completion_tokens']} out tokens" in line
    assert usd(row["cost_usd"]) in line and f"{row['latency_ms']:.0f} ms" in line
    assert f"department risk: {remaining_usd(budget['remaining_usd'], 4.0)} left of $4.00 this month" in line
    resp = ip.user_ns["resp"]
    assert resp.choices[0].message.content == result.text
    assert resp.usage.completion_tokens == row["completion_tokens"]
    bundle = result._repr_mimebundle_()
    assert bundle["text/markdown"].startswith(result.text) and line.split(" · ")[0] in bundle["text/markdown"]
    assert bundle["text/plain"] == f"{result.text}\n{line}"


def test_cell_call_is_in_the_audit_trail_with_the_notebook_context(ip: Any, stack: Any) -> None:
    result = cell(ip, "", "Summarise the MVR findings.")
    audit = stack.platform.audit.show(result.receipt.call_id)
    assert audit is not None and audit["decision"] == "allowed" and audit["status"] == "success"
    assert (audit["user_id"], audit["department"], audit["audit_reason"], audit["use_case"]) == \
        ("ana", "risk", "MVR peer review", "qa")
    assert audit["cost_usd"] == result.receipt.cost_usd
    assert stack.platform.audit.verify().ok


def test_options_reach_the_request(ip: Any, stack: Any) -> None:
    """-u/-d/-r/--use-case/--sensitivity go to the caller context; -s/-t/--max-tokens to the provider request."""
    from litellm.integrations.custom_logger import CustomLogger

    from tidyllm._litellm import import_litellm

    sent: list[dict[str, Any]] = []

    class Spy(CustomLogger):
        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            sent.append({"messages": messages, **(kwargs.get("optional_params") or {})})

    import_litellm().callbacks.append(Spy())  # removed again by conftest's LiteLLM state restore
    result = cell(ip, '-u bo -d finance -r "quarterly close" --use-case summarise --sensitivity internal '
                      '-s "You are terse." -t 0.3 --max-tokens 40 -f text', "Summarise {In[0]!r} please")
    row = mart_row(stack.platform, result.receipt.call_id)
    assert (row["user_id"], row["department"], row["use_case"], row["data_sensitivity"]) == \
        ("bo", "finance", "summarise", "internal")
    assert stack.platform.audit.show(result.receipt.call_id)["audit_reason"] == "quarterly close"
    expected = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Summarise {In[0]!r} please"}]
    assert sent[-1]["messages"] == expected and sent[-1]["temperature"] == 0.3 and sent[-1]["max_tokens"] == 40
    assert row["completion_tokens"] <= 40
    assert stack.platform.audit.show(result.receipt.call_id)["content_hash"] == hash_content(expected)


def test_route_option_picks_the_endpoint(ip: Any, stack: Any) -> None:
    result = cell(ip, "--route chat-small", "hello")
    assert result.receipt.route == "chat-small" and result.receipt.requested_model == "chat-small"
    assert str(result.receipt).startswith("chat-small · ")
    result = cell(ip, "-m chat --route chat-claude", "hello")
    assert result.receipt.route == "chat-claude"


def test_config_model_default_is_used(ip: Any) -> None:
    ip.run_line_magic("llm_config", "model=chat-small format=text receipt=false")
    result = cell(ip, "", "hello")
    assert result.format == "text" and result.receipt is None
    assert result._repr_mimebundle_() == {"text/plain": result.text}
    platform = ip.magics_manager.registry["LLMMagics"].platform()
    # a call admitted from admission credit (a busy caller) has its row written when it is settled, a moment
    # after the cell returned; without a receipt nothing waits for it
    deadline = time.monotonic() + 10
    while True:
        newest = platform.calls(order_by="-started_at", limit=1).iloc[0]
        if newest["requested_model"] == "chat-small" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert newest["requested_model"] == newest["route"] == "chat-small"


def test_mock_response_is_governed_costed_and_audited(ip: Any, stack: Any) -> None:
    platform = stack.platform
    hits = stack.simulator.hits()
    result = cell(ip, '--mock "A mocked answer."', "anything")
    assert result.text == "A mocked answer." and stack.simulator.hits() == hits
    row = mart_row(platform, result.receipt.call_id)
    price = platform.prices.lookup(row["route"])
    assert row["status"] == "success" and row["cost_usd"] == pytest.approx(
        (row["prompt_tokens"] * price.input_per_1m + row["completion_tokens"] * price.output_per_1m) / 1e6)
    assert platform.audit.show(result.receipt.call_id)["decision"] == "allowed"


def test_any_litellm_model_name_goes_through_a_governed_router(ip: Any, stack: Any) -> None:
    """A model that is not a gateway route is governed too: priced from LiteLLM's map, budgeted, audited."""
    platform = stack.platform
    result = cell(ip, '-m gpt-4o-mini --mock "offline answer"', "hello")
    row = mart_row(platform, result.receipt.call_id)
    assert row["route"] == row["requested_model"] == "gpt-4o-mini" and row["status"] == "success"
    assert row["cost_usd"] == result.receipt.cost_usd > 0
    assert platform.audit.show(result.receipt.call_id)["audit_reason"] == "MVR peer review"
    assert result.receipt.budget_name == "risk"


# --- interpolation -----------------------------------------------------------------------------------------

def test_interpolation_of_names_in_and_out(ip: Any, stack: Any) -> None:
    ip.run_cell("topic = 'credit risk'", store_history=True)
    ip.run_cell("6 * 7", store_history=True)
    result = cell(ip, "-f text --mock ok",
                  "About {topic}: {In[1]} gives {Out[2]}; {missing} {Out[9]} {{topic}} {\"k\": 1}")
    audit = stack.platform.audit.show(result.receipt.call_id)
    sent = "About credit risk: topic = 'credit risk' gives 42; {missing} {Out[9]} {topic} {\"k\": 1}"
    assert audit["content_hash"] == hash_content([{"role": "user", "content": sent}])
    # a %%llm cell's value (Out[3]) is its answer, so a later cell can quote it
    result = cell(ip, "-f text --mock again", "Previous answer: {Out[3]}")
    assert stack.platform.audit.show(result.receipt.call_id)["content_hash"] == \
        hash_content([{"role": "user", "content": "Previous answer: ok"}])


def test_interpolate_rules() -> None:
    ns = {"a": 1, "d": {"k": [1, 2]}, "In": ["", "x = 1"], "Out": {1: "res"}, "s": "text"}
    assert interpolate("{a} {d['k'][1]} {d[\"k\"]} {In[1]} {Out[1]} {s.upper}", ns).startswith(
        "1 2 [1, 2] x = 1 res <built-in method upper")
    assert interpolate("{b} {Out[9]} {a.nope} {{a}} {{ a }} {} {1} {\"a\": {a}}", ns) == \
        "{b} {Out[9]} {a.nope} {a} {{ a }} {} {1} {\"a\": 1}"
    assert interpolate("def f():\n    return {x: 1 for x in y}", ns) == "def f():\n    return {x: 1 for x in y}"


# --- formats -----------------------------------------------------------------------------------------------

def test_format_code_goes_into_the_next_cell(ip: Any) -> None:
    result = cell(ip, '-f code --mock "print(42)"', "Print the answer")
    assert ip.rl_next_input == "print(42)"
    bundle = result._repr_mimebundle_()
    assert bundle["text/plain"].startswith("code (1 lines) inserted into the next cell")
    assert extract_code("Here you go:\n```python\nimport os\nprint(os.sep)\n```\nDone.") == "import os\nprint(os.sep)"


def test_format_json_html_markdown_text(ip: Any) -> None:
    result = cell(ip, "-f json --mock '{\"a\": [1, 2]}'", "JSON please")
    bundle = result._repr_mimebundle_()
    assert bundle["application/json"] == {"a": [1, 2]} and json.loads(bundle["text/plain"].rsplit("\n", 1)[0]) == \
        {"a": [1, 2]}
    assert str(result.receipt) in bundle["text/plain"] and "```json" in bundle["text/markdown"]
    bad = cell(ip, '-f json --mock "not json"', "JSON please")._repr_mimebundle_()
    assert "application/json" not in bad and "not valid JSON" in bad["text/plain"]
    html = cell(ip, '-f html --mock "<b>bold</b>"', "HTML please")._repr_mimebundle_()
    assert html["text/html"].startswith("<b>bold</b>") and 'class="tidyllm-receipt"' in html["text/html"]
    md = cell(ip, '-f markdown --mock "# Title"', "MD please")._repr_mimebundle_()
    assert md["text/markdown"].startswith("# Title\n\n<sub>")
    text = cell(ip, '-f TEXT --mock "plain"', "text please")._repr_mimebundle_()
    assert set(text) == {"text/plain"} and text["text/plain"].startswith("plain\n")


def test_format_instruction_is_appended_to_the_prompt(ip: Any, stack: Any) -> None:
    result = cell(ip, "-f json --mock {}", "List the risks")
    audit = stack.platform.audit.show(result.receipt.call_id)
    prompt = "List the risks\n\nAnswer with JSON only, without any text before or after it."
    assert audit["content_hash"] == hash_content([{"role": "user", "content": prompt}])


# --- streaming ---------------------------------------------------------------------------------------------

class _Recorder(io.StringIO):
    """stdout that remembers each write (to see tokens arrive one by one)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_stream_prints_tokens_as_they_arrive_and_is_governed(ip: Any, stack: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = _Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    result = ip.run_cell("%%llm --stream -o streamed\nTell me a long story", store_history=True)
    monkeypatch.undo()
    result.raise_error()
    assert result.result is None  # the answer is already on screen
    response = ip.user_ns["streamed"]
    text = response.choices[0].message.content
    tokens = out.writes[: out.writes.index("\n")]
    assert len(tokens) > 3 and "".join(tokens) == text
    rows = stack.platform.mart.frame("llm_calls", order_by="-started_at", limit=1).iloc[0]
    assert bool(rows["stream"]) and rows["status"] == "success" and rows["completion_tokens"] > 0
    receipt_line = out.getvalue().splitlines()[-1]
    assert f"{rows['prompt_tokens']} in + {rows['completion_tokens']} out tokens" in receipt_line
    assert usd(rows["cost_usd"]) in receipt_line and rows["id"][:8] in receipt_line
    assert stack.platform.audit.show(rows["id"])["user_id"] == "ana"


def test_stream_updates_a_display_in_place(ip: Any) -> None:
    from IPython.utils.capture import capture_output

    ip.run_line_magic("config", "LLMMagics.stream_display = 'update'")
    with capture_output() as captured:
        ip.run_cell("%%llm --stream -f markdown\nTell me a long story").raise_error()
    outputs = captured.outputs
    assert outputs and not outputs[0].update and all(o.update for o in outputs[1:])
    final = outputs[-1].data
    assert "text/markdown" in final and "<sub>" in final["text/markdown"] and " out tokens · $" in final["text/plain"]


# --- errors: one line each, no traceback -------------------------------------------------------------------

def test_over_budget_is_one_line_with_scope_remaining_and_how_to_raise(ip: Any, stack: Any,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    platform = stack.platform
    platform.budgets.set("user", "zoe", 0.000001, "month")
    hits = stack.simulator.hits()
    message = usage_error(ip, "%%llm -u zoe\nA long question", capsys)
    assert message.startswith("over budget: user 'zoe' has $") and "left of" in message
    assert "tidyllm budget set user zoe" in message
    assert stack.simulator.hits() == hits
    refused = platform.audit.frame(limit=1).iloc[0]
    assert (refused["decision"], refused["user_id"], refused["department"], refused["audit_reason"]) == \
        ("refused", "zoe", "risk", "MVR peer review")


def test_not_authorised_names_the_rule(ip: Any, stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    hits = stack.simulator.hits()
    message = usage_error(ip, "%%llm -d marketing --route chat-large\nWrite a slogan", capsys)
    assert message.startswith("not authorised: rule 'marketing-no-premium'")
    assert stack.simulator.hits() == hits


def test_missing_audit_reason(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("llm_config", "reason=")
    message = usage_error(ip, "%%llm\nWhy?", capsys)
    assert "requires an audit reason" in message and "%llm_config reason=" in message


@pytest.mark.parametrize(("source", "expected"), [
    ("%%llm -m nosuch\nhi", "unknown model group 'nosuch': the gateway serves model groups chat (chat-large"),
    ("%%llm --route nope\nhi", "unknown endpoint 'nope' for --route"),
    ("%%llm -m embed\nhi", "'embed' serves embeddings"),
    ("%%llm -m embed --route chat-small\nhi", "--route chat-small is an endpoint of model group 'chat'"),
    ("%%llm -t 3\nhi", "-t/--temperature must be between 0 and 2"),
    ("%%llm -t hot\nhi", "argument -t/--temperature: invalid float value: 'hot'"),
    ("%%llm --max-tokens 0\nhi", "--max-tokens must be a positive integer"),
    ("%%llm -f yaml\nhi", "argument -f/--format: invalid choice: 'yaml'"),
    ("%%llm -o 1x\nhi", "-o/--output needs a Python variable name"),
    ("%%llm --frobnicate\nhi", "unrecognized arguments: --frobnicate"),
    ("%%llm -r \"unclosed\nhi", "No closing quotation"),
    ("%%llm --sensitivity secret\nhi", "'secret' is not a known class"),
    ("%%llm\n   ", "the cell is empty"),
    ("%llm_config nonsense", "%llm_config expects key=value"),
    ("%llm_config colour=blue", "%llm_config expects key=value with a key among user, department"),
    ("%llm_config temperature=9", "%llm_config temperature: temperature must be between 0 and 2"),
    ("%llm_config gateway_mode=cloud", "%llm_config gateway_mode"),
    ("%llm_config format=yaml", "%llm_config format"),
    ("%llm_audit -n 0", "-n must be a positive number of rows"),
])
def test_bad_input_is_one_clear_line(ip: Any, stack: Any, capsys: pytest.CaptureFixture[str], source: str,
                                     expected: str) -> None:
    hits = stack.simulator.hits()
    assert expected in usage_error(ip, source, capsys)
    assert stack.simulator.hits() == hits


# --- %llm_config --------------------------------------------------------------------------------------------

def test_config_sets_and_shows_defaults(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("llm_config", 'system="Be brief, be kind." temperature=0.5 max_tokens=64 sensitivity=internal')
    magics = ip.magics_manager.registry["LLMMagics"]
    assert (magics.system, magics.temperature, magics.max_tokens, magics.sensitivity) == \
        ("Be brief, be kind.", 0.5, 64, "internal")
    capsys.readouterr()
    ip.run_line_magic("llm_config", "")
    shown = capsys.readouterr().out
    for expected in ("user            ana", "department      risk", "reason          MVR peer review",
                     "system          Be brief, be kind.", "temperature     0.5", "max_tokens      64",
                     "platform: <tidyllm.Platform"):
        assert expected in shown, expected
    ip.run_line_magic("llm_config", "user= temperature=")
    assert magics.user is None and magics.temperature is None
    ip.run_line_magic("llm_config", "")
    assert "demo-user  (from the platform's settings)" in capsys.readouterr().out


def test_config_line_is_all_or_nothing(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    magics = ip.magics_manager.registry["LLMMagics"]
    usage_error(ip, "%llm_config user=bob max_tokens=-3", capsys)
    assert magics.user == "ana" and magics.max_tokens is None


# --- inspection magics --------------------------------------------------------------------------------------

def test_budget_magic_filters_and_plots(ip: Any, stack: Any) -> None:
    from IPython.utils.capture import capture_output

    platform = stack.platform
    platform.budgets.set("user", "dave", 1.0, "day")
    everything = ip.run_line_magic("llm_budget", "")
    assert everything.equals(platform.budgets.status())
    risk = ip.run_line_magic("llm_budget", "-d risk")
    assert set(zip(risk["scope"], risk["name"])) == {("org", "org"), ("department", "risk")}
    dave = ip.run_line_magic("llm_budget", "-d risk -u dave")
    assert ("user", "dave") in set(zip(dave["scope"], dave["name"])) and len(dave) == 3
    with capture_output() as captured:
        ip.run_line_magic("llm_budget", "-d risk --plot")
    images = [o for o in captured.outputs if "image/png" in o.data]
    assert len(images) == 1 and images[0].data["image/png"]
    fig = budget_figure(risk)
    bars = fig.axes[0].patches
    assert len(bars) == 3 * len(risk)
    spent_share = 100 * risk.iloc[0]["spent_usd"] / risk.iloc[0]["limit_usd"]
    assert bars[0].get_width() == pytest.approx(spent_share)


def test_routes_magic_shows_health_and_the_routers_preference(ip: Any, stack: Any) -> None:
    from IPython.utils.capture import capture_output

    from tidyllm.magics._call import health_frame, preference_frame

    platform = stack.platform
    cell(ip, "--route chat-small", "warm up")
    health = health_frame(platform)
    assert list(health["endpoint"]) == ["chat-large", "chat-small", "chat-claude", "chat-onprem", "embed"]
    status = platform.routes.status().set_index("route")
    small = health.set_index("endpoint").loc["chat-small"]
    assert small["calls"] == status.loc["chat-small", "calls"] > 0 and small["state"] == "closed"
    assert small["input_per_1m"] == 0.15

    answers: list[dict[str, Any]] = []

    def optimizer(context: dict[str, Any]) -> dict[str, Any]:
        answers.append(context)
        return {"parameters": {"preferred_route": "chat-claude"}, "confidence": 0.7, "samples": 12,
                "source": "bandit"}

    platform.mart.register_optimizer("gateway", optimizer)
    try:
        prefs = preference_frame(platform, [{"department": "risk", "use_case": "qa"}])
        with capture_output() as captured:
            ip.run_line_magic("llm_routes", "")
    finally:
        platform.mart.register_optimizer("gateway", None)
    assert prefs.to_dict("records") == [{"department": "risk", "use_case": "qa", "model_group": "chat",
                                         "preferred_route": "chat-claude", "confidence": 0.7, "samples": 12,
                                         "source": "bandit"}]
    assert {"department": "risk", "use_case": "qa", "model_group": "chat"} in answers
    shown = [o.data.get("text/html") or o.data["text/plain"] for o in captured.outputs]
    assert shown[0] == "Endpoint health" and "chat-onprem" in shown[1]
    assert shown[2] == "Router preference per context" and "chat-claude" in shown[3] and "bandit" in shown[3]


def test_audit_magic_shows_newest_rows_and_verifies(ip: Any, stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cell(ip, "-u carol --mock one", "first")
    second = cell(ip, "-u carol --mock two", "second")
    capsys.readouterr()
    frame = ip.run_line_magic("llm_audit", "-n 2 -u carol --verify")
    out = capsys.readouterr().out
    assert out.startswith("audit chain verified: ") and "rows intact" in out
    assert len(frame) == 2 and list(frame["user_id"]) == ["carol", "carol"]
    assert frame.iloc[-1]["call_id"] == second.receipt.call_id
    assert {"seq", "recorded_at", "audit_reason", "route", "decision", "cost_usd"} <= set(frame.columns)


# --- a fresh process (see fresh_session) --------------------------------------------------------------------

def test_autoload_first_use_install_and_gateway_unreachable(fresh_session: dict[str, Any]) -> None:
    """``c.InteractiveShellApp.extensions = ["tidyllm"]`` autoloads and installs the platform from tidyllm.yaml
    (so every LiteLLM call is governed from the first cell); a gateway that is not running gets one line naming its URI and how to start it;
    a platform key of %llm_config re-installs the platform."""
    proc, tmp = fresh_session["proc"], fresh_session["dir"]
    returncode = proc.wait(timeout=120)
    out, err = (tmp / "stdout").read_text(), (tmp / "stderr").read_text()
    assert returncode == 0, err
    assert "autoloaded: True False" in out  # the magics are registered and the platform is installed
    assert "governed offline" in out and "department risk: " in out and "left of $1.00 this month" in out
    assert f"installed: sqlite:///{tmp / 'first.db'}" in out
    assert f"reinstalled: sqlite:///{tmp / 'second.db'}" in out
    errors = [line for line in err.splitlines() if line.startswith("UsageError")]
    assert errors == [f"UsageError: the MLflow gateway at http://127.0.0.1:{fresh_session['dead']} is unreachable: "
                      f"start it with `tidyllm gateway start --config {fresh_session['gateway_yaml']}` "
                      "(or `tidyllm.stack.LocalStack().start()` in a notebook) and re-run the cell"]
    assert "Traceback" not in err


# --- feedback ------------------------------------------------------------------------------------------------

def test_llm_feedback_scores_the_last_answer(ip: Any, stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    platform = stack.platform
    result = cell(ip, "", "Which controls cover model drift?")
    call_id = result.receipt.call_id
    capsys.readouterr()
    ip.run_line_magic("llm_feedback", "👎 cites the wrong policy")
    assert f"feedback 0 recorded for call {call_id}" in capsys.readouterr().out
    signal = platform.mart.frame("call_signals", call_id=call_id, source="human").iloc[0]
    assert signal["score"] == 0.0 and signal["comment"] == "cites the wrong policy"
    ip.run_line_magic("llm_feedback", "0.9")  # a second score for the same call is ignored
    assert platform.mart.frame("call_signals", call_id=call_id, source="human").iloc[0]["score"] == 0.0
    assert "a feedback score is in [0, 1]" in usage_error(ip, "%llm_feedback 7", capsys)
    assert "takes 👍, 👎 or a score" in usage_error(ip, "%llm_feedback great", capsys)

"""Secrets and hostile names: plant every kind of secret tidyllm knows and a department name made to break
things, drive real calls, and search every table, export, log line, report and notebook output."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import tidyllm
from tidyllm.cli import main
from tidyllm.gateway.simulator import Simulator
from tidyllm.mart.schema import TABLES

GATEWAY_KEY = "gwkey-planted-7c1d9e5f"
MLFLOW_PASSWORD = "mlflowpw-planted-3b8e"
SMTP_PASSWORD = "smtppw-planted-91ac"
META_KEY = "sk-metaplanted-0a1b2c3d4e"
META_TOKEN = "tok-planted-55aa66bb"
META_SECRET = "cs-planted-c0ffee11"
HOSTILE = r"$\frac{x}{$ <script>alert(1)</script> & ops"


class EchoProvider:
    """An OpenAI-compatible endpoint that rejects every call, echoing the API key it was sent (as real
    providers do: "Incorrect API key provided: ...")."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}.",
                                             "type": "invalid_request_error", "code": "invalid_api_key"}})
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def settled(platform: Any, timeout: float = 15.0) -> None:
    """Wait until no call is pending (sync callbacks run on LiteLLM's logging threads)."""
    deadline = time.monotonic() + timeout
    while (platform.calls()["status"] == "pending").any():
        assert time.monotonic() < deadline, "calls still pending"
        time.sleep(0.05)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(seed=0, latency_scale=0) as s:
        yield s


def test_planted_secrets_and_a_hostile_name_leak_nowhere(db_url: str, tmp_path: Path, sim: Simulator,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import litellm
    import sqlalchemy.engine

    echo = EchoProvider()
    monkeypatch.setenv("PLANTED_GW_KEY", GATEWAY_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "svc-tidyllm")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("TIDYLLM_SMTP_PASSWORD", SMTP_PASSWORD)
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(f"""
routes:
  - name: ep-echo
    route_type: llm/v1/chat
    group: broken
    model: {{provider: openai, name: gpt-echo, config: {{openai_api_key: $PLANTED_GW_KEY, openai_api_base: {echo.url}}}}}
    price: {{input_per_1m: 1, output_per_1m: 2}}
""")
    parsed = sqlalchemy.engine.make_url(db_url)
    if parsed.get_backend_name() == "postgresql" and not parsed.password:
        # the test server trusts local connections and ignores a password: plant one in the URL
        db_url = parsed.set(password="pgpw-planted-e4d1").render_as_string(hide_password=False)
    db_password = sqlalchemy.engine.make_url(db_url).password
    secrets = [GATEWAY_KEY, MLFLOW_PASSWORD, SMTP_PASSWORD, META_KEY, META_TOKEN, META_SECRET]
    if db_password:
        secrets.append(db_password)
    outputs: dict[str, str] = {}
    try:
        with caplog.at_level(logging.DEBUG, logger="tidyllm"):
            p = tidyllm.install(database_url=db_url, gateway_config=str(gateway),
                                alerts={"thresholds": [0.000001], "smtp_server": "127.0.0.1:1", "email_to": ["x@y"],
                                        "retries": 1})
            outputs["repr(settings)"] = repr(p.settings)
            p.prices.set("ep-sim", 1.0, 2.0)
            p.budgets.set("department", HOSTILE, 5.0)
            router = p.govern(litellm.Router(model_list=[
                {"model_name": "chat", "litellm_params": {"model": "openai/sim-gpt-small", "api_base": sim.url,
                                                          "api_key": "sk-test-not-real"}, "model_info": {"id": "ep-sim"}},
                {"model_name": "broken", "litellm_params": {"model": "openai/gpt-echo", "api_base": echo.url,
                                                            "api_key": GATEWAY_KEY}, "model_info": {"id": "ep-echo"}},
            ], num_retries=0))
            meta = {"user_id": "ana", "department": HOSTILE, "audit_reason": "leak test", "use_case": "qa",
                    "api_key": META_KEY, "x_auth_token": META_TOKEN, "client_secret": META_SECRET}
            router.completion(model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=20,
                              metadata=dict(meta))
            settled(p)
            with pytest.raises(Exception) as failure:
                router.completion(model="broken", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  metadata=dict(meta))
            assert GATEWAY_KEY in str(failure.value)  # the provider did echo it: the caller sees its own error
            settled(p)
            p.alerts.evaluate()
            p.alerts.flush(10)
            decisions = p.mart.frame("routing_decisions", parse_json=True)
            assert len(decisions) >= 1
            for context in decisions["context"]:
                assert not {"api_key", "x_auth_token", "client_secret"} & set(context)
            failed = p.calls(status="failure").iloc[0]
            assert "Incorrect API key provided: [REDACTED]" in failed["error_message"]
        tidyllm.uninstall()
        outputs["log"] = "\n".join(r.getMessage() for r in caplog.records)

        # every table, whole
        engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            for name in TABLES:
                rows = conn.execute(sa.text(f"SELECT * FROM {name}")).all()
                outputs[f"table {name}"] = "\n".join(repr(tuple(r)) for r in rows)
        engine.dispose()
        # exports, the report, read commands
        runner = CliRunner()
        for fmt in ("csv", "jsonl"):
            result = runner.invoke(main, ["audit", "export", "--format", fmt, "--database-url", db_url])
            assert result.exit_code == 0, result.output
            outputs[f"export {fmt}"] = result.output
        result = runner.invoke(main, ["report", "--out", str(tmp_path / "report"), "--database-url", db_url])
        assert result.exit_code == 0, result.output  # a $...$ department no longer crashes the report
        page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
        outputs["report"] = page
        assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        for args in (["budget", "show"], ["audit", "verify"]):
            outputs[" ".join(args)] = runner.invoke(main, [*args, "--database-url", db_url]).output
        # a notebook
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.utils.capture import capture_output
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        shell = InteractiveShell.instance(config=config)
        try:
            shell.run_line_magic("load_ext", "tidyllm")
            with capture_output() as captured:
                shell.run_line_magic("llm_config", f"database_url={db_url} department='{HOSTILE}'")
                shell.run_line_magic("llm_config", "")
                shell.run_line_magic("llm_budget", "")
            outputs["notebook"] = captured.stdout + "".join(str(o.data) for o in captured.outputs)
            if db_password:
                assert ":***@" in captured.stdout
        finally:
            shell.run_line_magic("unload_ext", "tidyllm")
            InteractiveShell.clear_instance()
            tidyllm.uninstall()
    finally:
        echo.close()
    leaks = [(secret, where) for where, text in outputs.items() for secret in secrets if secret in text]
    assert leaks == []
    assert repr(HOSTILE)[1:-1] in outputs["table budgets"]  # the hostile name itself is data, kept as given

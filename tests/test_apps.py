"""The applications end to end through the provider simulator and a real MLflow gateway (one module-scoped
stack): MVR review with verbatim evidence, cost estimate vs actual, up-front refusal, a batch stopping
cleanly at half the work, consensus and cascade, RAG on sqlite-vec and pgvector, every sub-call in
``llm_calls`` and ``audit_log`` with the caller and the execution, feedback reaching the router, the CLI
and the magics.

The simulator answers from scripted rules (``tidyllm/apps/data/simulator_answers.yaml``) plus a few the tests
add: chat-large is made wrong about 6 x 7, the governance item's quote is made up, and the cheapest route
(chat-onprem) is unsure about one question."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from _fixtures import CHAT_MODELS, new_department

import tidyllm.apps as apps
from tidyllm.apps import CostLimitError
from tidyllm.apps.documents import normalise, read_document
from tidyllm.gateway.simulator import parse_profiles
from tidyllm.stack import LocalStack

pytestmark = pytest.mark.slow  # starts an MLflow gateway

REASON = "MVR peer review"
WRONG = {"match": r"(?i)6 times 7", "reply": "Answer: 17"}
MADE_UP = {"match": r"Checklist item: governance\b",
           "reply": '{"severity": "low", "finding": "Approved.", "evidence": "The board approved the model in 1999."}'}
UNSURE = {"match": r"(?i)capital buffer", "reply": ["Answer: 2.5 percent", "Answer: 3 percent"]}
SURE = {"match": r"(?i)capital buffer", "reply": "Answer: 2.5 percent"}
SCHEMA = {"type": "object", "properties": {"owner": {"type": "string"}, "effective_date": {"type": "string"},
                                           "review_frequency": {"type": "string"}},
          "required": ["owner", "effective_date"]}


def _profiles() -> Any:
    base = apps.simulator_answers()
    spec: dict[str, Any] = {name: {"latency": {"base_ms": 0}, "answers": [MADE_UP, SURE, *base]} for name in CHAT_MODELS}
    spec["sim-gpt-large"]["answers"] = [WRONG, MADE_UP, SURE, *base]
    spec["sim-onprem-llama"]["answers"] = [MADE_UP, UNSURE, *base]
    spec["sim-embed"] = {"kind": "embedding", "latency": {"base_ms": 0}}
    return parse_profiles({"models": spec})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    db = tmp_path_factory.mktemp("apps") / "mart.db"
    with LocalStack(profiles=_profiles(), latency_scale=0, database_url=f"sqlite:///{db}",
                    routing={"strategy": "cheapest"}) as s:
        yield s


def who(dept: str) -> dict[str, str]:
    return {"user_id": "ana", "department": dept, "audit_reason": REASON}


def sub_calls(stack: LocalStack, execution_id: str) -> list[str]:
    steps = stack.platform.mart.steps(execution_id=execution_id, parse_json=True)
    return [d["call_id"] for d in steps["data"] if isinstance(d, dict) and d.get("call_id")]


def assert_governed(stack: LocalStack, execution_id: str, dept: str, n: int) -> None:
    """Every sub-call of the run is in llm_calls and audit_log with the caller, linked to the execution."""
    ids = sub_calls(stack, execution_id)
    assert len(ids) == n and len(set(ids)) == n
    calls = stack.platform.mart.frame("llm_calls", id=ids)
    assert len(calls) == n
    assert set(calls["user_id"]) == {"ana"} and set(calls["department"]) == {dept}
    assert set(calls["status"]) == {"success"}
    assert set(calls["execution_id"]) == {execution_id}  # the admission gate records the tracked execution
    audit = stack.platform.mart.frame("audit_log", call_id=ids)
    assert len(audit) == n and set(audit["user_id"]) == {"ana"} and set(audit["audit_reason"]) == {REASON}
    assert set(audit["decision"]) == {"allowed"}
    execution = stack.platform.mart.executions(id=execution_id).iloc[0]
    assert execution["status"] == "success" and execution["module"] in ("mvr_review", "ask", "extract",
                                                                        "summarise", "rag")


# --- MVR peer review --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mvr_rm_pd_v3.pdf", "mvr_rm_pd_v3.docx"])
def test_mvr_review_findings_quote_the_document_verbatim(stack: LocalStack, name: str) -> None:
    import pypdf

    dept = new_department(stack, "mvr", 5.0)
    review = apps.mvr_review(apps.sample_path(name), model="chat-small", **who(dept))
    f = review.findings
    assert len(f) == 12 and set(f["item"]) == {i.id for i in review.checklist.items}  # 6 items x 2 sections
    assert set(f["route"]) == {"chat-small"} and (f["cost_usd"] > 0).all()
    found, flagged = f[f["evidence_found"]], review.flagged
    # the governance item's "quote" is made up: kept and flagged, never hidden
    assert list(flagged["item"]) == ["governance", "governance"]
    assert set(flagged["status"]) == {"quote not found"}
    assert set(flagged["evidence"]) == {"The board approved the model in 1999."}
    assert len(found) == 10 and set(found["status"]) == {"ok"}
    assert {"high", "medium"} <= set(f["severity"])
    doc = read_document(apps.sample_path(name))
    pages = pypdf.PdfReader(str(apps.sample_path(name))).pages if name.endswith(".pdf") else None
    for _, row in found.iterrows():
        block = doc.find(row["evidence"], near=(0, 10**6))
        assert block is not None
        # the location is a real paragraph of the finding's section that holds the quote
        para = int(row["location"].rsplit("¶", 1)[1])
        assert row["evidence"] in doc.blocks[para - 1].text
        assert doc.blocks[para - 1].section == row["section"]
        assert row["chunk_location"].startswith(name)
        if pages is not None:
            assert f"p. {row['page']}," in row["location"]
            assert row["evidence"] in normalise(pages[row["page"] - 1].extract_text())
    md, html = review.to_markdown(), review.to_html()
    assert "## Performance testing and outcomes analysis" in md and "**Severity: high**" in md
    assert "quote not found in the document: check it" in md and "quote not found in the document" in html
    assert found["evidence"].iloc[0] in md and html.startswith("<!DOCTYPE html>")
    assert_governed(stack, review.execution_id, dept, 12)


def test_cost_estimate_covers_the_actual_cost_within_two_times(stack: LocalStack) -> None:
    dept = new_department(stack, "cost", 5.0)
    review = apps.mvr_review(apps.sample_path("mvr_rm_pd_v3.pdf"), model="chat-small", **who(dept))
    assert review.actual_usd == pytest.approx(review.findings["cost_usd"].sum())
    calls = stack.platform.mart.frame("llm_calls", id=list(review.findings["call_id"]))
    assert review.actual_usd == pytest.approx(calls["cost_usd"].sum())  # the mart's exact cost
    assert review.actual_usd <= review.estimate.total_usd <= 2 * review.actual_usd
    assert review.estimate.calls == 12 and set(review.estimate.routes) == {"chat-small"}
    summary = apps.summarise(apps.sample_path("mvr_rm_pd_v3.docx"), model="chat-small", **who(dept))
    assert summary.actual_usd <= summary.estimate.total_usd <= 2 * summary.actual_usd
    assert summary.documents["summary"].iloc[0].startswith("In brief, mvr_rm_pd_v3.docx says: [§")
    assert len(summary.parts) == summary.documents["chunks"].iloc[0] > 3
    assert_governed(stack, summary.execution_id, dept, len(summary.parts) + 1)


def test_max_cost_and_budgets_refuse_up_front(stack: LocalStack) -> None:
    dept = new_department(stack, "refuse", 5.0)
    before = stack.simulator.hits()
    with pytest.raises(CostLimitError, match=r"mvr_review: 12 call\(s\).*more than --max-cost \$0\.000100 allows"):
        apps.mvr_review(apps.sample_path("mvr_rm_pd_v3.pdf"), model="chat-small", max_cost=0.0001, **who(dept))
    poor = new_department(stack, "poor", 0.0005)
    with pytest.raises(CostLimitError, match=rf"more than the department '{poor}' \(month\) budget allows"):
        apps.mvr_review(apps.sample_path("mvr_rm_pd_v3.pdf"), model="chat-small", **who(poor))
    assert stack.simulator.hits() == before  # nothing reached a provider
    assert stack.platform.mart.frame("llm_calls", department=[dept, poor]).empty


def test_a_budget_for_half_the_batch_stops_cleanly_with_half_the_rows(stack: LocalStack, tmp_path: Path) -> None:
    text = Path(apps.sample_path("policies") / "credit_limit_policy.txt").read_text()
    docs = []
    for i in range(6):  # six documents of the same size: the same worst case each
        docs.append(tmp_path / f"policy_{i}.txt")
        docs[-1].write_text(text.replace("Head of Credit Risk", f"Head of Desk {i}"))
    dept = new_department(stack, "batch", 5.0)
    full = apps.extract(docs, SCHEMA, model="chat-small", **who(dept))
    assert len(full) == 6 and full["valid"].all() and full.attrs["stopped"] is None
    assert list(full["owner"]) == [f"Head of Desk {i}" for i in range(6)]
    per_doc = full.attrs["estimate"].per_call_usd
    assert len(set(per_doc)) == 1
    half = 3 * per_doc[0] + 1e-9  # covers half the work at its worst case
    cut = apps.extract(docs, SCHEMA, model="chat-small", max_cost=half, **who(dept))
    assert list(cut["document"]) == ["policy_0.txt", "policy_1.txt", "policy_2.txt"] and cut["valid"].all()
    assert cut.attrs["stopped"].startswith("stopped after 3 of 6 documents: the next one may cost $")
    assert "--max-cost" in cut.attrs["stopped"]
    # the department's own budget, sized for half the batch, stops it the same way
    small = new_department(stack, "half", half)
    by_budget = apps.extract(docs, SCHEMA, model="chat-small", **who(small))
    assert len(by_budget) == 3 and by_budget.attrs["stopped"].startswith("stopped after 3 of 6 documents")
    assert f"the department '{small}' (month) budget" in by_budget.attrs["stopped"]
    execution = stack.platform.mart.executions(id=by_budget.attrs["execution_id"], parse_json=True).iloc[0]
    assert execution["status"] == "success" and execution["result"]["done"] == 3
    assert_governed(stack, by_budget.attrs["execution_id"], small, 3)


def test_extract_keeps_validation_errors_per_row(stack: LocalStack, tmp_path: Path) -> None:
    (tmp_path / "memo.md").write_text("# Memo\n\nNo owner is named in this memo about lunch.\n")
    dept = new_department(stack, "extract", 5.0)
    frame = apps.extract([apps.sample_path("policies"), tmp_path / "memo.md"], SCHEMA, model="chat-small",
                         **who(dept))
    assert len(frame) == 6
    good = frame[frame["document"] != "memo.md"]
    assert good["valid"].all() and set(good["review_frequency"]) >= {"annual", "every six months"}
    memo = frame[frame["document"] == "memo.md"].iloc[0]
    assert not memo["valid"] and memo["errors"] == "the answer is not a JSON object"


# --- QA orchestrator ------------------------------------------------------------------------------------


def test_consensus_returns_the_majority_when_one_route_is_wrong(stack: LocalStack) -> None:
    dept = new_department(stack, "qa", 5.0)
    answer = apps.ask("What is 6 times 7?", routes=["chat-large", "chat-small", "chat-claude"], **who(dept))
    assert answer.answer == "42" and answer.confidence == pytest.approx(2 / 3)
    assert answer.disagreement == [{"route": "chat-large", "answer": "17"}]
    assert list(answer.votes["route"]) == ["chat-large", "chat-small", "chat-claude"]
    assert answer.actual_usd <= answer.estimate.total_usd
    one = apps.ask("What is 6 times 7?", routes=["chat-small"], **who(dept))  # one route: sampled 3 times
    assert one.answer == "42" and one.confidence == 1.0 and len(one.votes) == 3
    assert_governed(stack, answer.execution_id, dept, 3)


def test_cascade_escalates_only_on_low_confidence(stack: LocalStack) -> None:
    dept = new_department(stack, "cascade", 5.0)
    sure = apps.ask("What is 6 times 7?", strategy="cascade", **who(dept))
    assert sure.answer == "42" and not sure.escalated and sure.confidence == 1.0
    assert set(sure.votes["route"]) == {"chat-onprem"} and len(sure.votes) == 2  # the cheapest rung only
    unsure = apps.ask("What capital buffer applies?", strategy="cascade", **who(dept))
    assert unsure.escalated and unsure.answer == "2.5 percent" and unsure.confidence == 1.0
    assert list(unsure.votes["route"]) == ["chat-onprem", "chat-onprem", "chat-small", "chat-small"]
    assert sorted(set(unsure.votes[unsure.votes["rung"] == 0]["answer"])) == ["2.5 percent", "3 percent"]
    assert unsure.actual_usd < unsure.estimate.total_usd  # the estimate covered every rung
    assert_governed(stack, unsure.execution_id, dept, 4)


# --- RAG ------------------------------------------------------------------------------------------------

FACT = "The single-obligor exposure limit is 7.5 percent of Tier 1 capital."


def _rag_round_trip(stack: LocalStack, dept: str, store: str | None, tmp_path: Path) -> None:
    library = tmp_path / "library"
    shutil.copytree(apps.sample_path("policies"), library)
    shutil.copy(apps.sample_path("mvr_rm_pd_v3.docx"), library)
    index = apps.Index(f"policies-{uuid.uuid4().hex[:6]}", store=store, **who(dept))
    try:
        first = index.add(library)
        assert first.documents == 6 and first.added > 20 and first.updated == first.unchanged == 0
        assert 0 < first.actual_usd <= first.estimate.total_usd
        hits = index.search("What is the single-obligor exposure limit?", k=3)
        top = hits.iloc[0]
        assert top["document"] == "credit_limit_policy.txt" and FACT in top["text"]
        assert top["location"] == "credit_limit_policy.txt, §2. Concentration limits, ¶3"
        answer = index.answer("What is the single-obligor exposure limit?", model="chat-small")
        assert answer.answer.startswith("The single-obligor exposure limit is 7.5 percent") and "[1]" in answer.answer
        assert list(answer.citations["n"]) == [1] and FACT in answer.citations["text"].iloc[0]
        assert answer.citations["location"].iloc[0] == top["location"]
        # again: nothing changed, nothing embedded; then one paragraph of one policy changes
        again = index.add(library)
        assert again.added == again.updated == 0 and again.unchanged == first.added and again.actual_usd == 0
        policy = library / "credit_limit_policy.txt"
        policy.write_text(policy.read_text().replace("within one business day", "within two hours"))
        edited = index.add(library)
        assert edited.updated == 1 and edited.added == 0 and edited.unchanged == first.added - 1
        assert sorted(index.documents()) == sorted(p.name for p in library.iterdir())
        chunks = index.chunks()
        assert len(chunks) == first.added and chunks["call_id"].notna().all()
        assert set(chunks["execution_id"]) == {first.execution_id, edited.execution_id}
        assert_governed(stack, answer.execution_id, dept, 2)  # the query's embedding and the answer
    finally:
        index.drop()
        index.close()


def test_rag_finds_the_planted_fact_with_its_citation_on_sqlite_vec(stack: LocalStack, tmp_path: Path) -> None:
    dept = new_department(stack, "rag", 5.0)
    _rag_round_trip(stack, dept, None, tmp_path)
    mart_file = Path(stack.platform.mart.url.split("///", 1)[1])
    # sqlite-vec may need a second SQLite library in the process: the vectors keep to their own file
    assert mart_file.with_name(mart_file.stem + ".vectors.db").exists()
    assert stack.platform.mart.frame("rag_chunks").empty


@pytest.mark.postgres
def test_rag_finds_the_planted_fact_with_its_citation_on_postgres_pgvector(stack: LocalStack, tmp_path: Path,
                                                                           postgres_url: str) -> None:
    dept = new_department(stack, "pgrag", 5.0)
    _rag_round_trip(stack, dept, postgres_url, tmp_path)


# --- learning: executions, feedback, optimal configuration -----------------------------------------------


def test_feedback_reaches_the_router_and_the_optimal_config(stack: LocalStack) -> None:
    dept = new_department(stack, "learn", 5.0)
    pdf = apps.sample_path("mvr_rm_pd_v3.pdf")
    coarse = apps.mvr_review(pdf, model="chat-small", chunk_tokens=800, **who(dept))
    fine = apps.mvr_review(pdf, model="chat-onprem", chunk_tokens=300, **who(dept))
    coarse.feedback(0.9)
    fine.feedback(0.4)
    mart = stack.platform.mart
    outcomes = mart.outcomes(module="gateway", parse_json=True)
    scored = outcomes[outcomes["call_id"].isin(coarse.findings["call_id"])]
    assert len(scored) == 12 and set(scored["performance_score"]) == {0.9}  # each sub-call reached the router
    best = mart.get_optimal_config("mvr_review", {"department": dept})
    assert best["source"] == "history" and best["parameters"]["route"] == "chat-small"
    assert best["parameters"]["chunk_tokens"] == 800 and best["mean_score"] == pytest.approx(0.9)
    runs = mart.executions(module="mvr_review", parse_json=True)
    assert {coarse.execution_id, fine.execution_id} <= set(runs["id"])


# --- CLI and magics ------------------------------------------------------------------------------------------


def test_cli_reviews_a_report_and_takes_feedback(stack: LocalStack, tmp_path: Path) -> None:
    dept = new_department(stack, "cli", 5.0)
    env = {**os.environ, "TIDYLLM_DATABASE_URL": stack.platform.mart.url, "TIDYLLM_GATEWAY_URI": stack.gateway.uri,
           "TIDYLLM_GATEWAY_MODE": "legacy", "TIDYLLM_GATEWAY_CONFIG": str(stack.gateway_config),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    tidyllm = [sys.executable, "-c", "from tidyllm.cli import main; main()"]
    report = tmp_path / "review.md"
    out = subprocess.run([*tidyllm, "apps", "mvr-review", str(apps.sample_path("mvr_rm_pd_v3.docx")), "-m",
                          "chat-small", "--user", "ana", "--department", dept, "--reason", REASON, "-o", str(report)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "estimate: mvr_review: 12 call(s)" in out.stderr  # shown before any call
    assert "written: " in out.stdout and "12 findings, 2 flagged" in out.stdout
    assert report.read_text().startswith("# Peer review of mvr_rm_pd_v3.docx")
    execution_id = out.stdout.split("execution ")[1].split()[0]
    refused = subprocess.run([*tidyllm, "apps", "mvr-review", str(apps.sample_path("mvr_rm_pd_v3.docx")),
                              "--max-cost", "0.00001", "--department", dept, "--reason", REASON],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert refused.returncode == 1 and "error: mvr_review: 12 call(s)" in refused.stderr
    assert "Traceback" not in refused.stderr
    rated = subprocess.run([*tidyllm, "apps", "feedback", execution_id, "0.8"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=240)
    assert rated.returncode == 0, rated.stderr
    learned = stack.platform.mart.outcomes(module="mvr_review", parse_json=True)
    mine = learned[[d.get("execution_id") == execution_id for d in learned["data"]]]
    assert list(mine["performance_score"]) == [0.8] and mine["parameters"].iloc[0]["route"] == "chat-small"
    assert_governed(stack, execution_id, dept, 12)


@pytest.fixture
def ip(stack: LocalStack) -> Iterator[Any]:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "tidyllm")
    yield shell
    shell.run_line_magic("unload_ext", "tidyllm")
    InteractiveShell.clear_instance()


def test_magics_run_the_applications(stack: LocalStack, ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from IPython.core.error import UsageError

    from tidyllm.apps import Answer, Review

    dept = new_department(stack, "magic", 5.0)
    ip.run_line_magic("llm_config", f"user=ana department={dept} reason='{REASON}'")
    review = ip.run_line_magic("mvr_review", f"{apps.sample_path('mvr_rm_pd_v3.pdf')} -m chat-small")
    assert isinstance(review, Review) and len(review.findings) == 12
    printed = capsys.readouterr().out
    assert "estimate: mvr_review: 12 call(s)" in printed and f"execution {review.execution_id}" in printed
    cell = "# Model\n\n## 4.1 Data sources\n\nDevelopment data came from the servicing system. It is complete.\n"
    small = ip.run_cell_magic("mvr_review", "-m chat-small", cell)
    assert list(small.findings["evidence"])[0] == "Development data came from the servicing system."
    answer = ip.run_line_magic("ask", "--route chat-small --route chat-claude What is 6 times 7?")
    assert isinstance(answer, Answer) and answer.answer == "42"
    ip.user_ns["SCHEMA"] = SCHEMA  # --schema names a notebook variable (or a JSON schema file)
    frame = ip.run_line_magic("extract", f"--schema SCHEMA -m chat-small {apps.sample_path('policies')}")
    assert len(frame) == 5 and frame["valid"].all()
    with pytest.raises(UsageError, match=r"more than --max-cost \$0\.000001 allows"):
        ip.run_line_magic("mvr_review", f"{apps.sample_path('mvr_rm_pd_v3.pdf')} --max-cost 0.000001")
    with pytest.raises(UsageError, match="unsupported document type"):
        ip.run_line_magic("summarise", "notes.pptx")

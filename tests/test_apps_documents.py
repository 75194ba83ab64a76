"""Documents in (tidyllm.apps.documents), the MVR checklist, answer parsing and the simulator's scripted
answers: unit tests, no process started."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tidyllm.apps import sample_path, samples_dir
from tidyllm.apps._run import parse_json_object
from tidyllm.apps.documents import DocumentError, chunk_document, count_tokens, normalise, read_document
from tidyllm.apps.mvr import load_checklist, relevant_chunks
from tidyllm.apps.qa import extract_answer
from tidyllm.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
KEY = "The binomial test rejects calibration for risk grade 9 at the 95 percent confidence level."


def test_pdf_keeps_pages_sections_and_paragraphs() -> None:
    import pypdf

    doc = read_document(sample_path("mvr_rm_pd_v3.pdf"))
    assert doc.kind == "pdf" and doc.pages == 22  # the synthetic MVR is ~20 pages
    block = doc.find(KEY)
    assert block is not None
    assert block.section == "5 Model Performance and Testing > 5.2 Calibration"  # from the PDF's bookmarks
    page_text = normalise(pypdf.PdfReader(str(sample_path("mvr_rm_pd_v3.pdf"))).pages[block.page - 1].extract_text())
    assert KEY in page_text
    assert block.location(doc.name) == f"mvr_rm_pd_v3.pdf, p. {block.page}, §5.2 Calibration, ¶{block.paragraph}"
    assert [b.paragraph for b in doc.blocks] == list(range(1, len(doc.blocks) + 1))
    assert len(doc.sections()) == 1 + sum(1 for s in doc.sections() if " > " in s)  # the title page, then 2 levels


def test_docx_and_pdf_say_the_same_thing() -> None:
    pdf = read_document(sample_path("mvr_rm_pd_v3.pdf"))
    docx = read_document(sample_path("mvr_rm_pd_v3.docx"))
    assert docx.kind == "docx" and docx.pages is None
    block = docx.find(KEY)
    assert block is not None and block.section.endswith("5.2 Calibration") and block.page is None
    pdf_text = normalise(" ".join(b.text for b in pdf.blocks))
    body = [b for b in docx.blocks if b.section]  # below the title
    assert len(body) > 60 and all(b.text in pdf_text for b in body)


def test_markdown_html_and_text_readers() -> None:
    md = read_document(sample_path("policies") / "model_risk_policy.md")
    tiers = md.find("Tier 1 models are validated independently")
    assert tiers is not None and tiers.section == "Model Risk Management Policy > Model tiering" and tiers.line == 12
    html = read_document(sample_path("policies") / "data_governance_policy.html")
    assert html.kind == "html" and html.sections()[-1] == "Data Governance Policy > Data used in models"
    assert html.find("every imputation must be documented") is not None
    text = read_document(sample_path("policies") / "credit_limit_policy.txt")
    limit = text.find("The single-obligor exposure limit is 7.5 percent of Tier 1 capital.")
    assert limit is not None and limit.section == "2. Concentration limits" and limit.line == 9


def test_chunks_follow_structure_within_the_token_budget() -> None:
    doc = read_document(sample_path("mvr_rm_pd_v3.docx"))
    for budget in (120, 400, 800):
        chunks = chunk_document(doc, budget)
        assert all(c.tokens <= budget for c in chunks)
        assert all(len({b.section for b in doc.blocks if c.first_paragraph <= b.paragraph <= c.last_paragraph}) == 1
                   for c in chunks)  # a chunk never crosses a heading
        covered = [p for c in chunks for p in range(c.first_paragraph, c.last_paragraph + 1)]
        assert sorted(set(covered)) == [b.paragraph for b in doc.blocks]  # every paragraph, in order
    small = chunk_document(doc, 120)
    assert len(small) > len(chunk_document(doc, 800))
    assert small[5].location.startswith("mvr_rm_pd_v3.docx, §") and small[5].tokens == count_tokens(small[5].text)
    with pytest.raises(ConfigurationError, match="at least 32 tokens"):
        chunk_document(doc, 8)


def test_unreadable_documents_get_clear_errors(tmp_path: Path) -> None:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=str(sample_path("mvr_rm_pd_v3.pdf")))
    writer.encrypt("secret")
    writer.write(str(tmp_path / "locked.pdf"))
    with pytest.raises(DocumentError, match="locked.pdf: the PDF is encrypted; save an unencrypted copy"):
        read_document(tmp_path / "locked.pdf")
    scanned = pypdf.PdfWriter()
    scanned.add_blank_page(595, 842)
    scanned.add_blank_page(595, 842)
    scanned.write(str(tmp_path / "scan.pdf"))
    with pytest.raises(DocumentError, match=r"scan.pdf: none of its 2 page\(s\) has a text layer .*run OCR"):
        read_document(tmp_path / "scan.pdf")
    (tmp_path / "empty.md").write_text("\n\n   \n")
    with pytest.raises(DocumentError, match="empty.md: the document has no text"):
        read_document(tmp_path / "empty.md")
    (tmp_path / "slides.pptx").write_bytes(b"x")
    with pytest.raises(DocumentError, match="unsupported document type '.pptx'"):
        read_document(tmp_path / "slides.pptx")
    (tmp_path / "broken.docx").write_bytes(b"not a zip")
    with pytest.raises(DocumentError, match="broken.docx: not a readable DOCX"):
        read_document(tmp_path / "broken.docx")
    with pytest.raises(DocumentError, match="no such file"):
        read_document(tmp_path / "missing.pdf")


def test_the_bundled_samples_are_what_the_script_builds(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "scripts" / "make_sample_documents.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    items = module.document()
    module.write_pdf(items, tmp_path / "mvr.pdf")
    module.write_docx(items, tmp_path / "mvr.docx")
    assert (tmp_path / "mvr.pdf").read_bytes() == (samples_dir() / "mvr_rm_pd_v3.pdf").read_bytes()
    assert (tmp_path / "mvr.docx").read_bytes() == (samples_dir() / "mvr_rm_pd_v3.docx").read_bytes()


def test_default_checklist_finds_the_sections_of_each_item() -> None:
    checklist = load_checklist()
    assert [i.id for i in checklist.items] == ["conceptual_soundness", "data_quality", "performance_testing",
                                               "limitations", "ongoing_monitoring", "governance"]
    chunks = chunk_document(read_document(sample_path("mvr_rm_pd_v3.pdf")), 800)
    picked = {i.id: [c.section.split(" > ")[-1] for c in relevant_chunks(i, chunks)] for i in checklist.items}
    assert picked["data_quality"] == ["4.1 Data sources", "4.2 Data checks"]
    assert picked["performance_testing"] == ["5.1 Discriminatory power", "5.2 Calibration"]
    assert picked["limitations"] == ["6.1 Known limitations", "6.2 Compensating controls"]


def test_checklist_errors_name_the_item(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"item #1 \(x\) needs question, keywords"):
        load_checklist({"items": [{"id": "x", "title": "X"}]})
    with pytest.raises(ConfigurationError, match="item ids must be unique"):
        load_checklist({"items": [{"id": "x", "title": "X", "question": "?", "keywords": ["a"]}] * 2})
    (tmp_path / "bad.yaml").write_text("items: [")
    with pytest.raises(ConfigurationError, match="bad.yaml: not valid YAML"):
        load_checklist(tmp_path / "bad.yaml")
    with pytest.raises(ConfigurationError, match="cannot read the checklist"):
        load_checklist(tmp_path / "missing.yaml")


def test_answers_are_parsed_from_model_replies() -> None:
    assert parse_json_object('Sure:\n```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_object('x {"a": {"b": 2}} y') == {"a": {"b": 2}}
    assert parse_json_object("no json here") is None
    assert extract_answer("Let me think.\nAnswer: 42.") == "42"
    assert extract_answer("answer - Forty Two") == "forty two"
    assert extract_answer("  Paris  ") == "paris"


def test_simulator_answer_rules_are_validated() -> None:
    from tidyllm.gateway.simulator import parse_profiles

    with pytest.raises(ConfigurationError, match="'match' .* is not a valid regular expression"):
        parse_profiles({"models": {"m": {"answers": [{"match": "(", "reply": "x"}]}}})
    with pytest.raises(ConfigurationError, match="each entry needs 'match' and 'reply'"):
        parse_profiles({"models": {"m": {"answers": [{"match": "x"}]}}})
    rule = parse_profiles({"models": {"m": {"answers": [{"match": "q: (?P<q>.+)", "reply": ['"${q}"', "b"],
                                                         "escape": "json"}]}}})["m"].answers[0]
    assert rule.answer('q: say "hi"', 0) == '"say \\"hi\\""' and rule.answer("q: x", 1) == "b"
    assert rule.answer("nothing", 0) is None


def test_importing_the_apps_package_stays_light() -> None:
    code = ("import sys, tidyllm.apps, tidyllm.magics._apps, tidyllm.cli.apps; "
            "heavy = [m for m in ('litellm', 'pandas', 'sqlalchemy', 'pypdf', 'docx') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_a_finding_is_kept_and_flagged_whatever_the_model_answers() -> None:
    from tidyllm.apps.mvr import _finding

    doc = read_document(sample_path("policies") / "credit_limit_policy.txt")
    chunk = chunk_document(doc, 400)[2]
    item = load_checklist().items[0]
    quote = "The single-obligor exposure limit is 7.5 percent of Tier 1 capital."
    ok = _finding(item, chunk, doc, f'{{"severity": "high", "finding": "f", "evidence": "{quote}"}}')
    assert ok["status"] == "ok" and ok["evidence_found"] and ok["location"] == "credit_limit_policy.txt, §2. Concentration limits, ¶3"
    made_up = _finding(item, chunk, doc, '{"severity": "low", "finding": "f", "evidence": "The limit is 9 percent."}')
    assert made_up["status"] == "quote not found" and not made_up["evidence_found"]
    assert made_up["evidence"] == "The limit is 9 percent." and made_up["location"] == chunk.location
    odd = _finding(item, chunk, doc, f'{{"severity": "severe", "finding": "f", "evidence": "{quote}"}}')
    assert odd["status"] == "unknown severity 'severe'" and odd["severity"] is None
    prose = _finding(item, chunk, doc, "I think the section is fine.")
    assert prose["status"] == "unparseable answer" and prose["finding"] == "I think the section is fine."

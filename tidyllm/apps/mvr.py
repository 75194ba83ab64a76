"""MVR peer review: a model validation report checked against a checklist, with verbatim evidence.

``mvr_review(document, checklist=None, **context)`` reads the report, cuts it by section
(:func:`~tidyllm.apps.documents.chunk_document`), picks for each checklist item the sections that are
about it (keywords in the heading, else in the text), and asks one governed call per (item, section) for a
finding: ``severity`` (none/low/medium/high), ``finding`` and ``evidence`` — a sentence quoted from the
section. Every quote is looked up in the document: a quote that is found gets the location of the paragraph
it is in; one that is not is kept and flagged (``evidence_found`` False), never dropped.

The default checklist (``tidyllm/apps/data/mvr_checklist.yaml``, in the spirit of SR 11-7) is a YAML file a
team copies and edits: ``mvr_review(doc, checklist="ours.yaml")``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tidyllm.apps._run import AppRun, CostEstimate, PlannedCall, parse_json_object
from tidyllm.apps.documents import Chunk, Document, chunk_document, read_document
from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.platform import Platform

__all__ = ["Checklist", "ChecklistItem", "Review", "default_checklist_path", "load_checklist", "mvr_review",
           "FINDING_COLUMNS", "SEVERITIES"]

SEVERITIES = ("none", "low", "medium", "high")
FINDING_COLUMNS = ["item", "title", "severity", "finding", "evidence", "evidence_found", "location", "section",
                   "page", "chunk_location", "status", "route", "cost_usd", "call_id"]

SYSTEM_PROMPT = (
    "You are a senior model risk peer reviewer checking a model validation report against a review standard. "
    "Judge only from the section you are given. Quote evidence exactly as written in the section.")

USER_PROMPT = """Checklist item: {id} - {title}
Question: {question}
Section: {section} ({location})
---
{text}
---
Answer with one JSON object and nothing else:
{{"severity": "none|low|medium|high", "finding": "<one or two sentences>", "evidence": "<one sentence copied exactly from the section above>"}}"""


def default_checklist_path() -> Path:
    """The bundled SR 11-7-style checklist (copy it to edit it)."""
    return Path(__file__).with_name("data") / "mvr_checklist.yaml"


@dataclass(frozen=True)
class ChecklistItem:
    """One thing the reviewer checks: an id, a title, the question asked, and keywords that find sections."""

    id: str
    title: str
    question: str
    keywords: tuple[str, ...]
    max_sections: int = 2


@dataclass(frozen=True)
class Checklist:
    """A named list of :class:`ChecklistItem`."""

    name: str
    items: tuple[ChecklistItem, ...]


def load_checklist(source: "str | Path | Mapping[str, Any] | Checklist | None" = None) -> Checklist:
    """A checklist from a YAML file, a mapping (``{"name", "items": [...]}``) or the default (None)."""
    if isinstance(source, Checklist):
        return source
    where = "checklist"
    if source is None or isinstance(source, (str, Path)):
        import yaml

        path = Path(source) if source is not None else default_checklist_path()
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"{path}: cannot read the checklist ({exc.strerror}); check the path") from None
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path}: not valid YAML: {exc}") from None
    else:
        data = source
    if not isinstance(data, Mapping) or not isinstance(data.get("items"), list) or not data["items"]:
        raise ConfigurationError(f"{where}: a checklist needs 'items:', a non-empty list of {{id, title, question, "
                                 "keywords}}")
    default_max = data.get("max_sections", 2)
    items = []
    for i, raw in enumerate(data["items"], start=1):
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"{where}: item #{i} must be a mapping, got {raw!r}")
        missing = [k for k in ("id", "title", "question", "keywords") if not raw.get(k)]
        if missing:
            raise ConfigurationError(f"{where}: item #{i} ({raw.get('id', '?')}) needs {', '.join(missing)}")
        keywords = raw["keywords"]
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k for k in keywords):
            raise ConfigurationError(f"{where}: item {raw['id']!r}: 'keywords' must be a list of words")
        max_sections = raw.get("max_sections", default_max)
        if not isinstance(max_sections, int) or isinstance(max_sections, bool) or max_sections < 1:
            raise ConfigurationError(f"{where}: item {raw['id']!r}: 'max_sections' must be an integer >= 1")
        items.append(ChecklistItem(str(raw["id"]), str(raw["title"]), " ".join(str(raw["question"]).split()),
                                   tuple(k.lower() for k in keywords), max_sections))
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"{where}: item ids must be unique, got {ids}")
    return Checklist(str(data.get("name") or "checklist"), tuple(items))


def relevant_chunks(item: ChecklistItem, chunks: Sequence[Chunk]) -> list[Chunk]:
    """The chunks ``item`` is asked of: those whose section heading has a keyword, else the ones whose text
    mentions the keywords most; at most ``item.max_sections``, in document order."""
    by_heading = [c for c in chunks if any(k in c.section.split(" > ")[-1].lower() for k in item.keywords)]
    if not by_heading:
        scored = [(sum(c.text.lower().count(k) for k in item.keywords), c.index) for c in chunks]
        best = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:item.max_sections]
        by_heading = [chunks[i] for _, i in sorted(best, key=lambda s: s[1])]
    return by_heading[:item.max_sections]


@dataclass
class Review:
    """The result of :func:`mvr_review`: one finding per (checklist item, section) asked.

    ``findings`` columns: item, title, severity, finding, evidence, evidence_found, location (of the quote's
    paragraph, else of the section), section, page, chunk_location, status (ok / quote not found /
    unparseable answer), route, cost_usd, call_id."""

    document: str
    checklist: Checklist
    findings: "pd.DataFrame"
    estimate: CostEstimate
    actual_usd: float
    execution_id: str
    platform: "Platform" = field(repr=False)

    @property
    def flagged(self) -> "pd.DataFrame":
        """Findings whose evidence was not found verbatim in the document (or whose answer was unreadable)."""
        return self.findings[self.findings["status"] != "ok"]

    def feedback(self, score: float, **fields: Any) -> str:
        """Rate the review in [0, 1]: reaches the router for every sub-call and the ``mvr_review`` history."""
        from tidyllm.apps._run import feedback

        return feedback(self.execution_id, score, platform=self.platform, **fields)

    def to_markdown(self) -> str:
        """A report a reviewer can edit: findings by checklist item, quotes with their locations."""
        lines = [f"# Peer review of {self.document}", "",
                 f"Checklist: {self.checklist.name}. {len(self.findings)} finding(s); "
                 f"cost ${self.actual_usd:.6f} (estimated at most ${self.estimate.total_usd:.6f}); "
                 f"execution `{self.execution_id}`.", "",
                 "| item | severity | location |", "|---|---|---|"]
        for _, f in self.findings.iterrows():
            lines.append(f"| {f['title']} | {f['severity']} | {f['location']} |")
        for item in self.checklist.items:
            rows = self.findings[self.findings["item"] == item.id]
            lines += ["", f"## {item.title}", "", f"*{item.question}*"]
            if rows.empty:
                lines += ["", "No section of the report addresses this item."]
            for _, f in rows.iterrows():
                lines += ["", f"**Severity: {f['severity']}** — {f['finding']}", ""]
                if f["evidence"]:
                    lines.append(f"> {f['evidence']}")
                    lines.append(">")
                    mark = "" if f["evidence_found"] else " — **quote not found in the document: check it**"
                    lines.append(f"> — {f['location']}{mark}")
                else:
                    lines.append(f"*No evidence quoted ({f['status']}); section: {f['chunk_location']}.*")
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """The same report as a standalone HTML page."""
        esc = html.escape
        parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
                 f"<title>Peer review of {esc(self.document)}</title>",
                 "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}blockquote{border-left:4px "
                 "solid #ccc;margin-left:0;padding-left:1em}.flag{color:#b00;font-weight:bold}"
                 "td,th{border:1px solid #ccc;padding:.2em .5em}table{border-collapse:collapse}</style></head><body>",
                 f"<h1>Peer review of {esc(self.document)}</h1>",
                 f"<p>Checklist: {esc(self.checklist.name)}. {len(self.findings)} finding(s); cost "
                 f"${self.actual_usd:.6f} (estimated at most ${self.estimate.total_usd:.6f}); execution "
                 f"<code>{esc(self.execution_id)}</code>.</p>",
                 "<table><tr><th>item</th><th>severity</th><th>location</th></tr>"]
        for _, f in self.findings.iterrows():
            parts.append(f"<tr><td>{esc(f['title'])}</td><td>{esc(f['severity'])}</td>"
                         f"<td>{esc(f['location'])}</td></tr>")
        parts.append("</table>")
        for item in self.checklist.items:
            rows = self.findings[self.findings["item"] == item.id]
            parts += [f"<h2>{esc(item.title)}</h2>", f"<p><em>{esc(item.question)}</em></p>"]
            if rows.empty:
                parts.append("<p>No section of the report addresses this item.</p>")
            for _, f in rows.iterrows():
                parts.append(f"<p><strong>Severity: {esc(f['severity'])}</strong> — {esc(f['finding'])}</p>")
                if f["evidence"]:
                    flag = "" if f["evidence_found"] else \
                        " <span class='flag'>quote not found in the document: check it</span>"
                    parts.append(f"<blockquote>{esc(f['evidence'])}<br>— {esc(f['location'])}{flag}</blockquote>")
                else:
                    parts.append(f"<p class='flag'>No evidence quoted ({esc(f['status'])}); section: "
                                 f"{esc(f['chunk_location'])}.</p>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _prompt(item: ChecklistItem, chunk: Chunk) -> list[dict[str, str]]:
    user = USER_PROMPT.format(id=item.id, title=item.title, question=item.question,
                              section=chunk.section or "(untitled)", location=chunk.location, text=chunk.text)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _finding(item: ChecklistItem, chunk: Chunk, document: Document, answer: str) -> dict[str, Any]:
    """Parse one answer and check its quote against the document."""
    parsed = parse_json_object(answer)
    row: dict[str, Any] = {"item": item.id, "title": item.title, "section": chunk.section,
                           "chunk_location": chunk.location, "page": chunk.first_page}
    if parsed is None:
        return {**row, "severity": None, "finding": answer.strip()[:2000], "evidence": "", "evidence_found": False,
                "location": chunk.location, "status": "unparseable answer"}
    severity = str(parsed.get("severity", "")).strip().lower()
    evidence = str(parsed.get("evidence") or "").strip().strip('"')
    block = document.find(evidence, near=(chunk.first_paragraph, chunk.last_paragraph)) if evidence else None
    if block is not None:
        status = "ok"
        row.update(location=block.location(document.name), page=block.page, section=block.section)
    else:
        status = "quote not found" if evidence else "no evidence"
        row["location"] = chunk.location
    if severity not in SEVERITIES and status == "ok":
        status = f"unknown severity {severity!r}"  # flagged too: a reviewer must set it
    return {**row, "severity": severity if severity in SEVERITIES else None,
            "finding": str(parsed.get("finding") or "").strip(), "evidence": evidence,
            "evidence_found": block is not None, "status": status}


def mvr_review(document: "str | Path | Document", checklist: "str | Path | Mapping[str, Any] | Checklist | None" = None,
               *, model: str = "chat", chunk_tokens: int = 800, max_tokens: int = 160, max_cost: float | None = None,
               platform: "Platform | None" = None, **context: Any) -> Review:
    """Peer-review a model validation report against ``checklist`` (default: the bundled SR 11-7-style one).

    ``model`` is a gateway model group or route; ``context`` is the caller (``user_id``, ``department``,
    ``audit_reason``, ``use_case``, ``data_sensitivity``). The cost is estimated before any call and the review
    refused (:class:`~tidyllm.apps.CostLimitError`) if ``max_cost`` or the caller's budgets cannot cover it.
    """
    import pandas as pd

    doc = read_document(document)
    items = load_checklist(checklist)
    chunks = chunk_document(doc, chunk_tokens)
    work = [(item, chunk) for item in items.items for chunk in relevant_chunks(item, chunks)]
    if not work:
        raise ConfigurationError(f"{doc.name}: no section matches any checklist item's keywords; check the "
                                 "document or the checklist")
    context.setdefault("use_case", "mvr_review")
    run = AppRun(platform, "mvr_review", "review", context,
                 {"model": model, "chunk_tokens": chunk_tokens}, max_cost=max_cost)
    est = run.plan([PlannedCall(model, _prompt(item, chunk), max_tokens) for item, chunk in work])
    rows = []
    with run:
        run.step("document", {"name": doc.name, "kind": doc.kind, "pages": doc.pages, "chunks": len(chunks),
                              "checklist": items.name, "items": len(items.items)})
        for item, chunk in work:
            call = run.chat(model, _prompt(item, chunk), max_tokens=max_tokens, purpose=f"{item.id} @ {chunk.location}")
            rows.append({**_finding(item, chunk, doc, call.text), "route": call.route, "cost_usd": call.cost_usd,
                         "call_id": call.call_id})
        findings = pd.DataFrame(rows, columns=FINDING_COLUMNS)
        run.finish({"findings": len(rows), "flagged": int((findings["status"] != "ok").sum()),
                    "severities": findings["severity"].value_counts().to_dict()})
    return Review(doc.name, items, findings, est, run.actual_usd, run.execution_id, run.platform)

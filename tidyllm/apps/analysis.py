"""Document analysis: structured extraction and map-reduce summaries, in budget-aware batches.

- ``extract(documents, schema, **caller)`` asks one governed call per document for the fields of ``schema``
  (a JSON schema, or a pydantic model class) and returns a DataFrame with one row per document: the fields,
  ``valid``, the validation ``errors`` (kept per row, never raised), ``call_id``, ``route``, ``cost_usd``.
- ``summarise(documents, **caller)`` summarises every chunk (map), each summary tagged with its chunk's
  location, then each document from its chunk summaries (reduce).

A batch is estimated up front; it runs while its committed worst case fits ``max_cost`` and the caller's
tightest budget, and stops cleanly before the item that would not fit (or when governance refuses a call
for budget): the result holds what was done, and ``attrs["stopped"]`` (DataFrame) / ``.stopped`` says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from tidyllm.apps._run import AppRun, Batch, CostEstimate, PlannedCall, parse_json_object
from tidyllm.apps.documents import Chunk, Document, chunk_document, count_tokens, read_documents
from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.platform import Platform

__all__ = ["extract", "summarise", "Summary", "schema_of"]

Documents = "str | Path | Document | Iterable[str | Path | Document]"

EXTRACT_PROMPT = """Extract the fields below from the document. Reply with one JSON object and nothing else, matching this JSON schema (use null when the document does not say):
{schema}

Document: {name}
---
{text}
---"""

MAP_PROMPT = """Summarise this part of a document in at most three sentences, keeping figures and names.
Part: {location}
---
{text}
---"""

REDUCE_PROMPT = """Write a summary of the document {name} from the summaries of its parts below. Keep each part's location tag in square brackets after the statements that come from it.
{parts}"""


def schema_of(schema: "Mapping[str, Any] | type") -> tuple[dict[str, Any], Callable[[dict[str, Any]], list[str]]]:
    """(JSON schema, validator returning error messages) for a JSON schema mapping or a pydantic model."""
    if isinstance(schema, type):
        try:
            from pydantic import BaseModel, ValidationError
        except ImportError:  # pragma: no cover - pydantic comes with litellm
            raise ConfigurationError("a schema class must be a pydantic model") from None
        if not issubclass(schema, BaseModel):
            raise ConfigurationError(f"schema must be a JSON schema dict or a pydantic model, got {schema.__name__}")
        model = schema

        def validate_model(value: dict[str, Any]) -> list[str]:
            try:
                model.model_validate(value)
            except ValidationError as exc:
                return [f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()]
            return []

        return model.model_json_schema(), validate_model
    if not isinstance(schema, Mapping) or not isinstance(schema.get("properties"), Mapping) or not schema["properties"]:
        raise ConfigurationError("schema must be a JSON schema with 'properties' (e.g. {'type': 'object', "
                                 "'properties': {'owner': {'type': 'string'}}}) or a pydantic model class")
    import jsonschema

    try:
        validator = jsonschema.Draft202012Validator(dict(schema))
        validator.check_schema(dict(schema))
    except jsonschema.SchemaError as exc:
        raise ConfigurationError(f"schema is not a valid JSON schema: {exc.message}") from None

    def validate_json(value: dict[str, Any]) -> list[str]:
        return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))]

    return dict(schema), validate_json


def _doc_text(doc: Document, max_input_tokens: int) -> str:
    """The document's text, cut at whole paragraphs to ``max_input_tokens``."""
    out, used = [], 0
    for block in doc.blocks:
        tokens = count_tokens(block.text) + 1
        if out and used + tokens > max_input_tokens:
            break
        out.append(block.text)
        used += tokens
    return "\n".join(out)


def extract(documents: Documents, schema: "Mapping[str, Any] | type", *, model: str = "chat",
            max_tokens: int | None = None, max_input_tokens: int = 6000, max_cost: float | None = None,
            platform: "Platform | None" = None, **caller: Any) -> "pd.DataFrame":
    """Extract ``schema``'s fields from each document: one row per document (see the module doc).

    ``max_tokens`` defaults to 40 plus 30 per field (an answer's worst case is part of the estimate).
    ``attrs`` of the result: ``execution_id``, ``estimate`` (:class:`~tidyllm.apps.CostEstimate`),
    ``actual_usd``, ``stopped`` (None, or why the batch stopped early)."""
    import pandas as pd

    from tidyllm.errors import BudgetExceededError

    docs = read_documents(documents)
    json_schema, validate = schema_of(schema)
    fields = list(json_schema["properties"])
    if max_tokens is None:
        max_tokens = min(1000, 40 + 30 * len(fields))
    schema_text = json.dumps(json_schema, sort_keys=True)
    prompts = [[{"role": "user", "content": EXTRACT_PROMPT.format(schema=schema_text, name=d.name,
                                                                  text=_doc_text(d, max_input_tokens))}]
               for d in docs]
    caller.setdefault("use_case", "extraction")
    run = AppRun(platform, "extract", "extract", caller, {"model": model, "fields": ",".join(fields)},
                 max_cost=max_cost)
    est = run.plan([PlannedCall(model, p, max_tokens) for p in prompts], partial=True)
    rows = []
    with run:
        batch = Batch(run, est, "document", len(docs))
        for doc, prompt, worst in zip(docs, prompts, est.per_call_usd):
            if not batch.admit(worst):
                break
            try:
                call = run.chat(model, prompt, max_tokens=max_tokens, purpose=f"extract {doc.name}")
            except BudgetExceededError as exc:
                batch.refused(exc)
                break
            value = parse_json_object(call.text)
            errors = ["the answer is not a JSON object"] if value is None else validate(value)
            value = value or {}
            rows.append({"document": doc.name, **{f: value.get(f) for f in fields}, "valid": not errors,
                         "errors": "; ".join(errors), "call_id": call.call_id, "route": call.route,
                         "cost_usd": call.cost_usd})
            batch.done += 1
        if batch.stopped:
            run.step("stopped", {"reason": batch.stopped, "done": batch.done, "total": len(docs)})
        run.finish({"documents": len(docs), "done": batch.done, "stopped": batch.stopped,
                    "invalid": sum(1 for r in rows if not r["valid"])})
    frame = pd.DataFrame(rows, columns=["document", *fields, "valid", "errors", "call_id", "route", "cost_usd"])
    frame.attrs.update(execution_id=run.execution_id, estimate=est, actual_usd=run.actual_usd,
                       stopped=batch.stopped)
    return frame


@dataclass
class Summary:
    """What :func:`summarise` returns: per-chunk summaries (``parts``) and one summary per document."""

    parts: "pd.DataFrame"
    documents: "pd.DataFrame"
    estimate: CostEstimate
    actual_usd: float
    execution_id: str
    stopped: str | None
    platform: "Platform" = field(repr=False)

    def feedback(self, score: float, **fields: Any) -> str:
        """Rate the summaries in [0, 1]: reaches the router for every sub-call and the ``summarise`` history."""
        from tidyllm.apps._run import feedback

        return feedback(self.execution_id, score, platform=self.platform, **fields)

    def _repr_markdown_(self) -> str:
        out = [f"**{row['document']}**: {row['summary']}" for _, row in self.documents.iterrows()]
        if self.stopped:
            out.append(f"*{self.stopped}*")
        return "\n\n".join(out)


def _tag(chunk: Chunk) -> str:
    return chunk.location.split(", ", 1)[1] if ", " in chunk.location else chunk.location


def summarise(documents: Documents, *, model: str = "chat", chunk_tokens: int = 1500, max_tokens: int = 100,
              reduce_max_tokens: int = 300, max_cost: float | None = None, platform: "Platform | None" = None,
              **caller: Any) -> Summary:
    """Map-reduce summaries of ``documents``: each chunk, then each document from its chunks' summaries
    (a one-chunk document's summary is its chunk's). Batches stop cleanly at the budget (module doc)."""
    import pandas as pd

    from tidyllm.errors import BudgetExceededError

    docs = read_documents(documents)
    work: list[tuple[Document, list[Chunk]]] = [(d, chunk_document(d, chunk_tokens)) for d in docs]
    caller.setdefault("use_case", "summarise")
    run = AppRun(platform, "summarise", "map_reduce", caller, {"model": model, "chunk_tokens": chunk_tokens},
                 max_cost=max_cost)
    planned: list[PlannedCall] = []
    for doc, chunks in work:
        planned += [PlannedCall(model, [{"role": "user", "content": MAP_PROMPT.format(location=c.location,
                                                                                     text=c.text)}], max_tokens)
                    for c in chunks]
        if len(chunks) > 1:
            reduce_msg = [{"role": "user", "content": REDUCE_PROMPT.format(name=doc.name, parts="")}]
            pending = sum(count_tokens(f"[{_tag(c)}] ") for c in chunks) + max_tokens * len(chunks)
            planned.append(PlannedCall(model, reduce_msg, reduce_max_tokens, pending_tokens=pending))
    est = run.plan(planned, partial=True)
    parts: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    with run:
        batch = Batch(run, est, "document", len(docs))
        worst = iter(est.per_call_usd)
        try:
            for doc, chunks in work:
                doc_worst = [next(worst) for _ in range(len(chunks) + (1 if len(chunks) > 1 else 0))]
                if not batch.admit(sum(doc_worst)):  # a document is summarised whole or not at all
                    break
                mine = []
                for chunk in chunks:
                    prompt = [{"role": "user", "content": MAP_PROMPT.format(location=chunk.location, text=chunk.text)}]
                    call = run.chat(model, prompt, max_tokens=max_tokens, purpose=f"map {chunk.location}")
                    mine.append({"document": doc.name, "location": chunk.location, "summary": call.text.strip(),
                                 "call_id": call.call_id, "route": call.route, "cost_usd": call.cost_usd})
                if len(chunks) > 1:
                    listing = "\n".join(f"[{_tag(c)}] {p['summary']}" for c, p in zip(chunks, mine))
                    prompt = [{"role": "user", "content": REDUCE_PROMPT.format(name=doc.name, parts=listing)}]
                    call = run.chat(model, prompt, max_tokens=reduce_max_tokens, purpose=f"reduce {doc.name}")
                    text, cost, call_id = call.text.strip(), call.cost_usd, call.call_id
                else:
                    text, cost, call_id = mine[0]["summary"], 0.0, mine[0]["call_id"]
                parts.extend(mine)
                summaries.append({"document": doc.name, "summary": text, "chunks": len(chunks),
                                  "cost_usd": sum(p["cost_usd"] for p in mine) + cost, "call_id": call_id})
                batch.done += 1
        except BudgetExceededError as exc:
            batch.refused(exc)
        if batch.stopped:
            run.step("stopped", {"reason": batch.stopped, "done": batch.done, "total": len(docs)})
        run.finish({"documents": len(docs), "done": batch.done, "stopped": batch.stopped})
    return Summary(pd.DataFrame(parts, columns=["document", "location", "summary", "call_id", "route", "cost_usd"]),
                   pd.DataFrame(summaries, columns=["document", "summary", "chunks", "cost_usd", "call_id"]),
                   est, run.actual_usd, run.execution_id, batch.stopped, run.platform)

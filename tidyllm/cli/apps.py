"""``tidyllm apps``: the applications (MVR peer review, QA, extraction, summaries, RAG) from a shell.

Each command installs the governed platform from the settings (``tidyllm.yaml`` / ``TIDYLLM_*``: the gateway
must be running), prints the cost estimate before any call, runs the application and prints its result and
actual cost. The caller is ``--user/--department/--reason`` (default: the settings' ``defaults``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from tidyllm.cli._common import echo_frame, load, settings_options

_PATHS = click.Path(exists=True, path_type=Path)


def caller_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The caller context, ``--max-cost``, ``--model`` and the settings options."""
    for option in reversed([
        click.option("--user", "user_id", help="user_id of every call (default: settings defaults)"),
        click.option("--department", help="department whose budget pays (default: settings defaults)"),
        click.option("--reason", "audit_reason", help="audit reason recorded with every call"),
        click.option("--use-case", help="use case (a routing feature)"),
        click.option("--sensitivity", "data_sensitivity", help="data sensitivity class of the documents"),
        click.option("--max-cost", type=float, help="refuse up front when the worst case exceeds this many USD"),
    ]):
        fn = option(fn)
    return settings_options(fn)


def _install(config: str | None, database_url: str | None) -> Any:
    import tidyllm

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tidyllm.apps")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the estimate before any call, and the stop of a batch
    return tidyllm.install(load(config, database_url))


def _caller(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values.pop(k) for k in ("user_id", "department", "audit_reason", "use_case", "data_sensitivity")
            if values.get(k) is not None}


def _cost(estimate: Any, actual: float, execution_id: str) -> None:
    click.echo(f"\ncost: ${actual:.6f} (estimated at most ${estimate.total_usd:.6f}); execution {execution_id} "
               f"(rate it: tidyllm apps feedback {execution_id} SCORE)")


@click.group()
def apps() -> None:
    """Applications on the governed platform: mvr-review, ask, extract, summarise, rag-*, feedback."""


@apps.command("mvr-review")
@click.argument("document", type=_PATHS)
@click.option("--checklist", type=_PATHS, help="checklist YAML (default: the bundled SR 11-7-style one)")
@click.option("-m", "--model", default="chat", show_default=True, help="gateway model group or route")
@click.option("--chunk-tokens", type=int, default=800, show_default=True, help="token budget per section chunk")
@click.option("-f", "--format", "fmt", type=click.Choice(["markdown", "html", "csv"]), default="markdown",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="write the report here")
@caller_options
def mvr_review_cmd(document: Path, checklist: Path | None, model: str, chunk_tokens: int, fmt: str,
                   output: Path | None, config: str | None, database_url: str | None, **values: Any) -> None:
    """Peer-review the model validation report DOCUMENT (PDF, DOCX, HTML, Markdown, text)."""
    from tidyllm.apps import mvr_review

    platform = _install(config, database_url)
    max_cost = values.pop("max_cost")
    review = mvr_review(document, checklist, model=model, chunk_tokens=chunk_tokens, max_cost=max_cost,
                        platform=platform, **_caller(values))
    text = {"markdown": review.to_markdown, "html": review.to_html,
            "csv": lambda: review.findings.to_csv(index=False)}[fmt]()
    if output is not None:
        output.write_text(text, encoding="utf-8")
        click.echo(f"written: {output} ({len(review.findings)} findings, {len(review.flagged)} flagged)")
    else:
        click.echo(text)
    _cost(review.estimate, review.actual_usd, review.execution_id)


@apps.command("ask")
@click.argument("question")
@click.option("--context", "context_file", type=_PATHS, help="a document to answer from")
@click.option("--strategy", type=click.Choice(["consensus", "cascade"]), default="consensus", show_default=True)
@click.option("--route", "routes", multiple=True, help="a route to ask (repeat; default: the model group's)")
@click.option("--samples", type=int, help="answers per route (default 1, or 3 for one route; 2 per cascade rung)")
@click.option("--judge", help="a route that settles a tie")
@click.option("-m", "--model", default="chat", show_default=True, help="gateway model group")
@caller_options
def ask_cmd(question: str, context_file: Path | None, strategy: str, routes: tuple[str, ...], samples: int | None,
            judge: str | None, model: str, config: str | None, database_url: str | None, **values: Any) -> None:
    """Ask QUESTION by consensus of several routes, or by a cheap-to-strong cascade."""
    from tidyllm.apps import ask, read_document

    platform = _install(config, database_url)
    context = read_document(context_file) if context_file else None
    answer = ask(question, context, strategy, list(routes) or None, model=model, samples=samples, judge=judge,
                 max_cost=values.pop("max_cost"), platform=platform, **_caller(values))
    click.echo(f"answer: {answer.answer}\nconfidence: {answer.confidence:.2f}"
               f"{' (escalated)' if answer.escalated else ''}")
    echo_frame(answer.votes[["rung", "route", "answer", "cost_usd"]])
    _cost(answer.estimate, answer.actual_usd, answer.execution_id)


@apps.command("extract")
@click.argument("documents", nargs=-1, required=True, type=_PATHS)
@click.option("--schema", "schema_file", required=True, type=_PATHS, help="JSON schema file of the fields")
@click.option("-m", "--model", default="chat", show_default=True, help="gateway model group or route")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="also write a CSV")
@caller_options
def extract_cmd(documents: tuple[Path, ...], schema_file: Path, model: str, csv_path: Path | None,
                config: str | None, database_url: str | None, **values: Any) -> None:
    """Extract the fields of --schema from each of DOCUMENTS (files or directories): one row each."""
    from tidyllm.apps import extract
    from tidyllm.errors import ConfigurationError

    try:
        schema = json.loads(schema_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigurationError(f"{schema_file}: not valid JSON ({exc})") from None
    platform = _install(config, database_url)
    frame = extract(list(documents), schema, model=model, max_cost=values.pop("max_cost"), platform=platform,
                    **_caller(values))
    echo_frame(frame.drop(columns=["call_id"]))
    if frame.attrs["stopped"]:
        click.echo(frame.attrs["stopped"], err=True)
    if csv_path is not None:
        frame.to_csv(csv_path, index=False)
    _cost(frame.attrs["estimate"], frame.attrs["actual_usd"], frame.attrs["execution_id"])


@apps.command("summarise")
@click.argument("documents", nargs=-1, required=True, type=_PATHS)
@click.option("-m", "--model", default="chat", show_default=True, help="gateway model group or route")
@click.option("--chunk-tokens", type=int, default=1500, show_default=True)
@caller_options
def summarise_cmd(documents: tuple[Path, ...], model: str, chunk_tokens: int, config: str | None,
                  database_url: str | None, **values: Any) -> None:
    """Summarise DOCUMENTS (map-reduce over their sections, with location tags)."""
    from tidyllm.apps import summarise

    platform = _install(config, database_url)
    result = summarise(list(documents), model=model, chunk_tokens=chunk_tokens, max_cost=values.pop("max_cost"),
                       platform=platform, **_caller(values))
    for _, row in result.documents.iterrows():
        click.echo(f"## {row['document']}\n\n{row['summary']}\n")
    if result.stopped:
        click.echo(result.stopped, err=True)
    _cost(result.estimate, result.actual_usd, result.execution_id)


@apps.command("rag-add")
@click.argument("index")
@click.argument("documents", nargs=-1, required=True, type=_PATHS)
@click.option("--embedding-model", default="embed", show_default=True, help="gateway embedding route or group")
@caller_options
def rag_add_cmd(index: str, documents: tuple[Path, ...], embedding_model: str, config: str | None,
                database_url: str | None, **values: Any) -> None:
    """Add DOCUMENTS to the retrieval INDEX (only new or changed chunks are embedded)."""
    from tidyllm.apps import Index

    platform = _install(config, database_url)
    max_cost = values.pop("max_cost")
    idx = Index(index, model=embedding_model, platform=platform, **_caller(values))
    try:
        update = idx.add(list(documents), max_cost=max_cost)
    finally:
        idx.close()
    click.echo(f"{index}: {update.added} chunk(s) added, {update.updated} re-embedded, {update.unchanged} unchanged, "
               f"{update.removed} removed")
    if update.stopped:
        click.echo(update.stopped, err=True)
    _cost(update.estimate, update.actual_usd, update.execution_id)


@apps.command("rag-search")
@click.argument("index")
@click.argument("query")
@click.option("-k", type=int, default=5, show_default=True)
@click.option("--embedding-model", default="embed", show_default=True)
@caller_options
def rag_search_cmd(index: str, query: str, k: int, embedding_model: str, config: str | None,
                   database_url: str | None, **values: Any) -> None:
    """The K chunks of INDEX nearest to QUERY, with their locations."""
    from tidyllm.apps import Index

    platform = _install(config, database_url)
    max_cost = values.pop("max_cost")
    idx = Index(index, model=embedding_model, platform=platform, **_caller(values))
    try:
        frame = idx.search(query, k, max_cost=max_cost)
    finally:
        idx.close()
    echo_frame(frame[["rank", "location", "distance"]])


@apps.command("rag-answer")
@click.argument("index")
@click.argument("question")
@click.option("-k", type=int, default=4, show_default=True)
@click.option("-m", "--model", default="chat", show_default=True, help="gateway chat model group or route")
@click.option("--embedding-model", default="embed", show_default=True)
@caller_options
def rag_answer_cmd(index: str, question: str, k: int, model: str, embedding_model: str, config: str | None,
                   database_url: str | None, **values: Any) -> None:
    """Answer QUESTION from INDEX, citing the chunks it used."""
    from tidyllm.apps import Index

    platform = _install(config, database_url)
    max_cost = values.pop("max_cost")
    idx = Index(index, model=embedding_model, platform=platform, **_caller(values))
    try:
        answer = idx.answer(question, k, model=model, max_cost=max_cost)
    finally:
        idx.close()
    click.echo(answer.answer)
    for _, row in answer.citations.iterrows():
        click.echo(f"  [{row['n']}] {row['location']}")
    click.echo(f"\ncost: ${answer.actual_usd:.6f}; execution {answer.execution_id}")


@apps.command("feedback")
@click.argument("execution_id")
@click.argument("score", type=click.FloatRange(0.0, 1.0))
@settings_options
def feedback_cmd(execution_id: str, score: float, config: str | None, database_url: str | None) -> None:
    """Rate an application run (SCORE in [0, 1]): every sub-call's score reaches the router, and the run's
    configuration is learned for its application."""
    from tidyllm.apps import feedback

    platform = _install(config, database_url)
    outcome = feedback(execution_id, score, platform=platform)
    click.echo(f"recorded outcome {outcome}")


@apps.command("optimal")
@click.argument("application", type=click.Choice(["mvr_review", "ask", "extract", "summarise", "rag"]))
@click.option("--department")
@click.option("--use-case")
@settings_options
def optimal_cmd(application: str, department: str | None, use_case: str | None, config: str | None,
                database_url: str | None) -> None:
    """The configuration (route, chunk size, ...) that scored best for APPLICATION in this context."""
    from tidyllm.cli._common import platform as admin_platform

    ctx = {k: v for k, v in (("department", department), ("use_case", use_case)) if v}
    best = admin_platform(config, database_url).mart.get_optimal_config(application, ctx)
    click.echo(json.dumps(best, indent=2, sort_keys=True, default=str))

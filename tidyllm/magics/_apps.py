"""``AppMagics``: the applications of :mod:`tidyllm.apps` in a notebook.

- ``%mvr_review PATH [--checklist F] [-m MODEL] [--max-cost USD]`` reviews a report file;
  ``%%mvr_review`` reviews the cell (Markdown text). Shows the editable report, returns the ``Review``.
- ``%ask [--strategy consensus|cascade] [--route R ...] QUESTION``; ``%%ask QUESTION`` answers from the cell.
- ``%extract --schema FILE PATH...`` → DataFrame; ``%summarise PATH...`` → Summary.
- ``%rag add|search|answer INDEX ...`` → the index's update, hits or cited answer.
- ``%app_feedback EXECUTION_ID SCORE`` rates a run.

The caller (user, department, reason, use case, sensitivity) and the platform are the ``%%llm`` ones
(``%llm_config``). Each magic prints the cost estimate before any call and the actual cost after; errors a
user can act on (over budget, over ``--max-cost``, unreadable document) are one line.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
from typing import Any, Iterator

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

__all__ = ["AppMagics"]


@contextlib.contextmanager
def _shown() -> Iterator[None]:
    """Print the applications' estimate (and a batch's stop) while a magic runs; one line per error."""
    from tidyllm.errors import TidyLLMError

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tidyllm.apps")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    except TidyLLMError as exc:
        message = " ".join(str(exc).split("\n\nLiteLLM:", 1)[0].split())
        raise UsageError(message) from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _parse(fn: Any, line: str) -> Any:
    try:
        return parse_argstring(fn, line)
    except UsageError:
        raise
    except SystemExit:  # argparse's --help or a bad option has printed its message
        raise UsageError(f"see %{fn.__name__.rstrip('_')} --help") from None


@magics_class
class AppMagics(Magics):
    """Notebook magics for the applications; see the module doc."""

    def _llm(self) -> Any:
        magics = self.shell.magics_manager.registry.get("LLMMagics")
        if magics is None:
            raise UsageError("load the extension first: %load_ext tidyllm")
        return magics

    def _caller(self) -> dict[str, str]:
        llm = self._llm()
        values = {"user_id": llm.user, "department": llm.department, "audit_reason": llm.reason,
                  "use_case": llm.use_case, "data_sensitivity": llm.sensitivity}
        return {k: v for k, v in values.items() if v is not None}

    def _platform(self) -> Any:
        return self._llm().platform()

    @staticmethod
    def _cost(estimate: Any, actual: float, execution_id: str) -> None:
        print(f"cost: ${actual:.6f} (estimated at most ${estimate.total_usd:.6f}); execution {execution_id}")

    # --- MVR ------------------------------------------------------------------------------------------

    @magic_arguments()
    @argument("path", nargs="?", help="the report (PDF, DOCX, HTML, Markdown, text); %%mvr_review: the cell")
    @argument("--checklist", help="checklist YAML (default: the bundled SR 11-7-style one)")
    @argument("-m", "--model", default="chat", help="gateway model group or route")
    @argument("--chunk-tokens", type=int, default=800, help="token budget per section chunk")
    @argument("--max-cost", type=float, help="refuse up front when the worst case exceeds this many USD")
    @line_cell_magic
    def mvr_review(self, line: str, cell: str | None = None) -> Any:
        """Peer-review a model validation report against the checklist; returns the Review."""
        args = _parse(self.mvr_review, line)
        with _shown():
            from tidyllm.apps import mvr_review
            from tidyllm.apps.documents import Document, read_document

            if cell is not None:
                document: Any = _cell_document(cell, args.path or "cell.md")
            elif args.path:
                document = read_document(args.path)
            else:
                raise UsageError("%mvr_review needs a PATH (or use %%mvr_review with the report in the cell)")
            assert isinstance(document, Document)
            review = mvr_review(document, args.checklist, model=args.model, chunk_tokens=args.chunk_tokens,
                                max_cost=args.max_cost, platform=self._platform(), **self._caller())
        self._cost(review.estimate, review.actual_usd, review.execution_id)
        return review

    # --- QA -------------------------------------------------------------------------------------------

    @magic_arguments()
    @argument("question", nargs="*", help="the question")
    @argument("--strategy", choices=["consensus", "cascade"], default="consensus")
    @argument("--route", action="append", dest="routes", help="a route to ask (repeat)")
    @argument("--samples", type=int, help="answers per route / per cascade rung")
    @argument("--judge", help="a route that settles a tie")
    @argument("-m", "--model", default="chat", help="gateway model group")
    @argument("--max-cost", type=float, help="refuse up front when the worst case exceeds this many USD")
    @line_cell_magic
    def ask(self, line: str, cell: str | None = None) -> Any:
        """Ask by consensus or cascade; ``%%ask QUESTION`` answers from the cell's text."""
        args = _parse(self.ask, line)
        question = " ".join(args.question).strip()
        if not question:
            raise UsageError("%ask needs a question")
        with _shown():
            from tidyllm.apps import ask

            answer = ask(question, cell, args.strategy, args.routes, model=args.model, samples=args.samples,
                         judge=args.judge, max_cost=args.max_cost, platform=self._platform(), **self._caller())
        print(f"confidence {answer.confidence:.2f}{' (escalated)' if answer.escalated else ''}; "
              f"{len(answer.disagreement)} dissenting vote(s)")
        self._cost(answer.estimate, answer.actual_usd, answer.execution_id)
        return answer

    # --- document analysis ----------------------------------------------------------------------------

    @magic_arguments()
    @argument("paths", nargs="+", help="documents or directories")
    @argument("--schema", required=True, help="a JSON schema file, or the name of a dict / pydantic model")
    @argument("-m", "--model", default="chat", help="gateway model group or route")
    @argument("--max-cost", type=float, help="run while the worst case fits this many USD")
    @line_magic
    def extract(self, line: str) -> Any:
        """Extract --schema's fields from each document: a DataFrame, one row per document."""
        args = _parse(self.extract, line)
        schema = self._schema(args.schema)
        with _shown():
            from tidyllm.apps import extract

            frame = extract(args.paths, schema, model=args.model, max_cost=args.max_cost, platform=self._platform(),
                            **self._caller())
        self._cost(frame.attrs["estimate"], frame.attrs["actual_usd"], frame.attrs["execution_id"])
        return frame

    def _schema(self, name: str) -> Any:
        if name in self.shell.user_ns:
            return self.shell.user_ns[name]
        import json
        from pathlib import Path

        path = Path(name)
        if not path.is_file():
            raise UsageError(f"--schema {name!r} is neither a variable of this notebook nor a JSON schema file")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UsageError(f"{name}: not valid JSON ({exc})") from None

    @magic_arguments()
    @argument("paths", nargs="+", help="documents or directories")
    @argument("-m", "--model", default="chat", help="gateway model group or route")
    @argument("--chunk-tokens", type=int, default=1500)
    @argument("--max-cost", type=float, help="run while the worst case fits this many USD")
    @line_magic
    def summarise(self, line: str) -> Any:
        """Map-reduce summaries of the documents, with location tags."""
        args = _parse(self.summarise, line)
        with _shown():
            from tidyllm.apps import summarise

            result = summarise(args.paths, model=args.model, chunk_tokens=args.chunk_tokens, max_cost=args.max_cost,
                               platform=self._platform(), **self._caller())
        self._cost(result.estimate, result.actual_usd, result.execution_id)
        return result

    # --- RAG ------------------------------------------------------------------------------------------

    @line_magic
    def rag(self, line: str) -> Any:
        """``%rag add INDEX PATH...`` | ``%rag search INDEX QUERY`` | ``%rag answer INDEX QUESTION``."""
        words = shlex.split(line)
        if len(words) < 3 or words[0] not in ("add", "search", "answer"):
            raise UsageError("usage: %rag add INDEX PATH... | %rag search INDEX QUERY | %rag answer INDEX QUESTION")
        action, name, rest = words[0], words[1], words[2:]
        with _shown():
            from tidyllm.apps import Index

            index = Index(name, platform=self._platform(), **self._caller())
            try:
                if action == "add":
                    update = index.add(rest)
                    print(f"{name}: {update.added} chunk(s) added, {update.updated} re-embedded, "
                          f"{update.unchanged} unchanged, {update.removed} removed; cost ${update.actual_usd:.6f}")
                    return update
                if action == "search":
                    return index.search(" ".join(rest))
                return index.answer(" ".join(rest))
            finally:
                index.close()

    @line_magic
    def app_feedback(self, line: str) -> str:
        """``%app_feedback EXECUTION_ID SCORE``: rate an application run in [0, 1]."""
        words = line.split()
        if len(words) != 2:
            raise UsageError("usage: %app_feedback EXECUTION_ID SCORE (a number in [0, 1])")
        try:
            score = float(words[1])
        except ValueError:
            raise UsageError(f"SCORE must be a number in [0, 1], got {words[1]!r}") from None
        with _shown():
            from tidyllm.apps import feedback

            return feedback(words[0], score, platform=self._platform())


def _cell_document(text: str, name: str) -> Any:
    """The cell's text as a Markdown document named ``name``."""
    import tempfile
    from pathlib import Path

    from tidyllm.apps.documents import read_document

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / (name if name.endswith((".md", ".txt")) else f"{name}.md")
        path.write_text(text, encoding="utf-8")
        doc = read_document(path, name=name)
    return doc

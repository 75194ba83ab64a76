"""RAG: a retrieval index of governed embeddings in a real vector store, and answers with citations.

``Index(name, **caller)`` keeps its chunks in the mart (``rag_indexes``, ``rag_chunks``) and its vectors in
sqlite-vec (SQLite marts) or pgvector (PostgreSQL marts), see :mod:`tidyllm.apps._vectors`:

- ``index.add(documents)`` chunks each document by structure and embeds, through the gateway's embedding
  route, only the chunks that are new or whose text changed; chunks that disappeared are deleted. Embedding
  batches are budget-aware like every batch here.
- ``index.search(query, k)`` embeds the query (a governed call too) and returns the nearest chunks with their
  locations.
- ``index.answer(question)`` answers from the retrieved chunks, numbered ``[1]``, ``[2]``...; the citations the
  answer uses are mapped back to chunk locations.

Every operation is a tracked execution of module ``rag`` with its calls' ids and costs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tidyllm.apps._run import AppRun, Batch, CostEstimate, PlannedCall, resolve_platform, split_context
from tidyllm.apps._vectors import VectorStore, open_store
from tidyllm.apps.documents import Chunk, Document, chunk_document, read_documents
from tidyllm.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

    from tidyllm.platform import Platform

__all__ = ["Index", "IndexUpdate", "RagAnswer"]

ANSWER_PROMPT = """Answer the question using only the numbered sources below. Cite the sources you use as [n]. If the sources do not answer it, say so.

Sources:
{sources}

Question: {question}"""
_CITATION = re.compile(r"\[(\d{1,3})\]")


@dataclass(frozen=True)
class IndexUpdate:
    """What :meth:`Index.add` did: chunks embedded (new or changed), unchanged, removed; its cost."""

    added: int
    updated: int
    unchanged: int
    removed: int
    documents: int
    estimate: CostEstimate
    actual_usd: float
    execution_id: str
    stopped: str | None = None


@dataclass
class RagAnswer:
    """What :meth:`Index.answer` returns: the answer, its citations and the retrieved sources."""

    question: str
    answer: str
    #: the sources the answer cites: n, document, location, text, distance
    citations: "pd.DataFrame"
    #: every retrieved source, numbered as in the prompt
    sources: "pd.DataFrame"
    call_id: str
    route: str | None
    actual_usd: float
    execution_id: str
    platform: "Platform" = field(repr=False)

    def feedback(self, score: float, **fields: Any) -> str:
        """Rate the answer in [0, 1]: reaches the router for its calls and the ``rag`` history."""
        from tidyllm.apps._run import feedback

        return feedback(self.execution_id, score, platform=self.platform, **fields)

    def __str__(self) -> str:
        return self.answer


class Index:
    """A named retrieval index (see the module doc). ``caller`` is the caller context of its calls.

    ``model`` is the gateway's embedding route or group (fixed per index); ``store`` the database URL of the
    vector store (default: the platform's mart; on SQLite the vectors go to ``<mart>.vectors.db`` beside it,
    see :mod:`tidyllm.apps._vectors`)."""

    def __init__(self, name: str, *, model: str = "embed", chunk_tokens: int = 400, store: str | None = None,
                 platform: "Platform | None" = None, **caller: Any) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError("an index needs a non-empty name")
        self.name = name
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.platform = resolve_platform(platform)
        self.caller = split_context({"use_case": "rag", **caller})
        self.url = store or self.platform.mart.url
        if store is not None and store != self.platform.mart.url and not store.startswith("sqlite"):
            from tidyllm.mart import TidyMart

            TidyMart(store).close()  # create or upgrade the schema of a separate PostgreSQL store
        self._store: VectorStore | None = None

    def __repr__(self) -> str:
        return f"Index({self.name!r}, model={self.model!r})"

    @property
    def store(self) -> VectorStore:
        """The vector store connection (opened on first use)."""
        if self._store is None:
            self._store = open_store(self.url)
        return self._store

    def close(self) -> None:
        """Close the vector store connection."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def _run(self, operation: str, max_cost: float | None = None) -> AppRun:
        return AppRun(self.platform, "rag", operation, self.caller,
                      {"index": self.name, "model": self.model, "chunk_tokens": self.chunk_tokens}, max_cost=max_cost)

    # --- building ------------------------------------------------------------------------------------

    def add(self, documents: "str | Path | Document | Iterable[str | Path | Document]", *,
            batch_size: int = 32, max_cost: float | None = None) -> IndexUpdate:
        """Add or refresh ``documents``: embed new and changed chunks only, delete chunks that are gone."""
        from tidyllm.errors import BudgetExceededError

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}")
        docs = read_documents(documents)
        info = self.store.ensure_index(self.name, self.model)
        todo: list[tuple[Document, list[Chunk], list[int]]] = []
        unchanged = updated = removed = 0
        for doc in docs:
            existing = self.store.existing(self.name, doc.name)
            chunks = chunk_document(doc, self.chunk_tokens)
            keys = {c.key for c in chunks}
            fresh = [c for c in chunks if existing.get(c.key, (0, ""))[1] != c.digest]
            replaced = [existing[c.key][0] for c in fresh if c.key in existing]
            gone = [cid for key, (cid, _) in existing.items() if key not in keys]
            unchanged += len(chunks) - len(fresh)
            updated += len(replaced)
            removed += len(gone)
            todo.append((doc, fresh, replaced + gone))
        batches = [(doc, fresh[i:i + batch_size]) for doc, fresh, _ in todo for i in range(0, len(fresh), batch_size)]
        run = self._run("add", max_cost)
        est = run.plan([PlannedCall(self.model, inputs=[c.text for c in chunk_batch]) for _, chunk_batch in batches],
                       partial=True) if batches else CostEstimate("rag", 0, 0.0, 0, 0)
        added = 0
        with run:
            batch = Batch(run, est, "document", len(todo))
            worst = iter(est.per_call_usd)
            try:
                for doc, fresh, delete_ids in todo:
                    parts = [fresh[i:i + batch_size] for i in range(0, len(fresh), batch_size)]
                    doc_worst = sum(next(worst) for _ in parts)
                    if not batch.admit(doc_worst):  # a document is indexed whole or not at all
                        break
                    rows = []
                    for part in parts:
                        call = run.embed(self.model, [c.text for c in part], purpose=f"embed {doc.name}")
                        rows += [(self._row(c, call.call_id, run.execution_id), v) for c, v in zip(part, call.vectors)]
                    if rows or delete_ids:
                        dims = len(rows[0][1]) if rows else int(info["dimensions"] or 0)
                        self.store.write(self.name, info["vector_table"], dims, rows, delete_ids)
                        info["dimensions"] = dims
                    added += len(rows)
                    batch.done += 1
            except BudgetExceededError as exc:
                batch.refused(exc)
            run.finish({"documents": len(docs), "embedded": added, "unchanged": unchanged, "removed": removed,
                        "stopped": batch.stopped})
        return IndexUpdate(added - updated, updated, unchanged, removed, len(docs),
                           est, run.actual_usd, run.execution_id, batch.stopped)

    def _row(self, chunk: Chunk, call_id: str, execution_id: str) -> dict[str, Any]:
        return {"document": chunk.document, "chunk_key": chunk.key, "location": chunk.location,
                "section": chunk.section, "page": chunk.first_page, "text": chunk.text, "text_hash": chunk.digest,
                "tokens": chunk.tokens, "call_id": call_id, "execution_id": execution_id,
                "embedded_at": self.store._now()}

    def documents(self) -> list[str]:
        """Names of the documents in the index."""
        return self.store.documents(self.name)

    def chunks(self) -> "pd.DataFrame":
        """The index's ``rag_chunks`` rows (on SQLite they are in the vector file, not the mart)."""
        import pandas as pd

        return pd.DataFrame(self.store.rows(self.name))

    def drop(self) -> None:
        """Delete the index: its chunks, its vectors and its row."""
        info = self.store.ensure_index(self.name, self.model)
        self.store.drop(self.name, info["vector_table"])

    # --- retrieval -----------------------------------------------------------------------------------

    def _retrieve(self, run: AppRun, query: str, k: int) -> "pd.DataFrame":
        import pandas as pd

        if not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {k!r}")
        info = self.store.ensure_index(self.name, self.model)
        if info["dimensions"] is None:
            raise ConfigurationError(f"index {self.name!r} is empty: add documents first (index.add(paths))")
        call = run.embed(self.model, [query], purpose="embed query")
        hits = self.store.search(self.name, info["vector_table"], call.vectors[0], k)
        rows = self.store.chunks([cid for cid, _ in hits])
        out = [{"rank": i + 1, **{c: rows[cid][c] for c in ("document", "location", "section", "page", "text")},
                "distance": distance, "chunk_id": cid} for i, (cid, distance) in enumerate(hits) if cid in rows]
        return pd.DataFrame(out, columns=["rank", "document", "location", "section", "page", "text", "distance",
                                          "chunk_id"])

    def search(self, query: str, k: int = 5, *, max_cost: float | None = None) -> "pd.DataFrame":
        """The ``k`` chunks nearest to ``query``: rank, document, location, section, page, text, distance."""
        run = self._run("search", max_cost)
        run.plan([PlannedCall(self.model, inputs=[query])])
        with run:
            frame = self._retrieve(run, query, k)
            run.finish({"hits": len(frame)})
        frame.attrs.update(execution_id=run.execution_id, actual_usd=run.actual_usd)
        return frame

    def answer(self, question: str, k: int = 4, *, model: str = "chat", max_tokens: int = 300,
               max_cost: float | None = None) -> RagAnswer:
        """Answer ``question`` from the ``k`` nearest chunks, with the citations mapped to their locations."""
        from tidyllm.apps.documents import count_tokens

        run = self._run("answer", max_cost)
        # the sources are known only after retrieval: plan for k chunks of the index's chunk size
        skeleton = [{"role": "user", "content": ANSWER_PROMPT.format(sources="", question=question)}]
        pending = k * (self.chunk_tokens + count_tokens("[00] (location)\n") + 40)
        run.plan([PlannedCall(self.model, inputs=[question]),
                  PlannedCall(model, skeleton, max_tokens, pending_tokens=pending)])
        with run:
            sources = self._retrieve(run, question, k)
            listing = "\n\n".join(f"[{r['rank']}] ({r['location']})\n{r['text']}" for _, r in sources.iterrows())
            prompt = [{"role": "user", "content": ANSWER_PROMPT.format(sources=listing, question=question)}]
            call = run.chat(model, prompt, max_tokens=max_tokens, purpose="answer")
            cited = sorted({int(n) for n in _CITATION.findall(call.text)} & set(sources["rank"]))
            citations = sources[sources["rank"].isin(cited)].rename(columns={"rank": "n"})
            run.finish({"cited": cited, "sources": len(sources)})
        return RagAnswer(question, call.text.strip(), citations.reset_index(drop=True), sources, call.call_id,
                         call.route, run.actual_usd, run.execution_id, self.platform)

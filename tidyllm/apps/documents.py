"""Documents in: PDF, DOCX, HTML, Markdown and plain text read into paragraphs that know where they are.

:func:`read_document` turns a file (or text) into a :class:`Document`: a list of :class:`Block` paragraphs,
each with its page (PDF), its section (the heading path, e.g. ``"4 Data Quality > 4.2 Data checks"``) and its
paragraph number. :func:`chunk_document` cuts it by structure — one chunk per section, split at paragraph
(then sentence) boundaries only when a section is longer than the token budget — so every chunk carries
a location a reviewer can find again.

Readers: ``pypdf`` (headings from the PDF's bookmarks when it has them, else numbered heading lines;
paragraphs from the vertical gaps between lines), ``python-docx`` (``Heading N`` / ``Title`` styles),
``beautifulsoup4`` (``h1``–``h6``, ``p``, ``li``, ``td``), ``markdown-it-py`` (ATX/setext headings, source
lines), plain text (blank-line paragraphs, numbered or upper-case heading lines).

An encrypted PDF, a PDF without a text layer (scanned pages) and a document with no text raise
:class:`DocumentError` saying what to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tidyllm.errors import ConfigurationError

__all__ = ["Block", "Chunk", "Document", "DocumentError", "read_document", "read_documents", "chunk_document",
           "count_tokens", "normalise"]

#: file suffix -> reader kind
KINDS = {".pdf": "pdf", ".docx": "docx", ".html": "html", ".htm": "html", ".md": "markdown",
         ".markdown": "markdown", ".txt": "text", ".text": "text"}

_NUMBERED_HEADING = re.compile(r"^(\d+(?:\.\d+)*)\.?\s+[A-Z][^.!?]{0,100}$")
_UPPER_HEADING = re.compile(r"^[A-Z][A-Z0-9 ,&/()-]{3,80}$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_WS = re.compile(r"\s+")


class DocumentError(ConfigurationError):
    """A document cannot be read (encrypted, scanned without a text layer, empty, unsupported type)."""


def normalise(text: str) -> str:
    """``text`` with every run of whitespace collapsed to one space and typographic quotes/dashes made plain:
    the form in which quotes are compared with the document."""
    text = (text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
            .replace("\u2013", "-").replace("\u2014", "-").replace("\u00ad", "").replace("\u00a0", " "))
    return _WS.sub(" ", text).strip()


_ENCODER: Any = None


def count_tokens(text: str) -> int:
    """Tokens of ``text`` in OpenAI's ``cl100k_base`` encoding (LiteLLM's bundled copy: no download)."""
    global _ENCODER
    if _ENCODER is None:
        from tidyllm._litellm import import_litellm

        import_litellm()
        # LiteLLM's cl100k_base, loaded from the copy it bundles (tiktoken would download it)
        from litellm.litellm_core_utils.default_encoding import encoding

        _ENCODER = encoding
    return len(_ENCODER.encode_ordinary(text))


@dataclass(frozen=True)
class Block:
    """One paragraph of a document and where it is."""

    text: str
    #: heading path, outermost first ("" before the first heading)
    section: str
    #: 1-based paragraph number in the document
    paragraph: int
    #: 1-based page number (PDF) or None
    page: int | None = None
    #: 1-based first source line (Markdown, text) or None
    line: int | None = None

    def location(self, document: str) -> str:
        """``"report.pdf, p. 5, §4.2 Data checks, ¶31"``."""
        parts = [document]
        if self.page is not None:
            parts.append(f"p. {self.page}")
        if self.section:
            parts.append(f"§{self.section.split(' > ')[-1]}")
        parts.append(f"¶{self.paragraph}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Document:
    """A document read by :func:`read_document`: its name, kind, paragraphs and page count."""

    name: str
    kind: str
    blocks: tuple[Block, ...]
    pages: int | None = None
    path: str | None = None
    #: SHA-256 of the extracted text: what re-embedding compares
    digest: str = field(default="")

    @property
    def text(self) -> str:
        """The whole text, one paragraph per line."""
        return "\n".join(b.text for b in self.blocks)

    def sections(self) -> list[str]:
        """The section paths in document order."""
        return list(dict.fromkeys(b.section for b in self.blocks))

    def find(self, quote: str, near: "tuple[int, int] | None" = None) -> Block | None:
        """The paragraph containing ``quote`` verbatim (after :func:`normalise`), else None: the first one in
        the paragraph range ``near`` (first, last) when it is there, else the first in the document."""
        needle = normalise(quote)
        if not needle:
            return None
        hits = [b for b in self.blocks if needle in normalise(b.text)]
        if near is not None:
            for block in hits:
                if near[0] <= block.paragraph <= near[1]:
                    return block
        return hits[0] if hits else None


@dataclass(frozen=True)
class Chunk:
    """A piece of a document cut by :func:`chunk_document`: whole paragraphs of one section."""

    document: str
    index: int
    text: str
    section: str
    first_paragraph: int
    last_paragraph: int
    first_page: int | None
    last_page: int | None
    tokens: int

    @property
    def location(self) -> str:
        """``"report.pdf, pp. 8-9, §4.2 Data checks, ¶30-33"``."""
        parts = [self.document]
        if self.first_page is not None:
            parts.append(f"p. {self.first_page}" if self.first_page == self.last_page
                         else f"pp. {self.first_page}-{self.last_page}")
        if self.section:
            parts.append(f"§{self.section.split(' > ')[-1]}")
        parts.append(f"¶{self.first_paragraph}" if self.first_paragraph == self.last_paragraph
                     else f"¶{self.first_paragraph}-{self.last_paragraph}")
        return ", ".join(parts)

    @property
    def key(self) -> str:
        """Stable id of the chunk's place in its document (document, section, first paragraph)."""
        return hashlib.sha256(f"{self.document}\x00{self.section}\x00{self.first_paragraph}".encode()).hexdigest()[:32]

    @property
    def digest(self) -> str:
        """SHA-256 of the chunk's text: changes when the text does."""
        return hashlib.sha256(self.text.encode()).hexdigest()


# --- readers --------------------------------------------------------------------------------------------


class _Builder:
    """Collects paragraphs under the current heading path."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.path: list[tuple[int, str]] = []

    def heading(self, level: int, text: str) -> None:
        text = normalise(text)
        if not text:
            return
        self.path = [(lvl, t) for lvl, t in self.path if lvl < level] + [(level, text)]

    def paragraph(self, text: str, page: int | None = None, line: int | None = None) -> None:
        text = normalise(text)
        if text:
            section = " > ".join(t for _, t in self.path)
            self.blocks.append(Block(text, section, len(self.blocks) + 1, page, line))


def _heading_level(line: str) -> int | None:
    """Level of a numbered ("4.2 Data checks" -> 2) or upper-case heading line, else None."""
    m = _NUMBERED_HEADING.match(line)
    if m and len(line) <= 90:
        return m.group(1).count(".") + 1
    if _UPPER_HEADING.match(line) and not line.endswith("."):
        return 1
    return None


def _read_pdf(path: Path) -> tuple[list[Block], int]:
    import pypdf
    from pypdf.errors import PdfReadError

    try:
        reader = pypdf.PdfReader(str(path))
    except (PdfReadError, OSError, ValueError) as exc:
        raise DocumentError(f"{path.name}: not a readable PDF ({exc}); check the file") from None
    if reader.is_encrypted:
        raise DocumentError(f"{path.name}: the PDF is encrypted; save an unencrypted copy (or remove its "
                            "password) and read that")
    headings: dict[tuple[int, str], int] = {}

    def walk(items: Sequence[Any], level: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
                continue
            try:
                page = reader.get_destination_page_number(item)
            except Exception:  # noqa: BLE001 - a bookmark without a page destination
                continue
            headings[(page, normalise(item.title))] = level

    walk(reader.outline, 1)
    builder = _Builder()
    any_text = False
    for number, page in enumerate(reader.pages, start=1):
        lines: list[tuple[float, str]] = []  # (y of the line, text), top to bottom

        def visit(text: str, cm: Any, tm: Any, font: Any, size: Any, _lines: list = lines) -> None:
            if text.strip():
                y = float(tm[5]) * float(cm[3]) + float(cm[5])
                if _lines and abs(_lines[-1][0] - y) < 1.0:
                    _lines[-1] = (_lines[-1][0], _lines[-1][1] + text)
                else:
                    _lines.append((y, text))

        page.extract_text(visitor_text=visit)
        lines = [(y, normalise(t)) for y, t in lines if normalise(t)]
        if not lines:
            continue
        any_text = True
        gaps = sorted(lines[i - 1][0] - lines[i][0] for i in range(1, len(lines)) if lines[i - 1][0] > lines[i][0])
        line_gap = gaps[len(gaps) // 2] if gaps else 0.0
        current: list[str] = []
        previous_y: float | None = None
        for y, text in lines:
            level = headings.get((number - 1, text))
            if level is None and not headings:
                level = _heading_level(text)
            if level is not None:
                builder.paragraph(" ".join(current), page=number)
                current = []
                builder.heading(level, text)
            else:
                if current and previous_y is not None and line_gap and previous_y - y > line_gap * 1.3:
                    builder.paragraph(" ".join(current), page=number)
                    current = []
                current.append(text)
            previous_y = y
        builder.paragraph(" ".join(current), page=number)
    if not any_text and reader.pages:
        raise DocumentError(f"{path.name}: none of its {len(reader.pages)} page(s) has a text layer (a scanned "
                            "document?); run OCR on it first (e.g. `ocrmypdf in.pdf out.pdf`) and read the result")
    return builder.blocks, len(reader.pages)


def _read_docx(path: Path) -> list[Block]:
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(str(path))
    except (zipfile.BadZipFile, KeyError, ValueError, PackageNotFoundError) as exc:
        raise DocumentError(f"{path.name}: not a readable DOCX file ({exc}); an encrypted or old .doc file must be "
                            "saved as .docx without a password first") from None
    builder = _Builder()
    for para in document.paragraphs:
        style = (para.style.name if para.style is not None else "") or ""
        if style == "Title":
            builder.heading(0, para.text)
        elif style.startswith("Heading "):
            level = style.split(" ", 1)[1]
            builder.heading(int(level) if level.isdigit() else 1, para.text)
        else:
            builder.paragraph(para.text)
    for table in document.tables:
        for row in table.rows:
            builder.paragraph(" | ".join(normalise(c.text) for c in row.cells))
    return builder.blocks


def _read_html(text: str) -> list[Block]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "nav", "header", "footer", "template"]):
        tag.decompose()
    builder = _Builder()
    body = soup.body or soup
    for el in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "td", "th", "pre", "blockquote"]):
        if el.name[0] == "h" and el.name[1:].isdigit():
            builder.heading(int(el.name[1:]), el.get_text(" "))
        elif not el.find(["p", "li", "td", "pre"]):  # leaf blocks only: a <li> holding <p>s is read once
            builder.paragraph(el.get_text(" "))
    if not builder.blocks and body.get_text(strip=True):
        builder.paragraph(body.get_text(" "))
    return builder.blocks


def _read_markdown(text: str) -> list[Block]:
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    builder = _Builder()
    heading_level: int | None = None
    line: int | None = None
    for tok in tokens:
        if tok.type == "heading_open":
            heading_level = int(tok.tag[1:])
        elif tok.type == "heading_close":
            heading_level = None
        elif tok.type in ("paragraph_open", "fence", "code_block") and tok.map:
            line = tok.map[0] + 1
            if tok.type != "paragraph_open":
                builder.paragraph(tok.content, line=line)
        elif tok.type == "inline":
            if heading_level is not None:
                builder.heading(heading_level, tok.content)
            else:
                builder.paragraph(tok.content, line=(tok.map[0] + 1) if tok.map else line)
    return builder.blocks


def _read_text(text: str) -> list[Block]:
    builder = _Builder()
    current: list[str] = []
    start = 1
    for number, raw in enumerate(text.splitlines() + [""], start=1):
        line = raw.strip()
        level = _heading_level(line) if line else None
        if not line or level is not None:
            builder.paragraph(" ".join(current), line=start)
            current = []
            if level is not None:
                builder.heading(level, line)
            start = number + 1
            continue
        if not current:
            start = number
        current.append(line)
    return builder.blocks


def read_document(source: "str | Path | Document", *, name: str | None = None, kind: str | None = None) -> Document:
    """Read a file into a :class:`Document` (a Document passes through).

    ``source`` is a path; ``kind`` (``pdf``, ``docx``, ``html``, ``markdown``, ``text``) overrides the one its
    suffix implies. Raises :class:`DocumentError` for a missing, unsupported, encrypted, scanned or empty file.
    """
    if isinstance(source, Document):
        return source
    path = Path(source)
    kind = kind or KINDS.get(path.suffix.lower())
    if kind is None:
        raise DocumentError(f"{path.name}: unsupported document type {path.suffix or '(no suffix)'!r}; tidyllm "
                            f"reads {', '.join(sorted(set(KINDS)))}")
    if not path.is_file():
        raise DocumentError(f"{path}: no such file; check the path")
    pages = None
    if kind == "pdf":
        blocks, pages = _read_pdf(path)
    elif kind == "docx":
        blocks = _read_docx(path)
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        blocks = {"html": _read_html, "markdown": _read_markdown, "text": _read_text}[kind](text)
    if not blocks:
        raise DocumentError(f"{path.name}: the document has no text to read; check that it is the right file")
    digest = hashlib.sha256("\n".join(f"{b.section}\t{b.text}" for b in blocks).encode()).hexdigest()
    return Document(name or path.name, kind, tuple(blocks), pages, str(path), digest)


def read_documents(sources: "str | Path | Document | Iterable[str | Path | Document]") -> list[Document]:
    """Read one or many documents; a directory means every supported file in it (sorted by name)."""
    if isinstance(sources, (str, Path, Document)):
        sources = [sources]
    out: list[Document] = []
    for source in sources:
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            out.extend(read_document(p) for p in sorted(Path(source).iterdir()) if p.suffix.lower() in KINDS)
        else:
            out.append(read_document(source))
    if not out:
        raise DocumentError("no documents given (an empty list or a directory without supported files)")
    return out


# --- chunking -------------------------------------------------------------------------------------------


def _split_long(block: Block, max_tokens: int) -> list[Block]:
    """A paragraph longer than ``max_tokens`` as sentence groups that fit (a sentence is never cut)."""
    parts: list[str] = []
    for sentence in _SENTENCE_END.split(block.text):
        if parts and count_tokens(parts[-1] + " " + sentence) <= max_tokens:
            parts[-1] = parts[-1] + " " + sentence
        else:
            parts.append(sentence)
    return [Block(p, block.section, block.paragraph, block.page, block.line) for p in parts]


def chunk_document(document: Document, max_tokens: int = 800) -> list[Chunk]:
    """Cut ``document`` by structure: each section's paragraphs, in order, in chunks of at most ``max_tokens``
    (``cl100k_base`` tokens; a single sentence longer than that stays whole)."""
    if not isinstance(max_tokens, int) or max_tokens < 32:
        raise ConfigurationError(f"chunk size must be an integer of at least 32 tokens, got {max_tokens!r}")
    chunks: list[Chunk] = []
    group: list[tuple[Block, int]] = []

    def flush() -> None:
        if not group:
            return
        blocks = [b for b, _ in group]
        pages = [b.page for b in blocks if b.page is not None]
        text = "\n\n".join(b.text for b in blocks)
        chunks.append(Chunk(document.name, len(chunks), text, blocks[0].section, blocks[0].paragraph,
                            blocks[-1].paragraph, min(pages) if pages else None, max(pages) if pages else None,
                            count_tokens(text)))
        group.clear()

    for block in document.blocks:
        pieces = [block] if count_tokens(block.text) <= max_tokens else _split_long(block, max_tokens)
        for piece in pieces:
            tokens = count_tokens(piece.text)
            used = sum(t for _, t in group) + 2 * len(group)
            if group and (piece.section != group[0][0].section or used + tokens > max_tokens):
                flush()
            group.append((piece, tokens))
    flush()
    return chunks

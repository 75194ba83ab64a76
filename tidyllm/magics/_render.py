"""What the magics show: prompt interpolation, answer formats, the receipt, streamed tokens and the budget chart.

Nothing here calls a model or writes to the mart; :mod:`tidyllm.magics._call` does that.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from IPython.display import display

from tidyllm.money import usd

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "Receipt", "LLMResult", "Note", "interpolate", "instruct", "extract_code", "parse_json",
           "usd", "remaining_usd", "budget_figure", "figure_png", "StreamSink"]

FORMATS = ("markdown", "text", "code", "json", "html")

# Appended to the prompt so the model answers in the shape the cell renders (jupyter-ai's -f grammar).
_INSTRUCTIONS = {
    "markdown": "Answer in Markdown.",
    "text": "",
    "code": "Answer with source code only, without any explanation before or after it.",
    "json": "Answer with JSON only, without any text before or after it.",
    "html": "Answer with an HTML fragment only, without any text before or after it.",
}

# {name}, {name.attr}, {name[3]}, {name['key']} and chains of those; {{...}} of the same shape is an escape
_EXPR = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[(?:-?\d+|'[^'\]]*'|\"[^\"\]]*\")\])*"
_FIELD = re.compile(r"\{\{(?P<esc>" + _EXPR + r")\}\}|\{(?P<expr>" + _EXPR + r")\}")
_STEP = re.compile(r"\.(?P<attr>[A-Za-z_]\w*)|\[(?P<key>-?\d+|'[^'\]]*'|\"[^\"\]]*\")\]")
_FENCE = re.compile(r"```[^\n`]*\n(?P<body>.*?)(?:\n```|$)", re.S)


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Replace ``{name}`` (and ``{name.attr}``, ``{In[3]}``, ``{Out[3]}``, ``{d['k']}``) with values from
    ``namespace``. A field that does not resolve is left as written; ``{{name}}`` gives ``{name}``.

    Only fields of that shape are touched, so JSON, code and set literals in a prompt stay intact."""

    def sub(match: re.Match[str]) -> str:
        if match.group("esc") is not None:
            return "{" + match.group("esc") + "}"
        expr = match.group("expr")
        head = re.match(r"[A-Za-z_]\w*", expr)
        assert head is not None  # the pattern guarantees a leading name
        try:
            value = namespace[head.group(0)]
            for step in _STEP.finditer(expr, head.end()):
                if step.group("attr") is not None:
                    value = getattr(value, step.group("attr"))
                else:
                    key = step.group("key")
                    value = value[int(key)] if key[0] not in "'\"" else value[key[1:-1]]
            return str(value)
        except Exception:  # noqa: BLE001 - a field that does not resolve stays as written, never fails the cell
            return match.group(0)

    return _FIELD.sub(sub, text)


def instruct(prompt: str, fmt: str) -> str:
    """The prompt with the answer-format instruction for ``fmt`` appended."""
    instruction = _INSTRUCTIONS[fmt]
    return f"{prompt.rstrip()}\n\n{instruction}" if instruction else prompt


def extract_code(text: str) -> str:
    """The code of an answer: the first fenced block's body, else the whole answer."""
    match = _FENCE.search(text)
    return (match.group("body") if match else text).strip("\n")


def parse_json(text: str) -> Any:
    """The JSON value of an answer (fences allowed around it); raises ``ValueError`` if it is not JSON."""
    return json.loads(extract_code(text) if "```" in text else text)


def remaining_usd(remaining: float, limit: float) -> str:
    """What is left of a budget, with enough decimals to show what was spent (two significant digits
    of ``limit - remaining``): $3.999989 of $4.00, not $4.000."""
    used = limit - remaining
    decimals = 2 if used <= 0 else min(10, max(2, 1 - math.floor(math.log10(used))))
    return usd(remaining, decimals)


_PERIOD_WORDS = {"day": "today", "week": "this week", "month": "this month", "total": "in total"}


@dataclass(frozen=True)
class Receipt:
    """The governed call as the mart recorded it (``llm_calls`` row and tightest budget after settlement)."""

    call_id: str
    requested_model: str
    route: str
    status: str
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None
    latency_ms: float | None
    #: the tightest applicable budget after this call (None when no budget applies)
    budget_scope: str | None = None
    budget_name: str | None = None
    budget_period: str | None = None
    remaining_usd: float | None = None
    limit_usd: float | None = None

    def __str__(self) -> str:
        parts = [self.route if self.route == self.requested_model else f"{self.requested_model} → {self.route}"]
        if self.status != "success":
            parts.append(self.status)
        parts.append(f"{self.prompt_tokens or 0} in + {self.completion_tokens or 0} out tokens")
        parts.append(usd(self.cost_usd))
        if self.budget_scope is None:
            parts.append("no budget applies")
        else:
            who = "org" if self.budget_scope == "org" else f"{self.budget_scope} {self.budget_name}"
            parts.append(f"{who}: {remaining_usd(self.remaining_usd or 0.0, self.limit_usd or 0.0)} left of "
                         f"{usd(self.limit_usd)} "
                         f"{_PERIOD_WORDS.get(self.budget_period or '', '')}".rstrip())
        parts.append(f"{self.latency_ms:.0f} ms" if self.latency_ms is not None else "latency ?")
        parts.append(f"call {self.call_id[:8]}")
        return " · ".join(parts)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": str(self), "text/html": _receipt_html(str(self))}


def _receipt_html(text: str) -> str:
    return f'<div class="tidyllm-receipt" style="font-size:smaller;opacity:0.7">{html.escape(text)}</div>'


@dataclass
class LLMResult:
    """A ``%%llm`` cell's value: the answer rendered in its format, with the receipt underneath.

    ``str(result)`` is the answer text (so ``{Out[n]}`` interpolates it); ``.response`` is LiteLLM's
    response object; ``.receipt`` the :class:`Receipt` (None with ``--no-receipt``)."""

    text: str
    format: str
    response: Any
    receipt: Receipt | None = None

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"<LLMResult format={self.format!r} {len(self.text)} chars; {self.receipt or 'no receipt'}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        receipt = str(self.receipt) if self.receipt is not None else ""
        below_plain = f"\n{receipt}" if receipt else ""
        below_md = f"\n\n<sub>{html.escape(receipt)}</sub>" if receipt else ""
        below_html = _receipt_html(receipt) if receipt else ""
        if self.format == "code":
            lines = len(extract_code(self.text).splitlines())
            note = f"code ({lines} lines) inserted into the next cell"
            return {"text/plain": note + below_plain, "text/markdown": f"*{note}*" + below_md}
        if self.format == "json":
            try:
                value = parse_json(self.text)
            except ValueError:
                note = "(the answer is not valid JSON; shown as text)"
                return {"text/plain": f"{self.text}\n{note}{below_plain}",
                        "text/markdown": f"```\n{self.text}\n```\n\n*{note}*{below_md}"}
            pretty = json.dumps(value, indent=2, ensure_ascii=False)
            return {"text/plain": pretty + below_plain, "application/json": value,
                    "text/markdown": f"```json\n{pretty}\n```{below_md}"}
        if self.format == "html":
            return {"text/plain": self.text + below_plain, "text/html": self.text + below_html}
        if self.format == "markdown":
            return {"text/plain": self.text + below_plain, "text/markdown": self.text + below_md}
        return {"text/plain": self.text + below_plain}


@dataclass(frozen=True)
class Note:
    """A short line for the output area (plain text in a terminal, Markdown in a notebook)."""

    text: str
    markdown: str | None = None

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": self.text, "text/markdown": self.markdown or self.text}


def budget_figure(status: "pd.DataFrame") -> "Figure":
    """A horizontal stacked bar per budget: spent / reserved / remaining as shares of its limit,
    labelled in dollars (budgets of $50 and $0.05 stay comparable)."""
    from matplotlib.figure import Figure

    rows = status.to_dict("records")
    fig = Figure(figsize=(8, 0.55 * max(len(rows), 1) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{r['scope']} {r['name']} ({r['period']})" if r["scope"] != "org" else f"org ({r['period']})"
              for r in rows]
    limits = [r["limit_usd"] or 0.0 for r in rows]

    def share(key: str) -> list[float]:
        return [100.0 * r[key] / lim if lim else 0.0 for r, lim in zip(rows, limits)]

    spent, reserved, remaining = share("spent_usd"), share("reserved_usd"), share("remaining_usd")
    y = list(range(len(rows)))[::-1]
    ax.barh(y, spent, color="#d62728", label="spent")
    ax.barh(y, reserved, left=spent, color="#ff7f0e", label="reserved")
    ax.barh(y, remaining, left=[a + b for a, b in zip(spent, reserved)], color="#2ca02c", alpha=0.6,
            label="remaining")
    for yi, r in zip(y, rows):
        ax.text(101, yi, f"{usd(r['spent_usd'])} spent of {usd(r['limit_usd'])}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 135)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("% of limit")
    ax.set_title("tidyllm budgets: spent / reserved / remaining")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def figure_png(fig: "Figure") -> bytes:
    """PNG bytes of a Matplotlib figure, rendered off-screen (no pyplot state, any backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


class StreamSink:
    """Where ``--stream`` tokens go: a display updated in place (Jupyter) or stdout (terminal)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.text = ""
        self._handle: Any = None
        self._last = 0.0

    def token(self, delta: str) -> None:
        self.text += delta
        if self.mode == "print":
            sys.stdout.write(delta)
            sys.stdout.flush()
            return
        now = time.monotonic()
        if self._handle is None:
            self._handle = display(self._partial(), display_id=True)
            self._last = now
        elif now - self._last >= 0.05:  # at most 20 updates a second: each one is a message to the frontend
            self._handle.update(self._partial())
            self._last = now

    def _partial(self) -> "Note":
        return Note(self.text)

    def close(self) -> None:
        """The stream ended (or failed): end the printed line."""
        if self.mode == "print" and self.text:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def finish(self, result: "LLMResult") -> None:
        """Show the final answer: the in-place display becomes the rendered result; printed tokens get
        the receipt (or the code note) under them."""
        if self.mode == "update":
            if self._handle is None:
                display(result)
            else:
                self._handle.update(result)
            return
        if result.format == "code":
            print(LLMResult(result.text, "code", result.response)._repr_mimebundle_()["text/plain"])
        if result.receipt is not None:
            print(result.receipt)


def feedback_buttons(call_id: str | None, send: Any, shell: Any) -> Any:
    """👍 / 👎 buttons that send human feedback on ``call_id``, when the front end shows widgets (a Jupyter
    kernel with ipywidgets); ``None`` otherwise — ``%llm_feedback`` does the same from a line."""
    if call_id is None or getattr(shell, "kernel", None) is None:
        return None
    try:
        import ipywidgets as widgets
    except ImportError:
        return None
    up, down = widgets.Button(description="👍"), widgets.Button(description="👎")
    status = widgets.Label("")

    def clicked(score: float) -> Any:
        def handler(_: Any) -> None:
            send(call_id, score)
            up.disabled = down.disabled = True
            status.value = f"feedback {score:g} recorded"
        return handler

    up.on_click(clicked(1.0))
    down.on_click(clicked(0.0))
    return widgets.HBox([up, down, status])

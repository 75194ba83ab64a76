"""A deterministic corpus of ordinary chat prompts, and the prompt-token counts providers give them.

Used by tests/test_estimate.py (accuracy of the worst-case estimate) and bench/estimate_bench.py. The
prompts mix what a notebook user sends: short questions, long paragraphs, code, tables of numbers,
multi-turn histories with a system prompt, and text in French, German, Spanish, Russian, Chinese and
Japanese. ``provider_counts`` gives, for one chat, the provider simulator's own count
(``tidyllm.gateway.simulator``) and OpenAI's count with tiktoken (the cookbook formula: 3 tokens a
message, the tokens of every value, 1 for a name, 3 to prime the reply) for gpt-4 (cl100k_base) and
gpt-4o (o200k_base).
"""

from __future__ import annotations

import functools
import random
from typing import Any, Callable

_WORDS = ("the loan risk model policy rate customer report quarter revenue forecast data pipeline review "
          "account balance transaction compliance audit margin portfolio exposure capital default credit "
          "market liquidity interest payment schedule contract clause summary analysis approval request "
          "department budget variance cost estimate region segment growth decline trend signal threshold "
          "internationalisation counterparty reconciliation disproportionately misclassification").split()
_QUESTIONS = ("What is", "Explain", "Summarise", "Why did", "How can we reduce", "List the main drivers of",
              "Compare", "Give three examples of", "Is it true that", "Draft an email about")
_CODE = [
    "def {f}(xs: list[float]) -> float:\n    total = 0.0\n    for x in xs:\n        total += x * {k}\n"
    "    return total / max(len(xs), 1)\n",
    "SELECT department, SUM(cost_usd) AS spend\nFROM llm_calls\nWHERE started_at >= '{d}'\n"
    "GROUP BY department\nORDER BY spend DESC\nLIMIT {k};\n",
    "for (let i = 0; i < {k}; i++) {{\n  if (items[i].{f} !== undefined) {{ out.push(items[i]); }}\n}}\n",
    "import pandas as pd\ndf = pd.read_csv('{f}.csv')\nprint(df.groupby('region')['revenue'].agg(['mean', 'sum']))\n",
]
_FOREIGN = {
    "fr": "Le comité de crédit a examiné le portefeuille et recommande une réduction de l'exposition au risque.",
    "de": "Die Abteilung hat das Budget überschritten; bitte prüfen Sie die Kostenstellen und die Prognose.",
    "es": "El informe trimestral muestra un crecimiento de los ingresos y una disminución de la morosidad.",
    "ru": "Отдел рисков подготовил отчёт о ликвидности и предлагает пересмотреть лимиты по контрагентам.",
    "zh": "信用委员会审查了贷款组合，建议降低对高风险客户的敞口，并在下季度重新评估。",
    "ja": "リスク管理部は四半期報告書を作成し、取引先ごとの与信限度額の見直しを提案しています。",
}


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice(".?!;")


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng, rng.randint(6, 22)) for _ in range(sentences))


def _numbers(rng: random.Random, rows: int) -> str:
    lines = ["region,quarter,revenue,cost,margin"]
    for _ in range(rows):
        revenue, cost = rng.uniform(1e4, 9e6), rng.uniform(1e3, 5e6)
        lines.append(f"{rng.choice(['north', 'south', 'emea', 'apac'])},Q{rng.randint(1, 4)},"
                     f"{revenue:.2f},{cost:.2f},{(revenue - cost) / revenue:.4f}")
    return "\n".join(lines)


def _user_turn(rng: random.Random, kind: str) -> str:
    if kind == "question":
        return f"{rng.choice(_QUESTIONS)} {_sentence(rng, rng.randint(3, 12))}"
    if kind == "paragraph":
        return f"{rng.choice(_QUESTIONS)} the following text.\n\n{_paragraph(rng, rng.randint(4, 30))}"
    if kind == "code":
        snippet = rng.choice(_CODE).format(f=rng.choice(_WORDS), k=rng.randint(2, 500), d="2026-11-01")
        return f"Review this code and point out bugs:\n```\n{snippet}```"
    if kind == "numbers":
        return f"Which region has the best margin?\n{_numbers(rng, rng.randint(3, 40))}"
    lang = rng.choice(sorted(_FOREIGN))
    return " ".join(_FOREIGN[lang] for _ in range(rng.randint(1, 6)))


def corpus(size: int = 300, seed: int = 0) -> list[list[dict[str, Any]]]:
    """``size`` chats (lists of message dicts), the same for the same ``size`` and ``seed``."""
    rng = random.Random(seed)
    kinds = ("question", "paragraph", "code", "numbers", "foreign")
    chats = []
    for i in range(size):
        kind = kinds[i % len(kinds)]
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": f"You are an analyst. {_sentence(rng, rng.randint(5, 30))}"})
        for _ in range(rng.choice((0, 0, 0, 1, 2, 4))):  # earlier turns of a multi-turn history
            messages.append({"role": "user", "content": _user_turn(rng, rng.choice(kinds))})
            messages.append({"role": "assistant", "content": _paragraph(rng, rng.randint(1, 6))})
        messages.append({"role": "user", "content": _user_turn(rng, kind)})
        chats.append(messages)
    return chats


def openai_count(encode: Callable[[str], list[int]], messages: list[dict[str, Any]]) -> int:
    """OpenAI's prompt tokens for a chat (the cookbook's ``num_tokens_from_messages``)."""
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(encode(value))
            if key == "name":
                total += 1
    return total


def provider_counts(messages: list[dict[str, Any]], tools: Any = None) -> dict[str, int]:
    """The prompt tokens each provider reports for ``messages``: the simulator, gpt-4 and gpt-4o."""
    from tidyllm.gateway.simulator import _prompt_tokens

    cl100k, o200k = _openai_encoders()
    return {"simulator": _prompt_tokens(messages, tools),
            "openai-gpt-4": openai_count(cl100k, messages),
            "openai-gpt-4o": openai_count(o200k, messages)}


@functools.lru_cache(maxsize=1)
def _openai_encoders() -> tuple[Callable[[str], list[int]], Callable[[str], list[int]]]:
    import tiktoken

    from tidyllm._litellm import import_litellm

    import_litellm()
    # importing it points tiktoken at the vocabularies LiteLLM bundles (no download)
    from litellm.litellm_core_utils import default_encoding  # noqa: F401

    return tiktoken.get_encoding("cl100k_base").encode_ordinary, tiktoken.get_encoding("o200k_base").encode_ordinary


def tiktoken_counter(encoding: str) -> Callable[[str, str], int]:
    """A ``count(route, text)`` with one tiktoken encoding (``"o200k_base"``: gpt-4o's own tokenizer)."""
    cl100k, o200k = _openai_encoders()
    encode = {"cl100k_base": cl100k, "o200k_base": o200k}[encoding]
    return lambda route, text: len(encode(text))


def litellm_counter() -> Callable[[str, str], int]:
    """The tokenizer LiteLLM uses for a route (``select_tokenizer``), cached per route: what the LiteLLM
    bridge is to pass to ``WorstCaseEstimator``."""
    from tidyllm._litellm import import_litellm

    import_litellm()
    from litellm.utils import select_tokenizer

    encoders: dict[str, Callable[[str], Any]] = {}

    def count(route: str, text: str) -> int:
        encode = encoders.get(route)
        if encode is None:
            chosen = select_tokenizer(route.split("/", 1)[-1])
            tokenizer = chosen["tokenizer"]
            if chosen["type"] == "openai_tokenizer":
                encode = tokenizer.encode_ordinary
            else:  # a HuggingFace tokenizer
                encode = lambda t: tokenizer.encode(t).ids  # noqa: E731
            encoders[route] = encode
        return len(encode(text))

    return count

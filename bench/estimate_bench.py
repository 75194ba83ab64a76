"""How tight the worst-case prompt estimate is, and what it costs per call.

Tightness: a deterministic corpus of ordinary chat prompts (tests/_estimate_corpus.py: short questions,
long paragraphs, code, tables of numbers, multi-turn histories, six other languages). For each provider
and tokenizer pair, a ``WorstCaseEstimator`` first observes ``--warmup`` settled calls from another
corpus (seed 1), as settlement would feed it, then estimates every prompt of the measured corpus (seed 0,
``--prompts`` chats) without learning more. Reported per pair: reserve / provider count (min, median,
p90, max) and the number of prompts under-reserved (reserve below the provider's count). The same for
today's ``tidyllm.governance.engine.estimate_prompt_tokens`` (max(JSON tokens, chars/2) x 1.15 + 16).

Providers: the provider simulator's own count (``tidyllm.gateway.simulator``), and OpenAI's count for
gpt-4 (cl100k_base) and gpt-4o (o200k_base) by the cookbook formula. Tokenizers: the one LiteLLM uses
for an ``openai/<endpoint>`` route (``litellm.utils.select_tokenizer``: cl100k_base), and, for the
simulator, its own ``count_tokens``, and for gpt-4o its own o200k_base (the route's own tokenizers).

Cost: microseconds per ``estimate()`` call for the corpus's chats at the 10th percentile of size
("short"), the median and the largest, and for the next turn of its longest multi-turn history (a short
new question after a history the estimator has counted before), with the LiteLLM tokenizer (cold: no
cached counts; cached: the history's counts cached) and with the built-in fallback, against today's
``estimate_prompt_tokens``. Target: well under 100 µs for a typical prompt. Counting tokens is most of it
(tiktoken takes about 0.25 µs a token on the 2-core machine).

Run::

    PYTHONPATH=. LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python bench/estimate_bench.py \\
        --out bench/results/estimate.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from _common import percentile, print_header, print_load, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ROUTE = "openai/chat-a"


def today_estimate() -> Callable[..., int]:
    """Today's ``estimate_prompt_tokens`` (in the LiteLLM bridge since the sealed gate, in the engine before)."""
    try:
        from tidyllm.litellm_bridge.tokens import estimate_prompt_tokens
    except ImportError:
        from tidyllm.governance.engine import estimate_prompt_tokens  # type: ignore[attr-defined, no-redef]
    return estimate_prompt_tokens


def distribution(ratios: list[float], under: int) -> dict[str, Any]:
    return {"min": min(ratios), "median": percentile(ratios, 0.5), "p90": percentile(ratios, 0.9),
            "max": max(ratios), "under": under, "prompts": len(ratios)}


def tightness(warmup: int, prompts: int, margin: float) -> list[dict[str, Any]]:
    from _estimate_corpus import corpus, litellm_counter, provider_counts, tiktoken_counter

    from tidyllm.gateway.simulator import count_tokens as simulator_count
    from tidyllm.governance.estimate import WorstCaseEstimator

    estimate_prompt_tokens = today_estimate()

    measured = [(m, provider_counts(m)) for m in corpus(prompts, seed=0)]
    learning = [(m, provider_counts(m)) for m in corpus(max(warmup, 1), seed=1)][:warmup]
    litellm = litellm_counter()
    pairs: list[tuple[str, str, Callable[[str, str], int]]] = [
        ("openai-gpt-4", "litellm (cl100k_base)", litellm),
        ("openai-gpt-4o", "litellm (cl100k_base)", litellm),
        ("openai-gpt-4o", "its own (o200k_base)", tiktoken_counter("o200k_base")),
        ("simulator", "simulator's own", lambda route, text: simulator_count(text)),
        ("simulator", "litellm (cl100k_base)", litellm),
    ]
    rows = []
    for provider, tokenizer, count in pairs:
        est = WorstCaseEstimator(count, margin=margin)
        for messages, counts in learning:
            est.observe(ROUTE, est.estimate(ROUTE, messages=messages).counted, counts[provider])
        ratios, under = [], 0
        for messages, counts in measured:
            reserve = est.estimate(ROUTE, messages=messages).prompt_tokens
            ratios.append(reserve / counts[provider])
            under += reserve < counts[provider]
        rows.append({"provider": provider, "tokenizer": tokenizer, "estimate": "WorstCaseEstimator",
                     "factor": est.factor(ROUTE), **distribution(ratios, under)})
    for provider in ("openai-gpt-4", "openai-gpt-4o", "simulator"):
        ratios, under = [], 0
        for messages, counts in measured:
            reserve = estimate_prompt_tokens(ROUTE, messages=messages)
            ratios.append(reserve / counts[provider])
            under += reserve < counts[provider]
        rows.append({"provider": provider, "tokenizer": "litellm (cl100k_base)", "estimate": "engine today",
                     "factor": None, **distribution(ratios, under)})
    return rows


def per_call_us(fn: Callable[[], Any], repeat: int) -> float:
    """Median microseconds of one ``fn()`` over 7 batches of ``repeat`` calls."""
    fn()
    batches = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        batches.append((time.perf_counter() - start) / repeat * 1e6)
    return percentile(batches, 0.5)


def cost(prompts: int, repeat: int) -> list[dict[str, Any]]:
    from _estimate_corpus import corpus, litellm_counter

    from tidyllm.governance.estimate import WorstCaseEstimator

    estimate_prompt_tokens = today_estimate()

    def chars(messages: list[dict[str, Any]]) -> int:
        return sum(len(x["content"]) for x in messages)

    chats = sorted(corpus(prompts, seed=0), key=chars)
    history = max((m for m in chats if len(m) >= 7), key=chars)
    cases = {"short": chats[len(chats) // 10], "median": chats[len(chats) // 2], "long": chats[-1],
             "next turn": [*history, {"role": "user", "content": "And what does that mean for next quarter?"}]}
    count = litellm_counter()
    cold, warm, fallback = (WorstCaseEstimator(count, cache_size=0), WorstCaseEstimator(count),
                            WorstCaseEstimator(cache_size=0))
    warm.estimate(ROUTE, messages=history)  # the earlier turn: its history is in the cache now
    rows = []
    for name, messages in cases.items():
        row: dict[str, Any] = {"prompt": name, "chars": chars(messages), "messages": len(messages),
                               "tokens": cold.estimate(ROUTE, messages=messages).counted}
        row["litellm_cold_us"] = per_call_us(lambda: cold.estimate(ROUTE, messages=messages, max_tokens=256), repeat)
        row["litellm_cached_us"] = per_call_us(lambda: warm.estimate(ROUTE, messages=messages, max_tokens=256),
                                               repeat) if name == "next turn" else None
        row["fallback_cold_us"] = per_call_us(lambda: fallback.estimate(ROUTE, messages=messages), repeat)
        row["engine_today_us"] = per_call_us(lambda: estimate_prompt_tokens(ROUTE, messages=messages), repeat)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=300, help="prompts in the measured corpus")
    parser.add_argument("--warmup", type=int, default=8, help="settled calls observed before measuring")
    parser.add_argument("--margin", type=float, default=0.05, help="the estimator's tokenizer-uncertainty margin")
    parser.add_argument("--repeat", type=int, default=2000, help="calls per timing batch")
    parser.add_argument("--out", default="bench/results/estimate.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    load_before = os.getloadavg()

    rows = tightness(args.warmup, args.prompts, args.margin)
    print_header(f"reserve / provider prompt tokens ({args.prompts} prompts, after {args.warmup} observations, "
                 f"margin {args.margin:g})")
    print(f"{'provider':<15}{'tokenizer':<23}{'estimate':<20}{'factor':>7}{'min':>7}{'median':>8}{'p90':>7}"
          f"{'max':>7}{'under':>7}")
    for r in rows:
        factor = f"{r['factor']:.3f}" if r["factor"] is not None else "-"
        print(f"{r['provider']:<15}{r['tokenizer']:<23}{r['estimate']:<20}{factor:>7}{r['min']:>7.3f}"
              f"{r['median']:>8.3f}{r['p90']:>7.3f}{r['max']:>7.3f}{r['under']:>7d}")
    print()
    timings = cost(args.prompts, args.repeat)
    print_header("microseconds per estimate (median of 7 batches; cold = no cached counts)")
    print(f"{'prompt':<11}{'chars':>7}{'msgs':>6}{'tokens':>8}{'litellm cold':>14}{'litellm cached':>16}"
          f"{'fallback cold':>15}{'engine today':>14}")
    for r in timings:
        cached = f"{r['litellm_cached_us']:.1f}" if r["litellm_cached_us"] is not None else "-"
        print(f"{r['prompt']:<11}{r['chars']:>7}{r['messages']:>6}{r['tokens']:>8}{r['litellm_cold_us']:>14.1f}"
              f"{cached:>16}{r['fallback_cold_us']:>15.1f}{r['engine_today_us']:>14.1f}")
    load_after = os.getloadavg()
    print_load(load_before, load_after)
    write_results(args.out, "estimate", {"warmup": args.warmup, "margin": args.margin, "tightness": rows,
                                         "cost_us": timings}, load_before, load_after,
                  ["litellm", "tiktoken"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

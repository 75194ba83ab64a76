"""The worst-case estimate (tidyllm.governance.estimate): what it reserves, how it learns, how tight it is.

Unit tests: no process, no server. The accuracy tests compare the reserve with the prompt tokens the
provider simulator and OpenAI (tiktoken, the cookbook formula) count on a corpus of ordinary prompts.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import random
import statistics
import threading
from pathlib import Path
from typing import Any

import pytest

from _estimate_corpus import corpus, litellm_counter, provider_counts, tiktoken_counter
from tidyllm.errors import ConfigurationError
from tidyllm.gateway.simulator import count_tokens as sim_count
from tidyllm.governance import estimate as estimate_module
from tidyllm.governance.estimate import (
    PER_MESSAGE,
    PER_NAME,
    PER_ROLE,
    PER_TOOL_CALL,
    REPLY,
    WorstCase,
    WorstCaseEstimator,
    char_count,
    fallback_counter,
    routed_counter,
    simulator_counter,
)

ROUTE = "openai/chat-a"
WORDS = lambda route, text: len(text.split())  # noqa: E731 - a tokenizer whose counts are easy to check by eye


def exact(**kw: Any) -> WorstCaseEstimator:
    """An estimator that reserves exactly what it counts (factor 1, no margin), with the word tokenizer."""
    return WorstCaseEstimator(WORDS, margin=0.0, initial_factor=1.0, **kw)


def chat(text: str = "one two three") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


BASE = PER_MESSAGE + PER_ROLE + REPLY  # framing of a one-message chat


# --- output: max_tokens, n, best_of, reasoning ---------------------------------------------------


def test_default_max_tokens_and_prompt_of_a_plain_chat() -> None:
    w = exact(default_max_tokens=300).estimate(ROUTE, messages=chat())
    assert (w.counted, w.prompt_tokens, w.output_tokens, w.max_tokens, w.choices) == (BASE + 3, BASE + 3, 300, 300, 1)
    assert w.total_tokens == BASE + 3 + 300 and w.fixed_tokens == 0 and not w.embedding
    assert isinstance(w, WorstCase)
    with pytest.raises(AttributeError):
        w.prompt_tokens = 1  # type: ignore[misc]  # frozen


def test_n_multiplies_the_output_and_not_the_prompt() -> None:
    est = exact()
    one, twenty = est.estimate(ROUTE, messages=chat(), max_tokens=50), est.estimate(ROUTE, messages=chat(),
                                                                                    max_tokens=50, n=20)
    assert (one.output_tokens, twenty.output_tokens, twenty.choices) == (50, 1000, 20)
    assert one.prompt_tokens == twenty.prompt_tokens


def test_best_of_is_what_the_provider_generates_and_bills() -> None:
    w = exact().estimate(ROUTE, text="say hi", max_tokens=10, n=2, best_of=5)
    assert (w.choices, w.output_tokens) == (5, 50)
    assert exact().estimate(ROUTE, text="say hi", max_tokens=10, best_of=3).output_tokens == 30
    with pytest.raises(ConfigurationError, match=r"best_of \(2\) must be at least n \(3\)"):
        exact().estimate(ROUTE, text="x", n=3, best_of=2)


def test_max_completion_tokens_is_an_alias_and_the_larger_bound_wins() -> None:
    est = exact(default_max_tokens=7)
    assert est.estimate(ROUTE, messages=chat(), max_completion_tokens=400).output_tokens == 400
    assert est.estimate(ROUTE, messages=chat(), max_tokens=100, max_completion_tokens=400).max_tokens == 400
    assert est.estimate(ROUTE, messages=chat(), max_tokens=500, max_completion_tokens=400, n=2).output_tokens == 1000
    assert est.estimate(ROUTE, messages=chat(), max_tokens=100.0).max_tokens == 100  # an integral float is fine


def test_reasoning_is_bounded_by_max_tokens_or_reserved_at_the_reasoning_default() -> None:
    est = exact(default_max_tokens=1000, default_reasoning_max_tokens=20_000)
    assert est.estimate(ROUTE, messages=chat(), reasoning_effort="high").max_tokens == 20_000
    assert est.estimate(ROUTE, messages=chat(), reasoning_effort="none").max_tokens == 1000
    assert est.estimate(ROUTE, messages=chat(), reasoning_effort="high", max_completion_tokens=4000).max_tokens == 4000
    thinking = {"type": "enabled", "budget_tokens": 8000}
    assert est.estimate(ROUTE, messages=chat(), thinking=thinking).max_tokens == 20_000
    # Anthropic requires max_tokens above the budget; a request that does not is still reserved at the budget
    assert est.estimate(ROUTE, messages=chat(), thinking=thinking, max_tokens=2000, n=2).output_tokens == 16_000
    big = exact(default_max_tokens=10, default_reasoning_max_tokens=100)
    assert big.estimate(ROUTE, messages=chat(), thinking=thinking).max_tokens == 8000
    assert est.estimate(ROUTE, messages=chat(), thinking={"type": "disabled"}).max_tokens == 1000


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", math.nan), ("max_tokens", math.inf), ("max_tokens", 1.5),
    ("max_tokens", "100"), ("max_tokens", True), ("max_completion_tokens", -5), ("n", 0), ("n", -2), ("n", 2.5),
    ("best_of", 0),
])
def test_bad_output_bounds_are_configuration_errors_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"{field} must be an integer >= 1, got {value!r}") as info:
        exact().estimate(ROUTE, messages=chat(), **{field: value})
    assert isinstance(info.value, ValueError)


def test_bad_thinking_budget_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="thinking.budget_tokens must be an integer >= 1"):
        exact().estimate(ROUTE, messages=chat(), thinking={"type": "enabled", "budget_tokens": -1})


# --- input: messages, names, tool calls, tools ---------------------------------------------------


def test_chat_framing_names_and_other_text_fields_follow_openais_formula() -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "name": "ada lovelace", "content": "hello there"},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                {"role": "critic", "content": None}]  # an unusual role is counted as text
    w = exact().estimate(ROUTE, messages=messages)
    framing = REPLY + 4 * (PER_MESSAGE + PER_ROLE) + PER_NAME
    assert w.counted == framing + 2 + 2 + 2 + 1 + 1 + 1  # texts, name, tool_call_id, the role "critic"


def test_tool_calls_count_their_name_and_arguments() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "loan rates"}'}}
    messages = [*chat(), {"role": "assistant", "content": None, "tool_calls": [call, call]}]
    w = exact().estimate(ROUTE, messages=messages)
    args_words = len('lookup {"q": "loan rates"}'.split())
    assert w.counted == BASE + 3 + PER_MESSAGE + PER_ROLE + 2 * (PER_TOOL_CALL + args_words)
    legacy = [*chat(), {"role": "assistant", "function_call": call["function"]}]
    assert exact().estimate(ROUTE, messages=legacy).counted == BASE + 3 + PER_MESSAGE + PER_ROLE + PER_TOOL_CALL + \
        args_words


def test_tool_definitions_cost_the_tokens_of_their_json() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "description": "find a loan rate",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    est = exact()
    plain = est.estimate(ROUTE, messages=chat()).counted
    assert est.estimate(ROUTE, messages=chat(), tools=tools).counted == plain + len(json.dumps(tools).split())
    functions = [tools[0]["function"]]
    assert est.estimate(ROUTE, messages=chat(), functions=functions).counted == \
        plain + len(json.dumps(functions).split())
    with pytest.raises(ConfigurationError, match="tools must be JSON"):
        est.estimate(ROUTE, messages=chat(), tools=[{"bad": object()}])


def test_tools_with_the_real_tokenizer_cover_the_simulators_count() -> None:
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "look up the rate of a loan",
                                               "parameters": {"type": "object", "properties": {
                                                   "loan_id": {"type": "string"}, "when": {"type": "string"}}}}}
             for i in range(3)]
    est = WorstCaseEstimator(simulator_counter)
    for _ in range(est.warmup):
        est.observe(ROUTE, est.estimate(ROUTE, messages=chat(), tools=tools).counted,
                    provider_counts(chat(), tools)["simulator"])
    assert est.estimate(ROUTE, messages=chat(), tools=tools).prompt_tokens >= provider_counts(chat(), tools)["simulator"]


# --- input: images, audio, files --------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_images_are_reserved_per_image_outside_the_factor_and_their_base64_is_not_counted() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(b"x" * 30_000)}}
    content = [{"type": "text", "text": "what is this"}, image, {**image, "type": "input_image"}]
    est = WorstCaseEstimator(WORDS, margin=0.0, initial_factor=3.0, image_tokens=1500)
    w = est.estimate(ROUTE, messages=[{"role": "user", "content": content}])
    assert (w.counted, w.image_tokens, w.fixed_tokens) == (BASE + 3, 3000, 3000)
    assert w.prompt_tokens == 3 * (BASE + 3) + 3000


def test_audio_is_reserved_for_the_longest_it_can_play() -> None:
    wav = {"type": "input_audio", "input_audio": {"data": _b64(b"\0" * 16_000), "format": "wav"}}  # <= 2 s
    mp3 = {"type": "input_audio", "input_audio": {"data": _b64(b"\0" * 7_500), "format": "mp3"}}  # <= 10 s at 6 kbit/s
    by_url = {"type": "audio_url", "audio_url": {"url": "https://example.invalid/a.mp3"}}
    est = exact(audio_tokens_per_second=32, unknown_media_tokens=9_000)
    assert est.estimate(ROUTE, messages=[{"role": "user", "content": [wav]}]).audio_tokens == 64
    assert est.estimate(ROUTE, messages=[{"role": "user", "content": [mp3]}]).audio_tokens == 320
    w = est.estimate(ROUTE, messages=[{"role": "user", "content": [wav, mp3, by_url]}])
    assert (w.audio_tokens, w.counted, w.prompt_tokens) == (64 + 320 + 9_000, BASE, BASE + 9_384)


def _pdf(pages: int) -> bytes:
    kids = " ".join(f"{i + 3} 0 R" for i in range(pages))
    body = [b"%PDF-1.4", b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj",
            f"2 0 obj << /Type /Pages /Kids [{kids}] /Count {pages} >> endobj".encode()]
    body += [f"{i + 3} 0 obj << /Type /Page /Parent 2 0 R >> endobj".encode() for i in range(pages)]
    return b"\n".join(body + [b"%%EOF"])


def test_files_pdf_pages_inline_bytes_and_references() -> None:
    est = exact(file_page_tokens=5000, unknown_media_tokens=7_000)

    def file_part(**spec: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "text", "text": "summarise"}, {"type": "file", "file": spec}]}]

    pdf = est.estimate(ROUTE, messages=file_part(file_data="data:application/pdf;base64," + _b64(_pdf(3))))
    assert (pdf.file_tokens, pdf.counted) == (15_000, BASE + 1)
    text_file = "loan,rate\n" * 50
    inline = est.estimate(ROUTE, messages=file_part(file_data="data:text/csv;base64," + _b64(text_file.encode())))
    assert inline.file_tokens == len(text_file)  # a byte-level tokenizer never makes more than one a byte
    assert est.estimate(ROUTE, messages=file_part(file_id="file-abc")).file_tokens == 7_000
    anthropic = [{"role": "user", "content": [{"type": "document", "source": {"type": "base64",
                                                                              "data": _b64(_pdf(2))}}]}]
    assert est.estimate(ROUTE, messages=anthropic).file_tokens == 10_000


def test_an_unknown_content_part_is_counted_as_its_json() -> None:
    part = {"type": "video_frame", "note": "a b c"}
    w = exact().estimate(ROUTE, messages=[{"role": "user", "content": [part, "plain string part"]}])
    assert w.counted == BASE + len(json.dumps(part).split()) + 3


def test_the_context_window_caps_the_input() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}
    w = exact().estimate(ROUTE, messages=[{"role": "user", "content": [image] * 10}], max_input_tokens=8_192)
    assert w.prompt_tokens == 8_192 and w.image_tokens == 20_000


# --- embeddings -------------------------------------------------------------------------------------


def test_embedding_inputs_strings_and_token_ids() -> None:
    est = WorstCaseEstimator(WORDS, margin=0.0, initial_factor=2.0)
    one = est.estimate("openai/embed-a", text="risk of default", embedding=True)
    assert (one.counted, one.prompt_tokens, one.output_tokens, one.choices, one.embedding) == (3, 6, 0, 1, True)
    many = est.estimate("openai/embed-a", text=["a b", "c d e"], embedding=True, max_tokens=999, n=4)
    assert (many.counted, many.prompt_tokens, many.output_tokens) == (5, 10, 0)
    ids = est.estimate("openai/embed-a", text=[101, 2009, 2003], embedding=True)
    assert (ids.counted, ids.id_tokens, ids.prompt_tokens) == (0, 3, 3)  # ids count exactly: no factor
    nested = est.estimate("openai/embed-a", text=[[1, 2], [3, 4, 5]], embedding=True)
    assert (nested.id_tokens, nested.prompt_tokens, nested.fixed_tokens) == (5, 5, 5)


def test_a_text_completion_prompt_has_output() -> None:
    w = exact(default_max_tokens=64).estimate(ROUTE, text="complete this line", n=2)
    assert (w.counted, w.output_tokens) == (3, 128)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"messages": "hello"}, "messages must be a list of message dicts, got str"),
    ({"messages": ["hello"]}, r"messages\[0\] must be a dict with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 42}]}, r"messages\[0\].content must be a string or a list"),
    ({"messages": [{"role": "user", "content": [7]}]}, "a content part must be a dict with a 'type'"),
    ({"messages": chat(), "text": "x"}, "give messages .* or text .*, not both"),
    ({"text": {"a": 1}}, "text must be a string, a list of strings or of token ids, got dict"),
    ({"text": ["ok", 1.5]}, r"text\[1\] must be a string, a token id or a list of token ids, got 1.5"),
    ({"text": "x", "max_input_tokens": 0}, "max_input_tokens must be an integer >= 1"),
])
def test_bad_requests_are_configuration_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        exact().estimate(ROUTE, **kwargs)


def test_bad_route_and_bad_settings() -> None:
    with pytest.raises(ConfigurationError, match="route must be a non-empty string"):
        exact().estimate("", text="x")
    for kwargs, message in [({"margin": math.nan}, "margin must be a finite number >= 0"),
                            ({"margin": -0.1}, "margin must be a finite number >= 0"),
                            ({"initial_factor": 0}, "initial_factor must be a finite number > 0"),
                            ({"default_max_tokens": 0}, "default_max_tokens must be an integer >= 1"),
                            ({"image_tokens": -1}, "image_tokens must be an integer >= 0"),
                            ({"cache_size": 1.5}, "cache_size must be an integer >= 0")]:
        with pytest.raises(ConfigurationError, match=message):
            WorstCaseEstimator(WORDS, **kwargs)


def test_a_pydantic_style_message_object_is_read_through_model_dump() -> None:
    class Message:
        def model_dump(self) -> dict[str, Any]:
            return {"role": "user", "content": "one two three"}

    assert exact().estimate(ROUTE, messages=[Message()]).counted == BASE + 3


# --- margin and the learned factor -----------------------------------------------------------------


def test_margin_and_factor_scale_the_counted_tokens_and_round_up() -> None:
    est = WorstCaseEstimator(WORDS, margin=0.1, initial_factor=1.3)
    w = est.estimate(ROUTE, text=" ".join(["w"] * 100))
    assert (w.counted, w.factor, w.margin, w.prompt_tokens) == (100, 1.3, 0.1, math.ceil(100 * 1.3 * 1.1))


def test_the_factor_warms_up_then_is_the_largest_ratio_observed() -> None:
    est = WorstCaseEstimator(WORDS, initial_factor=1.25, warmup=3)
    assert est.factor(ROUTE) == 1.25
    assert est.observe(ROUTE, 100, 110) == 1.25  # warming up: never below the initial factor
    assert est.observe(ROUTE, 100, 130) == 1.30
    assert est.observe(ROUTE, 100, 90) == 1.30  # warm now: the largest ratio seen
    assert est.observe(ROUTE, 200, 220) == 1.30
    assert est.factor("openai/other") == 1.25  # per route
    warm = WorstCaseEstimator(WORDS, initial_factor=1.25, warmup=2)
    warm.observe(ROUTE, 100, 101)
    assert warm.observe(ROUTE, 100, 102) == 1.02  # below the initial factor once warm: tight on this route
    assert warm.factors() == {ROUTE: 1.02}


def test_the_factor_is_monotone_and_never_below_an_observed_ratio() -> None:
    rng = random.Random(7)
    est = WorstCaseEstimator(WORDS, warmup=0)
    previous, largest = 0.0, 0.0
    for _ in range(2000):
        counted = rng.randint(1, 5000)
        reported = int(counted * rng.uniform(0.5, 1.6))
        factor = est.observe(ROUTE, counted, reported)
        largest = max(largest, reported / counted)
        assert factor >= previous and factor == largest
        previous = factor


def test_fixed_tokens_are_taken_off_before_the_ratio_and_nothing_is_learnt_from_no_text() -> None:
    est = WorstCaseEstimator(WORDS, warmup=0)
    assert est.observe(ROUTE, 50, 50 + 1_200, fixed_tokens=1_200) == 1.0  # an image billed 1,200 of 2,000
    assert est.observe(ROUTE, 50, 3_000, fixed_tokens=2_000) == 20.0  # the bill overshot the whole reserve
    fresh = WorstCaseEstimator(WORDS, warmup=0)
    assert fresh.observe(ROUTE, 0, 500, fixed_tokens=3) == fresh.initial_factor
    for bad in ({"counted": -1}, {"reported": math.nan}, {"fixed_tokens": "1"}):
        args = {"counted": 10, "reported": 10, **bad}
        with pytest.raises(ConfigurationError, match=f"{next(iter(bad))} must be an integer >= 0"):
            est.observe(ROUTE, args["counted"], args["reported"], fixed_tokens=args.get("fixed_tokens", 0))


def test_seed_starts_a_route_from_history_and_never_lowers_it() -> None:
    est = WorstCaseEstimator(WORDS, initial_factor=1.25, warmup=5)
    assert est.seed(ROUTE, 1.04) == 1.04  # the warm-up is done by history
    assert est.observe(ROUTE, 100, 101) == 1.04
    assert est.seed(ROUTE, 1.01) == 1.04
    assert est.observe(ROUTE, 100, 110) == 1.10
    with pytest.raises(ConfigurationError, match="factor must be a finite number > 0"):
        est.seed(ROUTE, math.inf)


def test_after_observing_a_bill_the_same_request_is_never_reserved_below_it() -> None:
    est = WorstCaseEstimator(WORDS, warmup=0)
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this picture"}, image]}]
    before = est.estimate(ROUTE, messages=messages)
    billed = before.prompt_tokens + 700  # a provider that bills more than the whole reserve
    est.observe(ROUTE, before.counted, billed, fixed_tokens=before.fixed_tokens)
    assert est.estimate(ROUTE, messages=messages).prompt_tokens >= billed


def test_observe_is_thread_safe() -> None:
    est = WorstCaseEstimator(WORDS, warmup=0)
    ratios: list[list[float]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        rng = random.Random(i)
        start.wait()
        for _ in range(2000):
            counted = rng.randint(1, 1000)
            reported = rng.randint(0, 2000)
            ratios[i].append(reported / counted)
            est.observe(f"route-{i % 2}", counted, reported)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for route in (0, 1):
        assert est.factor(f"route-{route}") == max(r for i in range(route, 8, 2) for r in ratios[i])
        assert est._learned[f"route-{route}"][1] == 4 * 2000  # every observation counted once


# --- tokenizers and the cache ---------------------------------------------------------------------


def test_the_fallback_is_cl100k_from_litellms_bundled_copy_and_char_count_is_conservative() -> None:
    count = fallback_counter()
    assert count is fallback_counter()  # built once
    litellm = litellm_counter()
    for messages in corpus(40, seed=3):
        for m in messages:
            assert count(ROUTE, m["content"]) == litellm(ROUTE, m["content"])
            assert char_count(m["content"]) >= litellm(ROUTE, m["content"])
    assert char_count("abcd") == 2 and char_count("信用") == 4


def test_routed_counter_gives_routes_their_own_tokenizer() -> None:
    count = routed_counter(WORDS, {"openai/sim-*": simulator_counter})
    text = "internationalisation of counterparty reconciliation"
    assert count("openai/sim-gpt-small", text) == sim_count(text) == 10
    assert count("openai/gpt-4o", text) == 4


def test_cached_counts_equal_fresh_ones_and_the_cache_holds_no_text() -> None:
    long_text = "the loan risk model " * 40
    messages = [{"role": "system", "content": long_text}, {"role": "user", "content": "and? " * 60}]
    litellm = litellm_counter()
    cached, fresh = WorstCaseEstimator(litellm, cache_size=2), WorstCaseEstimator(litellm, cache_size=0)
    for i in range(5):
        turn = [*messages, {"role": "user", "content": f"question {i} " * 30}]
        assert cached.estimate(ROUTE, messages=turn) == fresh.estimate(ROUTE, messages=turn)
        assert len(cached._cache) <= 2
    assert all(isinstance(k, tuple) and isinstance(k[1], int) for k in cached._cache)
    assert fresh._cache == {}


def test_the_module_imports_no_litellm() -> None:
    tree = ast.parse(Path(estimate_module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"litellm", "sqlalchemy", "pandas", "mlflow"}


# --- accuracy on ordinary prompts ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured() -> list[tuple[list[dict[str, Any]], dict[str, int]]]:
    return [(m, provider_counts(m)) for m in corpus(300, seed=0)]


@pytest.fixture(scope="module")
def learning() -> list[tuple[list[dict[str, Any]], dict[str, int]]]:
    return [(m, provider_counts(m)) for m in corpus(8, seed=1)]


def _ratios(est: WorstCaseEstimator, measured: list[tuple[Any, dict[str, int]]], provider: str) -> list[float]:
    return [est.estimate(ROUTE, messages=m).prompt_tokens / counts[provider] for m, counts in measured]


def _learnt(count: Any, learning: Any, provider: str) -> WorstCaseEstimator:
    est = WorstCaseEstimator(count)
    for messages, counts in learning:
        est.observe(ROUTE, est.estimate(ROUTE, messages=messages).counted, counts[provider])
    return est


@pytest.mark.parametrize("provider, tokenizer", [
    ("openai-gpt-4", "litellm"), ("openai-gpt-4o", "o200k_base"), ("simulator", "simulator"),
])
def test_with_the_routes_own_tokenizer_the_reserve_is_never_under_and_within_15_percent(
        provider: str, tokenizer: str, measured: Any, learning: Any) -> None:
    count = {"litellm": litellm_counter(), "o200k_base": tiktoken_counter("o200k_base"),
             "simulator": simulator_counter}[tokenizer]
    ratios = sorted(_ratios(_learnt(count, learning, provider), measured, provider))
    assert ratios[0] >= 1.0, f"under-reserved: {ratios[0]:.3f}"
    assert statistics.median(ratios) <= 1.15 and ratios[int(0.9 * len(ratios))] <= 1.15, ratios


def test_gpt_4o_with_litellms_cl100k_is_never_under_and_tight_on_the_median(measured: Any, learning: Any) -> None:
    # LiteLLM 1.110 counts every OpenAI model with cl100k_base; gpt-4o's o200k_base needs far fewer tokens
    # for non-English text, so the tail is loose (bench: p90 1.28x) though the median is tight
    ratios = sorted(_ratios(_learnt(litellm_counter(), learning, "openai-gpt-4o"), measured, "openai-gpt-4o"))
    assert ratios[0] >= 1.0 and statistics.median(ratios) <= 1.15


def test_the_counted_tokens_match_openais_formula(measured: Any) -> None:
    est = WorstCaseEstimator(litellm_counter(), cache_size=0)
    for messages, counts in measured:
        # the route's tokenizer is gpt-4's: the count is exact up to the newlines joining short texts
        assert 0 <= est.estimate(ROUTE, messages=messages).counted - counts["openai-gpt-4"] <= len(messages)


def test_with_a_foreign_tokenizer_the_observed_workload_is_still_never_under_reserved(measured: Any) -> None:
    # the simulator's heuristic tokenizer against LiteLLM's cl100k_base: safe once observed, but not tight
    # (bench/estimate_bench.py: median 1.44x); the route's own tokenizer is what makes it tight
    est = WorstCaseEstimator(litellm_counter())
    for messages, counts in measured:
        est.observe(ROUTE, est.estimate(ROUTE, messages=messages).counted, counts["simulator"])
    assert min(_ratios(est, measured, "simulator")) >= 1.0

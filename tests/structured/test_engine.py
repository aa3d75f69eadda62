"""Constrained decoding in the engine, on the real tiny demo model (random weights: its
free text is garbage, so every constrained answer that validates is the grammar's doing)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import trio
from schemas import ALL, ORDER, PERSON

from omlx_actors import open_runtime
from omlx_actors.engine.messages import Submit
from omlx_actors.refusals import InvalidRequest
from omlx_actors.isolation.recovery import Recovery
from omlx_actors.front.structured import compile_schema, response_format_output

pytestmark = pytest.mark.timeout(240)


def _json_schema(schema):
    return response_format_output({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})


def _check(text: str, done, schema) -> None:
    """Fail closed: a `stop` answer parses and validates; anything else ends `length`."""
    if done.finish_reason == "stop":
        jsonschema.validate(json.loads(text), schema)
    else:
        assert done.finish_reason == "length", (done.finish_reason, done.error, text)


async def _collect(rt, content, **kwargs):
    session = rt.chat([{"role": "user", "content": content}], **kwargs)
    async with session:
        return await session.collect()


async def test_constrained_rows_validate_and_free_greedy_rows_are_unchanged_beside_them(tiny_llama):
    free_prompts = [f"free prompt {i}" for i in range(4)]
    async with open_runtime(tiny_llama) as rt:
        alone = [await _collect(rt, p, max_tokens=24, ignore_eos=True) for p in free_prompts]
        results: dict = {}

        async def run(key, content, **kwargs):
            results[key] = await _collect(rt, content, **kwargs)

        async with trio.open_nursery() as nursery:
            for i, (name, schema) in enumerate(list(ALL.items()) * 2):
                nursery.start_soon(functools_partial(run, ("c", i, name), f"json {i}",
                                   max_tokens=160, structured=_json_schema(schema),
                                   temperature=1.0, seed=i))
            for i, p in enumerate(free_prompts):
                nursery.start_soon(functools_partial(run, ("f", i), p, max_tokens=24, ignore_eos=True))
    for i, expected in enumerate(alone):
        assert results[("f", i)][0] == expected[0]
    stops = 0
    for key, (text, calls, done) in results.items():
        if key[0] == "c":
            _check(text, done, ALL[key[2]])
            stops += done.finish_reason == "stop"
    assert stops >= 5  # most finish: the grammar also forces the stop token when complete


def functools_partial(fn, *args, **kwargs):
    async def call():
        await fn(*args, **kwargs)
    return call


async def test_a_request_cut_by_max_tokens_ends_with_length_not_stop(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        text, _, done = await _collect(rt, "cut", max_tokens=3, structured=_json_schema(ORDER))
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_stop_strings_cannot_cut_structured_output(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        with pytest.raises(InvalidRequest, match="stop strings cannot be combined"):
            await _collect(rt, "x", max_tokens=8, stop=["}"], structured=_json_schema(PERSON))


def test_an_uncompilable_schema_is_refused_naming_the_feature():
    with pytest.raises(InvalidRequest, match="if") as caught:
        compile_schema({"type": "object", "if": {"required": ["a"]}}, param="response_format")
    assert caught.value.param == "response_format"


def test_a_continuation_replays_its_delivered_tokens_into_the_grammar():
    recovery = Recovery()
    original = Submit(request_id="r", prompt_tokens=(1, 2, 3), max_tokens=10,
                      grammar=compile_schema(PERSON, param="p"))
    recovery.track(original)
    recovery.mark_sent("r")
    from omlx_actors.engine.messages import TokenChoice, TokenDelta

    recovery.on_event(TokenDelta(request_id="r", tokens=(TokenChoice(token=7), TokenChoice(token=8)), step=1))
    first = recovery.continuation("r")
    assert first.prompt_tokens == (1, 2, 3, 7, 8)
    assert first.grammar_replay == 2
    assert first.grammar == original.grammar


async def test_a_prefix_cache_hit_leaves_the_constrained_answer_unchanged(tiny_llama):
    long_prompt = "a shared system prompt that spans several blocks " * 20
    async with open_runtime(tiny_llama) as rt:
        first = await _collect(rt, long_prompt, max_tokens=96, structured=_json_schema(PERSON))
        second = await _collect(rt, long_prompt, max_tokens=96, structured=_json_schema(PERSON))
    assert first[2].usage.cached_tokens == 0
    assert second[2].usage.cached_tokens >= 128
    assert second[0] == first[0]
    _check(first[0], first[2], PERSON)


def _processor(model_dir, schema):
    import json as _json

    from omlx_actors.engine.grammar import GrammarTokenizers

    config = _json.loads((model_dir / "config.json").read_text())
    tokenizers = GrammarTokenizers(str(model_dir), config["vocab_size"], (1, 3))
    return tokenizers, tokenizers.processor(compile_schema(schema, param="p"), ())


def test_a_token_the_grammar_refuses_puts_the_processor_in_error_and_the_mask_is_exact(tiny_llama):
    import mlx.core as mx

    tokenizers, proc = _processor(tiny_llama, PERSON)
    tok = tokenizers.tokenizer()
    logits = mx.zeros((1, tok.vocab_size))
    masked = proc(mx.array([5]), logits)  # first call: context[-1] is the prompt's last token
    allowed = [i for i, v in enumerate(masked[0].tolist()) if v == 0.0]
    assert [tok.decode_str([i]) for i in allowed] == ['{"']  # compact JSON: `{"` alone
    (brace_quote,) = allowed
    proc(mx.array([5, brace_quote]), logits)
    assert proc.error is None
    (bad,) = tok.tokenize_str("}")
    proc(mx.array([5, brace_quote, bad]), logits)  # `{"}` breaks the grammar
    assert proc.error is not None


def test_a_stop_token_before_the_json_is_complete_is_an_error(tiny_llama):
    import mlx.core as mx

    tokenizers, proc = _processor(tiny_llama, PERSON)
    logits = mx.zeros((1, tokenizers.tokenizer().vocab_size))
    proc(mx.array([5]), logits)
    proc(mx.array([5, 3]), logits)  # <|im_end|> at once
    assert proc.error == "stop token 3 before the grammar was complete"


def test_replayed_tokens_that_break_the_grammar_are_refused_at_admission(tiny_llama):
    from omlx_actors.engine.grammar import GrammarRejected

    tokenizers, _ = _processor(tiny_llama, PERSON)
    bad = tuple(tokenizers.tokenizer().tokenize_str("[1, 2]"))
    with pytest.raises(GrammarRejected, match="delivered tokens do not fit the grammar"):
        tokenizers.processor(compile_schema(PERSON, param="p"), bad)


async def test_matchers_stay_with_their_rows_as_the_batch_grows_and_shrinks(tiny_llama):
    """mlx-vlm #1574's trap: grammar state out of step when rows join and leave. Constrained
    greedy requests arrive staggered while others are cancelled mid-way; each answer equals
    the one it gives alone (greedy, so any matcher mix-up would show)."""
    names = list(ALL) + list(ALL)[:3]

    async with open_runtime(tiny_llama) as rt:
        alone = [await _collect(rt, f"item {i}", max_tokens=120, structured=_json_schema(ALL[n]))
                 for i, n in enumerate(names)]
        results: dict[int, tuple] = {}

        async def staggered(i: int, name: str) -> None:
            await trio.sleep(0.03 * i)  # rows join while others decode
            results[i] = await _collect(rt, f"item {i}", max_tokens=120, structured=_json_schema(ALL[name]))

        async def cancelled(i: int) -> None:
            session = rt.chat([{"role": "user", "content": f"gone {i}"}], max_tokens=120,
                              structured=_json_schema(ORDER))
            async with session:
                seen = 0
                async for _ in session:
                    seen += 1
                    if seen == 3 + 2 * i:
                        break  # the row leaves the batch mid-stream

        async with trio.open_nursery() as nursery:
            for i, name in enumerate(names):
                nursery.start_soon(staggered, i, name)
            for i in range(4):
                nursery.start_soon(cancelled, i)
    for i, name in enumerate(names):
        assert results[i][0] == alone[i][0], (i, name)
        _check(results[i][0], results[i][2], ALL[name])

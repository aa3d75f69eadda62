"""Sessions through the in-process API with the real tiny models."""

from __future__ import annotations

import math

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx_actors.wiring import open_runtime
from omlx_actors.refusals import ContextLengthExceeded, InvalidRequest
from omlx_actors.front.session import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, Done, Progress, TextDelta
from omlx_actors.front.text import tokens_at_least



@pytest.fixture(scope="module")
def tiny_llama_tokenizer(tiny_llama):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_llama)


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]


async def test_chat_applies_the_template_and_reports_usage_and_timings(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        session = rt.chat(CHAT, max_tokens=10, ignore_eos=True)
        text, calls, done = await session.collect()
        expected_prompt = rt.tokenizer.encode(
            rt.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
    assert list(session.prompt_tokens) == expected_prompt
    assert done.finish_reason == "length"
    assert done.usage.prompt_tokens == len(expected_prompt)
    assert done.usage.completion_tokens == 10
    assert done.timings.ttft_s is not None and done.timings.ttft_s > 0
    assert done.timings.total_s >= done.timings.ttft_s
    assert text == rt.tokenizer.decode(session.completion_token_ids)


async def test_stop_string_inside_the_output_ends_it_there(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        full, _, _ = await rt.complete("The quick brown fox", max_tokens=40, ignore_eos=True).collect()
        assert len(full) > 12
        stop = full[8:11]
        stopped, _, done = await rt.complete("The quick brown fox", max_tokens=40, ignore_eos=True,
                                             stop=[stop]).collect()
        assert stopped == full[: full.index(stop)]
        assert done.finish_reason == "stop"
        assert done.stop_sequence == stop
        # The session aborted the engine request at the stop string: it leaves the batch.
        with trio.fail_after(2):
            while (await rt.stats()).running:
                await trio.sleep(0.01)


async def test_eos_token_ends_the_request_with_stop_and_is_not_rendered(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        eos = rt.info.eos_token_ids[0]
        session = rt.complete("hello", max_tokens=30, logit_bias=((eos, 100.0),))
        text, _, done = await session.collect()
    assert done.finish_reason == "stop"
    assert session.completion_token_ids == [eos]
    assert text == ""


async def test_logprobs_are_reported_per_token_with_sorted_top_alternatives(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        session = rt.complete("logprobs please", max_tokens=8, ignore_eos=True, logprobs=True,
                              top_logprobs=4)
        choices = []
        async with session:
            async for event in session:
                if isinstance(event, TextDelta):
                    choices.extend(event.tokens)
    assert [c.token for c in choices] == session.completion_token_ids
    for c in choices:
        assert c.logprob is not None and c.logprob <= 0
        assert len(c.top) == 4
        assert [t.logprob for t in c.top] == sorted((t.logprob for t in c.top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert c.top[0].token == c.token
        assert math.isclose(c.top[0].logprob, c.logprob, rel_tol=1e-5, abs_tol=1e-6)


async def test_seeded_sampling_is_reproducible_alone_and_inside_a_batch(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        async def sample(seed):
            s = rt.complete("sample me", max_tokens=16, ignore_eos=True, temperature=1.0, seed=seed)
            await s.collect()
            return s.completion_token_ids

        alone = await sample(11)
        results = {}

        async def run(i):
            results[i] = await sample(11 if i == 0 else 100 + i)

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(run, i)
    assert results[0] == alone
    assert alone != results[1]


async def test_prefill_progress_is_reported_per_chunk(tiny_llama):
    async with open_runtime(tiny_llama, prefill_step_size=64) as rt:
        prompt = [(i * 13) % 400 + 10 for i in range(300)]
        session = rt.complete(prompt, max_tokens=2, ignore_eos=True)
        progress = []
        async with session:
            async for event in session:
                if isinstance(event, Progress):
                    progress.append((event.done, event.total))
                if isinstance(event, Done):
                    assert event.finish_reason == "length"
    assert progress[0] == (64, 300)
    assert progress[-1][0] >= 299 and all(total == 300 for _, total in progress)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "stop"),
        ({"stop": [str(i) for i in range(MAX_STOP_STRINGS + 1)]}, "stop"),
        ({"logit_bias": ((10_000, 1.0),)}, "logit_bias"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
async def test_invalid_parameters_are_refused_before_anything_runs(tiny_llama, kwargs, param):
    async with open_runtime(tiny_llama) as rt:
        with pytest.raises(InvalidRequest) as info:
            await rt.complete("hi", **kwargs).start()
        assert info.value.param == param
        assert info.value.status == 400
        assert len(rt.dispatcher) == 0
        assert (await rt.stats()).steps == 0


async def test_prompt_longer_than_the_context_is_refused_with_context_length_exceeded(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        too_long = [5] * (rt.max_context + 1)
        with pytest.raises(ContextLengthExceeded):
            await rt.complete(too_long, max_tokens=1).start()
        with pytest.raises(ContextLengthExceeded) as info:
            await rt.complete([5] * (rt.max_context - 4), max_tokens=10).start()
        assert info.value.param == "max_tokens"


async def test_hybrid_model_generates_identically_alone_and_batched(tiny_hybrid):
    async with open_runtime(tiny_hybrid) as rt:
        prompts = [f"hybrid prompt {i} with some words" for i in range(4)]
        alone = []
        for p in prompts:
            s = rt.complete(p, max_tokens=12, ignore_eos=True)
            await s.collect()
            alone.append(s.completion_token_ids)
        batched = {}

        async def run(i):
            s = rt.complete(prompts[i], max_tokens=12, ignore_eos=True)
            await s.collect()
            batched[i] = s.completion_token_ids

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(run, i)
    assert [batched[i] for i in range(4)] == alone


async def test_top_k_at_or_above_the_vocabulary_keeps_every_token(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        s = rt.complete("hi", max_tokens=4, ignore_eos=True, temperature=1.0, top_k=10_000, seed=3)
        _, _, done = await s.collect()
    assert done.finish_reason == "length"


# ---------------------------------------------------------------------------------------
# receive_ready: the batch form that streaming uses


async def _all_events_queued(rt, session) -> None:
    """Wait until the engine has delivered the whole request to the session's channel (the
    dispatcher forgets a request once it has routed its `Finished`)."""
    with trio.fail_after(10):
        while len(rt.dispatcher):
            await trio.sleep(0.01)


async def test_events_ready_together_come_in_one_batch_in_order(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        expected, _, _ = await rt.complete("batch me", max_tokens=12, ignore_eos=True).collect()
        async with rt.complete("batch me", max_tokens=12, ignore_eos=True) as session:
            await _all_events_queued(rt, session)
            batch = await session.receive_ready()
            with pytest.raises(trio.EndOfChannel):
                await session.receive_ready()
    assert isinstance(batch[-1], Done) and batch[-1].finish_reason == "length"
    assert "".join(e.text for e in batch if isinstance(e, TextDelta)) == expected
    assert len([e for e in batch if isinstance(e, TextDelta)]) > 1  # one delta per token still


async def test_a_stop_string_across_tokens_of_one_batch_ends_the_text_there(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        full, _, _ = await rt.complete("The quick brown fox", max_tokens=40, ignore_eos=True).collect()
        stop = full[8:14]  # several characters: it spans token boundaries
        async with rt.complete("The quick brown fox", max_tokens=40, ignore_eos=True, stop=[stop]) as session:
            await _all_events_queued(rt, session)
            batch = await session.receive_ready()
    assert "".join(e.text for e in batch if isinstance(e, TextDelta)) == full[: full.index(stop)]
    assert batch[-1].finish_reason == "stop" and batch[-1].stop_sequence == stop


async def test_reaching_the_deadline_returns_nothing_and_the_request_goes_on(tiny_llama):
    async with open_runtime(tiny_llama, prefill_step_size=2) as rt:
        prompt = [(i * 7) % 500 + 5 for i in range(300)]  # 150 prefill chunks: slow to start
        expected, _, _ = await rt.complete(prompt, max_tokens=8, ignore_eos=True).collect()
        async with rt.complete(prompt, max_tokens=8, ignore_eos=True) as session:
            # A deadline already past: what is queued, at most prefill progress, nothing more.
            events = await session.receive_ready(trio.current_time())
            assert all(isinstance(e, Progress) for e in events)
            while not events or not isinstance(events[-1], Done):
                events += await session.receive_ready(trio.current_time() + 0.001)
    assert events[-1].finish_reason == "length"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == expected


async def test_cancelling_receive_ready_aborts_the_request(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        session = rt.complete("cancel me", max_tokens=1000, ignore_eos=True)
        await session.start()
        with trio.CancelScope() as scope:
            scope.cancel()
            await session.receive_ready()
        with trio.fail_after(2):  # the engine confirms the abort
            while not (finished := [f for f in rt.dispatcher.recent_finished
                                    if f.request_id == session.request_id]):
                await trio.sleep(0.01)
    assert [f.reason.value for f in finished] == ["abort"]


async def test_a_prompt_far_past_the_context_is_refused_without_being_tokenized(tiny_llama):
    # Regression: an 8 MB prompt was tokenized whole (tens of seconds, GBs of RSS) before the
    # context check. Now its length alone proves it cannot fit.
    async with open_runtime(tiny_llama) as rt:
        prompt = "hello world " * 700_000
        start = trio.current_time()
        for session in (rt.complete(prompt, max_tokens=1),
                        rt.chat([{"role": "user", "content": prompt}], max_tokens=1)):
            with pytest.raises(ContextLengthExceeded) as info:
                await session.start()
            assert "at least" in info.value.message
        assert trio.current_time() - start < 2.0
        assert len(rt.dispatcher) == 0


async def test_a_prompt_past_the_context_is_counted_in_pieces_and_refused(tiny_llama):
    # Too short for the length bound (17 characters per token at most here), long enough to
    # be counted in pieces, which stop at the context.
    async with open_runtime(tiny_llama) as rt:
        prompt = "hello world " * 2_500
        assert len(prompt) // 17 < rt.max_context < len(rt.tokenizer.encode(prompt))
        with pytest.raises(ContextLengthExceeded) as info:
            await rt.complete(prompt, max_tokens=1).start()
        assert info.value.message.startswith("the prompt has at least ")
        assert info.value.param == "prompt"


@given(st.lists(st.sampled_from(list("ab \n.,xyzé") + ["hello", "world", "  "]), max_size=120).map("".join),
       st.integers(8, 64))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_counting_in_pieces_never_exceeds_the_true_count(tiny_llama_tokenizer, text, piece_chars):
    encode = lambda t: tiny_llama_tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    assert tokens_at_least(text, encode, 10**9, piece_chars=piece_chars) <= len(encode(text))


def test_counting_in_pieces_stops_soon_after_the_limit(tiny_llama_tokenizer):
    encoded: list[int] = []

    def encode(piece: str) -> list[int]:
        encoded.append(len(piece))
        return tiny_llama_tokenizer.encode(piece, add_special_tokens=False)

    text = "some words of text, " * 500_000  # 10 M characters
    assert tokens_at_least(text, encode, 2048, piece_chars=4096) >= 2048
    assert sum(encoded) < 12 * 4096


async def test_a_reader_that_stalls_through_a_prefill_cut_in_many_chunks_loses_nothing(tiny_hybrid):
    # A hybrid prompt is cut at every block end (16 tokens here), so a 480-token prompt
    # makes ~30 progress events where counting chunks at the 512-token step allowed 2: a
    # session that reads nothing until its request is over must still get every event.
    async with open_runtime(tiny_hybrid, block_size=16) as rt:
        prompt = [(i * 13) % 400 + 10 for i in range(480)]
        session = rt.complete(prompt, max_tokens=2, ignore_eos=True)
        async with session:
            while rt.pending_requests:  # the dispatcher routes it until its end, unread
                await trio.sleep(0.01)
            events = [event async for event in session]
    progress = [event for event in events if isinstance(event, Progress)]
    assert len(progress) > 8
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "length"

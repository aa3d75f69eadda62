"""Prefix reuse through the real engine: identical outputs, honest cached_tokens, budgets."""

from __future__ import annotations

import trio

from omlx_actors.wiring import open_runtime
from omlx_actors.cache.blocks import (
    ATTENTION_BLOCK_SIZE,
    RECURRENT_BLOCK_SIZE,
    default_block_size,
)

BLOCK = 16


async def _conversation(rt, turns: int = 6, max_tokens: int = 10):
    """A chat that grows turn by turn, each turn appending the model's answer and a new
    user message; returns each turn's (completion tokens, usage)."""
    messages = [{"role": "system", "content": "You are a helpful assistant for tests."}]
    out = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me about item {turn * 3}."})
        session = rt.chat(messages, max_tokens=max_tokens, ignore_eos=True)
        text, _, done = await session.collect()
        out.append((list(session.completion_token_ids), done.usage))
        messages.append({"role": "assistant", "content": text})
    return out


async def _same_with_cache_on_and_off(model_path):
    async with open_runtime(model_path, prefix_cache_bytes=0) as rt:
        cold = await _conversation(rt)
    async with open_runtime(model_path, block_size=BLOCK) as rt:
        warm = await _conversation(rt)
        stats = await rt.cache_stats()
    assert [tokens for tokens, _ in warm] == [tokens for tokens, _ in cold]
    assert all(usage.cached_tokens == 0 for _, usage in cold)
    return warm, stats


async def test_llama_greedy_outputs_identical_with_cache_on_and_off_over_six_turns(tiny_llama):
    warm, stats = await _same_with_cache_on_and_off(tiny_llama)
    cached = [usage.cached_tokens for _, usage in warm]
    assert cached[0] == 0
    assert all(c > 0 and c % BLOCK == 0 for c in cached[1:])
    # Each later turn reuses at least the previous turn's whole prompt, in full blocks.
    for (_, prev), (_, usage) in zip(warm, warm[1:]):
        assert usage.cached_tokens >= (prev.prompt_tokens // BLOCK) * BLOCK - BLOCK
    assert stats.hits == 5


async def test_hybrid_greedy_outputs_identical_with_cache_on_and_off_over_six_turns(tiny_hybrid):
    warm, _ = await _same_with_cache_on_and_off(tiny_hybrid)
    assert all(usage.cached_tokens > 0 for _, usage in warm[1:])


async def test_hybrid_long_prompt_short_answer_is_reused_next_turn(tiny_hybrid):
    """Seed 004: every boundary of a long prompt falls inside prefill and the answer is
    short; the snapshots taken during prefill must make the next turn a hit."""
    prompt = [(i * 31) % 400 + 10 for i in range(20 * BLOCK + 5)]
    async with open_runtime(tiny_hybrid, block_size=BLOCK) as rt:
        first = rt.complete(prompt, max_tokens=2, ignore_eos=True)
        await first.collect()
        second = rt.complete(prompt + first.completion_token_ids + [42, 43, 44], max_tokens=2,
                             ignore_eos=True)
        _, _, done = await second.collect()
    assert done.usage.cached_tokens == 20 * BLOCK


async def test_cached_tokens_equal_the_reused_blocks_and_the_last_token_is_always_prefilled(tiny_llama):
    prompt = [(i * 7) % 300 + 20 for i in range(4 * BLOCK)]  # an exact multiple of the block
    async with open_runtime(tiny_llama, block_size=BLOCK) as rt:
        await rt.complete(prompt, max_tokens=1, ignore_eos=True).collect()
        _, _, done = await rt.complete(prompt, max_tokens=3, ignore_eos=True).collect()
    # The whole prompt is cached, but its last token must run to produce logits.
    assert done.usage.cached_tokens == 3 * BLOCK


async def test_cached_blocks_stay_within_budget_and_pinned_blocks_survive_pressure(tiny_llama):
    # tiny-llama: 2 layers x (k, v) x 2 heads x 16 dims x 4 bytes = 512 bytes per token.
    block_bytes = 2 * 2 * 2 * 16 * 4 * BLOCK
    budget = 12 * block_bytes
    async with open_runtime(tiny_llama, block_size=BLOCK, prefix_cache_bytes=budget) as rt:
        base = [(i * 11) % 300 + 20 for i in range(8 * BLOCK + 3)]
        await rt.complete(base, max_tokens=1, ignore_eos=True).collect()
        # A long request pins base's 8 blocks while others push the cache past its budget.
        pinned = rt.complete(base + [7], max_tokens=200, ignore_eos=True)
        await pinned.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pinned.collect)
            for j in range(6):
                other = [(i * 13 + j * 101) % 300 + 20 for i in range(6 * BLOCK + 1)]
                await rt.complete(other, max_tokens=1, ignore_eos=True).collect()
                stats = await rt.cache_stats()
                assert stats.used_bytes <= stats.budget_bytes
                # The engine's tensors follow the index's evictions.
                with trio.fail_after(2):
                    while (await rt.stats()).prefix_cache_bytes != stats.used_bytes:
                        await trio.sleep(0.01)
        assert stats.evictions > 0
        # The pinned request's prefix was never evicted: a new request still finds it.
        _, _, done = await rt.complete(base + [9], max_tokens=1, ignore_eos=True).collect()
        assert done.usage.cached_tokens == 8 * BLOCK


async def test_prompt_blocks_are_reusable_while_their_request_still_decodes(tiny_llama):
    shared = [(i * 17) % 300 + 20 for i in range(5 * BLOCK)]
    async with open_runtime(tiny_llama, block_size=BLOCK) as rt:
        first = rt.complete(shared + [1, 2], max_tokens=300, ignore_eos=True)
        async with first:
            async for _ in first:
                if first.completion_token_ids:
                    break  # prefill done, first token out; it keeps decoding
            _, _, done = await rt.complete(shared + [3, 4], max_tokens=2, ignore_eos=True).collect()
            assert done.usage.cached_tokens == 5 * BLOCK
            assert len(first.completion_token_ids) < 300


async def test_default_block_size_is_small_for_attention_models_and_large_for_hybrid(tiny_llama, tiny_hybrid):
    """With no block size given, an attention-only model caches in 64-token blocks, so a
    conversation's next turn re-prefills less than 64 tokens of its history; a hybrid model
    keeps 256 (each block boundary is a prefill cut and a state snapshot there)."""
    history = [(i * 13) % 500 + 10 for i in range(200)]
    async with open_runtime(tiny_llama) as rt:
        assert rt.info.block_size == ATTENTION_BLOCK_SIZE
        first = rt.complete(history, max_tokens=30, ignore_eos=True)
        await first.collect()
        held = len(history) + len(first.completion_token_ids) - 1  # the cache's positions
        turn2 = history + first.completion_token_ids + [7, 8, 9]
        _, _, done = await rt.complete(turn2, max_tokens=2, ignore_eos=True).collect()
    assert done.usage.cached_tokens == (held // ATTENTION_BLOCK_SIZE) * ATTENTION_BLOCK_SIZE
    assert len(turn2) - done.usage.cached_tokens < ATTENTION_BLOCK_SIZE + 3
    async with open_runtime(tiny_hybrid) as rt:
        assert rt.info.block_size == RECURRENT_BLOCK_SIZE


def test_default_block_size_by_layout():
    assert default_block_size(("KVCache",) * 4) == ATTENTION_BLOCK_SIZE
    assert default_block_size(("KVCache", "ArraysCache", "KVCache")) == RECURRENT_BLOCK_SIZE
    assert default_block_size(()) == ATTENTION_BLOCK_SIZE


async def _greedy(rt, prompt, max_tokens=8):
    _, _, done = await (session := rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)).collect()
    return list(session.completion_token_ids), done.usage.cached_tokens


async def test_a_long_prompts_blocks_are_stored_while_it_still_prefills_and_reuse_is_exact(tiny_llama):
    """#18: an attention-only model's prompt blocks are saved chunk by chunk as its prefill
    completes them, not all in the step it starts decoding (which stalled every decoding
    stream for a long prompt). The blocks so saved serve a later prompt exactly."""
    from omlx_actors.front.session import Progress

    prompt = [(i * 13) % 300 + 20 for i in range(20 * BLOCK + 5)]
    branch = prompt[: 12 * BLOCK] + [7, 8, 9]
    async with open_runtime(tiny_llama, prefix_cache_bytes=0, prefill_step_size=32) as rt:
        cold, cold_branch = await _greedy(rt, prompt), await _greedy(rt, branch)
    async with open_runtime(tiny_llama, block_size=BLOCK, prefill_step_size=32) as rt:
        blocks_mid_prefill = []
        session = rt.complete(prompt, max_tokens=8, ignore_eos=True)
        async with session:
            async for event in session:
                if isinstance(event, Progress) and event.done < event.total:
                    blocks_mid_prefill.append((event.done, (await rt.cache_stats()).blocks))
        assert list(session.completion_token_ids) == cold[0]
        # Some chunk's blocks were in the index before the prompt ended; the step that
        # saved them had completed at least as many blocks as the index then held.
        assert any(blocks > 0 for _, blocks in blocks_mid_prefill), blocks_mid_prefill
        assert all(blocks <= done // BLOCK for done, blocks in blocks_mid_prefill)
        assert (await rt.cache_stats()).blocks == len(prompt) // BLOCK
        assert await _greedy(rt, branch) == (cold_branch[0], 12 * BLOCK)

"""The executor's continuous batch, driven through the in-process API with a real tiny model."""

from __future__ import annotations

import trio

from omlx_actors.wiring import open_runtime
from omlx_actors.engine.messages import FinishReason
from omlx_actors.engine.mlx_thread import worker_count

PROMPTS = [f"Request {i}: tell me about topic number {i * 7 % 13} please" for i in range(32)]


async def _greedy_tokens(rt, prompt: str, max_tokens: int = 24) -> list[int]:
    session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
    _, _, done = await session.collect()
    assert done.finish_reason == "length"
    return session.completion_token_ids


async def _idle_stats(rt):
    """Engine stats once it is idle and has cleared its buffer cache."""
    with trio.fail_after(5):
        while True:
            stats = await rt.stats()
            if stats.running == stats.waiting == stats.cache_memory_bytes == 0:
                return stats
            await trio.sleep(0.01)


async def test_greedy_outputs_identical_alone_and_in_batches_of_1_to_32(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        alone = {}
        for i in range(8):
            alone[i] = await _greedy_tokens(rt, PROMPTS[i])
        for concurrency in (1, 2, 4, 8, 16, 32):
            results: dict[int, list[int]] = {}

            async def one(i: int) -> None:
                results[i] = await _greedy_tokens(rt, PROMPTS[i])

            async with trio.open_nursery() as nursery:
                for i in range(concurrency):
                    nursery.start_soon(one, i)
            for i in range(min(concurrency, 8)):
                assert results[i] == alone[i], f"prompt {i} differs at concurrency {concurrency}"
            assert all(len(r) == 24 for r in results.values())


async def test_hundred_requests_every_tenth_cancelled_others_exact_and_nothing_leaks(tiny_llama):
    threads_before = worker_count()
    async with open_runtime(tiny_llama, max_batch_size=32) as rt:
        # Warm up with a full batch first: its one-time allocations are not leaks.
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(_greedy_tokens, rt, PROMPTS[i], 4)
        baseline = await _idle_stats(rt)
        counts: dict[int, int] = {}
        cancelled_at_step: dict[str, int] = {}

        async def run_one(i: int) -> None:
            session = rt.complete(PROMPTS[i % 32], max_tokens=20, ignore_eos=True,
                                  request_id=f"r{i}")
            if i % 10 == 0:
                with trio.CancelScope() as scope:
                    async with session:
                        n = 0
                        async for _ in session:
                            n += 1
                            if n == 3:
                                cancelled_at_step[session.request_id] = (await rt.ping()).steps
                                scope.cancel()
                assert scope.cancelled_caught
            else:
                _, _, done = await session.collect()
                assert done.finish_reason == "length"
                counts[i] = done.usage.completion_tokens

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(run_one, i)

        assert counts == {i: 20 for i in range(100) if i % 10}
        # Each cancelled request left the batch within one step of the cancel (plus the step
        # that was in flight when the abort arrived).
        with trio.fail_after(5):
            while len([f for f in rt.dispatcher.recent_finished
                       if f.reason is FinishReason.ABORT]) < 10:
                await trio.sleep(0.01)
        aborted = {f.request_id: f for f in rt.dispatcher.recent_finished
                   if f.reason is FinishReason.ABORT}
        assert set(aborted) == set(cancelled_at_step)
        for request_id, step in cancelled_at_step.items():
            assert aborted[request_id].step <= step + 2, (request_id, step, aborted[request_id])
        # Nothing leaks: no routes, no engine-side requests, no KV cache held by the batch.
        stats = await _idle_stats(rt)
        assert len(rt.dispatcher) == 0
        assert (stats.running, stats.waiting) == (0, 0)
        # One leaked request would keep a KV cache of 256 positions x 2 layers x 2 heads x
        # 16 dims x (k, v) x 4 bytes = 128 KiB; allow a few hundred bytes of shape jitter.
        assert stats.active_memory_bytes <= baseline.active_memory_bytes + 16 * 1024
        assert stats.cache_memory_bytes == 0
        # A reused request id works.
        session = rt.complete(PROMPTS[0], max_tokens=5, ignore_eos=True, request_id="r0")
        _, _, done = await session.collect()
        assert done.usage.completion_tokens == 5
    # The MLX thread is parked for reuse, not leaked: a second runtime reuses it.
    async with open_runtime(tiny_llama) as rt:
        await _greedy_tokens(rt, PROMPTS[1], max_tokens=2)
    assert worker_count() <= threads_before + 1


async def test_abort_before_prefill_finishes_is_confirmed_and_frees_the_slot(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        session = rt.complete(PROMPTS[3], max_tokens=50, ignore_eos=True)
        await session.start()
        session.close()
        with trio.fail_after(5):
            while not any(f.request_id == session.request_id for f in rt.dispatcher.recent_finished):
                await trio.sleep(0.01)
        finished = [f for f in rt.dispatcher.recent_finished if f.request_id == session.request_id]
        assert finished[0].reason is FinishReason.ABORT
        assert (await rt.stats()).running == 0


async def test_duplicate_running_request_id_is_refused(tiny_llama):
    from omlx_actors.refusals import DuplicateRequestId

    async with open_runtime(tiny_llama) as rt:
        first = rt.complete(PROMPTS[0], max_tokens=200, ignore_eos=True, request_id="same")
        await first.start()
        second = rt.complete(PROMPTS[1], max_tokens=5, request_id="same")
        try:
            await second.start()
        except DuplicateRequestId as exc:
            assert exc.status == 409
        else:
            raise AssertionError("a duplicate running id was accepted")
        first.close()


async def test_drain_shutdown_lets_running_requests_finish(tiny_llama):
    results = []
    async with trio.open_nursery() as nursery:
        async with open_runtime(tiny_llama, shutdown_mode="drain") as rt:
            session = rt.complete(PROMPTS[2], max_tokens=30, ignore_eos=True)
            await session.start()

            async def consume():
                results.append(await session.collect())

            nursery.start_soon(consume)
            await trio.sleep(0)
    _, _, done = results[0]
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 30


async def test_abort_shutdown_ends_running_requests_with_an_error(tiny_llama):
    results = []
    async with trio.open_nursery() as nursery:
        async with open_runtime(tiny_llama, shutdown_mode="abort") as rt:
            session = rt.complete(PROMPTS[2], max_tokens=2000, ignore_eos=True)
            await session.start()

            async def consume():
                results.append(await session.collect())

            nursery.start_soon(consume)
            while not session.completion_token_ids:
                await trio.sleep(0.01)
    _, _, done = results[0]
    assert done.finish_reason in ("abort", "error")
    assert done.usage.completion_tokens < 2000


async def test_injected_out_of_memory_fails_the_batch_and_the_engine_keeps_serving(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        sessions = [rt.complete(p, max_tokens=400, ignore_eos=True) for p in PROMPTS[:4]]
        for s in sessions:
            await s.start()
        results = []

        async def consume(s):
            results.append(await s.collect())

        async with trio.open_nursery() as nursery:
            for s in sessions:
                nursery.start_soon(consume, s)
            while not all(s.completion_token_ids for s in sessions):
                await trio.sleep(0.01)
            await rt.inject_fault("injected out-of-memory")
        assert [r[2].finish_reason for r in results] == ["error"] * 4
        assert all(r[2].error_type == "MemoryError" for r in results)
        assert (await rt.stats()).running == 0
        tokens = await _greedy_tokens(rt, PROMPTS[5], max_tokens=8)
        assert len(tokens) == 8

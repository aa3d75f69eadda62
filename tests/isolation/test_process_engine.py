"""The engine in its own process (isolation="process"), with real engine processes killed for
real: SIGKILL from outside, a native abort (SIGABRT) inside, a frozen process (SIGSTOP).

Every stream must complete, and with greedy decoding its full output must equal a run
without the fault; a request that crashes every engine is failed after the poison rule,
while the requests beside it complete.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import trio

from omlx_actors.wiring import open_runtime
from omlx_actors.refusals import EngineUnavailable
from omlx_actors.isolation.recovery import CRASH_LOOP_ERROR_TYPE, POISON_DEATHS
from omlx_actors.front.session import Done

STREAMS = 16
MAX_TOKENS = 160
# Long enough that the 8 requests beside the poison are still running when it arrives.
OTHERS_TOKENS = 120


def prompts(count: int, *, offset: int = 5) -> list[list[int]]:
    """Distinct prompts of 20-40 tokens from the tiny vocabulary (ids >= 5: not special)."""
    rng = random.Random(1234)
    return [[offset + rng.randrange(500) for _ in range(20 + 2 * i)] for i in range(count)]


async def run_all(rt, batch: list[list[int]], max_tokens: int = MAX_TOKENS):
    """Run every prompt concurrently; return each one's (token ids, done)."""
    results: dict[int, tuple[list[int], object]] = {}

    async def one(index: int, prompt: list[int]) -> None:
        session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
        _, _, done = await session.collect()
        results[index] = (list(session.completion_token_ids), done)

    async with trio.open_nursery() as nursery:
        for index, prompt in enumerate(batch):
            nursery.start_soon(one, index, prompt)
    return [results[i] for i in range(len(batch))]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Greedy outputs of the fault-free run, in this process (isolation="thread")."""

    async def main():
        async with open_runtime(tiny_llama) as rt:
            return await run_all(rt, prompts(STREAMS))

    return [tokens for tokens, _ in trio.run(main)]


async def run_all_signalled(rt, step: int, signum: int):
    """`run_all` of the usual streams, sending `signum` to the engine process the moment the
    first stream receives its `step`th token: an event, not a poll. (A polled step count,
    one ping round trip each, was seen on a loaded machine only after every stream had
    finished, so nothing was resumed.) The streams decode in one batch, so all are mid-way."""
    results: dict[int, tuple[list[int], object]] = {}
    signalled = False

    async def one(index: int, prompt: list[int]) -> None:
        nonlocal signalled
        done = None
        session = rt.complete(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        async with session:
            async for event in session:
                if isinstance(event, Done):
                    done = event
                elif not signalled and len(session.completion_token_ids) >= step:
                    signalled = True
                    os.kill(rt.engine_pid, signum)
        results[index] = (list(session.completion_token_ids), done)

    async with trio.open_nursery() as nursery:
        for index, prompt in enumerate(prompts(STREAMS)):
            nursery.start_soon(one, index, prompt)
    assert signalled
    return [results[i] for i in range(STREAMS)]


async def wait_for_restarts(rt, count: int) -> None:
    """The link may notice the death after the last stream has ended: wait for it."""
    with trio.fail_after(30):
        while rt.engine_status().restarts < count or rt.engine_status().state != "ready":
            await trio.sleep(0.01)


def assert_complete_and_equal(results, reference, max_tokens: int = MAX_TOKENS) -> None:
    for index, ((tokens, done), expected) in enumerate(zip(results, reference)):
        assert done.error is None, f"stream {index} failed: {done.error}"
        assert done.finish_reason == "length", f"stream {index}: {done.finish_reason}"
        assert done.usage.completion_tokens == max_tokens
        assert tokens == expected, f"stream {index} differs from the fault-free run"


async def test_process_mode_generates_what_thread_mode_does(tiny_llama, reference):
    async with open_runtime(tiny_llama, isolation="process") as rt:
        status = rt.engine_status()
        assert status.state == "ready" and status.isolation == "process"
        assert rt.engine_pid not in (None, os.getpid())
        results = await run_all(rt, prompts(STREAMS))
        stats = await rt.stats()
        assert stats.generation_tokens == STREAMS * MAX_TOKENS
        assert rt.memory.latest is not None  # snapshots cross the boundary too
    assert_complete_and_equal(results, reference)


@pytest.mark.parametrize("seed", [11, 23])
async def test_sigkill_at_a_random_step_loses_no_stream(tiny_llama, reference, seed):
    step = random.Random(seed).randrange(10, MAX_TOKENS // 2)
    async with open_runtime(tiny_llama, isolation="process") as rt:
        first_pid = rt.engine_pid
        results = await run_all_signalled(rt, step, signal.SIGKILL)
        await wait_for_restarts(rt, 1)
        status = rt.engine_status()
        assert status.restarts == 1
        assert "SIGKILL" in status.last_exit
        assert rt.engine_pid != first_pid
        assert status.resumed_requests == STREAMS
        assert status.last_resume_s is not None and status.last_resume_s > 0
    assert_complete_and_equal(results, reference)


@pytest.mark.parametrize("seed", [5])
async def test_native_abort_at_a_random_step_loses_no_stream(tiny_llama, reference, seed):
    step = random.Random(seed).randrange(10, MAX_TOKENS // 2)
    async with open_runtime(tiny_llama, isolation="process") as rt:
        await rt.inject_fault(kind="abort", at_step=step)
        results = await run_all(rt, prompts(STREAMS))
        status = rt.engine_status()
        assert status.restarts == 1
        assert "SIGABRT" in status.last_exit
    assert_complete_and_equal(results, reference)


async def test_a_request_that_crashes_every_engine_is_failed_and_the_others_complete(tiny_llama):
    poison_token = 2  # only the poison's prompt holds it (the others' ids are >= 5)
    others = prompts(8)
    async with open_runtime(tiny_llama) as rt:
        expected = [tokens for tokens, _ in await run_all(rt, others, max_tokens=OTHERS_TOKENS)]
    async with open_runtime(tiny_llama, isolation="process") as rt:
        await rt.inject_fault(kind="abort", prompt_token=poison_token, sticky=True)
        outcome: dict[str, object] = {}

        async def good():
            outcome["good"] = await run_all(rt, others, max_tokens=OTHERS_TOKENS)

        async def poison():
            session = rt.complete([7, poison_token, 9, 10], max_tokens=OTHERS_TOKENS, ignore_eos=True)
            outcome["poison"] = (await session.collect())[2]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(good)
            await trio.sleep(0.05)  # the others are running when the poison arrives
            nursery.start_soon(poison)
        await wait_for_restarts(rt, 2)  # the engine after the last death may still be starting
        status = rt.engine_status()
        done = outcome["poison"]
        assert done.finish_reason == "error"
        assert done.error_type == CRASH_LOOP_ERROR_TYPE
        assert "not retried" in done.error
        assert status.crash_loop_failures == 1
        # K deaths to be a suspect (the first may already find it alone), K alone on probation.
        assert 2 <= status.restarts <= 2 * POISON_DEATHS
        assert status.state == "ready"
        # The engine serves normally afterwards.
        again = await run_all(rt, others[:2], max_tokens=OTHERS_TOKENS)
    for index, ((tokens, done), want) in enumerate(zip(outcome["good"], expected)):
        assert done.error is None, f"request {index}: {done.error}"
        assert tokens == want
    assert [t for t, _ in again] == expected[:2]


async def test_a_frozen_engine_is_detected_by_its_heartbeat_and_replaced(tiny_llama, reference):
    async with open_runtime(tiny_llama, isolation="process", engine_heartbeat_timeout_s=2.0) as rt:
        results = await run_all_signalled(rt, 30, signal.SIGSTOP)
        await wait_for_restarts(rt, 1)
        status = rt.engine_status()
        assert status.restarts == 1
        assert "heartbeat" in status.last_exit
    assert_complete_and_equal(results, reference)


async def wait_for_new_engine(rt, old_pid: int, *, starting: bool) -> int:
    """The pid of the engine after `old_pid`: as soon as its process exists (`starting`), or
    once it is ready."""
    with trio.fail_after(120):
        while True:
            if starting and rt.engine.link.starting_pid not in (None, old_pid):
                return rt.engine.link.starting_pid
            # Ready already (a start faster than this loop looks): that one, then.
            if rt.engine_pid not in (None, old_pid) and rt.engine_status().state == "ready":
                return rt.engine_pid
            await trio.sleep(0.001)


async def wait_for_tokens(results: dict, count: int) -> None:
    """Until the streams have received `count` more tokens in all (counted by events)."""
    start = sum(len(tokens) for tokens in results.values())
    with trio.fail_after(120):
        while sum(len(tokens) for tokens in results.values()) < start + count:
            await trio.sleep(0.001)


async def run_all_observed(rt, batch, results: dict, outcome: dict, max_tokens: int = MAX_TOKENS):
    """`run_all`, with each stream's tokens visible in `results` as they arrive."""

    async def one(index: int, prompt: list[int]) -> None:
        results[index] = tokens = []
        done = None
        async with rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True) as session:
            async for event in session:
                tokens[:] = session.completion_token_ids
                if isinstance(event, Done):
                    done = event
        outcome[index] = (list(session.completion_token_ids), done)

    async with trio.open_nursery() as nursery:
        for index, prompt in enumerate(batch):
            nursery.start_soon(one, index, prompt)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
async def test_a_kill_while_the_replacement_engine_starts_is_one_more_death(tiny_llama, reference, signum):
    """Issue #15 (1): the second kill, as soon as the new engine process exists, took the
    whole front down (its ConnectionLost came wrapped in an exception group)."""
    async with open_runtime(tiny_llama, isolation="process") as rt:
        results, outcome = {}, {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_all_observed, rt, prompts(STREAMS), results, outcome)
            await wait_for_tokens(results, 3 * STREAMS)
            first = rt.engine_pid
            os.kill(first, signal.SIGKILL)
            starting = await wait_for_new_engine(rt, first, starting=True)
            os.kill(starting, signum)
        await wait_for_restarts(rt, 2)
        status = rt.engine_status()
        assert status.restarts == 2 and status.state == "ready"
        assert "did not start" in status.last_exit
    assert_complete_and_equal([outcome[i] for i in range(STREAMS)], reference)


async def test_kills_as_soon_as_the_engine_is_ready_fail_no_stream(tiny_llama, reference):
    """Issue #15 (2): three SIGKILLs, the last two the moment a new engine said ready, with
    16 streams in flight: requests sent to an engine that had not yet run them were taken
    for poison and one was failed. Only a death inside a step counts against a request."""
    async with open_runtime(tiny_llama, isolation="process") as rt:
        results, outcome = {}, {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_all_observed, rt, prompts(STREAMS), results, outcome)
            await wait_for_tokens(results, 2 * STREAMS)
            pid = rt.engine_pid
            os.kill(pid, signal.SIGKILL)
            for _ in range(2):
                pid = await wait_for_new_engine(rt, pid, starting=False)
                os.kill(pid, signal.SIGKILL)
        await wait_for_restarts(rt, 3)
        assert rt.engine_status().crash_loop_failures == 0
    assert_complete_and_equal([outcome[i] for i in range(STREAMS)], reference)


async def test_too_many_deaths_fail_the_engine_honestly(tiny_llama):
    async with open_runtime(tiny_llama, isolation="process", engine_max_restarts=1) as rt:
        for _ in range(2):
            pid = rt.engine_pid
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(60):
                while rt.engine_pid in (pid, None) and rt.engine_status().state != "failed":
                    await trio.sleep(0.01)
        status = rt.engine_status()
        assert status.state == "failed"
        assert "died 2 times" in status.reason
        with pytest.raises(EngineUnavailable):
            await rt.complete([5, 6, 7], max_tokens=4).start()


async def test_a_model_that_cannot_load_is_reported_not_retried(tmp_path, tiny_llama):
    from omlx_actors.engine.executor import EngineLoadFailed

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_llama.iterdir():
        if item.suffix != ".safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BaseException) as caught:
        async with open_runtime(broken, isolation="process"):
            pass
    assert caught.group_contains(EngineLoadFailed) if isinstance(caught.value, BaseExceptionGroup) \
        else isinstance(caught.value, EngineLoadFailed)


async def test_drain_finishes_running_requests_then_the_engine_process_exits(tiny_llama):
    async with open_runtime(tiny_llama, isolation="process", shutdown_mode="drain") as rt:
        pid = rt.engine_pid
        session = rt.complete([5, 6, 7, 8], max_tokens=60, ignore_eos=True)
        await session.start()
    # The runtime's exit drained the engine: the request finished, then the process ended.
    _, _, done = await session.collect()
    assert done.finish_reason == "length" and done.usage.completion_tokens == 60
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_disk_fault_reaches_the_ssd_writer_in_the_engine_process(tiny_llama, tmp_path):
    """`inject_disk_fault` crosses the boundary: the writer in the engine process fails its
    block writes with ENOSPC while serving goes on untouched."""
    async with open_runtime(tiny_llama, isolation="process", ssd_cache_dir=str(tmp_path),
                            block_size=16) as rt:
        await rt.inject_disk_fault("full", writes=1_000_000)
        results = await run_all(rt, prompts(4), max_tokens=8)
        await rt.flush_ssd_cache()
        stats = await rt.ssd_stats()
    assert all(len(tokens) == 8 for tokens, _ in results)
    assert stats.write_errors > 0 and stats.files == 0
    assert list(tmp_path.rglob("*.safetensors")) == []


# ------------------------------------------------------------------------------------------
# Issue #15's done-when: 20 kills at random moments, during starts as well.

STORM_KILLS = 20
STORM_TOKENS = 400  # enough that every stream is still running at the last kill


@pytest.fixture(scope="module")
def storm_reference(tiny_llama):
    async def main():
        async with open_runtime(tiny_llama) as rt:
            return await run_all(rt, prompts(STREAMS), max_tokens=STORM_TOKENS)

    return [tokens for tokens, _ in trio.run(main)]


@pytest.fixture
def no_core_dumps():
    """A SIGSEGV'd engine must not write a core file (children inherit the limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


@pytest.mark.parametrize("seed", [15])
async def test_twenty_kills_at_random_moments_lose_no_stream(tiny_llama, storm_reference, seed,
                                                            no_core_dumps):
    """Each kill is a SIGKILL or a SIGSEGV, at a moment chosen by events: after a random
    number of tokens delivered since the engine became ready, the moment it becomes ready,
    or the moment the replacement's process exists (it is still starting). No request
    crashes anything here, so every stream must finish, equal to the fault-free run."""
    rng = random.Random(seed)
    plan = []
    for index in range(STORM_KILLS):
        moment = "tokens" if index == 0 else rng.choice(["tokens", "tokens", "ready", "starting"])
        plan.append((moment, rng.randint(1, 2 * STREAMS), rng.choice([signal.SIGKILL, signal.SIGSEGV])))
    async with open_runtime(tiny_llama, isolation="process", engine_max_restarts=100) as rt:
        results, outcome = {}, {}
        kills = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_all_observed, rt, prompts(STREAMS), results, outcome, STORM_TOKENS)
            last = None
            for moment, tokens, signum in plan:
                if moment == "starting":
                    pid = await wait_for_new_engine(rt, last, starting=True)
                else:
                    pid = await wait_for_new_engine(rt, last, starting=False)
                    if moment == "tokens":
                        await wait_for_tokens(results, tokens)
                os.kill(pid, signum)
                kills.append((moment, signum.name))
                last = pid
            assert len(outcome) == 0, "a stream ended before the last kill: the storm was short"
        await wait_for_restarts(rt, STORM_KILLS)
        status = rt.engine_status()
        assert status.restarts == STORM_KILLS, kills
        assert status.crash_loop_failures == 0, kills
    assert_complete_and_equal([outcome[i] for i in range(STREAMS)], storm_reference,
                              max_tokens=STORM_TOKENS)

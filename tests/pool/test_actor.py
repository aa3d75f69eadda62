"""The pool actor with real tiny models (engines on MLX threads of this process): loads on
demand, shared loads, LRU eviction of idle models, leases held by requests, idle TTL,
refusals."""

from __future__ import annotations

import pytest
import trio

from omlx_actors.config import ConfigError
from omlx_actors.pool.api import open_pool
from omlx_actors.pool.catalog import PoolModelSpec, footprint_bytes
from omlx_actors.refusals import ModelNotFound, RequestTooLarge
from omlx_actors.config import RuntimeConfig
from omlx_actors.wiring import open_runtime

HELLO = [{"role": "user", "content": "Hello there"}]


def sizes(*paths) -> list[int]:
    return [footprint_bytes(p, RuntimeConfig()) for p in paths]


async def greedy_text(events) -> str:
    parts = []
    async for event in events:
        if hasattr(event, "text"):
            parts.append(event.text)
    return "".join(parts)


async def states(pool) -> dict[str, str]:
    return {v.name: v.state for v in (await pool.snapshot()).models}


async def test_a_load_that_does_not_fit_evicts_the_idle_model_and_outputs_match(
        tiny_llama, tiny_hybrid):
    async with open_runtime(tiny_hybrid) as rt:
        expected = await greedy_text(rt.chat(HELLO, max_tokens=12, ignore_eos=True))
    a, b = sizes(tiny_llama, tiny_hybrid)
    async with open_pool([tiny_llama, tiny_hybrid], budget_bytes=max(a, b)) as pool:
        assert await states(pool) == {"tiny-llama": "unloaded", "tiny-hybrid": "unloaded"}
        await greedy_text(pool.chat("tiny-llama", HELLO, max_tokens=4))
        assert (await states(pool))["tiny-llama"] == "loaded"
        got = await greedy_text(pool.chat("tiny-hybrid", HELLO, max_tokens=12, ignore_eos=True))
        assert got == expected
        snap = await pool.snapshot()
        views = {v.name: v for v in snap.models}
        assert views["tiny-llama"].state == "unloaded" and views["tiny-llama"].evictions == 1
        assert views["tiny-hybrid"].state == "loaded" and views["tiny-hybrid"].loads == 1
        assert snap.resident_bytes == b and snap.load_seconds.count == 2
        assert snap.unload_seconds.count == 1


async def test_concurrent_requests_for_an_unloaded_model_share_one_load(tiny_llama):
    async with open_pool([tiny_llama]) as pool:
        texts = []

        async def one():
            texts.append(await greedy_text(pool.chat("tiny-llama", HELLO, max_tokens=6)))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        assert len(set(texts)) == 1 and len(texts) == 4
        (view,) = (await pool.snapshot()).models
        assert view.loads == 1 and view.inflight == 0


async def test_a_model_with_a_request_in_flight_is_not_evicted(tiny_llama, tiny_hybrid):
    a, b = sizes(tiny_llama, tiny_hybrid)
    async with open_pool([tiny_llama, tiny_hybrid], budget_bytes=max(a, b)) as pool:
        lease = await pool.acquire("tiny-llama")
        waiter_done = trio.Event()

        async def wants_hybrid():
            async with pool.lease("tiny-hybrid"):
                waiter_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wants_hybrid)
            await trio.sleep(0.5)
            assert not waiter_done.is_set()
            assert await states(pool) == {"tiny-llama": "loaded", "tiny-hybrid": "unloaded"}
            pool.release_nowait(lease)
        assert waiter_done.is_set()
        assert (await states(pool))["tiny-llama"] == "unloaded"


async def test_a_caller_cancelled_while_waiting_for_a_load_leaves_no_lease(tiny_llama):
    async with open_pool([tiny_llama]) as pool:
        with trio.move_on_after(0.01):
            await pool.acquire("tiny-llama")
        with trio.fail_after(60):
            while (await states(pool))["tiny-llama"] != "loaded":
                await trio.sleep(0.05)
        await trio.sleep(0.1)
        (view,) = (await pool.snapshot()).models
        assert view.inflight == 0


async def test_idle_models_unload_after_the_ttl_and_pinned_ones_stay(tiny_llama, tiny_hybrid):
    async with open_pool([tiny_llama, tiny_hybrid], idle_ttl_s=0.4, pins=["tiny-hybrid"]) as pool:
        assert (await states(pool))["tiny-hybrid"] == "loaded"  # pinned: loaded at start
        await greedy_text(pool.chat("tiny-llama", HELLO, max_tokens=2))
        with trio.fail_after(30):
            while (await states(pool))["tiny-llama"] != "unloaded":
                await trio.sleep(0.05)
        assert (await states(pool))["tiny-hybrid"] == "loaded"


async def test_a_model_that_can_never_fit_is_refused(tiny_llama, tiny_hybrid):
    a, b = sizes(tiny_llama, tiny_hybrid)
    with pytest.raises(ConfigError, match="can never be loaded"):
        async with open_pool([tiny_llama, tiny_hybrid], budget_bytes=min(a, b)):
            pass
    found = PoolModelSpec(source=str(max((a, tiny_llama), (b, tiny_hybrid))[1]), explicit=False)
    small = min((a, tiny_llama), (b, tiny_hybrid))[1]
    async with open_pool([small, found], budget_bytes=min(a, b)) as pool:
        with pytest.raises(RequestTooLarge, match="can never be loaded") as refused:
            await pool.acquire(found.source)
        assert refused.value.status == 413
        with pytest.raises(ModelNotFound, match="available: "):
            await pool.acquire("no-such-model")


async def test_a_models_dir_serves_each_model_directory_in_it(tiny_llama, tiny_hybrid, tmp_path):
    import shutil

    from omlx_actors.pool.catalog import pool_specs

    root = tmp_path / "models"
    shutil.copytree(tiny_llama, root / "fast")
    shutil.copytree(tiny_hybrid, root / "hybrid")
    (root / "notes.txt").write_text("not a model")
    (root / "empty").mkdir()
    specs = pool_specs([], models_dir=root)
    assert [(s.source, s.explicit) for s in specs] == [
        (str(root / "fast"), False), (str(root / "hybrid"), False)]
    async with open_pool(specs) as pool:
        assert pool.names == ["fast", "hybrid"]
        assert await greedy_text(pool.chat("hybrid", HELLO, max_tokens=3))


async def test_requests_waiting_for_loads_are_bounded(tiny_llama, monkeypatch):
    from omlx_actors.pool import actor  # the constant the actor reads
    from omlx_actors.refusals import QueueFull

    monkeypatch.setattr(actor, "MAX_WAITING_FOR_LOAD", 2)
    async with open_pool([tiny_llama]) as pool:
        outcomes = []

        async def one():
            try:
                async with pool.lease("tiny-llama"):
                    outcomes.append("leased")
            except QueueFull as exc:
                outcomes.append(exc.status)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
                await trio.sleep(0)
        assert sorted(outcomes, key=str) == [429, "leased", "leased"]


async def test_a_load_kept_out_by_a_busy_model_drains_it_after_a_while(tiny_llama, tiny_hybrid):
    a, b = sizes(tiny_llama, tiny_hybrid)
    async with open_pool([tiny_llama, tiny_hybrid], budget_bytes=max(a, b),
                         drain_after_s=0.5) as pool:
        busy = await pool.acquire("tiny-llama")
        hybrid = trio.Event()

        async def wants_hybrid():
            async with pool.lease("tiny-hybrid"):
                hybrid.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wants_hybrid)
            await trio.sleep(1.5)  # past drain_after_s (the tick re-plans every second)
            with trio.move_on_after(0.3) as late:
                await pool.acquire("tiny-llama")  # draining: no new lease on it
            assert late.cancelled_caught and not hybrid.is_set()
            pool.release_nowait(busy)  # its last request ends: it is evicted for the load
        assert hybrid.is_set()
        assert (await states(pool))["tiny-llama"] == "unloaded"


async def test_each_model_gets_its_own_ssd_namespace(tiny_llama, tiny_hybrid, tmp_path):
    async with open_pool([tiny_llama, tiny_hybrid], ssd_cache_dir=tmp_path / "kv") as pool:
        for name in ("tiny-llama", "tiny-hybrid"):
            async with pool.lease(name) as runtime:
                assert runtime.config.ssd_cache_dir == tmp_path / "kv" / name
                assert runtime.has_ssd


async def test_a_model_that_fails_to_load_is_a_503_and_is_tried_again(tiny_llama, tmp_path):
    import shutil

    from omlx_actors.refusals import EngineUnavailable

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    async with open_pool([tiny_llama, broken]) as pool:
        for _ in range(2):  # a failed load is not sticky: the next request tries again
            with pytest.raises(EngineUnavailable, match="'broken' failed to load") as failed:
                await pool.acquire("broken")
            assert failed.value.status == 503
        view = next(v for v in (await pool.snapshot()).models if v.name == "broken")
        assert view.state == "failed" and view.error
        assert (await pool.snapshot()).load_failures == 2
        assert await greedy_text(pool.chat("tiny-llama", HELLO, max_tokens=2))

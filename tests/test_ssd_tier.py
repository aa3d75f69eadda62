"""The SSD tier of the prefix cache with the real engine and a real directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import trio

from omlx_actors.wiring import open_runtime

BLOCK = 16


def _prompt(n: int, seed: int = 0) -> list[int]:
    return [(i * 31 + seed * 7) % 400 + 10 for i in range(n)]


async def _generate(rt, prompt, max_tokens=12):
    session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
    _, _, done = await session.collect()
    return session.completion_token_ids, done


async def _restart_round_trip(model, tmp_path):
    prompt = _prompt(20 * BLOCK + 5)
    async with open_runtime(model, prefix_cache_bytes=0) as rt:
        cold, _ = await _generate(rt, prompt)
    async with open_runtime(model, block_size=BLOCK, ssd_cache_dir=tmp_path) as rt:
        first, done = await _generate(rt, prompt)
        assert done.usage.cached_tokens == 0
    async with open_runtime(model, block_size=BLOCK, ssd_cache_dir=tmp_path) as rt:
        warm, done = await _generate(rt, prompt)
        stats = await rt.ssd_stats()
    assert first == cold
    assert warm == cold
    assert done.usage.cached_tokens == 20 * BLOCK
    assert stats.load_hits == 20 and stats.corrupt_discarded == 0


async def test_llama_prefix_is_served_from_disk_after_a_restart_with_identical_output(tiny_llama, tmp_path):
    await _restart_round_trip(tiny_llama, tmp_path)


async def test_hybrid_prefix_snapshots_survive_a_restart_with_identical_output(tiny_hybrid, tmp_path):
    await _restart_round_trip(tiny_hybrid, tmp_path)


async def test_cleanup_of_a_scope_removes_its_files_and_later_saves_work(tiny_llama, tmp_path):
    async with open_runtime(tiny_llama, block_size=BLOCK, ssd_cache_dir=tmp_path) as rt:
        await rt.complete(_prompt(6 * BLOCK, seed=1), max_tokens=2, ignore_eos=True,
                          cache_scope="agent-1").collect()
        await rt.complete(_prompt(6 * BLOCK, seed=2), max_tokens=2, ignore_eos=True).collect()
        await trio.sleep(0.1)  # the last step's blocks reach the writer
        await rt.flush_ssd_cache()
        await rt.cleanup_cache_scope("agent-1")
        files = {p.name for p in tmp_path.rglob("*.safetensors")}
        stats = await rt.ssd_stats()
        assert stats.files == len(files) == 6  # only the unscoped request's blocks are left
        await rt.complete(_prompt(6 * BLOCK, seed=3), max_tokens=2, ignore_eos=True,
                          cache_scope="agent-1").collect()
    assert len(list(tmp_path.rglob("*.safetensors"))) == 12
    assert not list(tmp_path.rglob("*.tmp*"))


KILL_SCRIPT = """
import sys, trio
import omlx_actors.mlx_loader
from omlx_actors.wiring import open_runtime

async def main():
    async with open_runtime(sys.argv[1], block_size=16, ssd_cache_dir=sys.argv[2]) as rt:
        print("ready", flush=True)
        for i in range(400):
            prompt = [(j * 31 + i * 7) % 400 + 10 for j in range(8 * 16 + 3)]
            await rt.complete(prompt, max_tokens=2, ignore_eos=True).collect()
trio.run(main)
"""


def test_a_process_killed_while_writing_leaves_only_valid_blocks(tiny_llama, tmp_path):
    """SIGKILL at random points while blocks are written; after a restart every block that
    is served passes its checksum and greedy outputs equal a cold run."""
    script = tmp_path / "writer_load.py"
    script.write_text(KILL_SCRIPT)
    ssd = tmp_path / "ssd"
    for delay in (0.3, 0.9, 1.6):
        proc = subprocess.Popen([sys.executable, str(script), str(tiny_llama), str(ssd)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(ssd.rglob("*.safetensors"))

    async def check():
        prompts = [[(j * 31 + i * 7) % 400 + 10 for j in range(8 * 16 + 3)] for i in range(12)]
        async with open_runtime(tiny_llama, prefix_cache_bytes=0) as rt:
            cold = [(await _generate(rt, p, 6))[0] for p in prompts]
        async with open_runtime(tiny_llama, block_size=BLOCK, ssd_cache_dir=ssd) as rt:
            warm = []
            hits = 0
            for p in prompts:
                tokens, done = await _generate(rt, p, 6)
                warm.append(tokens)
                hits += done.usage.cached_tokens > 0
            stats = await rt.ssd_stats()
        assert warm == cold
        assert hits > 0
        assert stats.corrupt_discarded == 0

    trio.run(check)
    assert not list(ssd.rglob("*.tmp*"))


async def test_a_prompt_of_many_small_blocks_reaches_the_disk_whole(tiny_llama, tmp_path):
    """The engine's forward queue to the writer is bounded in tokens, not blocks: a prompt
    of 48 blocks of 16 tokens ends its prefill with all 48 at once, and every one is saved
    (a bound of 32 blocks, tuned for 256-token blocks, dropped a third of them)."""
    prompt = _prompt(48 * BLOCK + 3, seed=5)
    async with open_runtime(tiny_llama, block_size=BLOCK, ssd_cache_dir=tmp_path) as rt:
        await _generate(rt, prompt, max_tokens=2)
        await trio.sleep(0.1)  # the last step's blocks reach the writer
        await rt.flush_ssd_cache()
        assert (await rt.stats()).ssd_saves_dropped == 0
    async with open_runtime(tiny_llama, block_size=BLOCK, ssd_cache_dir=tmp_path) as rt:
        _, done = await _generate(rt, prompt, max_tokens=2)
    assert done.usage.cached_tokens == 48 * BLOCK

"""Where MLX runs: only on the executor's thread, never blocking the trio loop."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

import omlx_actors.mlx_loader  # noqa: F401
from omlx_actors.wiring import open_runtime
from omlx_actors.engine.mlx_thread import is_mlx_thread

MLX_ENTRY_POINTS = ("eval", "async_eval", "clear_cache", "synchronize", "new_stream")


@pytest.fixture
def mlx_call_log(monkeypatch):
    """Wrap MLX's entry points and the llama model's forward pass to record the calling
    thread (a wrapper at the boundary: the calls still go to the real MLX)."""
    import mlx.core as mx
    from mlx_lm.models import llama

    log: list[tuple[str, int]] = []
    for name in MLX_ENTRY_POINTS:
        real = getattr(mx, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            log.append((_name, threading.get_ident()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(mx, name, wrapper)
    real_call = llama.Model.__call__

    def model_call(self, *args, **kwargs):
        log.append(("model", threading.get_ident()))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(llama.Model, "__call__", model_call)
    return log


async def test_no_mlx_call_happens_off_the_executor_thread(tiny_llama, mlx_call_log):
    async with open_runtime(tiny_llama) as rt:
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(
                    lambda i=i: rt.chat([{"role": "user", "content": f"hi {i}"}], max_tokens=12,
                                        logprobs=True, top_logprobs=3).collect()
                )
        cancelled = rt.complete("cancel me", max_tokens=100, ignore_eos=True)
        async with cancelled:
            async for _ in cancelled:
                break
    names = {name for name, _ in mlx_call_log}
    assert {"model", "eval", "clear_cache", "synchronize", "new_stream"} <= names
    off_thread = [(name, ident) for name, ident in mlx_call_log if not is_mlx_thread(ident)]
    assert off_thread == []


async def test_buffer_cache_is_cleared_only_after_the_stream_is_synchronized(tiny_llama, mlx_call_log):
    async with open_runtime(tiny_llama) as rt:
        for i in range(3):
            await rt.complete(f"prompt {i}", max_tokens=6, ignore_eos=True).collect()
        stats = await rt.stats()
    assert stats.buffer_cache_clears >= 1
    calls = [name for name, _ in mlx_call_log if name != "model"]
    for i, name in enumerate(calls):
        if name == "clear_cache":
            # Ours follow mx.synchronize; mlx-lm's own (inside prefill) follow a blocking eval.
            assert calls[i - 1] in ("synchronize", "eval"), calls[max(0, i - 4) : i + 1]
    assert "synchronize" in calls


@pytest.fixture(scope="module")
def heavier_model(model_root):
    """A model slow enough on this CPU that one prefill chunk takes a while."""
    from omlx_actors.models import build_demo_model, get_spec

    spec = get_spec("tiny-llama").with_(
        name="prefill-heavy", hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=4096,
    )
    return build_demo_model(spec, model_root / "prefill-heavy", overwrite=True)


async def test_event_loop_heartbeat_stays_prompt_while_decoding(heavier_model):
    async with open_runtime(heavier_model) as rt:
        lags: list[float] = []
        async with trio.open_nursery() as nursery:

            async def decode():
                async with trio.open_nursery() as inner:
                    for i in range(8):
                        inner.start_soon(lambda i=i: rt.complete(f"decode {i}", max_tokens=60,
                                                                 ignore_eos=True).collect())
                nursery.cancel_scope.cancel()

            nursery.start_soon(decode)
            while True:
                start = time.monotonic()
                await trio.sleep(0.005)
                lags.append(time.monotonic() - start - 0.005)
    lags.sort()
    p99 = lags[int(0.99 * (len(lags) - 1))]
    assert len(lags) > 50
    assert p99 < 0.025, lags[-10:]


async def test_event_loop_answers_a_ping_within_50ms_while_a_long_prefill_runs(heavier_model):
    async with open_runtime(heavier_model, prefill_step_size=4096) as rt:
        prompt = [(i * 37) % 500 + 5 for i in range(3000)]
        session = rt.complete(prompt, max_tokens=1, ignore_eos=True)
        latencies: list[float] = []
        async with trio.open_nursery() as nursery:

            async def prefill():
                await session.collect()
                nursery.cancel_scope.cancel()

            nursery.start_soon(prefill)
            await trio.sleep(0.05)
            t0 = time.monotonic()
            while True:
                start = time.monotonic()
                pong = await rt.ping()
                latencies.append(time.monotonic() - start)
                if pong.steps > 0 and time.monotonic() - t0 > 0.2:
                    break
                await trio.sleep(0.01)
        prefill_s = time.monotonic() - t0
    assert prefill_s > 0.3, "the prefill was too short to show anything"
    assert len(latencies) >= 10
    assert max(latencies) < 0.05, sorted(latencies)[-5:]


CLEAN_EXIT_SCRIPT = """
import sys, trio
import omlx_actors.mlx_loader
from omlx_actors.wiring import open_runtime

async def main():
    async with open_runtime(sys.argv[1]) as rt:
        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(lambda i=i: rt.complete(f"exit test {i}", max_tokens=8).collect())
trio.run(main)
print("clean")
"""


def test_clean_shutdown_exits_zero_every_time(tiny_llama: Path, tmp_path: Path):
    script = tmp_path / "exit_check.py"
    script.write_text(CLEAN_EXIT_SCRIPT)
    codes = []
    for _ in range(12):
        proc = subprocess.run([sys.executable, str(script), str(tiny_llama)],
                              capture_output=True, text=True, timeout=120)
        codes.append((proc.returncode, proc.stdout.strip(), proc.stderr[-300:]))
    assert [c[0] for c in codes] == [0] * 12, codes
    assert all(c[1] == "clean" for c in codes)

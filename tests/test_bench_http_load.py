"""bench-servers' HTTP client in its own process (#18): `python -m omlx_actors.bench.http_load`
against a real server on loopback over the tiny model, and the prompts of equal shapes that
every warm-up and repeat runs on."""

from __future__ import annotations

import json
import sys

import trio

from omlx_actors.bench.common import make_text_prompts, texts_of_lengths
from omlx_actors.bench.http_load import HttpJob, run_http_load
from omlx_actors.config import RuntimeConfig
from omlx_actors.server import open_server

MAX_TOKENS = 6
PROMPTS = ["river stone light table", "garden window music", "paper engine forest cloud number"]


def check_timings(result: dict, requests: int) -> None:
    """TTFT and ITL present, positive and within the run."""
    assert len(result["ttft_s"]) == requests
    assert all(0 < t < result["wall_s"] for t in result["ttft_s"])
    # One gap per pair of consecutive text chunks; a chunk carries one token or more.
    assert 0 < len(result["itl_s"]) <= requests * (MAX_TOKENS - 1)
    assert all(0 <= g < result["wall_s"] for g in result["itl_s"])


async def test_http_load_module_streams_a_job_and_prints_its_timings(tiny_llama):
    async with open_server(RuntimeConfig(model=str(tiny_llama))) as server:
        job = {"url": server.url, "model": "tiny-llama", "prompts": PROMPTS,
               "max_tokens": MAX_TOKENS}
        proc = await trio.run_process(
            [sys.executable, "-m", "omlx_actors.bench.http_load", json.dumps(job)],
            capture_stdout=True)
    result = json.loads(proc.stdout)
    assert (result["tokens"], result["errors"]) == (len(PROMPTS) * MAX_TOKENS, 0)
    check_timings(result, len(PROMPTS))
    assert 0 < result["cpu_s"]


async def test_run_http_load_splits_the_streams_over_client_processes(tiny_llama):
    async with open_server(RuntimeConfig(model=str(tiny_llama))) as server:
        job = HttpJob(url=server.url, model="tiny-llama", prompts=[*PROMPTS, "silver market"],
                      max_tokens=MAX_TOKENS)
        result = await trio.to_thread.run_sync(run_http_load, "c", job, 2)
    assert (result.concurrency, result.tokens, result.errors) == (4, 4 * MAX_TOKENS, 0)
    check_timings({"ttft_s": result.ttft_s, "itl_s": result.itl_s, "wall_s": result.wall_s}, 4)
    assert result.itl_p50 <= result.itl_p99 and result.client_cpu_s > 0


def test_texts_of_lengths_match_the_lengths_with_other_words():
    def encode(text: str) -> list[str]:
        return list(text)  # one "token" per character: lengths vary from text to text

    first = make_text_prompts(4, 8, offset=3)
    again = texts_of_lengths(encode, [len(t) for t in first], 8, offset=10_003)
    assert [len(t) for t in again] == [len(t) for t in first]
    assert all(a != b and len(a.split()) == 8 for a, b in zip(again, first))

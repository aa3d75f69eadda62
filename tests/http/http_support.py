"""Helpers of the HTTP tests: a real server on a loopback ephemeral port, real clients."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.http.settings import HttpSettings
from omlx_actors.server import RunningServer, open_server

MODEL = "tiny-llama"  # the model directory's name is the served model id


@asynccontextmanager
async def serve(model: Path, settings: HttpSettings | None = None, **config: Any):
    """A server for `model` with RuntimeConfig overrides, shut down on exit."""
    async with open_server(RuntimeConfig(model=str(model), **config), settings) as server:
        yield server


def openai_client(server: RunningServer, **kwargs) -> openai.AsyncOpenAI:
    kwargs.setdefault("api_key", "unused")
    return openai.AsyncOpenAI(base_url=server.url + "/v1", max_retries=0, **kwargs)


def anthropic_client(server: RunningServer, **kwargs) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("api_key", "unused")
    return anthropic.AsyncAnthropic(base_url=server.url, max_retries=0, **kwargs)


def http_client(server: RunningServer, **kwargs) -> httpx.AsyncClient:
    kwargs.setdefault("timeout", 30.0)
    return httpx.AsyncClient(base_url=server.url, **kwargs)


async def wait_until(predicate: Callable[[], Any], timeout: float = 1.0, interval: float = 0.01) -> float:
    """Poll a (sync or async) predicate until true; return the seconds it took."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return trio.current_time() - start
            await trio.sleep(interval)


async def engine_idle(server: RunningServer) -> bool:
    stats = await server.runtime.stats()
    return stats.running == 0 and stats.waiting == 0 and len(server.runtime.dispatcher) == 0


def chat_body(**overrides: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
    body.update(overrides)
    return body


def sse_payloads(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]

"""Chat streams run together, with the engine process SIGKILLed mid-way on demand: what the
structured-output resume tests (the demo model's and the real model's) share."""

from __future__ import annotations

import os
import signal

import trio


async def run_chats(rt, requests: list[tuple[list[dict], object]], *, max_tokens: int,
                    kill_after_tokens: int | None = None, kill_within_s: float = 60.0,
                    poll_s: float = 0.002) -> list[tuple[str, object]]:
    """Stream each `(messages, structured)` through `rt.chat`, all at once. With
    `kill_after_tokens`, SIGKILL the engine process once every stream has delivered that
    many text events (failing after `kill_within_s`). Returns each request's text and final
    event, in the order of `requests`."""
    results: dict[int, tuple[str, object]] = {}
    delivered = [0] * len(requests)

    async def one(i: int, messages: list[dict], structured) -> None:
        session = rt.chat(messages, max_tokens=max_tokens, structured=structured)
        text = []
        async with session:
            async for event in session:
                if hasattr(event, "text"):
                    text.append(event.text)
                    delivered[i] += 1
                elif hasattr(event, "finish_reason"):
                    results[i] = ("".join(text), event)

    async with trio.open_nursery() as nursery:
        for i, (messages, structured) in enumerate(requests):
            nursery.start_soon(one, i, messages, structured)
        if kill_after_tokens is not None:
            with trio.fail_after(kill_within_s):
                while min(delivered) < kill_after_tokens:
                    await trio.sleep(poll_s)
            os.kill(rt.engine_pid, signal.SIGKILL)
    return [results[i] for i in range(len(requests))]

"""Streams under stress: clients that leave (mid-stream, mid-prefill, while waiting for a
non-streamed answer) free their request in the engine promptly; keep-alives flow during a
long prefill; 50 concurrent streams with 10 leavers finish exactly. And the SSE body on its
own: events ready together leave in one write; a session that ends without its final event
ends the stream with an error."""

from __future__ import annotations

import json

import httpx
import trio
from http_support import MODEL, chat_body, engine_idle, http_client, serve, sse_payloads, wait_until

from omlx_actors.wiring import open_runtime
from omlx_actors.engine.messages import FinishReason
from omlx_actors.http.openai_routes import ChatStream
from omlx_actors.http.settings import HttpSettings
from omlx_actors.http.sse import sse_body


def finished(server, request_id: str | None = None):
    """The engine's Finished event of `request_id` (of the only request, if None)."""
    matches = [f for f in server.runtime.dispatcher.recent_finished
               if request_id is None or f.request_id == request_id]
    assert len(matches) == 1, matches
    return matches[0]


async def freed_within(server, seconds: float, request_id: str | None = None) -> float:
    """Wait until the engine has nothing running or queued and has reported the request
    finished; return how long that took."""

    async def freed() -> bool:
        reported = [f for f in server.runtime.dispatcher.recent_finished
                    if request_id is None or f.request_id == request_id]
        return bool(reported) and await engine_idle(server)

    return await wait_until(freed, timeout=seconds)


async def test_disconnect_mid_stream_aborts_the_request_within_a_second(server):
    async with http_client(server) as http:
        body = chat_body(stream=True, max_tokens=1500, ignore_eos=True)
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            payloads = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    payloads.append(json.loads(line[6:]))
                if len(payloads) == 6:
                    break
    took = await freed_within(server, 1.0, payloads[0]["id"])
    assert took < 1.0
    done = finished(server, payloads[0]["id"])
    assert done.reason is FinishReason.ABORT
    assert 5 <= done.completion_tokens < 1500
    assert not server.state.inflight


async def test_disconnect_mid_prefill_aborts_before_any_token(tiny_llama):
    settings = HttpSettings(keepalive_s=0.05)
    async with serve(tiny_llama, settings, prefill_step_size=2) as server:
        prompt = [(i * 7) % 500 + 5 for i in range(1900)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "stream": True, "ignore_eos": True}
        async with http_client(server) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                lines = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line == ": keep-alive":
                        break
                pong = await server.runtime.ping()
        assert sse_payloads(lines) == []  # nothing but keep-alives yet: still prefilling
        assert pong.running + pong.waiting == 1
        took = await freed_within(server, 1.0)
        assert took < 1.0
        done = finished(server)
        assert done.reason is FinishReason.ABORT
        assert done.completion_tokens == 0


async def test_keepalives_flow_during_a_long_prefill_then_tokens(tiny_llama):
    async with serve(tiny_llama, HttpSettings(keepalive_s=0.05), prefill_step_size=2) as server:
        prompt = [(i * 11) % 500 + 5 for i in range(1500)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True, "ignore_eos": True}
        async with http_client(server) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines()]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[:first_data].count(": keep-alive") >= 2
    assert sse_payloads(lines)[-1] == "[DONE]"


async def test_non_streaming_client_that_times_out_frees_its_request(server):
    async with http_client(server, timeout=httpx.Timeout(30.0, read=0.3)) as http:
        try:
            await http.post("/v1/chat/completions", json=chat_body(max_tokens=1900, ignore_eos=True))
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("the request should outlast the client's read timeout")
    took = await freed_within(server, 1.0)
    assert took < 1.0
    assert finished(server).reason is FinishReason.ABORT


async def test_fifty_streams_ten_leave_early_the_rest_are_exact(server):
    max_tokens = 40
    results: dict[int, tuple[str, int]] = {}
    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    async with http_client(server, limits=limits) as http:

        async def client(i: int) -> None:
            body = chat_body(
                stream=True, max_tokens=max_tokens, ignore_eos=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"request number {i}"}],
            )
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                payloads = []
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payloads.append(line[6:])
                    if i % 5 == 0 and len(payloads) == 3:
                        results[i] = ("left", 0)
                        return
            assert payloads[-1] == "[DONE]"
            chunks = [json.loads(p) for p in payloads[:-1]]
            reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert reasons[-1] == "length"
            results[i] = ("done", chunks[-1]["usage"]["completion_tokens"])

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(client, i)
    assert sorted(i for i, (kind, _) in results.items() if kind == "left") == list(range(0, 50, 5))
    assert {n for kind, n in results.values() if kind == "done"} == {max_tokens}
    assert sum(kind == "done" for kind, _ in results.values()) == 40
    await wait_until(
        lambda: len(server.runtime.dispatcher.recent_finished) == 50, timeout=1.0
    )
    assert await engine_idle(server)
    reasons = [f.reason for f in server.runtime.dispatcher.recent_finished]
    # A leaver's request may have finished before its abort arrived; none is left running.
    assert len(reasons) == 50
    assert reasons.count(FinishReason.LENGTH) >= 40
    assert reasons.count(FinishReason.ABORT) + reasons.count(FinishReason.LENGTH) == 50


async def _writes(session) -> list[bytes]:
    """Every write of a chat stream's SSE body for a started session."""
    encoder = ChatStream(id="chatcmpl-1", model=MODEL, created=1, include_usage=False,
                         logprobs=False, token_text=str)
    body = sse_body(session, encoder, keepalive_s=30.0, on_done=lambda done: None,
                    on_end=lambda complete, seconds: None)
    return [write async for write in body]


async def test_events_ready_together_leave_in_one_write(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        expected, _, _ = await rt.complete("coalesce", max_tokens=10, ignore_eos=True).collect()
        session = rt.complete("coalesce", max_tokens=10, ignore_eos=True)
        await session.start()
        await wait_until(lambda: len(rt.dispatcher) == 0, timeout=10)  # all of it queued
        _opening, *rest = await _writes(session)
    assert len(rest) == 1
    payloads = sse_payloads(rest[0].decode().split("\n"))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p)["choices"][0] for p in payloads[:-1]]
    assert "".join(c["delta"].get("content", "") for c in chunks) == expected
    assert len(chunks) > 2 and chunks[-1]["finish_reason"] == "length"


async def test_a_session_that_ends_without_its_final_event_ends_the_stream_with_an_error(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        session = rt.complete("cut short", max_tokens=1000, ignore_eos=True)
        await session.start()
        session.close()  # by someone else (the exchange's cleanup) while its body still runs
        _, last = await _writes(session)
    error, done = sse_payloads(last.decode().split("\n"))
    assert json.loads(error)["error"]["message"] == "the stream ended without a final event"
    assert done == "[DONE]"

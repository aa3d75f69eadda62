"""The HTTP front over an engine process: a client's stream survives the engine being
killed, /health says what the engine is doing, and /metrics counts restarts."""

from __future__ import annotations

import os
import signal

import trio
from http_support import MODEL, http_client, openai_client, serve, wait_until

PROMPT = [{"role": "user", "content": "Tell me a long story."}]


async def stream_text(client, max_tokens: int) -> tuple[str, dict]:
    parts: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(parts), usage


async def test_a_stream_survives_the_engine_being_killed(tiny_llama):
    async with serve(tiny_llama) as server:  # the fault-free reference, in-process engine
        expected, _ = await stream_text(openai_client(server), 400)
    async with serve(tiny_llama, isolation="process") as server:
        rt = server.runtime
        client = openai_client(server)
        async with http_client(server) as http:
            health = (await http.get("/health")).json()
            assert health["status"] == "ok"
            assert health["engine"]["state"] == "ready" and health["engine"]["restarts"] == 0
            outcome = {}
            first_pid = rt.engine_pid
            async with trio.open_nursery() as nursery:

                async def client_stream():
                    outcome["text"], outcome["usage"] = await stream_text(client, 400)

                nursery.start_soon(client_stream)
                await wait_until(lambda: rt.pending_requests == 1, timeout=10)
                with trio.fail_after(30):
                    while (await rt.ping()).steps < 100:
                        await trio.sleep(0.005)
                os.kill(first_pid, signal.SIGKILL)
                # While the engine restarts, /health says so (503), with the count.
                states = set()
                with trio.fail_after(60):
                    while rt.engine_status().state != "ready" or rt.engine_pid == first_pid:
                        response = await http.get("/health")
                        states.add((response.status_code, response.json()["status"]))
                        await trio.sleep(0.01)
            assert (503, "restarting") in states
            health = (await http.get("/health")).json()
            assert health["status"] == "ok" and health["engine"]["restarts"] == 1
            metrics = (await http.get("/metrics")).text
    assert outcome["text"] == expected
    assert outcome["usage"].completion_tokens == 400
    assert "\nomlx_engine_restarts_total 1.0\n" in metrics
    assert "\nomlx_engine_resumed_requests_total 1.0\n" in metrics


async def kill_ready_engine(rt) -> None:
    """SIGKILL the ready engine; return once it has been replaced or the link gave up."""
    pid = rt.engine_pid
    os.kill(pid, signal.SIGKILL)
    with trio.fail_after(120):
        while rt.engine_status().state != "failed" and (
                rt.engine_pid in (pid, None) or rt.engine_status().state != "ready"):
            await trio.sleep(0.01)


async def test_a_failed_engine_is_tried_again_after_a_cool_down_and_health_says_when(tiny_llama):
    """Issue #15 (3): past --engine-max-restarts the engine was failed until a person
    restarted the server. Now /health says when the next try is, and the try comes;
    each give-up in a row doubles the wait."""
    async with serve(tiny_llama, isolation="process", engine_max_restarts=1,
                     engine_restart_cooldown_s=2.0, engine_restart_cooldown_max_s=60.0) as server:
        rt = server.runtime
        async with http_client(server) as http:
            for cool_down in (2.0, 4.0):
                await kill_ready_engine(rt)
                await kill_ready_engine(rt)
                response = await http.get("/health")
                body = response.json()
                assert response.status_code == 503 and body["status"] == "failed"
                assert "died 2 times" in body["engine"]["reason"]
                assert cool_down / 2 < body["engine"]["retry_in_s"] <= cool_down
                chat = await http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": PROMPT, "max_tokens": 4})
                assert chat.status_code == 503
                with trio.fail_after(120):
                    while (response := await http.get("/health")).status_code != 200:
                        await trio.sleep(0.05)
                assert "retry_in_s" not in response.json()["engine"]
                chat = await http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": PROMPT, "max_tokens": 4})
                assert chat.status_code == 200

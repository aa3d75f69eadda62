"""Refusals before the first byte, failures after it, auth and body limits, in each route's
error shape, driven by raw httpx and the official SDKs."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
import trio
from http_support import (
    MODEL,
    anthropic_client,
    chat_body,
    http_client,
    openai_client,
    serve,
    sse_payloads,
    wait_until,
)

from omlx_actors.http.settings import HttpSettings

HELLO = [{"role": "user", "content": "Hello there"}]
POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages")


def assert_openai_error(response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


def assert_anthropic_error(response, status: int, error_type: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type


def assert_error_shape(route: str, response, status: int):
    if route == "/v1/messages":
        assert response.status_code == status, response.text
        body = response.json()
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    else:
        assert_openai_error(response, status)


async def test_malformed_json_is_400_in_each_routes_shape(server):
    async with http_client(server) as http:
        for route in POST_ROUTES:
            for raw in (b"", b"{", b"not json", b"[]", b'"text"', b"\xff\xfe"):
                response = await http.post(route, content=raw, headers={"content-type": "application/json"})
                assert_error_shape(route, response, 400)


async def test_wrong_types_name_the_offending_field(server):
    async with http_client(server) as http:
        bad_type = await http.post("/v1/chat/completions", json=chat_body(max_tokens="ten"))
        bad_role = await http.post(
            "/v1/chat/completions", json=chat_body(messages=[{"role": "wizard", "content": "x"}])
        )
        missing = await http.post("/v1/completions", json={"model": MODEL})
        bool_as_int = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": True})
        bias = await http.post("/v1/chat/completions", json=chat_body(logit_bias={"abc": 1}))
        big_seed = await http.post("/v1/chat/completions", json=chat_body(seed=2**70))
    assert_openai_error(bad_type, 400, "invalid_request", "max_tokens")
    assert_openai_error(bad_role, 400, "invalid_request", "messages[0].role")
    assert_openai_error(missing, 400, "invalid_request", "prompt")
    assert_openai_error(bool_as_int, 400, "invalid_request", "max_tokens")
    assert_openai_error(bias, 400, "invalid_request", "logit_bias")
    assert_openai_error(big_seed, 400, "invalid_request", "seed")


async def test_unknown_routes_and_methods_answer_in_the_right_shape(server):
    async with http_client(server) as http:
        assert_openai_error(await http.get("/v1/nothing"), 404, "not_found")
        assert_openai_error(await http.get("/v1/chat/completions"), 405, "method_not_allowed")
        assert_anthropic_error(await http.get("/v1/messages"), 405, "invalid_request_error")
        assert_anthropic_error(await http.post("/v1/messages/batches", json={}), 404, "not_found_error")
        assert_openai_error(await http.get("/v1/models/other-model"), 404, "model_not_found")


async def test_unknown_model_on_the_anthropic_route_is_not_found_error(server):
    async with http_client(server) as http:
        response = await http.post(
            "/v1/messages", json={"model": "claude-3", "max_tokens": 1, "messages": HELLO}
        )
    assert_anthropic_error(response, 404, "not_found_error")


async def test_oversized_bodies_get_413_without_being_read_whole(tiny_llama):
    limit = 1 << 20
    async with serve(tiny_llama, HttpSettings(max_body_bytes=limit)) as server:
        async with http_client(server) as http:
            declared = await http.post(
                "/v1/chat/completions", content=b"x" * (8 * limit),
                headers={"content-type": "application/json"},
            )

            async def chunks():
                for _ in range(4):
                    yield b" " * limit

            chunked = await http.post("/v1/messages", content=chunks())
            still_fine = await http.post("/v1/chat/completions", json=chat_body(max_tokens=1))
        # A declared 1 GiB body: the answer comes after a few bytes of it were sent.
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1073741824\r\n\r\n{\"model\": "
                )
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
    assert_openai_error(declared, 413, "request_too_large")
    assert declared.headers["connection"] == "close"
    assert_anthropic_error(chunked, 413, "request_too_large")
    assert still_fine.status_code == 200
    assert head.startswith(b"HTTP/1.1 413")


async def test_api_key_is_required_on_v1_routes_only(tiny_llama):
    async with serve(tiny_llama, HttpSettings(api_key="s3cret")) as server:
        async with http_client(server) as http:
            assert_openai_error(await http.get("/v1/models"), 401, "invalid_api_key")
            assert_openai_error(
                await http.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"}),
                401, "invalid_api_key",
            )
            assert_anthropic_error(
                await http.post("/v1/messages", json={}, headers={"x-api-key": "s3cre"}),
                401, "authentication_error",
            )
            assert (await http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200
            assert (await http.get("/v1/models", headers={"x-api-key": "s3cret"})).status_code == 200
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
        async with openai_client(server, api_key="wrong") as bad, openai_client(server, api_key="s3cret") as good:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
            reply = await good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
            assert reply.usage.completion_tokens == 1
        async with anthropic_client(server, api_key="wrong") as bad, anthropic_client(server, api_key="s3cret") as good:
            with pytest.raises(anthropic.AuthenticationError):
                await bad.messages.create(model=MODEL, max_tokens=1, messages=HELLO)
            message = await good.messages.create(model=MODEL, max_tokens=1, messages=HELLO)
            assert message.usage.output_tokens == 1


async def test_protect_health_puts_health_and_metrics_behind_the_key(tiny_llama):
    async with serve(tiny_llama, HttpSettings(api_key="k", protect_health=True)) as server:
        async with http_client(server) as http:
            assert_openai_error(await http.get("/health"), 401)
            assert_openai_error(await http.get("/metrics"), 401)
            assert (await http.get("/health", headers={"x-api-key": "k"})).status_code == 200


async def test_full_queue_is_429_with_retry_after(tiny_llama):
    async with serve(tiny_llama, max_batch_size=1, max_waiting_requests=1) as server:
        long = chat_body(max_tokens=1500, ignore_eos=True, stream=True)
        async with http_client(server) as http, trio.open_nursery() as nursery:
            started = 0

            async def hold() -> None:
                nonlocal started
                async with http.stream("POST", "/v1/chat/completions", json=long) as response:
                    assert response.status_code == 200
                    started += 1
                    await trio.sleep_forever()

            nursery.start_soon(hold)
            nursery.start_soon(hold)
            await wait_until(lambda: started == 2, timeout=10)
            raw = await http.post("/v1/chat/completions", json=chat_body(max_tokens=1))
            async with openai_client(server) as client:
                with pytest.raises(openai.RateLimitError) as caught:
                    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
            async with anthropic_client(server) as client:
                with pytest.raises(anthropic.RateLimitError):
                    await client.messages.create(model=MODEL, max_tokens=1, messages=HELLO)
            nursery.cancel_scope.cancel()
    assert_openai_error(raw, 429, "queue_full")
    assert raw.headers["retry-after"] == "1"
    assert caught.value.code == "queue_full"


async def test_shutting_down_server_answers_503(server):
    server.state.stop_accepting()
    async with http_client(server) as http:
        chat = await http.post("/v1/chat/completions", json=chat_body())
        messages = await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 1, "messages": HELLO})
        health = await http.get("/health")
    assert_openai_error(chat, 503, "shutting_down")
    assert_anthropic_error(messages, 503, "overloaded_error")
    assert health.status_code == 503
    assert health.json()["status"] == "shutting_down"


async def test_engine_failure_mid_stream_ends_openai_stream_with_error_then_done(server):
    async with http_client(server) as http:
        body = chat_body(stream=True, max_tokens=1500, ignore_eos=True)
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = []
            async for line in response.aiter_lines():
                lines.append(line)
                if len(lines) == 20:
                    await server.runtime.inject_fault("injected out-of-memory")
    payloads = sse_payloads(lines)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "out_of_memory"
    assert "injected out-of-memory" in error["message"]


async def test_engine_failure_mid_stream_ends_anthropic_stream_with_error_event(server):
    body = {"model": MODEL, "max_tokens": 1500, "messages": HELLO, "stream": True, "ignore_eos": True}
    async with http_client(server) as http:
        async with http.stream("POST", "/v1/messages", json=body) as response:
            lines = []
            async for line in response.aiter_lines():
                lines.append(line)
                if len(lines) == 30:
                    await server.runtime.inject_fault("injected out-of-memory")
    events = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    assert events[-1] == "error"
    assert "message_stop" not in events
    last = json.loads(sse_payloads(lines)[-1])
    assert last["type"] == "error" and last["error"]["type"] == "overloaded_error"


async def test_out_of_memory_without_stream_is_a_503_in_shape(server):
    async with http_client(server) as http, trio.open_nursery() as nursery:
        result = {}

        async def ask() -> None:
            result["r"] = await http.post("/v1/chat/completions", json=chat_body(max_tokens=1500, ignore_eos=True))

        nursery.start_soon(ask)
        await wait_until(lambda: len(server.runtime.dispatcher) == 1, timeout=5)
        await server.runtime.inject_fault("injected out-of-memory")
    assert_openai_error(result["r"], 503, "out_of_memory")


def _route_body(route: str, **fields) -> dict:
    if route == "/v1/completions":
        return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}
    return {"model": MODEL, "messages": HELLO, "max_tokens": 2, **fields}


async def test_stop_strings_past_the_caps_are_400_in_each_routes_shape(server):
    from omlx_actors.front.session import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

    too_long = ["ab" * MAX_STOP_STRING_CHARS]
    too_many = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
    at_the_caps = ["x" * (MAX_STOP_STRING_CHARS - 3) + f"{i:03}" for i in range(MAX_STOP_STRINGS)]
    async with http_client(server) as http:
        for route in POST_ROUTES:
            key = "stop_sequences" if route == "/v1/messages" else "stop"
            for stops in (too_long, too_many):
                response = await http.post(route, json=_route_body(route, **{key: stops}))
                assert_error_shape(route, response, 400)
                assert "stop" in response.text
            fine = await http.post(route, json=_route_body(route, **{key: at_the_caps}))
            assert fine.status_code == 200, fine.text


def _nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b'{"a":' * depth + leaf + b"}" * depth


@pytest.mark.parametrize("depth", [65, 2_000, 100_000])
async def test_json_nested_too_deeply_is_400_in_each_routes_shape(server, depth):
    # Regression: msgspec raised RecursionError past ~1,000 levels, answered as a 500.
    nested = _nested(depth)
    bodies = {
        "/v1/chat/completions": b'{"model":"tiny-llama","max_tokens":2,"messages":[{"role":"user",'
        b'"content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":'
        + nested + b"}}]}",
        "/v1/completions": b'{"model":"tiny-llama","max_tokens":2,"prompt":' + b"[" * depth + b"]" * depth + b"}",
        "/v1/messages": b'{"model":"tiny-llama","max_tokens":2,"messages":[{"role":"user",'
        b'"content":"hi"}],"metadata":' + nested + b"}",
    }
    async with http_client(server) as http:
        for route, raw in bodies.items():
            response = await http.post(route, content=raw, headers={"content-type": "application/json"})
            assert_error_shape(route, response, 400)
            assert "nested" in response.text or route == "/v1/completions", response.text
        still_fine = await http.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    assert still_fine.status_code == 200


async def test_json_nested_to_the_cap_is_accepted(server):
    from omlx_actors.http.schemas import MAX_JSON_DEPTH

    # The body, tools, the tool and its function are four levels; parameters start the fifth.
    parameters = json.loads(_nested(MAX_JSON_DEPTH - 5, b'{"type":"object"}'))
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    async with http_client(server) as http:
        response = await http.post("/v1/chat/completions", json=chat_body(max_tokens=1, tools=[tool]))
    assert response.status_code == 200, response.text


async def test_multi_megabyte_prompts_are_refused_at_once_while_health_stays_fast(server):
    # Regression: a 6 MB prompt was tokenized whole before the context check: 19 s, 670 MB
    # of RSS kept. Now its length proves it cannot fit.
    prompt = "hello world " * 500_000
    bodies = {
        "/v1/chat/completions": chat_body(messages=[{"role": "user", "content": prompt}]),
        "/v1/completions": {"model": MODEL, "prompt": prompt, "max_tokens": 1},
        "/v1/messages": {"model": MODEL, "max_tokens": 1, "system": prompt, "messages": HELLO},
    }
    health_s: list[float] = []
    async with http_client(server) as http, trio.open_nursery() as nursery:

        async def probe_health() -> None:
            while True:
                start = trio.current_time()
                assert (await http.get("/health")).status_code == 200
                health_s.append(trio.current_time() - start)
                await trio.sleep(0.05)

        nursery.start_soon(probe_health)
        for route, body in bodies.items():
            start = trio.current_time()
            response = await http.post(route, json=body)
            assert trio.current_time() - start < 3.0
            assert_error_shape(route, response, 400)
            assert "at least" in response.text, response.text
        nursery.cancel_scope.cancel()
    assert health_s and max(health_s) < 1.0

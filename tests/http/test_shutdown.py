"""Graceful shutdown: the real CLI process on SIGTERM/SIGINT (drain: in-flight streams finish,
new requests get 503, exit status 0; abort: streams end with an error event), and the
in-process server's abort mode in both wire formats."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import httpx
import trio
from http_support import MODEL, chat_body, http_client, serve, sse_payloads, wait_until

BANNER_URL = re.compile(rb"http://127\.0\.0\.1:(\d+)/v1")


async def _start_cli(model, *flags: str):
    """`omlx-actors serve` on an ephemeral port; returns (process, base url, stdout so far)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "omlx_actors.cli", "serve", "--model", str(model), "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = b""
    with trio.fail_after(60):
        while not (match := BANNER_URL.search(output)):
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"the server exited before listening: {output.decode(errors='replace')}"
            output += chunk
    return process, f"http://127.0.0.1:{int(match.group(1))}", output


async def _rest_of_output(process) -> bytes:
    output = b""
    while chunk := await process.stdout.receive_some(4096):
        output += chunk
    return output


async def _signal_during_a_stream(model, signum: int, *flags: str, probe: bool = True):
    """Start a long stream, send `signum` once it is flowing, and (with `probe`) try a new
    request during the shutdown; return (stream lines, the new request's response or None,
    exit status, output)."""
    process, url, output = await _start_cli(model, *flags)
    assert b"RANDOM-WEIGHT DEMO" in output
    lines: list[str] = []
    late: dict[str, httpx.Response] = {}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            body = chat_body(stream=True, max_tokens=1900, ignore_eos=True,
                             stream_options={"include_usage": True})
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    lines.append(line)
                    if len(lines) == 10:
                        process.send_signal(signum)
                        if not probe:
                            continue
                        # A new connection while draining: the listener is still open.
                        async with httpx.AsyncClient(base_url=url, timeout=10) as other:
                            late["r"] = await other.post("/v1/chat/completions", json=chat_body(max_tokens=1))
        with trio.fail_after(30):
            status = await process.wait()
        output += await _rest_of_output(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return lines, late.get("r"), status, output.decode(errors="replace")


async def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits_0(tiny_llama):
    lines, late, status, output = await _signal_during_a_stream(tiny_llama, signal.SIGTERM)
    payloads = sse_payloads(lines)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["usage"]["completion_tokens"] == 1900
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "shutting_down"
    assert status == 0
    assert "SIGTERM: shutting down (drain)" in output
    assert "stopped" in output


async def test_sigint_with_abort_mode_ends_streams_with_an_error_and_exits_0(tiny_llama):
    lines, _, status, output = await _signal_during_a_stream(
        tiny_llama, signal.SIGINT, "--shutdown", "abort", probe=False
    )
    payloads = sse_payloads(lines)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "shutting_down"
    assert status == 0
    assert "SIGINT: shutting down (abort)" in output
    assert "Traceback" not in output


async def test_in_process_abort_ends_both_wire_formats_with_error_events(tiny_llama):
    async with serve(tiny_llama) as server:
        results: dict[str, list[str]] = {}
        async with http_client(server) as http, trio.open_nursery() as nursery:

            async def stream(route: str, body: dict) -> None:
                lines: list[str] = []
                async with http.stream("POST", route, json=body) as response:
                    async for line in response.aiter_lines():
                        lines.append(line)
                results[route] = lines

            nursery.start_soon(stream, "/v1/chat/completions", chat_body(stream=True, max_tokens=1900, ignore_eos=True))
            nursery.start_soon(stream, "/v1/messages", {
                "model": MODEL, "max_tokens": 1900, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hi"}],
            })
            await wait_until(lambda: len(server.state.inflight) == 2, timeout=5)
            await server.shutdown("abort")
        assert not server.state.inflight
    openai_payloads = sse_payloads(results["/v1/chat/completions"])
    assert openai_payloads[-1] == "[DONE]"
    assert json.loads(openai_payloads[-2])["error"]["code"] == "shutting_down"
    anthropic_lines = results["/v1/messages"]
    events = [line[7:] for line in anthropic_lines if line.startswith("event: ")]
    assert events[-1] == "error"
    assert json.loads(sse_payloads(anthropic_lines)[-1])["error"]["type"] == "overloaded_error"

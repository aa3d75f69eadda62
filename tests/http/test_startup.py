"""The server listens before the model is loaded: /health answers 503 `starting` and /v1
routes 503 with Retry-After until the runtime is ready.

The load is held back at a real boundary, the file system: the model directory's
tokenizer.json is a named pipe, so loading the tokenizer blocks until the test writes it.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio
from http_support import MODEL, chat_body, http_client
from test_health_metrics import samples

from omlx_actors.config import RuntimeConfig
from omlx_actors.server import open_server


def held_model(tiny_llama: Path, dest: Path) -> tuple[Path, Path, bytes]:
    """A copy of the tiny model whose tokenizer.json is a FIFO: (model, fifo, its content)."""
    model = dest / MODEL
    shutil.copytree(tiny_llama, model)
    fifo = model / "tokenizer.json"
    content = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    return model, fifo, content


def release(fifo: Path, content: bytes) -> bool:
    """If a reader is waiting on `fifo`: put the real file in its place (later readers -
    transformers wants a regular file - find that), then give the waiting reader
    `content`. Returns whether there was a reader; never blocks for long."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nobody is reading yet
            return False
        raise
    try:
        regular = fifo.with_suffix(".tmp")
        regular.write_bytes(content)
        os.replace(regular, fifo)
        view, deadline = memoryview(content), time.monotonic() + 5
        while view and time.monotonic() < deadline:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                time.sleep(0.001)
    finally:
        os.close(fd)
    return True


async def release_when_read(fifo: Path, content: bytes) -> None:
    while not release(fifo, content):
        await trio.sleep(0.02)


async def test_health_and_v1_answer_503_while_the_model_loads(tiny_llama, tmp_path):
    model, fifo, content = held_model(tiny_llama, tmp_path)
    seen = {}

    async def probe_then_release(server) -> None:
        async with http_client(server) as http:
            seen["health"] = await http.get("/health")
            seen["chat"] = await http.post("/v1/chat/completions", json=chat_body())
            seen["messages"] = await http.post(
                "/v1/messages", json={"model": MODEL, "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "hi"}]})
            seen["models"] = await http.get("/v1/models")
            seen["metrics"] = await http.get("/metrics")
        seen["loading"] = server.runtime is None  # nothing was read from the pipe yet
        await release_when_read(fifo, content)

    async with trio.open_nursery() as nursery:
        config = RuntimeConfig(model=str(model))
        async with open_server(config, on_listening=lambda s: nursery.start_soon(
                probe_then_release, s)) as server:
            async with http_client(server) as http:
                ready = await http.get("/health")
                answered = await http.post("/v1/chat/completions", json=chat_body(max_tokens=2))

    assert seen["loading"]
    assert seen["health"].status_code == 503
    assert seen["health"].json() == {"status": "starting", "engine": {"state": "starting"}}
    for route in ("chat", "messages", "models"):
        assert seen[route].status_code == 503, route
        assert seen[route].headers["Retry-After"] == "2", route
    assert seen["chat"].json()["error"]["code"] == "starting"
    assert seen["messages"].json()["type"] == "error"  # each route's own error shape
    assert seen["metrics"].status_code == 200
    assert samples(seen["metrics"].text)[("omlx_engine_ready", ())] == 0
    assert ready.status_code == 200 and ready.json()["status"] == "ok"
    assert answered.status_code == 200


def test_serve_listens_before_the_model_is_loaded(tiny_llama, tmp_path):
    # The real CLI: the port answers while the tokenizer read is held, then serves.
    model, fifo, content = held_model(tiny_llama, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "omlx_actors.cli", "serve", "--model", str(model), "--port", "0",
         "--isolation", "thread", "--no-ssd-cache"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # Without the port open before the load, nothing is printed (the load waits for us).
        assert select.select([proc.stdout], [], [], 60)[0], "serve printed nothing in 60 s"
        first = proc.stdout.readline()
        assert first.startswith("omlx-actors: listening on http://127.0.0.1:"), first
        url = first.split()[3]
        starting = httpx.get(url + "/health", timeout=10)
        chat = httpx.post(url + "/v1/chat/completions", json=chat_body(), timeout=10)
        deadline = time.monotonic() + 120
        while not release(fifo, content):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert starting.status_code == 503 and starting.json()["status"] == "starting"
    assert chat.status_code == 503 and chat.headers["Retry-After"] == "2"
    assert "serving RANDOM-WEIGHT DEMO model" in out
    assert proc.returncode == 0, out

"""`omlx-actors serve` with several models, as a real subprocess: the pool's flags reach
the server (names paired with --model in order, a pinned model loaded at start), and a
--pin that names no model is one line and exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx

CLI = [sys.executable, "-m", "omlx_actors.cli"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def test_serve_with_several_models_names_pins_and_routes_them(tiny_llama, tiny_hybrid, tmp_path):
    proc = subprocess.Popen(
        [*CLI, "serve", "--model", str(tiny_llama), "--model", str(tiny_hybrid),
         "--served-model-name", "fast", "--served-model-name", "hybrid", "--pin", "hybrid",
         "--idle-ttl", "600", "--port", "0", "--no-ssd-cache", "--isolation", "thread"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("w"), text=True, env=ENV,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        lines = []
        while not any(line.strip().endswith("/v1") for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], (tmp_path / "stderr").read_text()[-3000:]
        url = lines[-1].strip().removesuffix("/v1")
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        answer = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "model pool (fast, hybrid)" in "".join(lines)
    assert [(m["id"], m["state"], m["pinned"]) for m in models] == [
        ("fast", "unloaded", False), ("hybrid", "loaded", True)]
    assert answer.status_code == 200 and answer.json()["model"] == "fast"
    assert proc.returncode == 0


def test_a_pin_that_names_no_model_is_one_line_and_status_2(tiny_llama, tiny_hybrid):
    done = subprocess.run(
        [*CLI, "serve", "--model", str(tiny_llama), "--model", str(tiny_hybrid), "--pin", "nope",
         "--port", "0", "--no-ssd-cache", "--isolation", "thread"],
        capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("omlx-actors: --pin nope: no such model")

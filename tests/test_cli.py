"""The command line, run as a real subprocess: configuration errors are one line and exit
status 2; --help helps every flag and shows defaults; the model flags (--max-model-len,
--chat-template, --trust-remote-code, --log-level) reach the runtime."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import trio

from omlx_actors import open_runtime
from omlx_actors.refusals import ContextLengthExceeded

CLI = [sys.executable, "-m", "omlx_actors.cli"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
TEMPLATE = "CUSTOM {{ messages[0]['content'] }}"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def no_safetensors(tiny_llama: Path, dest: Path) -> Path:
    """A model directory with everything but its weights."""
    shutil.copytree(tiny_llama, dest, ignore=shutil.ignore_patterns("*.safetensors*"))
    return dest


@pytest.mark.parametrize("case", ["memory-budget", "missing-model", "bad-flag-value",
                                  "invalid-setting", "unloadable-model"])
def test_a_configuration_error_is_one_line_and_exit_status_2(case, tiny_llama, tmp_path):
    serve = ["serve", "--port", "0", "--no-ssd-cache", "--isolation", "thread"]
    args, reason = {
        "memory-budget": (["--memory-budget", "1K"],
                          "the weights of tiny-llama (547.35 KiB) do not fit the memory budget "
                          "(1.00 KiB)"),
        "missing-model": (["--model", str(tmp_path / "nope")],
                          f"no such model directory: {tmp_path / 'nope'}"),
        "bad-flag-value": (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
        "invalid-setting": (["--max-batch-size", "0"], "max_batch_size must be > 0, got 0"),
        # In the engine process: its failure to load reaches the front as one line too.
        "unloadable-model": (["--isolation", "process", "--model",
                              str(no_safetensors(tiny_llama, tmp_path / "empty"))],
                             "cannot load the model: "),
    }[case]
    if "--model" not in args:  # a repeated --model is a model pool (#20), not an override
        serve += ["--model", str(tiny_llama)]
    proc = cli(*serve, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert reason in proc.stderr
    assert proc.stderr.startswith("omlx-actors")
    if case == "unloadable-model":  # found out in the engine, after the port was bound
        assert proc.stdout.startswith("omlx-actors: listening on ")
    else:  # found out before anything started: that line is all there is
        assert proc.stdout == ""


def help_entries(text: str) -> dict[str, str]:
    """Each option of an argparse help text, by its first flag: its help text."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            invocation, _, rest = line.strip().partition("  ")
            flags = [word.rstrip(",") for word in invocation.split() if word.startswith("-")]
            current = next((flag for flag in flags if flag.startswith("--")), flags[0])
            entries[current] = [rest.strip()]
        elif current is not None and line.startswith("    "):
            entries[current].append(line.strip())
        else:
            current = None
    return {flag: " ".join(part for part in parts if part) for flag, parts in entries.items()}


@pytest.mark.parametrize("command", ["serve", "bench", "bench-resume", "bench-cache",
                                     "bench-servers", "replay", "build-demo"])
def test_help_helps_every_flag(command):
    proc = cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    entries = help_entries(proc.stdout)
    assert "--help" in entries and len(entries) >= 2
    assert {flag for flag, text in entries.items() if not text} == set()


def test_serve_help_shows_defaults_and_the_new_flags():
    entries = help_entries(cli("serve", "--help").stdout)
    assert entries["--host"].endswith("(default: 127.0.0.1)")
    assert entries["--port"].endswith("(default: 8000)")
    assert entries["--default-max-tokens"].endswith("(default: 512)")
    assert entries["--prefix-cache-bytes"].endswith("(default: 2G)")
    assert entries["--log-level"].endswith("(default: warning)")
    assert "off by default" in entries["--trust-remote-code"]
    for flag in ("--max-model-len", "--chat-template"):
        assert flag in entries
    top = cli("--help").stdout
    assert "OMLX_OPENBLAS" in top and "nothing below reads the environment" not in top


def test_xdg_cache_home_places_the_ssd_tier_the_demo_models_and_downloads(monkeypatch, tmp_path):
    from omlx_actors.cli import build_parser
    from omlx_actors.models.demo import default_cache_dir
    from omlx_actors.models.resolve import cache_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build_parser().parse_args(["serve"]).ssd_cache_dir == tmp_path / "omlx-actors" / "kv"
    assert default_cache_dir() == tmp_path / "omlx-actors" / "models"
    assert cache_root() == tmp_path / "omlx-actors"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset
    assert cache_root() == Path.home() / ".cache" / "omlx-actors"


def test_replay_and_serve_name_the_served_model_alike():
    assert "--served-model-name" in help_entries(cli("replay", "--help").stdout)
    assert "--served-model-name" in help_entries(cli("serve", "--help").stdout)


def test_serve_applies_max_model_len_chat_template_and_log_level(tiny_llama, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    proc = subprocess.Popen(
        [*CLI, "serve", "--model", str(tiny_llama), "--port", "0", "--no-ssd-cache",
         "--isolation", "thread", "--max-model-len", "64", "--chat-template", str(template),
         "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("w"), text=True, env=ENV,
    )
    watchdog = threading.Timer(120, proc.kill)  # a server that never gets ready fails, not hangs
    watchdog.start()
    try:
        lines = []
        while not any("/v1" in line for line in lines):  # the banner's last line
            lines.append(proc.stdout.readline())
            assert lines[-1], (tmp_path / "stderr").read_text()[-3000:]
        url = lines[-1].strip().removesuffix("/v1")

        def chat(content: str) -> httpx.Response:
            return httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny-llama", "max_tokens": 4,
                "messages": [{"role": "user", "content": content}]})

        short, long = chat("hi"), chat("word " * 80)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        err = (tmp_path / "stderr").read_text()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "context=64" in "".join(lines)
    # "CUSTOM hi" is 8 tokens of the tiny tokenizer; its own template makes more of "hi".
    assert short.status_code == 200 and short.json()["usage"]["prompt_tokens"] == 8
    assert long.status_code == 400
    assert long.json()["error"]["code"] == "context_length_exceeded"
    assert "64 tokens" in long.json()["error"]["message"]
    assert "omlx-actors INFO " in err  # --log-level info lets INFO records through


async def test_max_model_len_and_chat_template_reach_the_runtime(tiny_llama):
    async with open_runtime(tiny_llama, chat_template=TEMPLATE, max_model_len=64) as rt:
        session = rt.chat([{"role": "user", "content": "hi"}], max_tokens=4)
        async with session:
            await session.collect()
        too_long = rt.chat([{"role": "user", "content": "word " * 80}], max_tokens=4)
        with pytest.raises(ContextLengthExceeded):
            async with too_long:
                pass
    assert rt.max_context == 64
    assert list(session.prompt_tokens) == rt.tokenizer.encode("CUSTOM hi", add_special_tokens=False)


def custom_code_model(tiny_llama: Path, dest: Path) -> Path:
    """The tiny model, but its architecture comes from a Python file it ships (which
    records that it ran)."""
    shutil.copytree(tiny_llama, dest)
    (dest / "custom_arch.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('ran').write_text('yes')\n"
        "from mlx_lm.models.llama import Model, ModelArgs\n")
    config = json.loads((dest / "config.json").read_text())
    config["model_file"] = "custom_arch.py"
    (dest / "config.json").write_text(json.dumps(config))
    return dest


async def test_model_code_runs_only_with_trust_remote_code(tiny_llama, tmp_path):
    from omlx_actors.engine.executor import EngineLoadFailed

    model = custom_code_model(tiny_llama, tmp_path / "custom")
    with pytest.raises(BaseException) as refused:
        async with open_runtime(model):
            pass
    assert refused.group_contains(EngineLoadFailed, match="trust_remote_code") \
        if isinstance(refused.value, BaseExceptionGroup) else "trust_remote_code" in str(refused.value)
    assert not (model / "ran").exists()
    async with open_runtime(model, trust_remote_code=True) as rt:
        session = rt.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        async with session:
            _, _, done = await session.collect()
    assert done.usage.completion_tokens == 2
    assert (model / "ran").read_text() == "yes"


def test_trust_remote_code_flag_reaches_the_engine_process(tiny_llama, tmp_path):
    model = custom_code_model(tiny_llama, tmp_path / "custom")
    refused = cli("serve", "--model", str(model), "--port", "0", "--no-ssd-cache")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "trust_remote_code" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]


_ = trio  # the async tests run under pytest-trio

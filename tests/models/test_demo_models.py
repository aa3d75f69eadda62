"""The offline demo-model builder: loadable, deterministic, chat/tool ready, cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import omlx_actors.mlx_loader  # noqa: F401  (OpenBLAS before any mlx import)
from omlx_actors.models import demo, demo_tokenizer
from omlx_actors.models import (
    DEMO_SPECS,
    DemoModelSpec,
    build_demo_model,
    count_parameters,
    ensure_demo_model,
    is_demo_model,
    read_demo_marker,
)

TINY = ("tiny-llama", "tiny-hybrid")
REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    }
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each tiny spec built twice, into two separate directories."""
    root = tmp_path_factory.mktemp("demo-models")
    return {
        name: (build_demo_model(name, root / f"{name}-a"), build_demo_model(name, root / f"{name}-b"))
        for name in TINY
    }


@pytest.fixture(scope="module")
def loaded(built):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        import mlx_lm

        return {name: mlx_lm.load(str(a)) for name, (a, _) in built.items()}


def _greedy(model, tokenizer, prompt, max_tokens=16) -> list[int]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    return [
        r.token
        for r in stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
        )
    ]


# --------------------------------------------------------------------------- specs


def test_specs_registry():
    assert {"tiny-llama", "tiny-hybrid", "demo-150m"} <= set(DEMO_SPECS)
    for name, spec in DEMO_SPECS.items():
        assert spec.name == name
        assert spec.dtype == "float32"
        hash(spec)  # frozen and hashable, extra included
        assert DemoModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
        assert len(spec.fingerprint) == 12
    hybrid = DEMO_SPECS["tiny-hybrid"]
    assert hybrid.model_type == "qwen3_next"
    assert hybrid.extra_dict()["full_attention_interval"] == 4
    assert hybrid.num_hidden_layers == 4
    assert hybrid.with_(seed=1).fingerprint != hybrid.fingerprint
    with pytest.raises(KeyError, match="unknown demo model"):
        demo.get_spec("nope")


def test_demo_150m_parameter_count_without_building():
    spec = DEMO_SPECS["demo-150m"]
    n = count_parameters(spec)
    assert 120e6 <= n <= 160e6, n
    assert spec.vocab_size == 32000 and spec.model_type == "llama" and spec.dtype == "float32"
    # The tokenizer for it pads a small learned vocab with reserved tokens, exactly.
    tok = demo_tokenizer.train_demo_tokenizer(spec.vocab_size)
    assert tok.get_vocab_size(with_added_tokens=True) == spec.vocab_size
    reserved = demo_tokenizer.reserved_token_ids(tok)
    assert reserved and reserved[-1] == spec.vocab_size - 1
    assert tok.decode([reserved[-1]], skip_special_tokens=False) == f"<|reserved_{len(reserved) - 1}|>"


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", TINY)
def test_build_writes_complete_marked_directory(built, name):
    path, _ = built[name]
    for f in (*demo._REQUIRED_FILES, "special_tokens_map.json", demo.MARKER_FILE):
        assert (path / f).is_file(), f
    assert is_demo_model(path)
    marker = read_demo_marker(path)
    assert marker["name"] == name and "random weights" in marker["note"]
    assert marker["fingerprint"] == DEMO_SPECS[name].fingerprint
    assert marker["parameters"] == count_parameters(name)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == DEMO_SPECS[name].vocab_size
    assert config["eos_token_id"] == marker["eos_token_ids"] and len(config["eos_token_id"]) == 2
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # Nothing left behind by the atomic build.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        f"{n}-{s}" for n in TINY for s in "ab"
    )


@pytest.mark.parametrize("name", TINY)
def test_two_builds_are_byte_identical(built, name):
    a, b = built[name]
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_seed_changes_weights_not_tokenizer(built, tmp_path):
    a, _ = built["tiny-llama"]
    other = build_demo_model(DEMO_SPECS["tiny-llama"].with_(seed=7), tmp_path / "seed7")
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()


def test_tokenizer_training_is_deterministic_across_processes():
    code = (
        "import sys; from omlx_actors.models.demo_tokenizer import train_demo_tokenizer;"
        "sys.stdout.write(train_demo_tokenizer(512).to_str())"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)},
        ).stdout
        for seed in ("1", "2")
    ]
    assert outs[0] == outs[1] == demo_tokenizer.train_demo_tokenizer(512).to_str()


def test_build_refuses_existing_dest_unless_overwrite(built, tmp_path):
    dest = tmp_path / "m"
    build_demo_model("tiny-llama", dest)
    with pytest.raises(FileExistsError):
        build_demo_model("tiny-llama", dest)
    (dest / "stale.txt").write_text("x")
    build_demo_model("tiny-llama", dest, overwrite=True)
    assert not (dest / "stale.txt").exists()
    assert (dest / "model.safetensors").read_bytes() == (built["tiny-llama"][0] / "model.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_is_demo_model_false_for_other_dirs(tmp_path):
    assert not is_demo_model(tmp_path)
    assert not is_demo_model(tmp_path / "missing")
    (tmp_path / demo.MARKER_FILE).write_text("not json")
    assert not is_demo_model(tmp_path)


def test_cli_builds(tmp_path, capsys):
    dest = tmp_path / "cli"
    assert demo.main(["tiny-llama", str(dest)]) == 0
    assert is_demo_model(dest) and str(dest) in capsys.readouterr().out
    assert demo.main(["tiny-llama", str(dest)]) == 1
    assert demo.main(["--list"]) == 0


# --------------------------------------------------------------------------- loading / generation


@pytest.mark.parametrize("name", TINY)
def test_loads_and_greedy_generation_is_reproducible(built, loaded, name):
    import mlx_lm

    model_a, tok_a = loaded[name]
    model_b, tok_b = mlx_lm.load(str(built[name][1]))
    prompts = ["The quick brown fox", "class Request:\n    def"]
    outs = []
    for prompt in prompts:
        toks_a = _greedy(model_a, tok_a, prompt)
        toks_b = _greedy(model_b, tok_b, prompt)
        assert toks_a == toks_b
        assert toks_a and all(0 <= t < DEMO_SPECS[name].vocab_size for t in toks_a)
        outs.append(toks_a)
    assert outs[0] != outs[1]  # the prompt matters


@pytest.mark.parametrize("name", TINY)
def test_tokenizer_matches_model_and_decodes_every_id(loaded, name):
    model, tok = loaded[name]
    vocab_size = DEMO_SPECS[name].vocab_size
    assert len(tok) == vocab_size == len(tok.get_vocab())
    assert model.model.embed_tokens.weight.shape[0] == vocab_size
    for i in range(vocab_size):
        assert isinstance(tok.decode([i]), str)
    detok = tok.detokenizer
    for i in range(vocab_size):
        detok.add_token(i)
    detok.finalize()
    assert detok.text
    vocab = tok.get_vocab()
    assert tok.eos_token_ids == {vocab["<|end_of_text|>"], vocab["<|im_end|>"]}
    assert tok.bos_token == "<|begin_of_text|>"


@pytest.mark.parametrize("name", TINY)
def test_chat_template_and_tool_calling(loaded, name):
    _, tok = loaded[name]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == tok.get_vocab()["<|im_start|>"]
    assert tok.decode(ids) == text

    with_tools = messages + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
                {"id": "c2", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"location": "Nice"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]},
    ]
    text = tok.apply_chat_template(with_tools, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Nice"}}\n'
        "</tool_call><|im_end|>\n"
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nrain\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text
    # Tools without a system message still get a system section.
    assert tok.apply_chat_template(
        messages[1:2], tools=TOOLS, add_generation_prompt=False, tokenize=False
    ).startswith("<|im_start|>system\n# Tools\n")

    # mlx-lm infers its json_tools parser from the template; the markers are single tokens.
    assert tok.has_tool_calling
    assert tok.tool_call_start == "<tool_call>" and tok.tool_call_end == "</tool_call>"
    assert len(tok.tool_call_start_tokens) == 1 and len(tok.tool_call_end_tokens) == 1
    call = text.split("<|im_start|>assistant\n<tool_call>")[1].split("</tool_call>")[0]
    assert tok.tool_parser(call, TOOLS) == {"name": "get_weather", "arguments": {"location": "Paris"}}
    assert not tok.has_thinking


@pytest.mark.parametrize("name", TINY)
def test_greedy_text_is_readable(loaded, name):
    model, tok = loaded[name]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}], add_generation_prompt=True)
    toks = _greedy(model, tok, prompt, max_tokens=24)
    suppressed = set(demo_tokenizer.greedy_suppressed_ids(tok.backend_tokenizer))
    assert not suppressed & set(toks)
    text = tok.decode(toks)
    assert "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text)


def test_hybrid_prompt_cache_layout(loaded):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = loaded["tiny-hybrid"]
    assert [type(c).__name__ for c in make_prompt_cache(model)] == [
        "ArraysCache", "ArraysCache", "ArraysCache", "KVCache",
    ]
    model, _ = loaded["tiny-llama"]
    assert [type(c).__name__ for c in make_prompt_cache(model)] == ["KVCache", "KVCache"]


# --------------------------------------------------------------------------- caching


def test_ensure_demo_model_builds_once(tmp_path, monkeypatch):
    calls = []
    real_build = demo.build_demo_model

    def counting_build(*args, **kwargs):
        calls.append(args[0])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(demo, "build_demo_model", counting_build)
    spec = DEMO_SPECS["tiny-llama"]
    path = ensure_demo_model("tiny-llama", cache_dir=tmp_path)
    assert path == tmp_path / f"tiny-llama-{spec.fingerprint}"
    assert is_demo_model(path) and len(calls) == 1
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model("tiny-llama", cache_dir=tmp_path) == path
    assert len(calls) == 1 and (path / "model.safetensors").stat().st_mtime_ns == mtime

    # An incomplete directory (no marker) is rebuilt.
    (path / demo.MARKER_FILE).unlink()
    assert ensure_demo_model("tiny-llama", cache_dir=tmp_path) == path
    assert len(calls) == 2 and is_demo_model(path)

    # Default location: $XDG_CACHE_HOME/omlx-actors/models/<name>-<fingerprint>.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.demo_model_path("tiny-llama") == tmp_path / "xdg" / "omlx-actors" / "models" / path.name


@pytest.mark.slow
def test_demo_150m_builds_loads_and_generates(tmp_path):
    """The one demo-150m build of the session (~5 s, ~0.5 GB on disk)."""
    import mlx_lm

    path = build_demo_model("demo-150m", tmp_path / "demo-150m")
    marker = read_demo_marker(path)
    assert 120e6 <= marker["parameters"] <= 160e6
    model, tok = mlx_lm.load(str(path))
    assert len(tok) == 32000
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    toks = _greedy(model, tok, prompt, max_tokens=8)
    assert len(toks) == 8
    assert not set(toks) & set(demo_tokenizer.reserved_token_ids(tok.backend_tokenizer))

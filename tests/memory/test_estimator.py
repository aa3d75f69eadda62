"""The estimator on plain config dicts: what it reads, what it prices, how it decides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omlx_actors.memory.estimator import (
    KV_CACHE_STEP,
    LayerKind,
    ModelMemoryFacts,
    estimate_request_bytes,
    kv_bytes_per_token,
    kv_cache_capacity,
    padded_batch_kv_bytes,
)

from .configs import GEMMA3_LIKE, LLAVA_LIKE, QWEN35_LIKE

ROOT = Path(__file__).resolve().parents[2]
A, S, R = LayerKind.ATTENTION, LayerKind.SLIDING, LayerKind.RECURRENT


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture
def llama_facts(tiny_llama) -> ModelMemoryFacts:
    return ModelMemoryFacts.from_config(config_of(tiny_llama))


def test_importing_the_estimator_imports_neither_trio_nor_mlx():
    # The ledger and the executor's policy are pure too: the estimator's and theirs.
    probe = (
        "import sys, omlx_actors.memory.estimator, omlx_actors.memory; "
        "import omlx_actors.memory.admission, omlx_actors.memory.policy; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'mlx', 'mlx_lm')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------
# Reading configs


def test_llama_config_is_read_from_the_top_level(tiny_llama):
    facts = ModelMemoryFacts.from_config(config_of(tiny_llama), weights_bytes=123)
    assert (facts.model_type, facts.num_layers, facts.num_attention_heads) == ("llama", 2, 4)
    assert (facts.num_kv_heads, facts.head_dim, facts.hidden_size) == (2, 16, 64)
    assert (facts.vocab_size, facts.kv_dtype_bytes, facts.mlp_width) == (512, 4, 128)
    assert facts.layer_kinds == (A, A)
    assert facts.recurrent_state_bytes_per_layer == 0
    assert facts.weights_bytes == 123
    assert facts.config_source == ""
    # K and V, 2 heads x 16 dims x 4 bytes, 2 layers.
    assert kv_bytes_per_token(facts) == 2 * 2 * 16 * 4 * 2


def test_qwen3_next_hybrid_layers_and_recurrent_state(tiny_hybrid):
    facts = ModelMemoryFacts.from_config(config_of(tiny_hybrid))
    assert facts.layer_kinds == (R, R, R, A)  # full attention every 4th layer
    # conv: (4 - 1) x (2*2*16 + 4*16) x 4 bytes; state: 4 x 16 x 16 x 4 bytes (float32).
    assert facts.recurrent_state_bytes_per_layer == 3 * 128 * 4 + 4 * 16 * 16 * 4 == 5632
    assert kv_bytes_per_token(facts) == 2 * 2 * 16 * 4 * 1  # one attention layer
    # MoE: 2 experts x 32 + shared 64 = 128, the same as the dense intermediate size.
    assert facts.mlp_width == 128


def test_head_dim_and_kv_heads_default_from_the_attention_heads():
    facts = ModelMemoryFacts.from_config(
        {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 8, "vocab_size": 10}
    )
    assert (facts.head_dim, facts.num_kv_heads) == (32, 8)


@pytest.mark.parametrize(
    ("dtype_keys", "expected"),
    [
        ({"torch_dtype": "float32"}, 4),
        ({"torch_dtype": "bfloat16"}, 2),
        ({"torch_dtype": "float16"}, 2),
        ({"dtype": "bfloat16"}, 2),  # newer transformers write `dtype`
        ({"torch_dtype": "torch.float32"}, 4),
        ({"torch_dtype": "bfloat16", "quantization": {"group_size": 64, "bits": 4}}, 2),
        ({}, 2),
    ],
)
def test_kv_dtype_comes_from_the_config(dtype_keys, expected):
    config = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
              "vocab_size": 10, **dtype_keys}
    assert ModelMemoryFacts.from_config(config).kv_dtype_bytes == expected


def test_vlm_reads_the_language_model_not_the_vision_tower():
    facts = ModelMemoryFacts.from_config(LLAVA_LIKE)
    assert facts.config_source == "text_config"
    assert (facts.num_layers, facts.num_attention_heads, facts.num_kv_heads) == (32, 32, 8)
    assert (facts.hidden_size, facts.head_dim, facts.mlp_width) == (4096, 128, 14336)
    # Only at the top level: taken from there.
    assert (facts.vocab_size, facts.kv_dtype_bytes) == (32064, 2)
    assert facts.model_type == "llama"
    assert kv_bytes_per_token(facts) == 2 * 8 * 128 * 2 * 32  # 128 KiB per token


@pytest.mark.parametrize("key", ["text_config", "language_config", "llm_config"])
def test_every_language_model_sub_config_name_is_read(key):
    config = {k: v for k, v in LLAVA_LIKE.items() if k != "text_config"}
    config[key] = LLAVA_LIKE["text_config"]
    facts = ModelMemoryFacts.from_config(config)
    assert (facts.config_source, facts.num_layers) == (key, 32)


def test_legacy_gpt_names_are_read_in_a_sub_config():
    config = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
              "text_config": {"n_layer": 24, "n_embd": 2048, "n_head": 16, "n_vocab": 50257}}
    facts = ModelMemoryFacts.from_config(config)
    assert (facts.num_layers, facts.hidden_size, facts.num_attention_heads) == (24, 2048, 16)
    assert (facts.head_dim, facts.vocab_size) == (128, 50257)


def test_gemma3_sliding_layers_are_capped_at_the_window():
    facts = ModelMemoryFacts.from_config(GEMMA3_LIKE)
    assert facts.sliding_window == 1024
    assert [i for i, kind in enumerate(facts.layer_kinds) if kind is A] == [5, 11, 17, 23, 29]
    assert (facts.attention_layers, facts.sliding_layers) == (5, 29)
    per_layer = 2 * 4 * 256 * 2
    estimate = estimate_request_bytes(
        facts, prompt_tokens=20_000, cached_tokens=0, max_tokens=1000, prefill_chunk=512
    )
    # Global layers hold the whole context (21000 -> 21248); sliding ones window + chunk.
    assert estimate.kv_capacity_tokens == 21248
    assert estimate.kv_bytes == per_layer * (5 * 21248 + 29 * (1024 + 512))


def test_qwen35_vlm_hybrid_from_layer_types():
    facts = ModelMemoryFacts.from_config(QWEN35_LIKE)
    assert facts.layer_kinds == (R, R, R, A, R, R, R, A)
    assert facts.kv_dtype_bytes == 2
    conv = 3 * (2 * 16 * 128 + 32 * 128) * 2
    state = 32 * 128 * 128 * 4
    assert facts.recurrent_state_bytes_per_layer == conv + state
    estimate = estimate_request_bytes(
        facts, prompt_tokens=100, cached_tokens=0, max_tokens=10, prefill_chunk=512
    )
    assert estimate.recurrent_state_bytes == 6 * (conv + state)
    assert estimate.kv_bytes == 2 * 2 * 256 * 2 * 2 * 256


def test_layer_types_with_sliding_windows():
    config = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
              "vocab_size": 10, "sliding_window": 128,
              "layer_types": ["sliding_attention", "full_attention"] * 2}
    facts = ModelMemoryFacts.from_config(config)
    assert facts.layer_kinds == (S, A, S, A)
    assert facts.sliding_window == 128


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LLAVA_LIKE["vision_config"], "lacks vocab_size/n_vocab"),
        ({"hidden_size": 64, "vocab_size": 10},
         "lacks num_hidden_layers/n_layer/num_layers/n_layers, num_attention_heads/"),
        ({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
          "vocab_size": 10, "layer_types": ["full_attention", "mamba"]},
         "layer_types[1]='mamba': unknown layer type"),
        ({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
          "vocab_size": 10, "layer_types": ["full_attention"]},
         "layer_types lists 1 layers, num_hidden_layers says 2"),
        ({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
          "vocab_size": 10, "layer_types": ["linear_attention", "full_attention"],
          "linear_num_key_heads": 2},
         "lacks linear_key_head_dim, linear_num_value_heads"),
        ({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
          "vocab_size": 10, "torch_dtype": "float8"}, "unknown dtype"),
        ({"num_hidden_layers": 0, "hidden_size": 64, "num_attention_heads": 4,
          "vocab_size": 10}, "num_hidden_layers must be a positive integer"),
    ],
)
def test_a_config_it_cannot_read_is_refused_loudly(config, message):
    with pytest.raises(ValueError) as raised:
        ModelMemoryFacts.from_config(config)
    assert message in str(raised.value)


# ---------------------------------------------------------------------------------------
# Pricing a request


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "capacity"),
    [(1, 0, 256), (256, 0, 256), (257, 0, 512), (200, 56, 256), (200, 57, 512),
     (1000, 500, 1536)],
)
def test_kv_is_rounded_up_to_whole_256_steps(llama_facts, prompt, max_tokens, capacity):
    estimate = estimate_request_bytes(
        llama_facts, prompt_tokens=prompt, cached_tokens=0, max_tokens=max_tokens,
        prefill_chunk=512,
    )
    assert estimate.kv_capacity_tokens == capacity
    assert estimate.kv_bytes == capacity * kv_bytes_per_token(llama_facts)


def test_odd_prefill_chunks_leave_the_cache_off_the_step_grid():
    # Two chunks of 300: 300 -> 512 positions; the second does not fit, is cut to 300 and
    # grows by 512: 812 (mlx-lm KVCache.update_and_fetch), and the 512 are copied.
    assert kv_cache_capacity(0, [300, 300]) == (812, 512)
    assert kv_cache_capacity(0, [256, 256, 1]) == (768, 512)
    assert kv_cache_capacity(512, [488]) == (1024, 512)


def test_cached_prefix_is_not_counted_again(llama_facts):
    per_token = kv_bytes_per_token(llama_facts)
    common = dict(prompt_tokens=1000, max_tokens=100, prefill_chunk=512)
    cached = estimate_request_bytes(llama_facts, cached_tokens=512, **common)
    # 512 cached + 488 prefilled -> 1024 positions; decoding to 1100 -> 1280.
    assert cached.kv_capacity_tokens == 1280
    assert cached.kv_bytes == (1280 - 512) * per_token
    copied = estimate_request_bytes(llama_facts, cached_tokens=512, prefix_shared=False, **common)
    assert copied.kv_bytes == 1280 * per_token
    # The last growth (1024 -> 1280) copies the prefix with the rest.
    assert cached.growth_copy_bytes == copied.growth_copy_bytes == 1024 * per_token


def test_scratch_is_the_largest_chunk_against_the_whole_context(llama_facts):
    estimate = estimate_request_bytes(
        llama_facts, prompt_tokens=1000, cached_tokens=600, max_tokens=10, prefill_chunk=256
    )
    chunk = 256
    scores = chunk * 1000 * 4 * 4  # chunk x (cached + prompt) context x 4 heads x fp32
    logits = chunk * 512 * 4
    activations = chunk * (3 * 128 + 4 * 64) * 4
    assert estimate.scratch_bytes == scores + logits + activations
    batched = estimate_request_bytes(
        llama_facts, prompt_tokens=1000, cached_tokens=600, max_tokens=10, prefill_chunk=256,
        batch_size_hint=3,
    )
    assert batched.scratch_bytes == 3 * estimate.scratch_bytes


def test_a_fully_cached_prompt_still_prices_a_decode_step(llama_facts):
    estimate = estimate_request_bytes(
        llama_facts, prompt_tokens=512, cached_tokens=512, max_tokens=1, prefill_chunk=256
    )
    assert estimate.kv_capacity_tokens == 768
    assert estimate.kv_bytes == 256 * kv_bytes_per_token(llama_facts)
    assert estimate.scratch_bytes == 513 * 4 * 4 + 512 * 4 + (3 * 128 + 4 * 64) * 4


def test_total_is_the_sum_of_the_terms(tiny_hybrid):
    facts = ModelMemoryFacts.from_config(config_of(tiny_hybrid))
    e = estimate_request_bytes(facts, prompt_tokens=300, cached_tokens=0, max_tokens=10,
                               prefill_chunk=128)
    assert e.total == e.kv_bytes + e.growth_copy_bytes + e.recurrent_state_bytes + e.scratch_bytes
    assert e.recurrent_state_bytes == 3 * 5632


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens must be >= 1"),
        ({"cached_tokens": 11}, "cached_tokens must be within 0..prompt_tokens=10"),
        ({"cached_tokens": -1}, "cached_tokens must be within"),
        ({"max_tokens": -1}, "max_tokens must be >= 0"),
        ({"prefill_chunk": 0}, "prefill_chunk must be >= 1"),
        ({"batch_size_hint": 0}, "batch_size_hint must be >= 1"),
    ],
)
def test_nonsense_request_sizes_are_refused(llama_facts, kwargs, message):
    args = dict(prompt_tokens=10, cached_tokens=0, max_tokens=5, prefill_chunk=8) | kwargs
    with pytest.raises(ValueError) as raised:
        estimate_request_bytes(llama_facts, **args)
    assert message in str(raised.value)


@given(
    prompt=st.integers(1, 5000),
    cached_blocks=st.integers(0, 20),
    max_tokens=st.integers(0, 3000),
    chunk_steps=st.integers(1, 8),
)
def test_step_aligned_chunks_end_on_the_rounded_context(prompt, cached_blocks, max_tokens,
                                                         chunk_steps):
    facts = ModelMemoryFacts.from_config(
        {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 8}
    )
    cached = min(cached_blocks * KV_CACHE_STEP, prompt)
    cached -= cached % KV_CACHE_STEP
    e = estimate_request_bytes(facts, prompt_tokens=prompt, cached_tokens=cached,
                               max_tokens=max_tokens, prefill_chunk=chunk_steps * KV_CACHE_STEP)
    end = prompt + max_tokens
    assert e.kv_capacity_tokens == -(-end // KV_CACHE_STEP) * KV_CACHE_STEP
    assert e.growth_copy_bytes <= e.kv_bytes + cached * kv_bytes_per_token(facts)


def test_a_padded_batch_costs_every_row_the_longest_context(llama_facts):
    per_token = kv_bytes_per_token(llama_facts)
    # A 10-token request beside a 4000-token one is padded to 4000 (+ < one step).
    assert padded_batch_kv_bytes(llama_facts, rows=2, longest_context=4000) == (
        2 * (4000 + 255) * per_token
    )
    assert padded_batch_kv_bytes(llama_facts, rows=0, longest_context=4000) == 0

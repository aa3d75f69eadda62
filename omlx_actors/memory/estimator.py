"""What a model and a request will cost in memory, computed from sizes known in Python.

Pure: imports neither trio nor MLX, so it can be asked *before* anything is evaluated. On
Linux's CPU build a failed allocation is an uncatchable SIGSEGV and on Metal a failed
command buffer aborts the process, and MLX's memory limit is only a guideline: whatever does
not fit has to be refused here, from the model's config and the request's token counts.

Two steps, each a plain function of plain data:

1. `ModelMemoryFacts.from_config(config)` reads the sizes that matter from an HF/mlx-lm
   `config.json` (nested language-model sub-configs of VLMs included) and fails loudly when
   a size it needs is missing: a guard that silently reads nothing never fires (seed 004).
2. `estimate_request_bytes(facts, ...)` prices one request: its KV cache (mlx-lm's growth
   in 256-position steps included), the copy made when that cache grows, the fixed-size
   state of recurrent layers, and the scratch of its largest prefill chunk.

`padded_batch_kv_bytes` bounds a whole mlx-lm decode batch, whose rows are padded to the
longest: per-request prices do not add up to it when lengths differ. Comparing prices with
a budget is the admission ledger's (`memory/admission.py`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "KV_CACHE_STEP",
    "LayerKind",
    "ModelMemoryFacts",
    "RequestEstimate",
    "estimate_request_bytes",
    "format_bytes",
    "kv_bytes_per_token",
    "kv_cache_capacity",
    "padded_batch_kv_bytes",
]

# mlx-lm's `KVCache.step` (and `BatchKVCache.step`, `RotatingKVCache.step`): a cache that
# runs out of room grows by whole multiples of this many positions.
KV_CACHE_STEP = 256

# Attention scores are softmaxed in float32 (`precise` softmax / the SDPA fallback), and
# logits are upcast before sampling: price both at 4 bytes whatever the model dtype.
SCORES_DTYPE_BYTES = 4
LOGITS_DTYPE_BYTES = 4
# The gated-delta recurrent state is created and carried in float32 (mlx-lm gated_delta.py).
RECURRENT_STATE_DTYPE_BYTES = 4

# KV dtype when the config names none. mlx-lm runs a model in the dtype of its weights;
# released checkpoints are fp16/bf16 (quantized ones dequantize into their fp16/bf16 scales).
DEFAULT_KV_DTYPE_BYTES = 2

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "fp32": 4,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "bf16": 2,
}

# Where VLM / wrapper configs keep the language model. Preferred over the top level even
# when the top level has a layer count: in some packs that count is the vision tower's.
LM_SUBCONFIG_KEYS = ("text_config", "language_config", "llm_config")

# Each size under the names configs are known to use, most common first.
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size", "n_vocab"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner"),
}

_ATTENTION_TYPES = frozenset({"full_attention", "attention", "global", "global_attention"})
_SLIDING_TYPES = frozenset({"sliding_attention", "sliding", "local", "local_attention"})
_LINEAR_TYPES = frozenset({"linear_attention"})
_LINEAR_KEYS = (
    "linear_num_key_heads",
    "linear_key_head_dim",
    "linear_num_value_heads",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
)


class LayerKind(enum.Enum):
    """What a decoder layer keeps per sequence."""

    ATTENTION = "attention"
    """A KV cache that grows with the context (mlx-lm `KVCache`)."""
    SLIDING = "sliding"
    """A KV cache capped at the sliding window (mlx-lm `RotatingKVCache`)."""
    RECURRENT = "recurrent"
    """A fixed-size state, whatever the context (mlx-lm `ArraysCache`: conv + SSM state)."""


def format_bytes(n: int) -> str:
    """`n` bytes for a human: "1.50 GiB", "12.0 MiB", "512 B"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _lookup(config: Mapping[str, Any], name: str) -> Any:
    for key in _ALIASES[name]:
        value = config.get(key)
        if value is not None:
            return value
    return None


def _language_model_config(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The language model's part of `config` and where it was found ("" = top level)."""
    for key in LM_SUBCONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, Mapping) and _lookup(sub, "num_layers") is not None:
            return sub, key
    return config, ""


def _dtype_bytes(lm: Mapping[str, Any], top: Mapping[str, Any]) -> int:
    for source in (lm, top):
        for key in ("torch_dtype", "dtype"):
            name = source.get(key)
            if isinstance(name, str):
                name = name.removeprefix("torch.").lower()
                if name not in _DTYPE_BYTES:
                    raise ValueError(f"config {key}={name!r}: unknown dtype")
                return _DTYPE_BYTES[name]
    return DEFAULT_KV_DTYPE_BYTES


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config {what} must be a positive integer, got {value!r}")
    return value


def _recurrent_state_bytes(lm: Mapping[str, Any], kv_dtype_bytes: int) -> int:
    """Bytes of one gated-delta (qwen3_next / qwen3_5) linear layer's state, one sequence.

    mlx-lm's `ArraysCache(size=2)` holds, per sequence:
    - the conv state `(kernel - 1, conv_dim)` in the model dtype, with
      `conv_dim = 2 * key_heads * key_head_dim + value_heads * value_head_dim` (q, k, v);
    - the recurrent state `(value_heads, value_head_dim, key_head_dim)` in float32.
    """
    missing = [key for key in _LINEAR_KEYS if lm.get(key) is None]
    if missing:
        raise ValueError(f"config has linear-attention layers but lacks {', '.join(missing)}")
    hk, dk, hv, dv, kernel = (
        _positive_int(lm[key], key) for key in _LINEAR_KEYS
    )
    conv_dim = 2 * hk * dk + hv * dv
    conv_bytes = (kernel - 1) * conv_dim * kv_dtype_bytes
    state_bytes = hv * dv * dk * RECURRENT_STATE_DTYPE_BYTES
    return conv_bytes + state_bytes


def _layer_kinds(lm: Mapping[str, Any], num_layers: int) -> tuple[LayerKind, ...]:
    """Which layers keep a growing KV cache, a windowed one, or a fixed state.

    Read, in this order: an explicit `layer_types` list; qwen3_next's
    `full_attention_interval` (layer i is attention iff (i+1) % interval == 0, the rest
    linear); gemma3's `sliding_window_pattern` (layer i is global iff (i+1) % pattern == 0,
    the rest sliding). Otherwise every layer is full attention: mlx-lm's llama/mistral
    ignore a bare `sliding_window` and keep a full cache, so that is what they cost.
    """
    layer_types = lm.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ValueError(
                f"config layer_types lists {len(layer_types)} layers, "
                f"num_hidden_layers says {num_layers}"
            )
        kinds = []
        for index, name in enumerate(layer_types):
            if name in _ATTENTION_TYPES:
                kinds.append(LayerKind.ATTENTION)
            elif name in _SLIDING_TYPES:
                kinds.append(LayerKind.SLIDING)
            elif name in _LINEAR_TYPES:
                kinds.append(LayerKind.RECURRENT)
            else:
                raise ValueError(f"config layer_types[{index}]={name!r}: unknown layer type")
        return tuple(kinds)
    if lm.get("full_attention_interval") is not None and any(
        lm.get(key) is not None for key in _LINEAR_KEYS
    ):
        interval = _positive_int(lm["full_attention_interval"], "full_attention_interval")
        return tuple(
            LayerKind.ATTENTION if (i + 1) % interval == 0 else LayerKind.RECURRENT
            for i in range(num_layers)
        )
    if lm.get("sliding_window_pattern") is not None and lm.get("sliding_window") is not None:
        pattern = _positive_int(lm["sliding_window_pattern"], "sliding_window_pattern")
        return tuple(
            LayerKind.ATTENTION if (i + 1) % pattern == 0 else LayerKind.SLIDING
            for i in range(num_layers)
        )
    return (LayerKind.ATTENTION,) * num_layers


def _mlp_width(lm: Mapping[str, Any]) -> int:
    """Widest MLP activation per token: the dense MLP, or top-k experts plus the shared one."""
    dense = _lookup(lm, "intermediate_size") or 0
    experts = (lm.get("num_experts_per_tok") or 0) * (lm.get("moe_intermediate_size") or 0)
    shared = lm.get("shared_expert_intermediate_size") or 0
    return max(int(dense), int(experts + shared))


@attrs.frozen(kw_only=True)
class ModelMemoryFacts:
    """The sizes of a model that decide what its requests cost. Plain data.

    Invariant: `len(layer_kinds) == num_layers`; `sliding_window` is set iff some layer is
    SLIDING; `recurrent_state_bytes_per_layer` is 0 iff no layer is RECURRENT.
    """

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    # Bytes per element of K and V (the model's activation dtype).
    kv_dtype_bytes: int
    # Widest MLP activation per token (dense, or MoE top-k + shared); 0 when unknown.
    mlp_width: int
    layer_kinds: tuple[LayerKind, ...]
    sliding_window: int | None = None
    # One recurrent layer's state for one sequence, in bytes.
    recurrent_state_bytes_per_layer: int = 0
    # Resident size of the loaded weights, when the caller knows it.
    weights_bytes: int | None = None
    # Where the language model was read from: "" (top level) or e.g. "text_config".
    config_source: str = ""

    @property
    def attention_layers(self) -> int:
        return self.layer_kinds.count(LayerKind.ATTENTION)

    @property
    def sliding_layers(self) -> int:
        return self.layer_kinds.count(LayerKind.SLIDING)

    @property
    def recurrent_layers(self) -> int:
        return self.layer_kinds.count(LayerKind.RECURRENT)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        weights_bytes: int | None = None,
        kv_dtype_bytes: int | None = None,
    ) -> ModelMemoryFacts:
        """Read the facts from an HF / mlx-lm `config.json` (as a dict).

        The language model is read from `text_config`, `language_config` or `llm_config`
        when one of them has a layer count (VLMs, wrappers), else from the top level;
        `vocab_size` and the dtype fall back to the top level when the sub-config lacks
        them. `head_dim` defaults to `hidden_size // num_attention_heads`, the KV heads to
        the attention heads. `kv_dtype_bytes` overrides the dtype read from
        `torch_dtype`/`dtype` (default 2 when the config names none).

        Raises ValueError naming every required size that is missing or malformed.
        """
        lm, source = _language_model_config(config)
        where = f"{source}." if source else ""
        required = {name: _lookup(lm, name) for name in ("num_layers", "num_attention_heads")}
        required["hidden_size"] = _lookup(lm, "hidden_size")
        required["vocab_size"] = _lookup(lm, "vocab_size") or _lookup(config, "vocab_size")
        missing = [name for name, value in required.items() if value is None]
        if missing:
            names = ", ".join(f"{where}{'/'.join(_ALIASES[m])}" for m in missing)
            raise ValueError(f"model config lacks {names}: cannot estimate its memory")
        num_layers = _positive_int(required["num_layers"], f"{where}num_hidden_layers")
        heads = _positive_int(required["num_attention_heads"], f"{where}num_attention_heads")
        hidden = _positive_int(required["hidden_size"], f"{where}hidden_size")
        vocab = _positive_int(required["vocab_size"], "vocab_size")
        kv_heads = _lookup(lm, "num_kv_heads")
        kv_heads = heads if kv_heads is None else _positive_int(kv_heads, "num_key_value_heads")
        head_dim = _lookup(lm, "head_dim")
        head_dim = hidden // heads if head_dim is None else _positive_int(head_dim, "head_dim")
        if kv_dtype_bytes is None:
            kv_dtype_bytes = _dtype_bytes(lm, config)
        kinds = _layer_kinds(lm, num_layers)
        sliding_window = None
        if LayerKind.SLIDING in kinds:
            sliding_window = _positive_int(lm.get("sliding_window"), f"{where}sliding_window")
        recurrent = 0
        if LayerKind.RECURRENT in kinds:
            recurrent = _recurrent_state_bytes(lm, kv_dtype_bytes)
        if weights_bytes is not None and weights_bytes < 0:
            raise ValueError(f"weights_bytes must be >= 0, got {weights_bytes!r}")
        return cls(
            model_type=str(lm.get("model_type") or config.get("model_type") or ""),
            num_layers=num_layers,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=vocab,
            kv_dtype_bytes=kv_dtype_bytes,
            mlp_width=_mlp_width(lm),
            layer_kinds=kinds,
            sliding_window=sliding_window,
            recurrent_state_bytes_per_layer=recurrent,
            weights_bytes=weights_bytes,
            config_source=source,
        )


def kv_bytes_per_token(facts: ModelMemoryFacts) -> int:
    """Bytes one more position of context adds to the KV caches of one sequence, while the
    context is within every sliding window: K and V of every attention and sliding layer."""
    per_layer = 2 * facts.num_kv_heads * facts.head_dim * facts.kv_dtype_bytes
    return per_layer * (facts.attention_layers + facts.sliding_layers)


def kv_cache_capacity(start: int, updates: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """Positions an mlx-lm `KVCache` holds after `updates` (tokens per call) starting from a
    cache that holds exactly `start` positions; and the largest buffer it replaced.

    Mirrors `KVCache.update_and_fetch`: when a call of `n` tokens does not fit, the cache
    is cut to its offset (if that is not a multiple of the step) and `ceil(n / 256) * 256`
    positions are concatenated, so the old buffer and the new one coexist until the
    concatenation is evaluated. Decode steps (n = 1) are folded in closed form by
    `estimate_request_bytes`.
    """
    capacity = offset = start
    replaced = 0
    for n in updates:
        if offset + n > capacity:
            replaced = max(replaced, capacity)
            if offset % KV_CACHE_STEP:
                capacity = offset
            capacity += math.ceil(n / KV_CACHE_STEP) * KV_CACHE_STEP
        offset += n
    return capacity, replaced


def _prefill_chunks(tokens: int, chunk: int) -> list[int]:
    return [chunk] * (tokens // chunk) + ([tokens % chunk] if tokens % chunk else [])


@attrs.frozen(kw_only=True)
class RequestEstimate:
    """What one request costs in bytes, term by term. Plain data: it may travel.

    `total` is the sum of the terms: an upper bound of what admitting the request adds at
    its worst moment. The terms do not all peak at once (the scratch is gone before the
    cache has grown by `max_tokens`), so the sum is conservative by design: being wrong
    the other way kills the process.
    """

    # Positions the request's attention-layer KV buffer ends with (KV_CACHE_STEP rounding).
    kv_capacity_tokens: int
    # Its KV caches at their largest, less the cached prefix when that is shared.
    kv_bytes: int
    # The buffer a growing KV cache replaces, alive until the concatenation that grows it
    # has been evaluated (mlx-lm grows by concatenating, not in place).
    growth_copy_bytes: int
    # Fixed-size states of recurrent layers (conv + SSM state): paid once, whatever the length.
    recurrent_state_bytes: int
    # The largest prefill chunk's temporaries: attention scores, logits, MLP activations.
    scratch_bytes: int

    @property
    def total(self) -> int:
        return (
            self.kv_bytes + self.growth_copy_bytes + self.recurrent_state_bytes + self.scratch_bytes
        )


def _check_request_counts(prompt_tokens: int, cached_tokens: int, max_tokens: int,
                          prefill_chunk: int, batch_size_hint: int) -> None:
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens!r}")
    if not 0 <= cached_tokens <= prompt_tokens:
        raise ValueError(
            f"cached_tokens must be within 0..prompt_tokens={prompt_tokens}, got {cached_tokens!r}"
        )
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens!r}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk!r}")
    if batch_size_hint < 1:
        raise ValueError(f"batch_size_hint must be >= 1, got {batch_size_hint!r}")


def _chunk_scratch_bytes(facts: ModelMemoryFacts, chunk: int, prompt_tokens: int,
                         end: int) -> int:
    """The temporaries of one `chunk`-token prefill chunk (see `estimate_request_bytes`):
    attention scores over the larger context, logits, MLP activations."""
    scores = 0
    if facts.attention_layers or facts.sliding_layers:
        scores = max(chunk * prompt_tokens, end) * facts.num_attention_heads * SCORES_DTYPE_BYTES
    logits = chunk * facts.vocab_size * LOGITS_DTYPE_BYTES
    activations = chunk * (3 * facts.mlp_width + 4 * facts.hidden_size) * facts.kv_dtype_bytes
    return scores + logits + activations


def estimate_request_bytes(
    facts: ModelMemoryFacts,
    *,
    prompt_tokens: int,
    cached_tokens: int,
    max_tokens: int,
    prefill_chunk: int,
    batch_size_hint: int = 1,
    prefix_shared: bool = True,
) -> RequestEstimate:
    """Price one request for `facts`' model.

    `prompt_tokens` is the whole prompt, `cached_tokens` the prefix of it restored from the
    prompt cache instead of being prefilled (0 <= cached <= prompt). The uncached rest is
    prefilled in chunks of `prefill_chunk` tokens, then `max_tokens` tokens are decoded one
    at a time (one more position than mlx-lm writes: the last sampled token is never fed
    back; an upper bound by at most one step).

    Terms (see `RequestEstimate`):

    - **kv**: the attention-layer cache ends at `kv_cache_capacity` positions (mlx-lm grows
      in KV_CACHE_STEP=256-position steps), times `kv_bytes_per_token` per layer; a
      sliding layer holds at most `sliding_window + chunk` positions. With
      `prefix_shared` (the default) the cached prefix is *not* counted: it is already paid
      for by whoever holds the prompt cache. Pass `prefix_shared=False` when the request
      gets its own copy of the prefix (mlx-lm's `LRUPromptCache` deep-copies on fetch, and
      merging a restored cache into a `BatchGenerator` batch copies it too) while the
      prompt cache keeps the original.
    - **growth_copy**: the buffer replaced at the cache's last growth (including the
      prefix: the concatenation copies it), alive until the concatenation is evaluated.
    - **recurrent_state**: `recurrent_layers * recurrent_state_bytes_per_layer`.
    - **scratch**, for the largest chunk `c = min(prefill_chunk, uncached)` (at least 1):
      attention scores `c * context * num_attention_heads * 4` (float32 softmax; one
      layer at a time, so counted once; `context` is the whole prompt at the last chunk,
      or prompt + max_tokens for a decode step, whichever product is larger), plus logits
      `c * vocab_size * 4` (mlx-lm's model call computes the LM head on every position of
      a chunk; 0.32.2's BatchGenerator never evaluates them during prefill, so this is
      conservative there), plus MLP activations `c * (3 * mlp_width + 4 * hidden_size) *
      dtype` (gate, up, their product; residual, norm, attention output). The scratch is
      multiplied by `batch_size_hint`: prompts prefilled together are padded to the
      longest, and their chunks are evaluated at once.

    Raises ValueError on negative counts, `cached_tokens > prompt_tokens`, an empty prompt,
    or a non-positive chunk or batch hint.
    """
    _check_request_counts(prompt_tokens, cached_tokens, max_tokens, prefill_chunk,
                          batch_size_hint)
    uncached = prompt_tokens - cached_tokens
    per_layer_token = 2 * facts.num_kv_heads * facts.head_dim * facts.kv_dtype_bytes

    # Full-attention layers: prefill chunks, then decode folded in closed form.
    capacity, replaced = kv_cache_capacity(cached_tokens, _prefill_chunks(uncached, prefill_chunk))
    end = prompt_tokens + max_tokens
    if end > capacity:
        # One token at a time, the cache is full (offset == capacity) whenever it grows, so
        # nothing is cut and each growth adds exactly one step.
        growths = math.ceil((end - capacity) / KV_CACHE_STEP)
        capacity += growths * KV_CACHE_STEP
        replaced = max(replaced, capacity - KV_CACHE_STEP)
    prefix = cached_tokens if prefix_shared else 0
    kv_tokens = facts.attention_layers * (capacity - prefix)
    copy_tokens = facts.attention_layers * replaced

    chunk = max(1, min(prefill_chunk, uncached))
    if facts.sliding_layers:
        assert facts.sliding_window is not None
        window_cap = min(capacity, facts.sliding_window + chunk)
        window_prefix = min(prefix, facts.sliding_window)
        kv_tokens += facts.sliding_layers * (window_cap - window_prefix)
        copy_tokens += facts.sliding_layers * min(replaced, window_cap)
    return RequestEstimate(
        kv_capacity_tokens=capacity,
        kv_bytes=kv_tokens * per_layer_token,
        growth_copy_bytes=copy_tokens * per_layer_token,
        recurrent_state_bytes=facts.recurrent_layers * facts.recurrent_state_bytes_per_layer,
        scratch_bytes=_chunk_scratch_bytes(facts, chunk, prompt_tokens, end) * batch_size_hint,
    )


def padded_batch_kv_bytes(facts: ModelMemoryFacts, *, rows: int, longest_context: int) -> int:
    """An upper bound of the KV bytes of an mlx-lm decode batch (`BatchKVCache`): `rows`
    sequences whose longest context is `longest_context` positions.

    A batch keeps one `(rows, kv_heads, width, head_dim)` buffer per layer: every row is
    left-padded to the longest (`merge` and `extend` pad, they do not pack), so a short
    request batched beside a long one costs as much KV as the long one. The width is at
    least the longest context and, growing by whole steps from wherever a merge left it,
    less than one step more. Summing per-request `kv_bytes` underestimates a mixed batch;
    this is the number to compare when rows of very different lengths run together.
    """
    if rows < 0 or longest_context < 0:
        raise ValueError(f"rows and longest_context must be >= 0, got {rows}, {longest_context}")
    if rows == 0 or longest_context == 0:
        return 0
    width = longest_context + KV_CACHE_STEP - 1
    tokens = facts.attention_layers * width
    if facts.sliding_layers:
        assert facts.sliding_window is not None
        tokens += facts.sliding_layers * min(width, facts.sliding_window + KV_CACHE_STEP - 1)
    per_layer_token = 2 * facts.num_kv_heads * facts.head_dim * facts.kv_dtype_bytes
    return rows * tokens * per_layer_token

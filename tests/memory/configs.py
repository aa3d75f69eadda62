"""Model configs written inline, shaped like the real ones they are named after."""

from __future__ import annotations

# A llava-style VLM: the vision tower's sizes leak to the top level (num_hidden_layers etc.,
# as some packs and HF auto-wrappers do); the language model lives under text_config, and
# the dtype and vocabulary only at the top level.
LLAVA_LIKE = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "torch_dtype": "bfloat16",
    "vocab_size": 32064,
    "num_hidden_layers": 24,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "image_token_index": 32000,
    "vision_config": {
        "model_type": "clip_vision_model",
        "num_hidden_layers": 24,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 336,
        "patch_size": 14,
    },
    "text_config": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
    },
}

# A gemma3-style VLM: text_config with a sliding window on five of every six layers.
GEMMA3_LIKE = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 27,
                      "hidden_size": 1152, "num_attention_heads": 16},
    "text_config": {
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "hidden_size": 2560,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 10240,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "vocab_size": 262208,
    },
}

# A qwen3.5-style VLM: a gated-delta hybrid under text_config, described by layer_types.
QWEN35_LIKE = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "vision_config": {"depth": 27, "hidden_size": 1152, "num_heads": 16},
    "text_config": {
        "model_type": "qwen3_5_text",
        "dtype": "bfloat16",
        "num_hidden_layers": 8,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "intermediate_size": 6144,
        "vocab_size": 248320,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"]
        + ["linear_attention"] * 3 + ["full_attention"],
        "full_attention_interval": 4,
        "linear_num_key_heads": 16,
        "linear_key_head_dim": 128,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
    },
}

"""GGUF import: a llama-family GGUF file -> an mlx-lm model directory, once.

`import_gguf(src, dest)` reads the file with MLX's own GGUF reader (`mx.load`), which keeps
Q4_0/Q4_1/Q8_0 tensors as MLX affine-quantized `weight`/`scales`/`biases` (group size 32)
and F16/F32 tensors as they are, and writes what `mlx_lm.load` needs:

- `model.safetensors`: the tensors under mlx-lm's llama names (`blk.N.attn_q` ->
  `model.layers.N.self_attn.q_proj`, `token_embd` -> `model.embed_tokens`, ...);
- `config.json`: the llama config from the GGUF metadata, with `rope_traditional: true`
  (llama.cpp's converter permutes Q/K rows for interleaved RoPE) and a `quantization`
  entry (group size 32; a per-layer entry where a tensor has another bit width);
- `tokenizer.json` / `tokenizer_config.json`: a byte-level BPE built with `tokenizers` from
  `tokenizer.ggml.tokens` and `merges` (token type 3, "control", is special), the chat
  template from `tokenizer.chat_template`, bos/eos from their ids;
- `omlx_gguf.json`: where it came from (file name, sha256) - written last, so a directory
  with it is a complete import.

`float32_variant(src_dir, dest)` writes the same model with every quantized tensor
dequantized to float32 (MLX's CPU `quantized_matmul` is several times slower than an
OpenBLAS float32 matmul; see `omlx_actors.models.resolve`).

Anything else - another architecture, another tensor type (K-quants, IQ, BF16), a
SentencePiece vocabulary, tensors we have no name for - is refused with `UnsupportedGguf`,
whose message is one line naming what is not supported. The check reads only the file's
header (`read_gguf_header`, pure Python), before any MLX work.

Importing runs MLX on the calling thread: call it before the engine starts, or in a child
process (as `omlx_actors.models.resolve` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from omlx_actors.models.demo import publish_directory

# Bump when the importer's output changes for the same file (invalidates cached imports).
IMPORTER_VERSION = 1
MARKER_FILE = "omlx_gguf.json"

# GGML tensor type ids that MLX's GGUF reader handles, by name.
SUPPORTED_TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
_TENSOR_TYPE_NAMES = {
    **SUPPORTED_TENSOR_TYPES, 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}
# GGUF architectures with llama's tensor layout (mistral GGUFs from older converters say so).
SUPPORTED_ARCHITECTURES = ("llama", "mistral")
# llama.cpp's pre-tokenizer names -> how `tokenizers` splits before byte-level BPE.
_GPT2_SPLIT = None  # ByteLevel's own regex
_PRE_TOKENIZERS = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    # Digits one by one, then GPT-2's regex (llama.cpp groups these together).
    "smollm": (True, _GPT2_SPLIT),
    "starcoder": (True, _GPT2_SPLIT),
    "refact": (True, _GPT2_SPLIT),
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)$")


class UnsupportedGguf(ValueError):
    """The file is a GGUF we cannot import; the message is one line saying why."""


@attrs.frozen
class GgufHeader:
    """What the header says: scalar metadata (arrays are skipped, their lengths kept under
    `array_lengths`) and each tensor's GGML type id."""

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensor_types: dict[str, int]


# --------------------------------------------------------------------------- header (pure)

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise UnsupportedGguf("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_str(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise UnsupportedGguf("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype == 8:
        f.seek(_read(f, "<Q"), os.SEEK_CUR)
    elif vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == 9:
        etype, n = _read(f, "<I"), _read(f, "<Q")
        if etype in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[etype]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _skip_value(f, etype)
    else:
        raise UnsupportedGguf(f"unknown GGUF metadata value type {vtype}")


def read_gguf_header(path: Path | str) -> GgufHeader:
    """Parse the header of a GGUF file (v2/v3) without reading tensor data.

    Raises `UnsupportedGguf` if it is not a GGUF file."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UnsupportedGguf(f"{Path(path).name} is not a GGUF file (bad magic)")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise UnsupportedGguf(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = _read_str(f)
            vtype = _read(f, "<I")
            if vtype == 8:
                metadata[key] = _read_str(f)
            elif vtype in _SCALARS:
                metadata[key] = _read(f, _SCALARS[vtype])
            elif vtype == 9:
                pos = f.tell()
                _read(f, "<I")
                lengths[key] = _read(f, "<Q")
                f.seek(pos)
                _skip_value(f, 9)
            else:
                raise UnsupportedGguf(f"unknown GGUF metadata value type {vtype} for {key}")
        tensors: dict[str, int] = {}
        for _ in range(n_tensors):
            name = _read_str(f)
            n_dims = _read(f, "<I")
            f.seek(8 * n_dims, os.SEEK_CUR)
            tensors[name] = _read(f, "<I")
            f.seek(8, os.SEEK_CUR)  # data offset
    return GgufHeader(version=version, metadata=metadata, array_lengths=lengths,
                      tensor_types=tensors)


def _mlx_name(gguf_name: str) -> str | None:
    """mlx-lm's llama parameter prefix for a GGUF tensor base name, or None."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def check_supported(header: GgufHeader, name: str = "GGUF file") -> None:
    """Raise `UnsupportedGguf` (one line) unless `import_gguf` can import this file."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGguf(
            f"{name}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    bad = sorted({t for t in header.tensor_types.values() if t not in SUPPORTED_TENSOR_TYPES})
    if bad:
        names = ", ".join(_TENSOR_TYPE_NAMES.get(t, f"type {t}") for t in bad)
        example = next(k for k, t in header.tensor_types.items() if t == bad[0])
        raise UnsupportedGguf(
            f"{name}: tensor type {names} is not supported (e.g. {example}; "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES.values())})")
    unknown = sorted(k for k in header.tensor_types if _mlx_name(k.rsplit(".", 1)[0]) is None)
    if unknown:
        raise UnsupportedGguf(
            f"{name}: tensor {unknown[0]} of architecture {arch!r} has no mlx-lm llama "
            f"equivalent ({len(unknown)} such tensors)")
    tok_model = md.get("tokenizer.ggml.model")
    if tok_model != "gpt2":
        raise UnsupportedGguf(
            f"{name}: tokenizer model {tok_model!r} is not supported (only 'gpt2', "
            "byte-level BPE)")
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedGguf(
            f"{name}: pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(_PRE_TOKENIZERS)})")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in header.array_lengths:
            raise UnsupportedGguf(f"{name}: no {key} in the metadata")


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(metadata: dict[str, Any], dest: Path, max_length: int) -> dict[str, Any]:
    """Write tokenizer.json and tokenizer_config.json for the GGUF vocabulary; return the
    special-token ids (`bos_token_id`, `eos_token_id`, `pad_token_id`, may be None)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    types = metadata.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     byte_fallback=False))
    digits, _ = _PRE_TOKENIZERS[metadata.get("tokenizer.ggml.pre", "default")]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (type 3) are special: matched whole in text, never split by BPE;
    # user-defined ones (type 4) are matched whole too but are ordinary text.
    tokenizer.add_tokens([AddedToken(tokens[i], special=(t == 3), normalized=False)
                          for i, t in enumerate(types) if t in (3, 4)])
    tokenizer.save(str(dest / "tokenizer.json"))

    def token(key: str) -> tuple[int | None, str | None]:
        i = metadata.get(key)
        if i is None:
            return None, None
        i = int(i.item() if hasattr(i, "item") else i)
        return i, tokens[i]

    (bos_id, bos), (eos_id, eos) = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    (pad_id, pad), (_, unk) = token("tokenizer.ggml.padding_token_id"), token("tokenizer.ggml.unknown_token_id")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        "add_bos_token": bool(add_bos.item() if hasattr(add_bos, "item") else add_bos),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    _write_json(dest / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}


# --------------------------------------------------------------------------- import (MLX)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _scalar(md: dict[str, Any], key: str, default: Any = None) -> Any:
    v = md.get(key, default)
    return v.item() if hasattr(v, "item") else v


def model_config(md: dict[str, Any], arch: str) -> dict[str, Any]:
    """mlx-lm's llama config.json (without quantization and token ids) from GGUF metadata."""
    hidden = int(_scalar(md, f"{arch}.embedding_length"))
    heads = int(_scalar(md, f"{arch}.attention.head_count"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(md, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(md, f"{arch}.attention.head_count_kv", heads)),
        "intermediate_size": int(_scalar(md, f"{arch}.feed_forward_length")),
        "head_dim": int(_scalar(md, f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_scalar(md, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(_scalar(md, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(md, f"{arch}.rope.freq_base", 10000.0)),
        # llama.cpp's converter permutes Q/K rows so that RoPE rotates adjacent pairs.
        "rope_traditional": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if md.get("tokenizer.ggml.tokens") is not None:
        config["vocab_size"] = len(md["tokenizer.ggml.tokens"])
    return config


def _quant_params(weights: dict[str, Any], prefix: str) -> tuple[int, int] | None:
    """(group_size, bits) of a quantized tensor, from its shapes; None if not quantized."""
    scales = weights.get(f"{prefix}.scales")
    if scales is None:
        return None
    packed = weights[f"{prefix}.weight"]
    group = 32  # every GGUF type MLX reads quantized has 32-element blocks
    in_features = scales.shape[-1] * group
    return group, packed.shape[-1] * 32 // in_features


def import_gguf(src: Path | str, dest: Path | str, *, sha256: str | None = None,
                progress: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """Import the GGUF file `src` into the mlx-lm model directory `dest` (atomically: a
    temp directory next to it, renamed). Raises `UnsupportedGguf` before any work for a
    file we cannot import, FileExistsError if `dest` exists and not `overwrite`."""
    say = progress or (lambda _msg: None)
    src, dest = Path(src), Path(dest)
    check_supported(read_gguf_header(src), src.name)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists")
    sha256 = sha256 or file_sha256(src)
    say(f"importing {src.name} (sha256 {sha256[:12]}) into {dest}")
    from omlx_actors.mlx_loader import load_mlx

    mx = load_mlx()
    weights, md = mx.load(str(src), return_metadata=True)
    arch = md["general.architecture"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".importing", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        renamed: dict[str, Any] = {}
        for key, value in weights.items():
            base, leaf = key.rsplit(".", 1)
            renamed[f"{_mlx_name(base)}.{leaf}"] = value
        del weights
        config = model_config(md, arch)
        config["tie_word_embeddings"] = "lm_head.weight" not in renamed
        quantized = {k.rsplit(".", 1)[0]: _quant_params(renamed, k.rsplit(".", 1)[0])
                     for k in renamed if k.endswith(".scales")}
        if quantized:
            counts: dict[tuple[int, int], int] = {}
            for params in quantized.values():
                counts[params] = counts.get(params, 0) + 1
            group, bits = max(counts, key=counts.get)
            quant: dict[str, Any] = {"group_size": group, "bits": bits}
            for prefix, (g, b) in sorted(quantized.items()):
                if (g, b) != (group, bits):
                    quant[prefix] = {"group_size": g, "bits": b}
            config["quantization"] = quant
            config["quantization_config"] = quant
        say(f"writing {len(renamed)} tensors")
        mx.save_safetensors(str(tmp / "model.safetensors"), renamed, metadata={"format": "mlx"})
        del renamed
        say("building the tokenizer from the GGUF vocabulary")
        ids = build_tokenizer(md, tmp, config["max_position_embeddings"])
        config.update({k: v for k, v in ids.items() if v is not None})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / MARKER_FILE, {
            "omlx_gguf": True, "importer_version": IMPORTER_VERSION, "source": src.name,
            "sha256": sha256, "architecture": arch, "name": md.get("general.name"),
            "license": md.get("general.license"), "dtype": "gguf",
        })
        publish_directory(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def float32_variant(src: Path | str, dest: Path | str, *,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Write `src` (an imported directory) to `dest` with every quantized tensor
    dequantized to float32 (scales and biases widened first, so nothing is rounded to
    float16 on the way), F16 tensors widened too, and no `quantization` in config.json.
    The tokenizer files are copied. Atomic like `import_gguf`."""
    say = progress or (lambda _msg: None)
    src, dest = Path(src), Path(dest)
    from omlx_actors.mlx_loader import load_mlx

    mx = load_mlx()
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    quant = config.pop("quantization", None) or {}
    config.pop("quantization_config", None)
    weights = mx.load(str(src / "model.safetensors"))
    say(f"dequantizing {src.name} to float32 for the CPU")
    out: dict[str, Any] = {}
    for key in sorted(weights):
        prefix, leaf = key.rsplit(".", 1)
        if leaf in ("scales", "biases") and f"{prefix}.scales" in weights:
            continue
        value = weights[key]
        if leaf == "weight" and f"{prefix}.scales" in weights:
            params = quant.get(prefix) or quant
            value = mx.dequantize(value, weights[f"{prefix}.scales"].astype(mx.float32),
                                  weights[f"{prefix}.biases"].astype(mx.float32),
                                  group_size=params["group_size"], bits=params["bits"])
        out[key] = value.astype(mx.float32)
        mx.eval(out[key])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".dequantizing", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        mx.save_safetensors(str(tmp / "model.safetensors"), out, metadata={"format": "mlx"})
        config["torch_dtype"] = "float32"
        _write_json(tmp / "config.json", config)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        marker = json.loads((src / MARKER_FILE).read_text(encoding="utf-8"))
        _write_json(tmp / MARKER_FILE, {**marker, "dtype": "float32"})
        publish_directory(tmp, dest, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_marker(path: Path | str) -> dict[str, Any] | None:
    """The `omlx_gguf.json` of an imported directory, or None (not one, or incomplete)."""
    try:
        data = json.loads((Path(path) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("importer_version") != IMPORTER_VERSION:
        return None
    return data


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def import_gguf_main(src: Path, dest: Path, *, overwrite: bool = False) -> int:
    """`omlx-actors import-gguf FILE DEST`: 0 on success; a one-line refusal (exit 2)."""
    import sys

    def say(msg: str) -> None:
        print(f"omlx-actors: {msg}", file=sys.stderr, flush=True)

    try:
        import_gguf(src, dest, progress=say, overwrite=overwrite)
    except (UnsupportedGguf, FileExistsError, FileNotFoundError) as exc:
        print(f"omlx-actors import-gguf: {exc}", file=sys.stderr)
        return 2
    print(f"imported {src.name} into {dest}")
    return 0

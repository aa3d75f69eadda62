"""GGUF files we cannot import are refused before any work, in one line that names what
is not supported (architecture, tensor type, tokenizer); the header reader reads what a
GGUF writer wrote. Files are written here with a minimal GGUF v3 writer."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from omlx_actors.models.gguf import UnsupportedGguf, check_supported, read_gguf_header

STRING, UINT32, ARRAY = 8, 4, 9


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v) -> bytes:
    if isinstance(v, str):
        return struct.pack("<I", STRING) + _str(v)
    if isinstance(v, int):
        return struct.pack("<I", UINT32) + struct.pack("<I", v)
    assert isinstance(v, list) and all(isinstance(x, str) for x in v)
    return (struct.pack("<I", ARRAY) + struct.pack("<IQ", STRING, len(v))
            + b"".join(_str(x) for x in v))


def write_gguf(path: Path, metadata: dict, tensors: dict[str, int]) -> Path:
    """A GGUF v3 header: `metadata` (str, int or list of str) and tensor infos (name ->
    GGML type id, each 1-D of 32 elements). No tensor data: refusals never read it."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += _str(key) + _value(value)
    for name, ggml_type in tensors.items():
        out += _str(name) + struct.pack("<IQIQ", 1, 32, ggml_type, 0)
    path.write_bytes(out)
    return path


LLAMA = {
    "general.architecture": "llama",
    "llama.block_count": 1,
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "smollm",
    "tokenizer.ggml.tokens": ["a", "b", "ab"],
    "tokenizer.ggml.merges": ["a b"],
}
TENSORS = {"token_embd.weight": 2, "blk.0.attn_q.weight": 3, "blk.0.attn_norm.weight": 0,
           "output_norm.weight": 0, "blk.0.ffn_down.weight": 8, "blk.0.ffn_up.weight": 1}


def test_the_header_reader_reads_metadata_arrays_and_tensor_types(tmp_path):
    header = read_gguf_header(write_gguf(tmp_path / "m.gguf", LLAMA, TENSORS))
    assert header.version == 3
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["llama.block_count"] == 1
    assert header.array_lengths == {"tokenizer.ggml.tokens": 3, "tokenizer.ggml.merges": 1}
    assert header.tensor_types == TENSORS
    check_supported(header)  # Q4_0, Q4_1, Q8_0, F16, F32 of llama: accepted


@pytest.mark.parametrize("metadata, tensors, message", [
    ({**LLAMA, "general.architecture": "qwen2"}, TENSORS,
     "m.gguf: architecture 'qwen2' is not supported (supported: llama, mistral)"),
    (LLAMA, {**TENSORS, "blk.0.ffn_gate.weight": 14},
     "m.gguf: tensor type Q6_K is not supported (e.g. blk.0.ffn_gate.weight; supported: "
     "F32, F16, Q4_0, Q4_1, Q8_0)"),
    (LLAMA, {**TENSORS, "blk.0.attn_v.weight": 12, "output.weight": 30},
     "m.gguf: tensor type Q4_K, BF16 is not supported (e.g. blk.0.attn_v.weight; supported: "
     "F32, F16, Q4_0, Q4_1, Q8_0)"),
    (LLAMA, {**TENSORS, "rope_freqs.weight": 0},
     "m.gguf: tensor rope_freqs.weight of architecture 'llama' has no mlx-lm llama "
     "equivalent (1 such tensors)"),
    ({**LLAMA, "tokenizer.ggml.model": "llama"}, TENSORS,
     "m.gguf: tokenizer model 'llama' is not supported (only 'gpt2', byte-level BPE)"),
    ({**LLAMA, "tokenizer.ggml.pre": "qwen2"}, TENSORS,
     "m.gguf: pre-tokenizer 'qwen2' is not supported (supported: default, gpt2, smollm, "
     "starcoder, refact)"),
])
def test_an_unsupported_gguf_is_refused_naming_what(tmp_path, metadata, tensors, message):
    header = read_gguf_header(write_gguf(tmp_path / "m.gguf", metadata, tensors))
    with pytest.raises(UnsupportedGguf) as info:
        check_supported(header, "m.gguf")
    assert str(info.value) == message


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UnsupportedGguf, match="x.gguf is not a GGUF file"):
        read_gguf_header(tmp_path / "x.gguf")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omlx_actors.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_import_gguf_refuses_an_unsupported_file_in_one_line(tmp_path):
    bad = write_gguf(tmp_path / "qwen.gguf", {**LLAMA, "general.architecture": "qwen2"}, TENSORS)
    proc = _cli("import-gguf", str(bad), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr == ("omlx-actors import-gguf: qwen.gguf: architecture 'qwen2' is not "
                           "supported (supported: llama, mistral)\n")
    assert not (tmp_path / "out").exists()


def test_serve_refuses_an_unsupported_gguf_in_one_line(tmp_path):
    bad = write_gguf(tmp_path / "k.gguf", LLAMA, {**TENSORS, "blk.0.attn_k.weight": 12})
    proc = _cli("serve", "--model", str(bad), "--port", "0", "--no-ssd-cache")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == ["omlx-actors: cannot serve k.gguf: k.gguf: tensor type Q4_K is not "
                     "supported (e.g. blk.0.attn_k.weight; supported: F32, F16, Q4_0, Q4_1, "
                     "Q8_0)"], proc.stderr

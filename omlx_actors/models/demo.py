"""Offline demo models: complete mlx-lm model directories with random weights, from a seed.

`build_demo_model("tiny-llama", dest)` writes a directory that `mlx_lm.load(dest)` loads
with no network: `config.json`, `model.safetensors` (deterministic random weights, via
mlx-lm's own `save_model`/`save_config`), a byte-level BPE tokenizer trained locally on a
built-in corpus (see `omlx_actors.models.demo_tokenizer`) with a ChatML + tools chat
template, and a marker file `omlx_demo.json` that says the weights are random.
Same spec -> byte-identical weights and tokenizer files.

`ensure_demo_model("demo-150m")` builds once into the user cache
(`$XDG_CACHE_HOME/omlx-actors/models/<name>-<fingerprint>`) and reuses it afterwards.

The output of these models is meaningless; they exist for tests, benchmarks and demos of
the runtime. Building runs MLX on the calling thread (lazy model construction, array
conversion and the safetensors write), so call it before the engine starts or from the
thread that owns MLX.

CLI: `python -m omlx_actors.models.demo NAME [DEST] [--overwrite]` (no DEST: the cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from omlx_actors.config import cache_home
from omlx_actors.models import demo_tokenizer

# Bump when the builder's output changes for an unchanged spec (invalidates caches).
BUILDER_VERSION = 1
MARKER_FILE = "omlx_demo.json"
DEMO_NOTE = "random weights, demo only: the output of this model is meaningless"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_DTYPES = ("float32", "float16", "bfloat16")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def publish_directory(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move a fully built directory `tmp` to `dest` by renames, so a reader sees either the
    old directory or the whole new one; an existing `dest` is replaced only if `overwrite`
    (else `FileExistsError`: another builder won the race)."""
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dest} appeared while it was being built")
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, trash / "old")
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)

def _freeze(value: Any) -> Any:
    """JSON-ish value -> hashable (lists to tuples, dicts to sorted pair tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _extra_converter(value: Mapping[str, Any] | tuple[tuple[str, Any], ...]) -> tuple:
    if isinstance(value, Mapping):
        return _freeze(value)
    return tuple(sorted((str(k), _freeze(v)) for k, v in value))


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@attrs.frozen
class DemoModelSpec:
    """What to build. `extra` holds model-type specific config.json keys (e.g. qwen3_next's
    linear-attention and MoE sizes); it is stored as sorted (key, value) pairs so the spec
    stays hashable - pass a dict, read it back with `extra_dict()`."""

    name: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    seed: int = 0
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(_DTYPES))
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    extra: tuple = attrs.field(default=(), converter=_extra_converter)

    def extra_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.extra}

    def with_(self, **changes: Any) -> DemoModelSpec:
        """A copy with fields changed (e.g. `spec.with_(seed=1, dtype="bfloat16")`)."""
        return attrs.evolve(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["extra"] = self.extra_dict()
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DemoModelSpec:
        return cls(**data)

    @property
    def fingerprint(self) -> str:
        """Hash of the spec plus everything else the build depends on (12 hex digits)."""
        payload = json.dumps(
            {
                "builder": BUILDER_VERSION,
                "spec": self.to_json(),
                "tokenizer": demo_tokenizer.tokenizer_fingerprint(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def model_config(self, *, eos_token_ids: list[int] | None = None, bos_token_id: int | None = None) -> dict[str, Any]:
        """The config.json mlx-lm will read (minus tokenizer ids unless given)."""
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "head_dim": head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.dtype,
        }
        if self.model_type in _ARCHITECTURES:
            config["architectures"] = [_ARCHITECTURES[self.model_type]]
        config.update(self.extra_dict())
        if bos_token_id is not None:
            config["bos_token_id"] = bos_token_id
        if eos_token_ids is not None:
            config["eos_token_id"] = list(eos_token_ids)
        return config


DEMO_SPECS: dict[str, DemoModelSpec] = {
    spec.name: spec
    for spec in (
        # Unit tests: builds in well under a second, decodes in microseconds.
        DemoModelSpec(
            name="tiny-llama",
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=2048,
        ),
        # A hybrid (linear attention + full attention every 4th layer, MoE MLPs): its
        # prompt cache is [ArraysCache, ArraysCache, ArraysCache, KVCache].
        DemoModelSpec(
            name="tiny-hybrid",
            model_type="qwen3_next",
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            head_dim=16,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            extra={
                "full_attention_interval": 4,
                "linear_num_value_heads": 4,
                "linear_num_key_heads": 2,
                "linear_key_head_dim": 16,
                "linear_value_head_dim": 16,
                "linear_conv_kernel_dim": 4,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "decoder_sparse_step": 1,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 64,
                "mlp_only_layers": [],
                "norm_topk_prob": True,
                "partial_rotary_factor": 0.25,
            },
        ),
        # Benchmarks and `omlx-actors serve`: ~132M parameters, fp32 (~0.5 GB on disk).
        DemoModelSpec(
            name="demo-150m",
            model_type="llama",
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            intermediate_size=2304,
            vocab_size=32000,
            max_position_embeddings=8192,
        ),
    )
}


def get_spec(spec_or_name: DemoModelSpec | str) -> DemoModelSpec:
    if isinstance(spec_or_name, DemoModelSpec):
        return spec_or_name
    try:
        return DEMO_SPECS[spec_or_name]
    except KeyError:
        raise KeyError(
            f"unknown demo model {spec_or_name!r}; known: {', '.join(DEMO_SPECS)}"
        ) from None


# --------------------------------------------------------------------------- MLX side


def _mx():
    from omlx_actors.mlx_loader import load_mlx

    return load_mlx()


def _instantiate(config: dict[str, Any]):
    """The mlx-lm model for `config`, with its (lazy, never evaluated) default init.

    Like `mlx_lm.load`, constructing the model advances MLX's global random state.
    """
    _mx()  # BLAS preload before mlx_lm imports mlx
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def count_parameters(spec_or_name: DemoModelSpec | str) -> int:
    """Parameter count of a spec's model, without materializing any weights."""
    from mlx.utils import tree_flatten

    model = _instantiate(get_spec(spec_or_name).model_config())
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _init_array(name: str, shape: tuple[int, ...], spec: DemoModelSpec):
    """Deterministic float32 numpy init for one parameter, from (seed, name) only."""
    import numpy as np

    leaf = name.rsplit(".", 1)[-1]
    rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "A_log":  # gated delta net decay: log(A), A ~ U(1, 16)
        return np.log(rng.uniform(1.0, 16.0, size=shape)).astype(np.float32)
    if leaf == "dt_bias":
        return np.ones(shape, np.float32)
    if "norm" in name and leaf == "weight":  # RMSNorm / LayerNorm scales
        return np.ones(shape, np.float32)
    std = spec.init_std
    if "conv1d" in name:  # depthwise conv over a few steps: keep the signal
        std = 1.0 / np.sqrt(shape[1])
    out = rng.standard_normal(size=shape, dtype=np.float32)
    out *= np.float32(std)
    return out


def _write_weights(
    dest: Path, spec: DemoModelSpec, config: dict[str, Any], suppressed_ids: list[int]
) -> int:
    mx = _mx()
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import save_model

    model = _instantiate(config)
    dtype = getattr(mx, spec.dtype)
    names = [(k, tuple(v.shape)) for k, v in tree_flatten(model.parameters())]
    params = []
    for name, shape in names:
        arr = _init_array(name, shape, spec)
        if name == "lm_head.weight" and suppressed_ids:
            # These rows score exactly 0 while the others score ~N(0, s): greedy decoding
            # picks readable text (see greedy_suppressed_ids). Sampling can pick any id.
            arr[suppressed_ids] = 0.0
        a = mx.array(arr)
        del arr
        if a.dtype != dtype:
            a = a.astype(dtype)
        mx.eval(a)
        params.append((name, a))
    # Every parameter is replaced: nothing of the constructor's lazy init is evaluated.
    model.update(tree_unflatten(params), strict=True)
    del params
    save_model(dest, model, donate_model=True)
    return sum(math.prod(shape) for _, shape in names)


# --------------------------------------------------------------------------- building


def _build_into(tmp: Path, spec: DemoModelSpec) -> None:
    from mlx_lm.utils import save_config

    tok = demo_tokenizer.write_demo_tokenizer(
        tmp, spec.vocab_size, model_max_length=spec.max_position_embeddings
    )
    config = spec.model_config(
        eos_token_ids=tok["eos_token_ids"], bos_token_id=tok["bos_token_id"]
    )
    config["pad_token_id"] = tok["pad_token_id"]
    suppressed = [] if spec.tie_word_embeddings else tok["suppressed_ids"]
    n_params = _write_weights(tmp, spec, config, suppressed)
    save_config(dict(config), tmp / "config.json")
    marker = {
        "omlx_demo": True,
        "note": DEMO_NOTE,
        "name": spec.name,
        "fingerprint": spec.fingerprint,
        "builder_version": BUILDER_VERSION,
        "parameters": n_params,
        "learned_vocab": tok["learned_vocab"],
        "reserved_tokens": len(tok["reserved_ids"]),
        "greedy_suppressed_tokens": len(suppressed),
        "eos_token_ids": tok["eos_token_ids"],
        "spec": spec.to_json(),
    }
    # Written last: a directory with a marker is a complete build.
    (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def build_demo_model(
    spec_or_name: DemoModelSpec | str, dest: Path | str, *, overwrite: bool = False
) -> Path:
    """Build a demo model directory at `dest`, atomically (temp dir next to it + rename).

    Raises FileExistsError if `dest` exists and `overwrite` is false.
    """
    spec = get_spec(spec_or_name)
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists (pass overwrite=True to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".building", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        _build_into(tmp, spec)
        publish_directory(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_demo_marker(path: Path | str) -> dict[str, Any] | None:
    """The `omlx_demo.json` contents of a demo model directory, or None."""
    try:
        data = json.loads((Path(path) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("omlx_demo") is True else None


def is_demo_model(path: Path | str) -> bool:
    """True if `path` is a model directory built by this module (random weights)."""
    return read_demo_marker(path) is not None


def _is_complete(path: Path, spec: DemoModelSpec) -> bool:
    marker = read_demo_marker(path)
    return (
        marker is not None
        and marker.get("fingerprint") == spec.fingerprint
        and all((path / f).is_file() for f in _REQUIRED_FILES)
    )


def default_cache_dir() -> Path:
    return cache_home() / "models"


def demo_model_path(spec_or_name: DemoModelSpec | str, cache_dir: Path | str | None = None) -> Path:
    """Where `ensure_demo_model` keeps (or would keep) a spec's build."""
    spec = get_spec(spec_or_name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{spec.name}-{spec.fingerprint}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: atomic rename still protects
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_model(
    name: DemoModelSpec | str = "demo-150m", cache_dir: Path | str | None = None
) -> Path:
    """Path of a complete build of `name` in the cache, building it once if needed.

    The directory name carries the spec's fingerprint, so a changed spec or builder gets
    a fresh build. Concurrent callers (threads or processes) serialize on a lock file.
    """
    spec = get_spec(name)
    path = demo_model_path(spec, cache_dir)
    if _is_complete(path, spec):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.parent / f".{path.name}.lock"):
        if not _is_complete(path, spec):
            build_demo_model(spec, path, overwrite=True)
    return path


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m omlx_actors.models.demo",
        description="Build a random-weight demo model directory loadable by mlx_lm.load.",
    )
    parser.add_argument("name", nargs="?", choices=sorted(DEMO_SPECS), help="which demo model")
    parser.add_argument("dest", nargs="?", type=Path, help="output directory (default: the cache)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    parser.add_argument("--seed", type=int, default=None, help="override the spec's seed")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="override the dtype")
    parser.add_argument("--list", action="store_true", help="list the specs and exit")
    args = parser.parse_args(argv)

    if args.list or args.name is None:
        for spec in DEMO_SPECS.values():
            print(
                f"{spec.name:12s} {spec.model_type:11s} vocab={spec.vocab_size:<6d} "
                f"layers={spec.num_hidden_layers:<3d} hidden={spec.hidden_size:<5d} "
                f"dtype={spec.dtype}"
            )
        return 0 if args.list else 2
    spec = get_spec(args.name)
    if args.seed is not None:
        spec = spec.with_(seed=args.seed)
    if args.dtype is not None:
        spec = spec.with_(dtype=args.dtype)
    t0 = time.perf_counter()
    if args.dest is None:
        path = ensure_demo_model(spec)
    else:
        try:
            path = build_demo_model(spec, args.dest, overwrite=args.overwrite)
        except FileExistsError:
            print(f"error: {args.dest} exists (use --overwrite to replace it)", file=sys.stderr)
            return 1
    print(f"{path}  ({time.perf_counter() - t0:.1f}s; {DEMO_NOTE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loading the model onto the engine core's thread, and describing it to the others.

Once per core, before its first command: the weights go onto the core's own stream, the
CPU's split attention is installed when asked for, the block store is chosen for the
model's cache layout, and the grammar tokenizers are prepared. What the rest of the engine
and the front learn of the model is `EngineInfo`, plain data. MLX thread only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import attrs

from omlx_actors.cache.blocks import cache_namespace, default_block_size
from omlx_actors.engine import cpu_attention
from omlx_actors.engine.block_store import BlockStore, cache_layout
from omlx_actors.engine.core_messages import EngineSettings
from omlx_actors.engine.grammar import GrammarTokenizers
from omlx_actors.engine.messages import EngineInfo
from omlx_actors.mlx_loader import load_mlx, stop_token_ids

mx = load_mlx()


@attrs.frozen
class LoadedModel:
    model: Any
    info: EngineInfo
    store: BlockStore | None  # None: no prefix cache (block size 0, or a layout it can't hold)
    grammars: GrammarTokenizers


def model_identity(path: Path) -> str:
    """What names a model for the prefix cache: its config and weight files' sizes. Two
    directories with the same files share cached blocks; any change gives a new namespace."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:24]


def _plain_config(config: dict) -> tuple[tuple[str, str], ...]:
    """The model config as (key, JSON) pairs: plain data the front's estimator can read."""
    return tuple(sorted((str(k), json.dumps(v, sort_keys=True, default=str)) for k, v in config.items()))


def load_engine_model(settings: EngineSettings, stream: Any) -> LoadedModel:
    """Load `settings.model_path` on `stream` (the core's own). Raises whatever loading
    raises; the CPU's split attention may then be enabled on this thread already."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    path = Path(settings.model_path)
    with mx.stream(stream):
        model, config = load_model(path, trust_remote_code=settings.trust_remote_code)
    text_config = config.get("text_config", config)
    # Not config.json's eos_token_id alone: mlx-lm's set (tokenizer, generation_config).
    eos_ids = stop_token_ids(path, config)
    if settings.parallel_attention and cpu_attention.install(model):
        cpu_attention.enable_on_this_thread()
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    # MLX's peak is process-wide: measure this engine's own from here.
    mx.reset_peak_memory()
    layout = cache_layout(model)
    block_size = settings.block_size
    if block_size is None:
        block_size = default_block_size(layout)
    namespace = cache_namespace(model_identity(path), layout, max(block_size, 1))
    store = None
    if block_size > 0:
        store = BlockStore(layout, block_size, namespace)
        if not store.enabled:
            store = None  # a cache type we cannot slice or snapshot
    grammars = GrammarTokenizers(str(path), int(text_config.get("vocab_size", 0)), tuple(eos_ids))
    info = EngineInfo(
        model_path=str(path),
        model_type=str(config.get("model_type", "unknown")),
        vocab_size=int(text_config.get("vocab_size", 0)),
        max_context=text_config.get("max_position_embeddings"),
        eos_token_ids=eos_ids,
        device="gpu" if mx.default_device() == mx.gpu else "cpu",
        cache_layout=layout,
        cache_namespace=namespace if store is not None else None,
        block_size=block_size if store is not None else 0,
        weights_bytes=weights_bytes,
        memory_config=_plain_config(config),
    )
    return LoadedModel(model=model, info=info, store=store, grammars=grammars)

"""Which models a pool serves, under which names, and what each costs.

`PoolModelSpec` is one model as configured (`--model`, with its `--served-model-name` and
`--pin`; or found in `--models-dir`); `resolve_pool_models` resolves each to its weights
(the same `models.download.resolve_model` a single runtime uses: demo models, GGUF imports,
hub ids, local directories), gives it its served name and aliases, its own runtime config
(its own SSD namespace: a subdirectory of the configured SSD directory) and its priced
footprint (`footprint_bytes`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from omlx_actors.config import ConfigError, RuntimeConfig
from omlx_actors.memory.estimator import ModelMemoryFacts, kv_bytes_per_token

# At most this many models in one pool: every one is an engine process when loaded and a
# line of /v1/models, /health and /metrics; a directory with more is a configuration error.
MAX_POOL_MODELS = 64
# A served name travels in URLs, metrics labels and SSD directory names.
MAX_MODEL_NAME_CHARS = 256


@attrs.frozen(kw_only=True)
class PoolModelSpec:
    """One model as configured. `source`: what `--model` says (a directory, a `.gguf`
    file, a hub id, a demo model's name). `explicit`: named on the command line (a model
    that can never fit is then refused at startup; one found in a directory gets a 413)."""

    source: str
    served_name: str | None = None
    pinned: bool = False
    explicit: bool = True


@attrs.frozen(kw_only=True)
class PoolModel:
    """A resolved model of the pool."""

    name: str  # the served id: what /v1/models lists and requests name
    aliases: frozenset[str]  # every name a request may use for it (`name` included)
    path: Path
    is_demo: bool
    config: RuntimeConfig  # its runtime's own settings (model, SSD namespace)
    size_bytes: int
    pinned: bool
    explicit: bool


def discover_models(models_dir: Path) -> list[PoolModelSpec]:
    """Every subdirectory of `models_dir` holding a `config.json` (an mlx-lm model) and
    every `.gguf` file in it, sorted by name."""
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--models-dir {models_dir}: not a directory")
    found = []
    for entry in sorted(root.iterdir()):
        if (entry.is_dir() and (entry / "config.json").is_file()) or (
                entry.is_file() and entry.suffix.lower() == ".gguf"):
            found.append(PoolModelSpec(source=str(entry), explicit=False))
        if len(found) > MAX_POOL_MODELS:
            raise ConfigError(f"--models-dir {models_dir}: more than {MAX_POOL_MODELS} models")
    return found


def pool_specs(models: Sequence[str], served_names: Sequence[str] = (),
               pins: Iterable[str] = (), models_dir: Path | None = None) -> list[PoolModelSpec]:
    """The pool's models from the CLI's flags: `--served-model-name`s pair with the
    `--model`s in order; `--pin` names a model by any of its names (checked once the
    names are known, in `resolve_pool_models`)."""
    if len(served_names) > len(models):
        raise ConfigError(f"{len(served_names)} --served-model-name for {len(models)} --model")
    pins = frozenset(pins)
    specs = [PoolModelSpec(source=m, served_name=served_names[i] if i < len(served_names) else None,
                           pinned=m in pins)
             for i, m in enumerate(models)]
    if models_dir is not None:
        specs.extend(discover_models(models_dir))
    if len(specs) > MAX_POOL_MODELS:
        raise ConfigError(f"more than {MAX_POOL_MODELS} models in one pool")
    return specs


def footprint_bytes(path: Path, config: RuntimeConfig) -> int:
    """What a loaded model is priced at in the pool's budget: its weights (the size of its
    safetensors files), the prefix cache its engine may keep (`prefix_cache_bytes`) and the
    KV cache of one request of `default_max_tokens` tokens (the estimator's per-token KV
    from its config.json). Not priced: the engine process's own baseline (interpreter,
    MLX), and requests beyond the first (each engine admits those against its own budget)."""
    path = Path(path)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    try:
        facts = ModelMemoryFacts.from_config(json.loads((path / "config.json").read_text()))
        kv = kv_bytes_per_token(facts) * config.default_max_tokens
    except (OSError, ValueError):
        kv = 0
    return max(weights + config.prefix_cache_bytes + kv, 1)


def safe_dir_name(name: str) -> str:
    """A served name as one directory name (the model's SSD namespace)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return cleaned[:120]


def default_name(spec: PoolModelSpec, path: Path) -> str:
    if spec.served_name:
        return spec.served_name
    local = Path(spec.source).expanduser()
    if local.is_file():
        return local.stem  # a .gguf file
    if local.is_dir():
        return path.name
    return spec.source  # a hub id or a demo model's name, as given


def runtime_config_for(spec: PoolModelSpec, name: str, base: RuntimeConfig) -> RuntimeConfig:
    """The model's own settings: its source (a demo model's name selects that demo), and
    its own SSD namespace under the configured SSD directory."""
    from omlx_actors.models.demo import DEMO_SPECS

    is_demo_name = spec.source in DEMO_SPECS and not Path(spec.source).expanduser().exists()
    changes: dict = {"model": None, "demo_model": spec.source} if is_demo_name else {
        "model": spec.source}
    if base.ssd_cache_dir is not None:
        changes["ssd_cache_dir"] = Path(base.ssd_cache_dir) / safe_dir_name(name)
    return attrs.evolve(base, **changes)


async def resolve_pool_models(specs: Sequence[PoolModelSpec], base: RuntimeConfig,
                              pins: Iterable[str] = ()) -> list[PoolModel]:
    """Resolve every spec (downloads, imports: as `serve` would for one model), name and
    price it. Raises `ConfigError` for duplicate names, a `--pin` that names no model, or
    more models than `MAX_POOL_MODELS`."""
    from omlx_actors.models.download import resolve_model

    if not specs:
        raise ConfigError("a model pool needs at least one model")
    if len(specs) > MAX_POOL_MODELS:
        raise ConfigError(f"more than {MAX_POOL_MODELS} models in one pool")
    models: list[PoolModel] = []
    taken: dict[str, str] = {}
    for spec in specs:
        probe = runtime_config_for(spec, spec.served_name or spec.source, base)
        path, is_demo = await resolve_model(probe)
        name = default_name(spec, path)
        if not name or len(name) > MAX_MODEL_NAME_CHARS:
            raise ConfigError(f"model name {name[:40]!r}...: 1 to {MAX_MODEL_NAME_CHARS} characters")
        config = runtime_config_for(spec, name, base)
        aliases = {name, spec.source, path.name, str(path)}
        for alias in aliases:
            if alias in taken and taken[alias] != name:
                raise ConfigError(f"two models answer to the name {alias!r} "
                                  f"({taken[alias]} and {name}); give one --served-model-name")
        # A directory's own name is an alias only while no other model claims it.
        taken.update({alias: name for alias in aliases})
        models.append(PoolModel(name=name, aliases=frozenset(aliases), path=path,
                                is_demo=is_demo, config=config,
                                size_bytes=footprint_bytes(path, config),
                                pinned=spec.pinned, explicit=spec.explicit))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate model names: {sorted(n for n in names if names.count(n) > 1)}")
    pins = frozenset(pins)
    unknown = {p for p in pins if not any(p in m.aliases for m in models)}
    if unknown:
        raise ConfigError(f"--pin {sorted(unknown)[0]}: no such model in the pool "
                          f"(models: {', '.join(names)})")
    return [attrs.evolve(m, pinned=m.pinned or bool(pins & m.aliases)) for m in models]


__all__ = [
    "MAX_POOL_MODELS", "PoolModel", "PoolModelSpec", "discover_models", "footprint_bytes",
    "PoolOptions", "pool_specs", "resolve_pool_models", "runtime_config_for",
]


@attrs.frozen(kw_only=True)
class PoolOptions:
    """A model pool as `serve` configures it (`server.open_server(pool=...)`)."""

    specs: tuple[PoolModelSpec, ...]
    budget_bytes: int | None = attrs.field(default=None)
    idle_ttl_s: float | None = None
    pins: tuple[str, ...] = ()

    @budget_bytes.validator
    def _positive(self, attribute, value) -> None:
        if value is not None and value <= 0:
            raise ConfigError(f"the pool's memory budget must be > 0, got {value!r}")

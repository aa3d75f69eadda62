"""The one place the package imports MLX from.

MLX's Linux CPU wheel bundles the reference netlib BLAS, which runs fp32 matmuls 50-100x
slower than the machine can. Loading a real BLAS (Debian's OpenBLAS) into the global symbol
namespace *before* `mlx.core` is first imported makes MLX's CPU backend bind to it instead.
That only works if it happens before anything else imports MLX, so every module of the
package that needs MLX goes through `load_mlx()` (or imports this module first).

Nothing here touches an MLX stream or array: importing is safe on any thread. Running MLX is
not - see `omlx_actors.engine.executor`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from types import ModuleType

# Debian/Ubuntu's libopenblas0-pthread. Searched in this order; the environment variable
# OMLX_OPENBLAS overrides (an explicit path, or "off" to skip the preload).
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_blas_status: str | None = None


def _preload_openblas() -> str:
    """Load OpenBLAS with RTLD_GLOBAL if we are on Linux and MLX is not imported yet.

    Returns a short human-readable status (kept for `omlx-actors serve` to print).
    """
    if not sys.platform.startswith("linux"):
        return "not needed (not Linux)"
    if "mlx.core" in sys.modules:
        return "skipped: mlx.core was imported before omlx_actors.mlx_loader"
    # From the environment, not RuntimeConfig: this runs before MLX's first import, before
    # any config exists (see omlx_actors.config).
    choice = os.environ.get("OMLX_OPENBLAS", "")
    if choice.lower() == "off":
        return "disabled by OMLX_OPENBLAS=off"
    candidates = (choice,) if choice else OPENBLAS_CANDIDATES
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:  # a broken install: say so, keep going slowly
                return f"failed to load {path}: {exc}"
            return f"OpenBLAS preloaded from {path}"
    warnings.warn(
        "OpenBLAS not found: MLX's CPU backend will use its bundled reference BLAS, which is "
        "50-100x slower for matmuls. Fix: `apt-get install libopenblas0-pthread` "
        "(or set OMLX_OPENBLAS=/path/to/libopenblas.so.0).",
        RuntimeWarning,
        stacklevel=3,
    )
    return "not found (slow reference BLAS in use)"


def blas_status() -> str:
    """What the BLAS preload did, e.g. for the server's banner."""
    return _blas_status or "MLX not loaded yet"


def load_mlx() -> ModuleType:
    """Import and return `mlx.core`, preloading OpenBLAS first on Linux (once)."""
    global _blas_status
    if _blas_status is None:
        _blas_status = _preload_openblas()
    import mlx.core as mx

    return mx


def device_name() -> str:
    """'gpu' on Metal/CUDA builds, 'cpu' otherwise (asks MLX; safe on any thread)."""
    mx = load_mlx()
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


# Importing this module is enough to fix the BLAS: `import omlx_actors.mlx_loader` first.
load_mlx()


def stop_token_ids(model_path, config: dict) -> tuple[int, ...]:
    """The ids that end a generation for the model at `model_path`: the set mlx-lm's
    `load(...)` gives its tokenizer wrapper, computed without loading the tokenizer.

    That is `eos_token_id` from `config` (mlx-lm's `load_config` already replaced it with
    `generation_config.json`'s when that names one; config.json's own ids are kept too),
    the tokenizer's `eos_token` (tokenizer_config.json or special_tokens_map.json, looked up
    in tokenizer.json), and the model module's tokenizer defaults. Many chat models end
    their turn with a token named only in the tokenizer or in generation_config.json; a
    stop id missing here makes the engine generate past the end of the answer.
    """
    import json
    from pathlib import Path

    path = Path(model_path)
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    def read(name: str) -> dict:
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    add(config.get("eos_token_id"))
    add(read("config.json").get("eos_token_id"))
    add(read("generation_config.json").get("eos_token_id"))
    eos = read("tokenizer_config.json").get("eos_token") or read(
        "special_tokens_map.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        token_id = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(eos)
        if token_id is not None:
            ids.add(token_id)
    try:
        from mlx_lm.utils import _tokenizer_defaults

        add((_tokenizer_defaults(path) or {}).get("eos_token_ids"))
    except ImportError:  # an mlx-lm without per-model tokenizer defaults
        pass
    return tuple(sorted(ids))

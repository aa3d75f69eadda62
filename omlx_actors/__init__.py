"""omlx-actors: a local LLM inference runtime on MLX and mlx-lm, built from Trio actors.

`open_runtime` (one model) and `open_pool` (several, loaded on demand) are imported lazily so `import omlx_actors` stays cheap and does not load MLX.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_pool", "open_runtime"]


def __getattr__(name: str) -> Any:
    if name == "open_runtime":
        from omlx_actors.wiring import open_runtime

        return open_runtime
    if name == "open_pool":
        from omlx_actors.pool.api import open_pool

        return open_pool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

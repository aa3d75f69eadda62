"""omlx-actors: a local LLM inference runtime on MLX and mlx-lm, built from Trio actors.

`open_runtime` is imported lazily so `import omlx_actors` stays cheap and does not load MLX.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_runtime"]


def __getattr__(name: str) -> Any:
    if name == "open_runtime":
        from omlx_actors.wiring import open_runtime

        return open_runtime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

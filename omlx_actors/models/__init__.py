"""Model helpers: offline random-weight demo models (`omlx_actors.models.demo`), GGUF
import (`omlx_actors.models.gguf`) and which weights to serve (`omlx_actors.models.resolve`:
the default real model, GGUF files, float32 on the CPU).

Names are re-exported lazily, so importing this package stays cheap and
`python -m omlx_actors.models.demo` runs without a double-import warning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omlx_actors.models.demo import (
        DEMO_SPECS,
        DemoModelSpec,
        build_demo_model,
        count_parameters,
        default_cache_dir,
        demo_model_path,
        ensure_demo_model,
        get_spec,
        is_demo_model,
        read_demo_marker,
    )

__all__ = [
    "DEMO_SPECS",
    "DemoModelSpec",
    "build_demo_model",
    "count_parameters",
    "default_cache_dir",
    "demo_model_path",
    "ensure_demo_model",
    "get_spec",
    "is_demo_model",
    "read_demo_marker",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("omlx_actors.models.demo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

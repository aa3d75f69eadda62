"""Memory: what a request will cost (`estimator`), who holds how much and who waits
(`admission`: the ledger), what the executor does about it (`policy`) - all three pure,
importing neither trio nor MLX - and what the process uses against its budget (`enforcer`:
an actor).

The enforcer's names are imported lazily, so `import omlx_actors.memory` (or its estimator)
stays free of trio, like the estimator itself.
"""

from __future__ import annotations

from typing import Any

from .estimator import (
    KV_CACHE_STEP,
    LayerKind,
    ModelMemoryFacts,
    RequestEstimate,
    estimate_request_bytes,
    format_bytes,
    kv_bytes_per_token,
    kv_cache_capacity,
    padded_batch_kv_bytes,
)

_ENFORCER_NAMES = frozenset({
    "BudgetMode",
    "EnforcerHandle",
    "EnforcerMessage",
    "GetSnapshot",
    "MemoryBudget",
    "MemoryLevel",
    "MemorySnapshot",
    "MlxLimits",
    "MlxReading",
    "SnapshotBoard",
    "SnapshotSubscription",
    "SystemReading",
    "level_for",
    "mlx_limits_for",
    "read_system_psutil",
    "snapshot_from",
})

__all__ = [  # the estimator's names, then the enforcer's (lazy: `_ENFORCER_NAMES`)
    "KV_CACHE_STEP",
    "BudgetMode",
    "EnforcerHandle",
    "EnforcerMessage",
    "GetSnapshot",
    "LayerKind",
    "MemoryBudget",
    "MemoryLevel",
    "MemorySnapshot",
    "MlxLimits",
    "MlxReading",
    "ModelMemoryFacts",
    "RequestEstimate",
    "SnapshotBoard",
    "SnapshotSubscription",
    "SystemReading",
    "estimate_request_bytes",
    "format_bytes",
    "kv_bytes_per_token",
    "kv_cache_capacity",
    "level_for",
    "mlx_limits_for",
    "padded_batch_kv_bytes",
    "read_system_psutil",
    "run_enforcer",
    "snapshot_from",
]


def __getattr__(name: str) -> Any:
    if name in _ENFORCER_NAMES or name == "run_enforcer":
        from . import enforcer

        return enforcer.run if name == "run_enforcer" else getattr(enforcer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

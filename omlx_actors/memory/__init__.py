"""Memory: what a request will cost (`estimator`: pure, imports neither trio nor MLX) and
what the process uses against its budget (`enforcer`: an actor).

The enforcer's names are imported lazily, so `import omlx_actors.memory` (or its estimator)
stays free of trio, like the estimator itself.
"""

from __future__ import annotations

from typing import Any

from .estimator import (
    KV_CACHE_STEP,
    Admit,
    AdmissionDecision,
    LayerKind,
    ModelMemoryFacts,
    Reject,
    RequestEstimate,
    Wait,
    decide_admission,
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

__all__ = sorted({
    "KV_CACHE_STEP",
    "Admit",
    "AdmissionDecision",
    "LayerKind",
    "ModelMemoryFacts",
    "Reject",
    "RequestEstimate",
    "Wait",
    "decide_admission",
    "estimate_request_bytes",
    "format_bytes",
    "kv_bytes_per_token",
    "kv_cache_capacity",
    "padded_batch_kv_bytes",
    "run_enforcer",
} | _ENFORCER_NAMES)


def __getattr__(name: str) -> Any:
    if name in _ENFORCER_NAMES or name == "run_enforcer":
        from . import enforcer

        return enforcer.run if name == "run_enforcer" else getattr(enforcer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

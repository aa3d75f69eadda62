"""The engine host's own messages: the handshake, the stop, and the prefix lookup.

The front sends `HostHello` first; the engine process answers `HostReady` once its model is
loaded and its SSD index rebuilt (or `HostLoadFailed`), then serves calls and casts to its
actors, and `LookupAndSubmit`. `HostStop` ends it: the executor drains or aborts, its last events are sent, and the
reply `HostStopped` is the last frame before the process exits.
"""

from __future__ import annotations

import attrs

from omlx_actors.engine.messages import EngineInfo, Submit


@attrs.frozen(kw_only=True)
class HostHello:
    """The engine's settings: a `RuntimeConfig` as JSON, the resolved model directory, and
    the file the MLX thread records its current step's requests in (`engine/step_record.py`),
    which the front reads when the engine dies."""

    config_json: str
    model_path: str
    step_record_path: str | None = None


@attrs.frozen(kw_only=True)
class HostReady:
    info: EngineInfo
    pid: int
    cache_index: bool  # the prefix cache's index runs (else lookups find nothing)
    ssd: bool  # the SSD tier runs


@attrs.frozen(kw_only=True)
class HostLoadFailed:
    error_type: str
    error: str


@attrs.frozen(kw_only=True)
class HostStop:
    mode: str  # "drain" | "abort"


@attrs.frozen(kw_only=True)
class HostStopped:
    pass


@attrs.frozen(kw_only=True)
class LookupAndSubmit:
    """Pin the longest cached prefix of the request's prompt (restoring blocks from the SSD
    tier, inside the engine process), then submit it with that prefix: one round trip, and
    no block crosses the boundary. Answered with None, or the executor's refusal."""

    submit: Submit

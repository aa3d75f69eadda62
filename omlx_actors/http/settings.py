"""The HTTP front's settings: one typed object, built by the CLI and passed down."""

from __future__ import annotations

import attrs


def _positive(instance, attribute, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


# Request bodies above this are refused with 413 before they are read whole. 32 MiB holds a
# prompt of several million characters; anything larger is a mistake or an attack.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@attrs.frozen(kw_only=True)
class HttpSettings:
    """How the HTTP front behaves. Shutdown mode and drain timeout are the runtime's
    (`RuntimeConfig.shutdown_mode`, `drain_timeout_s`): the server drains or aborts streams
    the same way the runtime drains or aborts requests."""

    # With a key, every /v1/* route needs `Authorization: Bearer KEY` or `x-api-key: KEY`.
    api_key: str | None = attrs.field(default=None, repr=False)
    # Also require the key on /health and /metrics (by default they stay open for probes).
    protect_health: bool = False
    max_body_bytes: int = attrs.field(default=DEFAULT_MAX_BODY_BYTES, validator=_positive)
    # A stream that has sent nothing for this long gets an SSE keep-alive comment (OpenAI
    # routes) or a `ping` event (Anthropic), so proxies and clients do not time out during
    # a long prefill or a queue wait.
    keepalive_s: float = attrs.field(default=5.0, validator=_positive)
    # The model id /v1/models reports; None: the --model string, or the model directory's name.
    served_model_name: str | None = None
    # /health: how long to wait for the executor's Pong, and how old its last step may be
    # while it has running requests before the engine counts as stuck.
    health_ping_timeout_s: float = attrs.field(default=1.0, validator=_positive)
    health_stall_s: float = attrs.field(default=30.0, validator=_positive)
    # Shutdown: after aborting in-flight requests, how long their streams get to send their
    # final error event before the connections are cut.
    abort_grace_s: float = attrs.field(default=5.0, validator=_positive)

"""The runtime's configuration: one typed object, built once and passed down.

The CLI builds a `RuntimeConfig` from flags; modules take their settings from it, not from
the environment. The environment is read in three places, each for a reason the config
object cannot serve (`omlx_actors.cli`'s help lists them for the user):

- XDG_CACHE_HOME, by `cache_home()` below only: where the package keeps what it builds or
  fetches. Its callers are `omlx_actors.cli` (the default --ssd-cache-dir, shown in the
  help before any config exists), `omlx_actors.models.demo` (the demo models) and
  `omlx_actors.models.resolve` (downloaded and imported models); the model helpers are also
  called without a config (`build-demo`, the engine process, tests).
- OMLX_OPENBLAS, by `omlx_actors.mlx_loader`: which OpenBLAS library to preload, or `off`.
  The preload must happen before MLX is first imported - before a config exists, and in the
  engine process before it has read the one it is sent.
- Hugging Face's HF_* variables (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, ...), by
  huggingface_hub through mlx-lm, when a model id is resolved or downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs


class ConfigError(ValueError):
    """A setting that cannot work (with this model, on this machine). The CLI reports it in
    one line and exits with status 2, like a bad flag."""


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def cache_home() -> Path:
    """This package's directory in the user's cache: `$XDG_CACHE_HOME/omlx-actors`, or
    `~/.cache/omlx-actors` where XDG_CACHE_HOME is unset or empty. The one place the
    package reads XDG_CACHE_HOME (read at each call; nothing is created)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "omlx-actors"


def _positive(instance, attribute, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class RuntimeConfig:
    """Settings of one runtime (engine + front).

    `model`: a local mlx-lm model directory or a Hugging Face repo id; None serves the
    built-in random-weight demo model (`demo_model`), built once into the user cache.
    """

    model: str | None = None
    demo_model: str = "demo-150m"
    model_cache_dir: Path | None = None
    # Rows decoded together; mlx-lm's BatchGenerator `completion_batch_size`.
    max_batch_size: int = attrs.field(default=32, validator=_positive)
    # Prompts prefilled together, and the tokens per prefill chunk.
    prefill_batch_size: int = attrs.field(default=8, validator=_positive)
    prefill_step_size: int = attrs.field(default=512, validator=_positive)
    # The most prompt tokens one step prefills per prompt while other rows are decoding, so
    # a long prompt's prefill adds at most that much work to each of their tokens (#18);
    # 0: no cap (every step may prefill a whole `prefill_step_size` chunk).
    prefill_step_while_decoding: int = attrs.field(default=128, validator=attrs.validators.ge(0))
    # Requests admitted beyond the batch wait in the engine; past this many waiting the
    # front answers 429 with Retry-After instead of queueing without bound.
    max_waiting_requests: int = attrs.field(default=256, validator=_positive)
    default_max_tokens: int = attrs.field(default=512, validator=_positive)
    # Upper bound for any request's prompt + max_tokens when the model config names none.
    fallback_context_length: int = attrs.field(default=32768, validator=_positive)
    # How long a caller waits for the executor to accept a submission.
    submit_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    # Shutdown: "drain" lets running requests finish, "abort" ends them at once.
    shutdown_mode: str = attrs.field(
        default="drain", validator=attrs.validators.in_(("drain", "abort"))
    )
    drain_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    # Prefix cache in memory: tokens per block (None: chosen for the model, see
    # `omlx_actors.cache.blocks.default_block_size`), and the byte budget for cached blocks
    # (0 turns the prefix cache off).
    block_size: int | None = attrs.field(default=None, validator=_positive)
    prefix_cache_bytes: int = attrs.field(
        default=2 * 1024**3, validator=attrs.validators.ge(0)
    )
    # Memory budget for weights + prefix cache + requests: explicit bytes, or None for
    # automatic (total memory minus a headroom). Requests that can never fit are refused
    # (413) before any work; ones that fit later wait (bounded by max_waiting_requests).
    memory_budget_bytes: int | None = attrs.field(default=None, validator=_positive)
    # The longest a request may wait for memory (seconds, from its arrival at the engine):
    # past it, it is refused - 503 `queue_timeout` with Retry-After before the first byte, an
    # error event after. A request that nothing will ever make room for is refused at once.
    max_queue_wait_s: float = attrs.field(default=120.0, validator=_positive)
    memory_poll_interval_s: float = attrs.field(default=0.5, validator=_positive)
    # SSD tier of the prefix cache: a directory for block files (None: off) and its byte
    # budget (also shrunk when the disk runs low). Blocks are written through as they are
    # stored in memory, so a restarted server finds its conversations' prefixes there.
    ssd_cache_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    ssd_cache_bytes: int = attrs.field(default=16 * 1024**3, validator=_positive)

    # CPU backend only: split prompt attention over two MLX streams (bit-identical results;
    # on Metal and CUDA attention is a fused kernel and this does nothing).
    parallel_attention: bool = True

    # Where the engine runs: "thread" - on an MLX thread of this process (the in-process
    # API's default); "process" - in a child process, so that a native crash of MLX (an
    # abort, a segfault) kills only the engine: the front starts a new one and resumes every
    # in-flight request where it stopped (`serve`'s default).
    isolation: str = attrs.field(
        default="thread", validator=attrs.validators.in_(("thread", "process"))
    )
    # The engine process: how long it may take to start (model load, SSD index rebuild),
    # and how long it may leave a heartbeat unanswered before it is killed and restarted.
    engine_start_timeout_s: float = attrs.field(default=300.0, validator=_positive)
    engine_heartbeat_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    # More engine deaths than this within the window (a start that fails counts as one) and
    # the front gives up for a while: the engine is "failed", in-flight requests end with an
    # error and new ones get 503 - until a new engine is tried after a cool-down, doubled at
    # each give-up in a row up to the max (a crash-looping engine costs little, a passing
    # cause - memory taken by another program - heals without a person).
    engine_max_restarts: int = attrs.field(default=10, validator=_positive)
    engine_restart_window_s: float = attrs.field(default=60.0, validator=_positive)
    engine_restart_cooldown_s: float = attrs.field(default=30.0, validator=_positive)
    engine_restart_cooldown_max_s: float = attrs.field(default=900.0, validator=_positive)

    # Python's thread switch interval (seconds) for the processes that run the engine (the
    # server, and the engine process): the MLX thread releases the GIL while the device
    # computes and must get it back the moment a step is done; with the default 5 ms a busy
    # event loop can hold it a whole interval each time, which costs most on fast steps
    # (a GPU). None: Python's 5 ms in the server and in an in-process runtime (a process-wide
    # setting an embedder chooses), 0.2 ms in the engine process (`isolation.host`).
    gil_switch_interval_s: float | None = attrs.field(default=None, validator=_positive)

    # Caps any request's prompt + max_tokens below the model's context (the context check
    # uses the smaller of the two; a larger value changes nothing). None: the model's.
    max_model_len: int | None = attrs.field(default=None, validator=_positive)
    # A Jinja chat template (its text) that replaces the tokenizer's; None keeps the model's.
    chat_template: str | None = None
    # Let mlx-lm and transformers run Python code shipped with the model (a config's
    # `model_file`, custom tokenizer classes). Off: mlx-lm refuses such models.
    trust_remote_code: bool = False
    # Logging threshold of the server and the engine process.
    log_level: str = attrs.field(default="warning", validator=attrs.validators.in_(LOG_LEVELS))

    def check_model_fits(self, model_path: Path) -> None:
        """Raise `ConfigError` when an explicit memory budget cannot even hold the model's
        weights (their files' sizes), before anything is loaded."""
        if self.memory_budget_bytes is None:
            return
        weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
        if weights >= self.memory_budget_bytes:
            raise ConfigError(
                f"the weights of {Path(model_path).name} ({_human(weights)}) do not fit "
                f"the memory budget ({_human(self.memory_budget_bytes)})")

    def to_json(self) -> str:
        """This config as JSON (paths as strings), for the engine process."""
        return json.dumps(attrs.asdict(
            self, value_serializer=lambda _, __, v: str(v) if isinstance(v, Path) else v))

    @classmethod
    def from_json(cls, text: str) -> RuntimeConfig:
        data = json.loads(text)
        for name in ("model_cache_dir", "ssd_cache_dir"):
            if data.get(name) is not None:
                data[name] = Path(data[name])
        return cls(**data)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"

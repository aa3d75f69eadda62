"""The in-process API: `open_runtime()` → `Runtime.chat()` / `Runtime.complete()`.

The HTTP server uses exactly this path. Example::

    async with open_runtime(model="path/to/mlx-model") as rt:
        async for event in rt.chat([{"role": "user", "content": "hi"}], max_tokens=32):
            ...

Who owns what: the supervisor owns the executor actor and its inbox; the `Dispatcher` owns
the table request id → session channel and is the only reader of the executor's event
channel; each `Session` owns its text state. Sessions talk to the executor only with
messages (`Submit`, `Abort`).
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.cache.actor import CacheStats, CacheStatsQuery
from omlx_actors.config import RuntimeConfig
from omlx_actors.engine import executor
from omlx_actors.engine.assembly import open_engine_side
from omlx_actors.engine.messages import (
    Abort,
    EngineEvent,
    EngineInfo,
    EngineStats,
    EngineStatsQuery,
    FaultKind,
    Finished,
    FinishReason,
    InjectFault,
    Ping,
    Pong,
    SamplingParams,
    Submit,
)
from omlx_actors.refusals import (
    DuplicateRequestId,
    EngineUnavailable,
    ModelNotFound,
    QueueFull,
    RequestTooLarge,
)
from omlx_actors.isolation.link import (
    EngineLink,
    EngineStatus,
    RemoteAddress,
    open_engine_link,
)
from omlx_actors.kernel import ActorError, Address, InboxFull
from omlx_actors.front.session import GenerationRequest, Session, coerce_stop
from omlx_actors.front.structured import StructuredOutput
from omlx_actors.ssd.messages import SsdCleanupAll
from omlx_actors.ssd.messages import SsdCleanupRequest
from omlx_actors.ssd.messages import DiskFaultKind, InjectDiskFault
from omlx_actors.ssd.messages import SsdFlush
from omlx_actors.ssd.messages import SsdStatsQuery

log = logging.getLogger(__name__)

# Finished events the dispatcher remembers for inspection (tests, debugging); older ones
# are forgotten.
RECENT_FINISHED = 1024

class Dispatcher:
    """Routes engine events to sessions by request id. Never blocks on a session: each
    session's channel is sized to hold its whole request (see `Session._channel_capacity`).

    Register/unregister are plain methods: they run on the trio thread between awaits, so
    the table has one owner at a time without any lock.
    """

    def __init__(self) -> None:
        self._routes: dict[str, trio.MemorySendChannel[EngineEvent]] = {}
        self.undeliverable = 0  # events for requests nobody listens to any more
        self.recent_finished: deque[Finished] = deque(maxlen=RECENT_FINISHED)

    def register(self, request_id: str, capacity: int) -> trio.MemoryReceiveChannel:
        if request_id in self._routes:
            raise DuplicateRequestId(f"request id {request_id!r} is already in use", param="request_id")
        send, receive = trio.open_memory_channel[EngineEvent](capacity)
        self._routes[request_id] = send
        return receive

    def unregister(self, request_id: str) -> None:
        send = self._routes.pop(request_id, None)
        if send is not None:
            send.close()

    def __len__(self) -> int:
        return len(self._routes)

    async def run(self, events: trio.MemoryReceiveChannel[EngineEvent]) -> None:
        """Serve until the executor's event channel closes; then fail whoever is left.

        Routes every event already waiting before yielding again: a step's tokens for all
        streams land in their sessions together, so each stream wakes once per step with
        everything it has, not once per event."""
        try:
            async for event in events:
                self._route(event)
                while True:
                    try:
                        self._route(events.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
        finally:
            for request_id in list(self._routes):
                self.fail(request_id, "EngineStopped", "the engine stopped")

    def _route(self, event: EngineEvent) -> None:
        if isinstance(event, Finished):
            self.recent_finished.append(event)
        send = self._routes.get(event.request_id)
        if send is None:
            self.undeliverable += 1
            return
        try:
            send.send_nowait(event)
        except trio.WouldBlock:  # a sizing bug: say so, and end that request
            log.error("session channel of %s is full; failing it", event.request_id)
            self.unregister(event.request_id)
        except trio.BrokenResourceError:
            self.unregister(event.request_id)
        if isinstance(event, Finished):
            self.unregister(event.request_id)

    def fail(self, request_id: str, error_type: str, error: str) -> None:
        send = self._routes.get(request_id)
        if send is not None:
            try:
                send.send_nowait(
                    Finished(
                        request_id=request_id,
                        reason=FinishReason.ERROR,
                        prompt_tokens=0,
                        completion_tokens=0,
                        error=error,
                        error_type=error_type,
                    )
                )
            except (trio.WouldBlock, trio.BrokenResourceError):
                pass
            self.unregister(request_id)


@attrs.define
class Runtime:
    """A running engine and its front. Get one from `open_runtime`."""

    config: RuntimeConfig
    info: EngineInfo
    tokenizer: Any
    model_path: Path
    is_demo: bool
    dispatcher: Dispatcher
    # The engine's actors: local `Address`es, or `RemoteAddress`es of the engine process -
    # the same calls either way.
    _executor: Address | RemoteAddress
    _nursery: trio.Nursery
    # Pins the prompt's cached prefix, then submits: `EngineSide.submit` or the link's.
    _submit: Callable[[Submit], Awaitable[None]]
    cache_index: Address | RemoteAddress | None = None
    memory: Any = None  # the memory enforcer's latest snapshot as `.latest`
    ssd: Address | RemoteAddress | None = None  # the SSD writer (None: no SSD tier)
    link: EngineLink | None = None  # the engine process's link (isolation="process")
    accepting: bool = True

    # -- requests ----------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        request_id: str | None = None,
        cache_scope: str = "",
        structured: StructuredOutput | None = None,
        **sampling_kwargs: Any,
    ) -> Session:
        """A session for a chat. Sampling settings come as `sampling=` or as keyword
        arguments of `SamplingParams` (temperature=, top_p=, seed=, logprobs=, ...).
        `cache_scope` files the request's new blocks on the SSD tier under that name, so
        `cleanup_cache_scope` can remove them (e.g. an agent session's id). `structured`
        constrains the output (`omlx_actors.front.structured`: a JSON schema, a forced tool call)."""
        return Session(
            self,
            GenerationRequest(
                messages=tuple(dict(m) for m in messages),
                tools=tuple(tools) if tools else None,
                max_tokens=max_tokens,
                stop=coerce_stop(stop),
                sampling=sampling or SamplingParams(**sampling_kwargs),
                ignore_eos=ignore_eos,
                request_id=request_id,
                cache_scope=cache_scope,
                structured=structured,
            ),
        )

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        request_id: str | None = None,
        cache_scope: str = "",
        structured: StructuredOutput | None = None,
        **sampling_kwargs: Any,
    ) -> Session:
        """A session for a raw prompt (text, or token ids)."""
        return Session(
            self,
            GenerationRequest(
                prompt=prompt if isinstance(prompt, str) else tuple(prompt),
                max_tokens=max_tokens,
                stop=coerce_stop(stop),
                sampling=sampling or SamplingParams(**sampling_kwargs),
                ignore_eos=ignore_eos,
                request_id=request_id,
                cache_scope=cache_scope,
                structured=structured,
            ),
        )

    # -- what sessions use ---------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """The most tokens a request's prompt + max_tokens may hold: the model's context
        (or `fallback_context_length` when its config names none), capped by
        `max_model_len`."""
        context = self.info.max_context or self.config.fallback_context_length
        if self.config.max_model_len is not None:
            return min(context, self.config.max_model_len)
        return context

    @property
    def pending_requests(self) -> int:
        return len(self.dispatcher)

    async def submit(self, submit: Submit) -> None:
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down")
        try:
            await self._submit(submit)
        except executor.DuplicateRequest as exc:
            raise DuplicateRequestId(str(exc), param="request_id") from exc
        except executor.MemoryRefused as exc:
            raise RequestTooLarge(
                f"this request cannot fit in memory: {exc.message}",
                code="prefill_memory_exceeded",
                details={"estimated_bytes": exc.needed_bytes, "limit_bytes": exc.available_bytes},
            ) from exc
        except executor.AdmissionQueueFull as exc:
            raise QueueFull(exc.message) from exc
        except InboxFull as exc:
            raise QueueFull("the engine's inbox is full; retry shortly") from exc
        except ActorError as exc:
            raise EngineUnavailable(f"the engine is unavailable: {exc}") from exc

    async def cleanup_cache_scope(self, scope: str) -> None:
        """Remove the SSD tier's blocks filed under `scope`; returns once the writer has
        acknowledged every save of that scope queued or in progress before the call."""
        if self.ssd is not None:
            await self.ssd.call(SsdCleanupRequest(scope=scope))

    async def flush_ssd_cache(self) -> None:
        """Return once every block handed to the SSD tier so far is on disk. (Blocks still on
        their way from the engine - at most one step's worth - are not waited for.)"""
        if self.ssd is not None:
            await self.ssd.call(SsdFlush())

    async def cleanup_ssd_cache(self) -> None:
        """Remove every block file of the SSD tier (acknowledged like `cleanup_cache_scope`)."""
        if self.ssd is not None:
            await self.ssd.call(SsdCleanupAll())

    async def inject_disk_fault(self, kind: DiskFaultKind | str, writes: int, *,
                                after_writes: int = 0, stall_s: float = 0.0):
        """Fault injection at the SSD tier's disk (tests, scenarios; off unless called),
        by count: of the block writes after this call, the first `after_writes` go through
        and the next `writes` stall for `stall_s` each ("stall": the writer hangs in its
        write, so saves back up and are dropped and cleanups wait for it) or fail with
        ENOSPC ("full"). Raises ValueError without an SSD tier or with a bad count.
        Returns the writer's stats."""
        if self.ssd is None:
            raise ValueError("a disk fault needs the SSD tier (ssd_cache_dir)")
        fault = InjectDiskFault(kind=DiskFaultKind(kind), writes=writes,
                                after_writes=after_writes, stall_s=stall_s)
        return await self.ssd.call(fault, timeout=5.0)

    async def ssd_stats(self, timeout: float = 5.0):
        if self.ssd is None:
            return None
        return await self.ssd.call(SsdStatsQuery(), timeout=timeout)

    async def cache_stats(self, timeout: float = 1.0) -> CacheStats | None:
        if self.cache_index is None:
            return None
        return await self.cache_index.call(CacheStatsQuery(), timeout=timeout)

    def abort_nowait(self, request_id: str) -> None:
        """Abort without waiting (safe in a cancelled scope). If the inbox is momentarily
        full, a background task delivers the abort instead: it is never dropped."""
        if not self._executor.cast_nowait(Abort(request_id=request_id)):
            self._nursery.start_soon(self._executor.cast, Abort(request_id=request_id))

    # -- engine introspection --------------------------------------------------------------

    def engine_status(self) -> EngineStatus:
        """The engine's state (starting, ready, restarting, failed, stopped) and restarts."""
        if self.link is not None:
            return self.link.status()
        return EngineStatus(state="ready", isolation="thread")

    @property
    def engine_pid(self) -> int | None:
        """The engine process's pid (None with isolation="thread": it is this process)."""
        return self.link.pid if self.link is not None else None

    async def ping(self, timeout: float = 1.0) -> Pong:
        return await self._executor.call(Ping(), timeout=timeout)

    async def stats(self, timeout: float = 1.0) -> EngineStats:
        return await self._executor.call(EngineStatsQuery(), timeout=timeout)

    async def inject_fault(
        self,
        error: str = "injected out-of-memory",
        *,
        at_step: int | None = None,
        above_bytes: int | None = None,
        kind: FaultKind | str = FaultKind.OOM,
        prompt_token: int | None = None,
        sticky: bool = False,
    ) -> None:
        """Fault injection (tests, scenarios; off unless called), at the next step, step
        number `at_step`, the first step that starts with MLX's active memory above
        `above_bytes`, or the first step while a request whose prompt holds `prompt_token`
        is in the engine.

        kind "oom": the step fails as an out-of-memory would - its requests end with
        `finish_reason="error"`; requests still waiting for a batch are unaffected.
        kind "abort": the engine process aborts (SIGABRT), as MLX's uncaught C++ errors do;
        only with isolation="process" (it would take this process down otherwise).
        `sticky`: sent again to every new engine process (a request that always crashes)."""
        kind = FaultKind(kind)
        if kind is FaultKind.ABORT and self.link is None:
            raise ValueError('an "abort" fault needs isolation="process"')
        await self._executor.call(
            InjectFault(error=error, at_step=at_step, above_bytes=above_bytes, kind=kind,
                        prompt_token=prompt_token, sticky=sticky),
            timeout=5.0,
        )


async def resolve_model(config: RuntimeConfig) -> tuple[Path, bool]:
    """The model directory to load, and whether it is the random-weight demo.

    "smollm2-135m-instruct" is the real default model, fetched and imported once. A GGUF
    file is imported once into the user cache (`omlx_actors.models.resolve`), and a
    quantized GGUF import is served as float32 on the CPU; another local directory is used
    as is; anything else goes through mlx-lm's hub resolution
    (which works offline for already-downloaded repos). None builds/uses the demo model -
    built in a child process, because building runs MLX and MLX belongs to the executor's
    thread in this process.
    """
    from omlx_actors.models import demo_model_path, is_demo_model

    if config.model is None:
        path = demo_model_path(config.demo_model, config.model_cache_dir)
        if not is_demo_model(path):
            log.warning("building the random-weight demo model %s once into %s",
                        config.demo_model, path)
            script = ("import sys; from omlx_actors.models import ensure_demo_model; "
                      "ensure_demo_model(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)")
            args = [sys.executable, "-c", script, config.demo_model]
            if config.model_cache_dir is not None:
                args.append(str(config.model_cache_dir))
            await trio.run_process(args)
        return path, True
    local = Path(config.model).expanduser()
    from omlx_actors.models import resolve as model_resolve

    if config.model == model_resolve.DEFAULT_MODEL.name and not local.exists():
        # The real default model by its served name: fetched and imported once.
        proc = await trio.run_process(model_resolve.prepare_args("default"), check=False,
                                      capture_stdout=True)
        try:
            return model_resolve.parse_child(proc.returncode, proc.stdout.decode()), False
        except model_resolve.ModelUnavailable as exc:
            raise ModelNotFound(f"model {config.model!r}: {exc}") from None
    if model_resolve.needs_child(local):
        # A GGUF file (imported once into the cache) or a quantized import (float32 on the
        # CPU): MLX work, so in a child process; its progress goes to our stderr.
        what = "gguf" if local.is_file() else "dir"
        proc = await trio.run_process(model_resolve.prepare_args(what, local), check=False,
                                      capture_stdout=True)
        try:
            return model_resolve.parse_child(proc.returncode, proc.stdout.decode()), False
        except ValueError as exc:  # UnsupportedGguf
            raise ModelNotFound(f"cannot serve {local.name}: {exc}") from None
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFound(f"{local} has no config.json: not an mlx-lm model directory")
        return local, is_demo_model(local)

    def download() -> Path:
        from mlx_lm.utils import _download

        return Path(_download(config.model))

    try:
        return await trio.to_thread.run_sync(download), False
    except Exception as exc:  # noqa: BLE001 - any resolution failure means "not found"
        raise ModelNotFound(f"model {config.model!r} not found locally or on the hub: {exc}") from exc


@asynccontextmanager
async def open_runtime(
    model: str | Path | None = None, *, config: RuntimeConfig | None = None, **overrides: Any
) -> AsyncIterator[Runtime]:
    """Start the engine (model loaded on its MLX thread) and yield a ready `Runtime`.

    On exit: with `shutdown_mode="drain"` running requests finish first (bounded by
    `drain_timeout_s`, then aborted); with "abort" they end at once with `abort`/`error`.
    """
    if config is None:
        config = RuntimeConfig(model=None if model is None else str(model), **overrides)
    elif model is not None or overrides:
        config = attrs.evolve(config, **({"model": str(model)} if model is not None else {}), **overrides)
    path, is_demo = await resolve_model(config)
    config.check_model_fits(path)
    from mlx_lm.utils import load_tokenizer

    # transformers takes both as tokenizer options: a `chat_template` replaces the one the
    # model ships; `trust_remote_code` lets it import a tokenizer class shipped as code.
    tokenizer_options = {"trust_remote_code": config.trust_remote_code}
    if config.chat_template is not None:
        tokenizer_options["chat_template"] = config.chat_template
    tokenizer = await trio.to_thread.run_sync(load_tokenizer, path, tokenizer_options)
    dispatcher = Dispatcher()
    async with trio.open_nursery() as nursery:
        async with _open_engine(config, path) as (engine, link):
            nursery.start_soon(dispatcher.run, engine.events)
            runtime = Runtime(
                config=config,
                info=engine.info,
                tokenizer=tokenizer,
                model_path=path,
                is_demo=is_demo,
                dispatcher=dispatcher,
                executor=engine.executor,
                nursery=nursery,
                submit=engine.submit,
                cache_index=engine.cache_index,
                memory=engine.memory,
                ssd=engine.ssd,
                link=link,
            )
            try:
                yield runtime
            finally:
                runtime.accepting = False


@attrs.frozen
class _RemoteEngine:
    """The engine process, shaped like `EngineSide` for `open_runtime`."""

    info: EngineInfo
    executor: RemoteAddress
    events: trio.MemoryReceiveChannel
    memory: Any
    cache_index: RemoteAddress | None
    ssd: RemoteAddress | None
    submit: Callable[[Submit], Awaitable[None]]


@asynccontextmanager
async def _open_engine(config: RuntimeConfig, path: Path):
    """The engine side in this process (isolation="thread") or in its own (="process"),
    as (engine, link-or-None). Stops it on exit, per `config.shutdown_mode`."""
    if config.isolation == "thread":
        async with open_engine_side(config, str(path)) as side:
            yield side, None
        return
    async with open_engine_link(config, path) as link:
        ready = link.first_ready
        yield _RemoteEngine(
            info=ready.info,
            executor=link.address("executor"),
            events=link.events,
            memory=link.memory,
            cache_index=link.address("cache-index") if ready.cache_index else None,
            ssd=link.address("ssd") if ready.ssd else None,
            submit=link.submit,
        ), link

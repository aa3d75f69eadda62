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

import functools
import logging
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.cache import actor as cache_actor
from omlx_actors.cache.actor import CacheStats, CacheStatsQuery, Lookup, Release
from omlx_actors.cache.blocks import block_hashes
from omlx_actors.config import RuntimeConfig
from omlx_actors.engine import executor
from omlx_actors.engine.core import EngineSettings
from omlx_actors.engine.messages import (
    RestoredBlock,
    RestoreBlocks,
    Abort,
    EngineEvent,
    EngineInfo,
    EngineStats,
    EngineStatsQuery,
    Finished,
    FinishReason,
    InjectFault,
    Ping,
    Pong,
    SamplingParams,
    Submit,
)
from omlx_actors.errors import (
    DuplicateRequestId,
    EngineUnavailable,
    ModelNotFound,
    QueueFull,
    RequestTooLarge,
)
from omlx_actors.memory import enforcer
from omlx_actors.ssd import writer as ssd_writer
from omlx_actors.ssd.blockfile import BlockIdentity
from omlx_actors.ssd.messages import CleanupAll as SsdCleanupAll
from omlx_actors.ssd.messages import CleanupRequest as SsdCleanupRequest
from omlx_actors.ssd.messages import Contains as SsdContains
from omlx_actors.ssd.messages import Flush as SsdFlush
from omlx_actors.ssd.messages import Load as SsdLoad
from omlx_actors.ssd.messages import Shutdown as SsdShutdown
from omlx_actors.ssd.messages import StatsQuery as SsdStatsQuery
from omlx_actors.ssd.messages import WriterConfig
from omlx_actors.runtime import (
    ActorError,
    Address,
    InboxFull,
    Overflow,
    RestartPolicy,
    ShutdownMode,
    open_inbox,
    open_supervisor,
)
from omlx_actors.session import GenerationRequest, Session, coerce_stop

log = logging.getLogger(__name__)

# Finished events the dispatcher remembers for inspection (tests, debugging); older ones
# are forgotten.
RECENT_FINISHED = 1024

# The executor's inbox. Its handler never awaits, so it is only full if the trio loop is
# starved; a Submit then waits (WAIT) up to `submit_timeout_s`, an Abort falls back to a
# background cast (see Runtime.abort_nowait). 1024 covers a burst of that many requests.
EXECUTOR_INBOX_CAPACITY = 1024


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
        """Serve until the executor's event channel closes; then fail whoever is left."""
        try:
            async for event in events:
                if isinstance(event, Finished):
                    self.recent_finished.append(event)
                send = self._routes.get(event.request_id)
                if send is None:
                    self.undeliverable += 1
                    continue
                try:
                    send.send_nowait(event)
                except trio.WouldBlock:  # a sizing bug: say so, and end that request
                    log.error("session channel of %s is full; failing it", event.request_id)
                    self.unregister(event.request_id)
                except trio.BrokenResourceError:
                    self.unregister(event.request_id)
                if isinstance(event, Finished):
                    self.unregister(event.request_id)
        finally:
            for request_id in list(self._routes):
                self.fail(request_id, "EngineStopped", "the engine stopped")

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
    _executor: Address
    _nursery: trio.Nursery
    cache_index: Address | None = None
    memory: Any = None  # the memory enforcer's handle (latest snapshot, subscriptions)
    ssd: Any = None  # the SSD writer's address (None: no SSD tier)
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
        **sampling_kwargs: Any,
    ) -> Session:
        """A session for a chat. Sampling settings come as `sampling=` or as keyword
        arguments of `SamplingParams` (temperature=, top_p=, seed=, logprobs=, ...).
        `cache_scope` files the request's new blocks on the SSD tier under that name, so
        `cleanup_cache_scope` can remove them (e.g. an agent session's id)."""
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
            ),
        )

    # -- what sessions use ---------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self.info.max_context or self.config.fallback_context_length

    @property
    def pending_requests(self) -> int:
        return len(self.dispatcher)

    async def submit(self, submit: Submit) -> None:
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down")
        try:
            await self._executor.call(submit, timeout=self.config.submit_timeout_s)
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

    @property
    def prefix_cache_enabled(self) -> bool:
        return self.cache_index is not None and self.info.cache_namespace is not None

    async def lookup_prefix(self, request_id: str, prompt_tokens: Sequence[int]) -> tuple[str, ...]:
        """The longest cached prefix of the prompt, as block hashes pinned for this request.
        Never the whole prompt: the last prompt token is always prefilled."""
        if not self.prefix_cache_enabled:
            return ()
        hashes = block_hashes(prompt_tokens[:-1], self.info.block_size, self.info.cache_namespace)
        if not hashes:
            return ()
        timeout = self.config.submit_timeout_s
        try:
            result = await self.cache_index.call(
                Lookup(request_id=request_id, hashes=tuple(hashes)), timeout=timeout
            )
            matched = tuple(result.matched)
            if self.ssd is not None and len(matched) < len(hashes):
                if await self._restore_from_ssd(hashes[len(matched):]):
                    # Pin again: the new pin covers the restored blocks too.
                    result = await self.cache_index.call(
                        Lookup(request_id=request_id, hashes=tuple(hashes)), timeout=timeout
                    )
                    matched = tuple(result.matched)
        except ActorError as exc:  # the cache is an optimisation: serve without it
            log.warning("prefix cache lookup failed (%s); prefilling in full", exc)
            return ()
        return matched

    async def _restore_from_ssd(self, hashes: Sequence[str]) -> int:
        """Load the leading run of `hashes` found on the SSD tier (stopping at the first
        miss: a chain is usable only up to its first gap) into the engine's block store."""
        timeout = self.config.submit_timeout_s
        present = set((await self.ssd.call(SsdContains(hashes=tuple(hashes)), timeout=timeout)).present)
        blocks = []
        for block_hash in hashes:
            if block_hash not in present:
                break
            loaded = await self.ssd.call(SsdLoad(hash=block_hash), timeout=timeout)
            if not loaded.hit:
                break
            blocks.append(RestoredBlock(hash=block_hash, parent=loaded.parent, tensors=loaded.tensors))
        if not blocks:
            return 0
        restored = await self._executor.call(RestoreBlocks(blocks=tuple(blocks)), timeout=timeout)
        return len(restored)

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

    async def ssd_stats(self, timeout: float = 5.0):
        if self.ssd is None:
            return None
        return await self.ssd.call(SsdStatsQuery(), timeout=timeout)

    def release_prefix(self, request_id: str) -> None:
        """Unpin a request's blocks when it never reached the engine (never blocks)."""
        if self.cache_index is not None and not self.cache_index.cast_nowait(
            Release(request_id=request_id)
        ):
            self._nursery.start_soon(self.cache_index.cast, Release(request_id=request_id))

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
    ) -> None:
        """Make an engine step fail as an out-of-memory would (tests, scenarios; off unless
        called): the next step, step number `at_step`, or the first step that starts with
        MLX's active memory above `above_bytes`. The requests in that step end with
        `finish_reason="error"`; requests still waiting for a batch are unaffected."""
        await self._executor.call(
            InjectFault(error=error, at_step=at_step, above_bytes=above_bytes), timeout=5.0
        )


async def resolve_model(config: RuntimeConfig) -> tuple[Path, bool]:
    """The model directory to load, and whether it is the random-weight demo.

    A local directory is used as is; anything else goes through mlx-lm's hub resolution
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
    from mlx_lm.utils import load_tokenizer

    tokenizer = await trio.to_thread.run_sync(load_tokenizer, path)
    settings = EngineSettings(
        model_path=str(path),
        completion_batch_size=config.max_batch_size,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
        block_size=config.block_size if config.prefix_cache_bytes > 0 else 0,
        max_requests=config.max_batch_size + config.max_waiting_requests,
        ssd_enabled=config.ssd_cache_dir is not None and config.prefix_cache_bytes > 0,
    )
    ssd_address = None
    if settings.ssd_enabled:
        ssd_address, ssd_control, ssd_saves = ssd_writer.open_writer_inboxes()
    events_send, events_recv = trio.open_memory_channel[EngineEvent](executor.ENGINE_EVENT_BACKLOG)
    address, inbox = open_inbox("executor", EXECUTOR_INBOX_CAPACITY, Overflow.WAIT)
    gauge = executor.MlxGauge()
    memory_address, memory_inbox = open_inbox(
        "memory", enforcer.ENFORCER_INBOX_CAPACITY, Overflow.WAIT
    )
    budget = (
        enforcer.MemoryBudget.auto()
        if config.memory_budget_bytes is None
        else enforcer.MemoryBudget.explicit(config.memory_budget_bytes)
    )
    cache_address = None
    if config.prefix_cache_bytes > 0:
        cache_address, cache_inbox = open_inbox(
            "cache-index", cache_actor.CACHE_INBOX_CAPACITY, Overflow.WAIT
        )
    dispatcher = Dispatcher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run, events_recv)
        async with open_supervisor("engine", cleanup_timeout=config.drain_timeout_s) as sup:
            memory_handle = await sup.start(
                "memory",
                functools.partial(
                    enforcer.run, poll_interval=config.memory_poll_interval_s,
                    read_mlx=gauge.reading,
                ),
                memory_inbox,
                budget,
            )
            wiring = executor.MemoryWiring(
                gauge=gauge,
                snapshots=memory_handle.subscribe(),
                limits_for=enforcer.mlx_limits_for,
                max_waiting=config.max_waiting_requests,
                prefix_cache_bytes=config.prefix_cache_bytes,
                prefill_step_size=config.prefill_step_size,
                prefill_batch_size=config.prefill_batch_size,
            )
            if cache_address is not None:
                # Not restarted: a fresh index would not know the blocks the engine still
                # holds, which then could never be evicted. A crash escalates instead.
                await sup.start(
                    "cache-index", cache_actor.run, cache_inbox, config.prefix_cache_bytes, address,
                    policy=RestartPolicy(max_restarts=0, within=1.0),
                )
            # No restarts: a crashed executor has lost its batch, and its sessions are failed
            # by its own cleanup; restarting with in-flight resume is the isolation issue's.
            info = await sup.start(
                "executor",
                executor.run,
                inbox,
                settings,
                events_send,
                cache_address,
                wiring,
                ssd_address,
                policy=RestartPolicy(max_restarts=0, within=1.0),
            )
            if ssd_address is not None and info.cache_namespace is not None:
                # Started once the engine knows its cache identity (the namespace names the
                # model, its cache layout and the block size; other files are skipped).
                # Not restarted: a new incarnation would forget the cleanup barriers.
                await sup.start(
                    "ssd-writer", ssd_writer.run, ssd_control, ssd_saves,
                    WriterConfig(
                        directory=str(config.ssd_cache_dir),
                        identity=BlockIdentity(namespace=info.cache_namespace,
                                               layout=info.cache_layout, block_size=info.block_size),
                        budget_bytes=config.ssd_cache_bytes,
                    ),
                    policy=RestartPolicy(max_restarts=0, within=1.0),
                )
            else:
                ssd_address = None
            runtime = Runtime(
                config=config,
                info=info,
                tokenizer=tokenizer,
                model_path=path,
                is_demo=is_demo,
                dispatcher=dispatcher,
                executor=address,
                nursery=nursery,
                cache_index=cache_address,
                memory=memory_handle,
                ssd=ssd_address,
            )
            try:
                yield runtime
            finally:
                runtime.accepting = False
                mode = ShutdownMode.DRAIN if config.shutdown_mode == "drain" else ShutdownMode.ABORT
                with trio.CancelScope(shield=True):
                    # The engine first (its last blocks go to the writer), then the writer
                    # flushes what it was sent, then everyone else.
                    await sup.stop("executor", mode)
                    if ssd_address is not None:
                        with trio.move_on_after(config.drain_timeout_s):
                            try:
                                await ssd_address.call(SsdShutdown(flush=mode is ShutdownMode.DRAIN))
                            except ActorError as exc:
                                log.warning("SSD writer did not shut down cleanly: %s", exc)
                    await sup.shutdown(mode)
        events_send.close()

"""The engine side, assembled: memory enforcer, cache index, executor and SSD writer under one
supervisor, started in order and stopped in order.

Both ways of running the engine use this: in the front's own trio run (`isolation="thread"`,
`wiring.open_runtime`) and in the engine process (`isolation="process"`, `isolation.host`). What
it yields, a `LocalEngineSide`, implements the front's declared interface (`engine.side.EngineSide`),
as the engine process's `isolation.remote_side.RemoteEngineSide` does, so the front cannot tell
which of the two it is talking to.

Also here: the prefix lookup (`lookup_prefix`), which runs next to the actors it calls, so a
block restored from the SSD tier goes from the writer to the executor without crossing the
process boundary twice.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from omlx_actors.cache import actor as cache_actor
from omlx_actors.cache.actor import Lookup, Release
from omlx_actors.cache.blocks import block_hashes
from omlx_actors.config import RuntimeConfig
from omlx_actors.engine import executor
from omlx_actors.engine.core_messages import EngineSettings
from omlx_actors.engine.messages import (
    EngineEvent,
    EngineInfo,
    RestoredBlock,
    RestoreBlocks,
    Submit,
)
from omlx_actors.engine.request_table import MlxGauge
from omlx_actors.engine.side import AddressedEngine, EngineStatus
from omlx_actors.memory import enforcer
from omlx_actors.kernel import (
    ActorError,
    Address,
    Overflow,
    RestartPolicy,
    ShutdownMode,
    open_inbox,
    open_supervisor,
)
from omlx_actors.ssd import writer as ssd_writer
from omlx_actors.ssd.blockfile import BlockIdentity
from omlx_actors.ssd.messages import SsdContains
from omlx_actors.ssd.messages import SsdLoad
from omlx_actors.ssd.messages import SsdShutdown
from omlx_actors.ssd.messages import WriterConfig

log = logging.getLogger(__name__)

# The executor's inbox. Its handler never awaits, so it is only full if the trio loop is
# starved; a Submit then waits (WAIT) up to `submit_timeout_s`, an Abort falls back to a
# background cast (see Runtime.abort_nowait). 1024 covers a burst of that many requests.
EXECUTOR_INBOX_CAPACITY = 1024


@attrs.define(eq=False)
class LocalEngineSide(AddressedEngine):
    """A running engine side in this process (`engine.side.EngineSide`). `events` is its
    output: every `EngineEvent`, in order; it ends when the executor has stopped.
    `cache_index` and `ssd` are None when off."""

    info: EngineInfo
    executor: Address
    events: trio.MemoryReceiveChannel[EngineEvent]
    memory: Any  # enforcer.EnforcerHandle: `.latest`, `.subscribe()`
    cache_index: Address | None
    ssd: Address | None
    lookup_timeout_s: float
    nursery: trio.Nursery  # for casts that must not be dropped

    def status(self) -> EngineStatus:
        return EngineStatus(state="ready", isolation="thread")

    @property
    def pid(self) -> int | None:
        return None  # this process

    async def submit(self, submit: Submit) -> None:
        """Pin the prompt's longest cached prefix (restoring blocks from the SSD tier), then
        submit the request with it. The executor's refusals raise; the pins are released
        when the request does not get in (refused, timed out, or the caller cancelled)."""
        cached = await self.lookup_prefix(submit.request_id, submit.prompt_tokens)
        try:
            await self.executor.call(attrs.evolve(submit, cached_blocks=cached),
                                     timeout=self.lookup_timeout_s)
        except BaseException:
            if cached:
                self._release(submit.request_id)
            raise

    def _release(self, request_id: str) -> None:
        """Unpin a request's blocks without blocking (a background cast if the inbox is
        momentarily full: a lost `Release` would pin blocks forever)."""
        assert self.cache_index is not None
        if not self.cache_index.cast_nowait(Release(request_id=request_id)):
            self.nursery.start_soon(self.cache_index.cast, Release(request_id=request_id))

    async def lookup_prefix(self, request_id: str, prompt_tokens: Sequence[int]) -> tuple[str, ...]:
        """The longest cached prefix of the prompt, as block hashes pinned for this request.
        Never the whole prompt: the last prompt token is always prefilled. Blocks missing
        in memory but present on the SSD tier are restored first. Failures are logged and
        give a shorter (or no) prefix: the cache is an optimisation."""
        info = self.info
        if self.cache_index is None or info.cache_namespace is None:
            return ()
        hashes = block_hashes(prompt_tokens[:-1], info.block_size, info.cache_namespace)
        if not hashes:
            return ()
        timeout = self.lookup_timeout_s
        lookup = Lookup(request_id=request_id, hashes=tuple(hashes))
        try:
            matched = tuple((await self.cache_index.call(lookup, timeout=timeout)).matched)
            if self.ssd is not None and len(matched) < len(hashes):
                if await self._restore_from_ssd(hashes[len(matched):]):
                    # Pin again: the new pin covers the restored blocks too.
                    matched = tuple((await self.cache_index.call(lookup, timeout=timeout)).matched)
        except ActorError as exc:
            log.warning("prefix cache lookup failed (%s); prefilling in full", exc)
            return ()
        return matched

    async def _restore_from_ssd(self, hashes: Sequence[str]) -> int:
        """Load the leading run of `hashes` found on the SSD tier (stopping at the first
        miss: a chain is usable only up to its first gap) into the engine's block store."""
        timeout = self.lookup_timeout_s
        assert self.ssd is not None
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
        restored = await self.executor.call(RestoreBlocks(blocks=tuple(blocks)), timeout=timeout)
        return len(restored)


def engine_settings(config: RuntimeConfig, model_path: str,
                    step_record_path: str | None = None) -> EngineSettings:
    return EngineSettings(
        step_record_path=step_record_path,
        model_path=model_path,
        completion_batch_size=config.max_batch_size,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
        prefill_step_while_decoding=config.prefill_step_while_decoding,
        block_size=config.block_size if config.prefix_cache_bytes > 0 else 0,
        max_requests=config.max_batch_size + config.max_waiting_requests,
        ssd_enabled=config.ssd_cache_dir is not None and config.prefix_cache_bytes > 0,
        parallel_attention=config.parallel_attention,
        trust_remote_code=config.trust_remote_code,
    )


@asynccontextmanager
async def open_engine_side(
    config: RuntimeConfig, model_path: str, *, stop_mode: list[ShutdownMode] | None = None,
    step_record_path: str | None = None,
) -> AsyncIterator[LocalEngineSide]:
    """Start the engine-side actors; yield once the model is loaded and the SSD index is
    rebuilt. Raises `executor.EngineLoadFailed` if the model cannot be loaded.

    On exit (cancellation included: the stop is shielded and time-bounded) the executor
    stops first - draining running requests, or aborting them, per `stop_mode[0]` if given
    (a one-item list the caller may set late), else `config.shutdown_mode` - so its last
    blocks reach the writer; then the writer flushes (drain) and stops; then the rest.
    """
    settings = engine_settings(config, model_path, step_record_path)
    if config.gil_switch_interval_s is not None:
        # Process-wide, so only when asked (`RuntimeConfig.gil_switch_interval_s`): here the
        # MLX thread shares its GIL with this trio loop and every session on it.
        sys.setswitchinterval(config.gil_switch_interval_s)
    ssd_address = ssd_inboxes = None
    if settings.ssd_enabled:
        ssd_address, *ssd_inboxes = ssd_writer.open_writer_inboxes()
    events_send, events_recv = trio.open_memory_channel[EngineEvent](executor.ENGINE_EVENT_BACKLOG)
    address, inbox = open_inbox("executor", EXECUTOR_INBOX_CAPACITY, Overflow.WAIT)
    gauge = MlxGauge()
    memory_address, memory_inbox = open_inbox(
        "memory", enforcer.ENFORCER_INBOX_CAPACITY, Overflow.WAIT
    )
    cache_address = None
    if config.prefix_cache_bytes > 0:
        cache_address, cache_inbox = open_inbox(
            "cache-index", cache_actor.CACHE_INBOX_CAPACITY, Overflow.WAIT
        )
    async with open_supervisor("engine", cleanup_timeout=config.drain_timeout_s) as sup:
        memory_handle = await sup.start(
            "memory",
            functools.partial(
                enforcer.run, poll_interval=config.memory_poll_interval_s, read_mlx=gauge.reading,
            ),
            memory_inbox,
            _memory_budget(config),
        )
        wiring = _memory_wiring(config, gauge, memory_handle)
        if cache_address is not None:
            # Not restarted: a fresh index would not know the blocks the engine still
            # holds, which then could never be evicted. A crash escalates instead.
            await sup.start(
                "cache-index", cache_actor.run, cache_inbox, config.prefix_cache_bytes, address,
                policy=RestartPolicy(max_restarts=0, within=1.0),
            )
        # No restarts here: a crashed executor has lost its batch, and its sessions are
        # failed by its own cleanup. Resuming in-flight requests needs the engine in its own
        # process (isolation/), where the whole engine side is restarted at once.
        info = await sup.start(
            "executor", executor.run, inbox, settings, events_send, cache_address, wiring,
            ssd_address,
            policy=RestartPolicy(max_restarts=0, within=1.0),
        )
        if ssd_address is not None and info.cache_namespace is not None:
            await _start_ssd_writer(sup, config, info, ssd_inboxes)
        else:
            ssd_address = None
        try:
            async with trio.open_nursery() as background:
                yield LocalEngineSide(
                    info=info, executor=address, events=events_recv, memory=memory_handle,
                    cache_index=cache_address, ssd=ssd_address,
                    lookup_timeout_s=config.submit_timeout_s, nursery=background,
                )
        finally:
            mode = stop_mode[0] if stop_mode else (
                ShutdownMode.DRAIN if config.shutdown_mode == "drain" else ShutdownMode.ABORT)
            with trio.CancelScope(shield=True):
                await _stop_in_order(sup, mode, events_send, ssd_address, config.drain_timeout_s)


def _memory_budget(config: RuntimeConfig) -> enforcer.MemoryBudget:
    if config.memory_budget_bytes is None:
        return enforcer.MemoryBudget.auto()
    return enforcer.MemoryBudget.explicit(config.memory_budget_bytes)


def _memory_wiring(config: RuntimeConfig, gauge: MlxGauge,
                   memory_handle: Any) -> executor.MemoryWiring:
    return executor.MemoryWiring(
        gauge=gauge,
        snapshots=memory_handle.subscribe(),
        limits_for=enforcer.mlx_limits_for,
        max_waiting=config.max_waiting_requests,
        prefix_cache_bytes=config.prefix_cache_bytes,
        prefill_step_size=config.prefill_step_size,
        prefill_batch_size=config.prefill_batch_size,
        max_queue_wait_s=config.max_queue_wait_s,
    )


async def _start_ssd_writer(sup: Any, config: RuntimeConfig, info: EngineInfo,
                            inboxes: Sequence[Any]) -> None:
    """Started once the engine knows its cache identity (the namespace names the model,
    its cache layout and the block size; other files are skipped). Not restarted: a new
    incarnation would forget the cleanup barriers."""
    ssd_control, ssd_saves = inboxes
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


async def _stop_in_order(sup: Any, mode: ShutdownMode, events_send: trio.MemorySendChannel,
                         ssd_address: Address | None, drain_timeout_s: float) -> None:
    """The engine first (its last blocks go to the writer), then the writer flushes what
    it was sent, then everyone else. The caller shields this."""
    await sup.stop("executor", mode)
    events_send.close()
    if ssd_address is not None:
        with trio.move_on_after(drain_timeout_s):
            try:
                await ssd_address.call(SsdShutdown(flush=mode is ShutdownMode.DRAIN))
            except ActorError as exc:
                log.warning("SSD writer did not shut down cleanly: %s", exc)
    await sup.shutdown(mode)

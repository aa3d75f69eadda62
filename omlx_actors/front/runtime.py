"""The in-process API: the `Runtime` facade; `chat()` / `complete()` give one `Session` each.

Get one from `omlx_actors.open_runtime` (the composition root, `omlx_actors.wiring`). The
HTTP server uses exactly this path. Example::

    async with open_runtime(model="path/to/mlx-model") as rt:
        async for event in rt.chat([{"role": "user", "content": "hi"}], max_tokens=32):
            ...

Who owns what: the engine side (`engine.side.EngineSide`: actors in this process or in the
engine process, the front cannot tell) owns the engine's actors; the `Dispatcher` owns the
table request id → session channel and is the only reader of the engine's event channel;
each `Session` owns its text state and reaches the engine only through a `SessionContext`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.messages import (
    AdmissionQueueFull,
    DuplicateRequest,
    EngineInfo,
    EngineStats,
    FaultKind,
    InjectFault,
    MemoryRefused,
    Pong,
    SamplingParams,
    Submit,
)
from omlx_actors.engine.side import EngineSide, EngineStatus
from omlx_actors.front.dispatcher import Dispatcher
from omlx_actors.front.requests import GenerationRequest, coerce_stop
from omlx_actors.front.session import Session, SessionContext
from omlx_actors.front.structured import StructuredOutput
from omlx_actors.kernel import ActorError, InboxFull
from omlx_actors.refusals import DuplicateRequestId, EngineUnavailable, QueueFull, RequestTooLarge
from omlx_actors.ssd.messages import (
    DiskFaultKind,
    InjectDiskFault,
    SsdCleanupAll,
    SsdCleanupRequest,
    SsdFlush,
    SsdStatsQuery,
)


@attrs.define
class Runtime:
    """A running engine side and its front. Get one from `omlx_actors.open_runtime`."""

    config: RuntimeConfig
    tokenizer: Any
    model_path: Path
    is_demo: bool
    dispatcher: Dispatcher
    engine: EngineSide
    _nursery: trio.Nursery  # for aborts that must not be dropped
    accepting: bool = True
    _sessions: SessionContext = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._sessions = SessionContext(
            tokenizer=self.tokenizer, info=self.info, config=self.config,
            max_context=self.max_context, dispatcher=self.dispatcher, submit=self.submit,
            abort_nowait=self.abort_nowait,
        )

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def memory(self) -> Any:
        """The memory enforcer's snapshots: `.latest` is the newest (or None)."""
        return self.engine.memory

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
            self._sessions,
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
            self._sessions,
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
        """Sessions submit through this (their `SessionContext.submit`): refused once the
        runtime stops accepting; the engine's refusals become the front's `RequestError`s."""
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down")
        try:
            await self.engine.submit(submit)
        except DuplicateRequest as exc:
            raise DuplicateRequestId(str(exc), param="request_id") from exc
        except MemoryRefused as exc:
            raise RequestTooLarge(
                f"this request cannot fit in memory: {exc.message}",
                code="prefill_memory_exceeded",
                details={"estimated_bytes": exc.needed_bytes, "limit_bytes": exc.available_bytes},
            ) from exc
        except AdmissionQueueFull as exc:
            raise QueueFull(exc.message) from exc
        except InboxFull as exc:
            raise QueueFull("the engine's inbox is full; retry shortly") from exc
        except ActorError as exc:
            raise EngineUnavailable(f"the engine is unavailable: {exc}") from exc

    @property
    def has_ssd(self) -> bool:
        """Whether the SSD tier is on (`ssd_cache_dir` set and the model's cache usable)."""
        return self.engine.has_ssd

    async def cleanup_cache_scope(self, scope: str) -> None:
        """Remove the SSD tier's blocks filed under `scope`; returns once the writer has
        acknowledged every save of that scope queued or in progress before the call."""
        await self.engine.ssd_call(SsdCleanupRequest(scope=scope))

    async def flush_ssd_cache(self) -> None:
        """Return once every block handed to the SSD tier so far is on disk. (Blocks still on
        their way from the engine - at most one step's worth - are not waited for.)"""
        await self.engine.ssd_call(SsdFlush())

    async def cleanup_ssd_cache(self) -> None:
        """Remove every block file of the SSD tier (acknowledged like `cleanup_cache_scope`)."""
        await self.engine.ssd_call(SsdCleanupAll())

    async def inject_disk_fault(self, kind: DiskFaultKind | str, writes: int, *,
                                after_writes: int = 0, stall_s: float = 0.0):
        """Fault injection at the SSD tier's disk (tests, scenarios; off unless called),
        by count: of the block writes after this call, the first `after_writes` go through
        and the next `writes` stall for `stall_s` each ("stall": the writer hangs in its
        write, so saves back up and are dropped and cleanups wait for it) or fail with
        ENOSPC ("full"). Raises ValueError without an SSD tier or with a bad count.
        Returns the writer's stats."""
        if not self.engine.has_ssd:
            raise ValueError("a disk fault needs the SSD tier (ssd_cache_dir)")
        fault = InjectDiskFault(kind=DiskFaultKind(kind), writes=writes,
                                after_writes=after_writes, stall_s=stall_s)
        return await self.engine.ssd_call(fault, timeout=5.0)

    async def ssd_stats(self, timeout: float = 5.0):
        """The SSD writer's stats; None without an SSD tier."""
        return await self.engine.ssd_call(SsdStatsQuery(), timeout=timeout)

    async def cache_stats(self, timeout: float = 1.0):
        """The prefix-cache index's `CacheStats`; None without a prefix cache."""
        return await self.engine.cache_stats(timeout)

    def abort_nowait(self, request_id: str) -> None:
        """Abort without waiting (safe in a cancelled scope). If the inbox is momentarily
        full, a background task delivers the abort instead: it is never dropped."""
        if not self.engine.abort_nowait(request_id):
            self._nursery.start_soon(self.engine.abort, request_id)

    # -- engine introspection --------------------------------------------------------------

    def engine_status(self) -> EngineStatus:
        """The engine's state (starting, ready, restarting, failed, stopped) and restarts."""
        return self.engine.status()

    @property
    def engine_pid(self) -> int | None:
        """The engine process's pid (None with isolation="thread": it is this process)."""
        return self.engine.pid

    async def ping(self, timeout: float = 1.0) -> Pong:
        return await self.engine.ping(timeout)

    async def stats(self, timeout: float = 1.0) -> EngineStats:
        return await self.engine.stats(timeout)

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
        if kind is FaultKind.ABORT and self.engine.status().isolation != "process":
            raise ValueError('an "abort" fault needs isolation="process"')
        await self.engine.inject_fault(
            InjectFault(error=error, at_step=at_step, above_bytes=above_bytes, kind=kind,
                        prompt_token=prompt_token, sticky=sticky),
            timeout=5.0,
        )

"""The composition root: `open_runtime()` puts a model, an engine side and the front together.

It is the one place that chooses how the engine runs - its actors in this trio run
(`isolation="thread"`, `engine.assembly.open_engine_side`) or in a child process
(`isolation="process"`, `isolation.link` seen as an `isolation.remote_side.RemoteEngineSide`)
- and hands the chosen `engine.side.EngineSide` to the front's `Runtime`, which cannot tell
which it got. Imported lazily as `omlx_actors.open_runtime`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.assembly import open_engine_side
from omlx_actors.engine.side import EngineSide
from omlx_actors.front.dispatcher import Dispatcher
from omlx_actors.front.runtime import Runtime
from omlx_actors.isolation.link import open_engine_link
from omlx_actors.isolation.remote_side import RemoteEngineSide
from omlx_actors.models.download import resolve_model

__all__ = ["open_runtime", "resolve_model"]


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
        async with open_engine(config, path) as engine:
            nursery.start_soon(dispatcher.run, engine.events)
            runtime = Runtime(
                config=config,
                tokenizer=tokenizer,
                model_path=path,
                is_demo=is_demo,
                dispatcher=dispatcher,
                engine=engine,
                nursery=nursery,
            )
            try:
                yield runtime
            finally:
                runtime.accepting = False


@asynccontextmanager
async def open_engine(config: RuntimeConfig, path: Path) -> AsyncIterator[EngineSide]:
    """The engine side in this process (isolation="thread") or in its own (="process").
    Stops it on exit, per `config.shutdown_mode`."""
    if config.isolation == "thread":
        async with open_engine_side(config, str(path)) as side:
            yield side
        return
    async with open_engine_link(config, path) as link:
        yield RemoteEngineSide.of(link)

"""`python -m omlx_actors.bench.ssd_window`: the SSD tier's write-behind window.

How long after a prompt's prefill ends are all its blocks durable on disk? Until then a
SIGKILL of the whole server loses the blocks not yet written (issue #15 item 14: 8 of a
prompt's 30 blocks were on disk when the server was killed in the first second of
decoding). The bench serves one prompt of `--prompt-tokens` random token ids through an
in-process runtime with the SSD tier on a real disk (`--dir`, default /var/tmp, rather
than a tmpfs) and decodes on meanwhile, as a server does. The window runs from the end of
the prefill step on the MLX thread (the last of the prompt's blocks converted for the
writer - the moment a server-side kill starts losing them) to the return of the write
that made the last of them durable (after its directory's fsync); both moments are taken
by wrapping `BlockStore.tensor_data` and `block_directory.write_blocks` in this process (the
session sees its first token later on a busy machine, so it is no clock for this). It
repeats `--repeats` times, each with a fresh directory and prompt, and prints each run and
the median.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from typing import Any

import trio

from omlx_actors.ssd import block_directory


class _Clock:
    """When the prompt's blocks were handed over and when each write batch returned."""

    def __init__(self) -> None:
        self.converted: list[float] = []
        self.durable: list[tuple[float, int]] = []  # (time, blocks written) per batch

    def install(self) -> None:
        from omlx_actors.engine.block_store import BlockStore

        convert, write = BlockStore.tensor_data, block_directory.write_blocks

        def tensor_data(store: Any, block_hash: str) -> Any:
            result = convert(store, block_hash)
            self.converted.append(time.perf_counter())
            return result

        def write_blocks(root: Any, identity: Any, batch: Any) -> Any:
            results = write(root, identity, batch)
            ok = sum(not isinstance(r, OSError) for r in results)
            self.durable.append((time.perf_counter(), ok))
            return results

        BlockStore.tensor_data = tensor_data  # type: ignore[method-assign]
        block_directory.write_blocks = write_blocks  # type: ignore[assignment]


async def _one_run(model: str | None, prompt_tokens: int, block_size: int | None,
                   directory: str, seed: int, clock: _Clock) -> dict[str, float]:
    from omlx_actors import open_runtime

    async with open_runtime(model, ssd_cache_dir=directory, block_size=block_size,
                            **({} if model else {"demo_model": "demo-150m"})) as rt:
        rng = random.Random(seed)
        prompt = [rng.randrange(10, rt.info.vocab_size - 10) for _ in range(prompt_tokens)]
        blocks = prompt_tokens // rt.info.block_size  # the prompt's full blocks
        clock.converted.clear()
        clock.durable.clear()
        session = rt.complete(prompt, max_tokens=256, ignore_eos=True)
        async with session:
            async for _ in session:
                if sum(n for _, n in clock.durable) >= blocks:
                    break
        handed_over = clock.converted[blocks - 1]
        written = 0
        for at, n in clock.durable:
            written += n
            if written >= blocks:
                return {"blocks": blocks, "window_ms": (at - handed_over) * 1e3,
                        "batches": len(clock.durable)}
        raise AssertionError(f"only {written} of {blocks} blocks were written")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omlx_actors.bench.ssd_window", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: demo-150m)")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="parent of the block directories")
    args = parser.parse_args(argv)
    windows = []
    clock = _Clock()
    clock.install()
    for i in range(args.repeats):
        directory = tempfile.mkdtemp(prefix="omlx-ssd-bench-", dir=args.dir)
        try:
            run = trio.run(_one_run, args.model, args.prompt_tokens, args.block_size,
                           directory, i, clock)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        windows.append(run["window_ms"])
        print(f"run {i + 1}: {run['blocks']} blocks durable {run['window_ms']:.0f} ms after "
              f"the prefill ended ({run['batches']} write batches)", flush=True)
    print(f"median: a {args.prompt_tokens}-token prompt's blocks are all on disk "
          f"{statistics.median(windows):.0f} ms after its prefill ends")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

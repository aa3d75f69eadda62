"""Every read and write of mlx-lm's `BatchGenerator` internals, in one place.

mlx-lm offers no public way to read one row's cache at a segment boundary, to see which rows
are about to leave the prompt batch, or to change the prefill chunk of a running generator.
The engine core does all three through the functions below, and nowhere else. Each assumes
mlx-lm 0.32.2's shapes (pinned in pyproject.toml for this module): when upgrading mlx-lm,
read these against its `generate.py` (`BatchGenerator`, `PromptProcessingBatch`,
`GenerationBatch`) and the batch caches' `extract`.

The public surface the core uses directly (`BatchGenerator(...)`, `insert_segments`, `next`,
`remove`, the responses' fields) is not here. MLX thread only: the generator and its caches
belong to the core.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from typing import Any

from omlx_actors.engine.block_store import ARRAYS, KV

# `BatchGenerator._find_uids` reports each uid's stage: 0 still queued (not yet in a batch),
# 1 in the prompt batch, 2 in the generation batch.
QUEUED = 0


def prompt_counters(gen: Any) -> tuple[float, int]:
    """mlx-lm's own running totals (seconds, tokens) of prompt processing: `_counters`, a
    `BatchCounters` dataclass with `prompt_time` and `prompt_tokens`."""
    counters = gen._counters
    return counters.prompt_time, counters.prompt_tokens


def align_prefill_group(gen: Any, prefill_batch_size: int) -> None:
    """Let the coming step's prefill group fill to `prefill_batch_size` once the rows
    that end their prompt in it have moved on to decoding.

    mlx-lm 0.32.2's `BatchGenerator` sizes the new group *before* it moves finished
    prompts out of the prompt batch: a request that arrived alone (prefilled on its own
    while the rest of a burst arrived) leaves room for P-1 in the next group, that group
    for 1 in the one after, and the burst is prefilled in alternating groups of 1 and
    P-1: twice the prefill passes (at c=32 on the CPU demo model, runs like that reached
    0.73-0.83 of the bare loop). Counting the leavers in (what `_next` splits off: one
    segment of one token left) restores full groups. Reads `_currently_processing`, a list
    of `[segments, done, total]` per prompt-batch row."""
    leaving = sum(1 for segments, *_ in gen._currently_processing
                  if len(segments) == 1 and len(segments[0]) == 1)
    gen.prefill_batch_size = prefill_batch_size + leaving


def set_prefill_step(gen: Any, tokens: int) -> None:
    """Tokens per prompt the next steps prefill, for rows already in the prompt batch too.
    0.32.2's `_next` cuts each prompt's next chunk at the generator's `prefill_step_size`
    (within its first segment, so segment ends stay where they were cut); the prompt
    batch, built once in `__init__` with a copy of that size, splits what it is given at
    its own `prefill_step_size`, so both are set."""
    gen.prefill_step_size = tokens
    gen._prompt_batch.prefill_step_size = tokens


def prefill_step(gen: Any) -> int:
    """The chunk the generator cuts prompts at now (its `prefill_step_size`)."""
    return gen.prefill_step_size


def decoding_rows(gen: Any) -> int:
    """Rows in the generation batch (`_generation_batch`, with `__len__`): the rows the
    next step decodes before it prefills."""
    return len(gen._generation_batch)


def queued_uids(gen: Any, uids: Sequence[int]) -> set[int]:
    """Those of `uids` still queued, in no batch yet (`_find_uids` stage 0). Raises
    whatever `_find_uids` raises on a batch a failed step left inconsistent."""
    stages = gen._find_uids(uids)
    return {uid for uid, (stage, _) in stages.items() if stage == QUEUED}


def prompt_row_state(gen: Any, uid: int, layout: Sequence[str]) -> list[Any]:
    """The recurrent state of `uid`'s row in the prompt batch (`_prompt_batch`, whose
    `uids` and `prompt_cache`, one batch cache per layer, are in row order)."""
    batch = gen._prompt_batch
    return recurrent_state(batch.prompt_cache, batch.uids.index(uid), layout)


def generation_row(gen: Any, uid: int) -> tuple[list[int], list[Any]]:
    """The tokens and the whole cache (every layer) of `uid`'s row in the generation batch
    (`_generation_batch`, whose `uids`, `tokens` and `prompt_cache` are in row order)."""
    batch = gen._generation_batch
    idx = batch.uids.index(uid)
    return list(batch.tokens[idx]), [c.extract(idx) for c in batch.prompt_cache]


class RowKV:
    """One row of a batch KV cache as views into it (no copy), with a `KVCache`'s
    `state`: (keys, values, length), batch dimension 1."""

    __slots__ = ("state",)

    def __init__(self, keys: Any, values: Any) -> None:
        self.state = (keys, values, keys.shape[2])


def prompt_row_length(gen: Any, uid: int) -> int:
    """Tokens `uid`'s row in the prompt batch holds so far (0 if it is not there): plain
    Python, so the caller can tell whether a block was completed before reading any KV."""
    batch = gen._prompt_batch
    if batch is None or uid not in batch.uids:
        return 0
    return len(batch.tokens[batch.uids.index(uid)])


def prompt_row_kv(gen: Any, uid: int, layout: Sequence[str]) -> tuple[list[int], list[Any]] | None:
    """The tokens `uid`'s row in the prompt batch holds so far and its KV per layer, as
    views (`RowKV`), between two steps of its prefill. None where that cannot be read
    exactly: a layer that is not KV, no cache yet, or a row whose cached span (`left_padding`
    to `_idx`: mlx-lm finalizes right padding into left padding at the end of every
    `prompt` call) does not hold exactly its tokens."""
    return _row_kv(gen._prompt_batch, uid, layout)


def generation_row_kv(gen: Any, uid: int, layout: Sequence[str]) -> tuple[list[int], list[Any]] | None:
    """`prompt_row_kv` for a row of the generation batch: views instead of
    `generation_row`'s contiguous copy of the whole row (a 16k-token row of a 7.5B model
    is 2 GB, copied only to be sliced into blocks)."""
    return _row_kv(gen._generation_batch, uid, layout)


def _row_kv(batch: Any, uid: int, layout: Sequence[str]) -> tuple[list[int], list[Any]] | None:
    if batch is None or uid not in batch.uids or any(kind != KV for kind in layout):
        return None
    caches = batch.prompt_cache
    if not caches or any(getattr(c, "keys", None) is None for c in caches):
        return None
    idx = batch.uids.index(uid)
    tokens = list(batch.tokens[idx])
    # Every layer's batch cache goes through the same prepare/finalize/filter/extend, so
    # they share their padding and end: read the padding once (reading it waits for the
    # stream), and refuse a batch whose layers disagree rather than slice it wrongly.
    end = caches[0]._idx
    padding = caches[0].left_padding.tolist()[idx]
    if end - padding != len(tokens) or any(c._idx != end for c in caches):
        return None
    return tokens, [RowKV(c.keys[idx : idx + 1, :, padding:end], c.values[idx : idx + 1, :, padding:end])
                    for c in caches]


def generation_rows_at_block_end(
    gen: Any, block_size: int, layout: Sequence[str], wanted: Container[int],
) -> Iterator[tuple[int, int, list[Any]]]:
    """(uid, index of the block just completed, recurrent state) for each row of the
    generation batch in `wanted` whose cache holds a whole number of blocks, in row order.
    A row's state is extracted only when its turn comes."""
    batch = gen._generation_batch
    for idx, uid in enumerate(batch.uids):
        held = len(batch.tokens[idx])  # tokens in this row's cache
        if uid in wanted and held % block_size == 0:
            yield uid, held // block_size - 1, recurrent_state(batch.prompt_cache, idx, layout)


def recurrent_state(batch_cache: list[Any], idx: int, layout: Sequence[str]) -> list[Any]:
    """Row `idx` of a batch cache, recurrent layers only (KV blocks are sliced at save):
    each layer's batch cache has `extract(idx)`, giving that row's own cache."""
    return [c.extract(idx) if kind == ARRAYS else None for c, kind in zip(batch_cache, layout)]

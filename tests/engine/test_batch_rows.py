"""mlx-lm's private batch state, read the way the engine core reads it (`engine/batch_rows.py`).

These pin the shapes of mlx-lm 0.32.2 that `batch_rows` assumes, on the real tiny hybrid model
(recurrent and attention layers): after an mlx-lm upgrade, a failure here names the function
to re-read against mlx-lm's `generate.py`. One scenario runs once on an MLX worker thread and
records what each function saw; each test checks one of those readings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from omlx_actors.engine import batch_rows
from omlx_actors.engine.block_store import ARRAYS, cache_layout
from omlx_actors.mlx_loader import load_mlx

# Two prompts: 20 tokens cut at a block boundary after 10, and 3 tokens; token ids from the
# tiny vocabulary (>= 5: not special).
LONG = [list(range(5, 15)), list(range(15, 25))]
SHORT = [list(range(30, 33))]


def _scenario(path: Path) -> dict:
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load_model

    mx = load_mlx()
    stream = mx.new_stream(mx.default_device())
    with mx.stream(stream):
        model, _ = load_model(path)
    layout = cache_layout(model)
    gen = BatchGenerator(model, stream=stream, prefill_batch_size=2, completion_batch_size=4,
                         prefill_step_size=8)
    long_uid, short_uid = gen.insert_segments([LONG, SHORT], max_tokens=[3, 3])
    seen: dict = {"layout": layout, "uids": (long_uid, short_uid)}
    seen["queued_before"] = batch_rows.queued_uids(gen, [long_uid, short_uid])
    seen["counters_before"] = batch_rows.prompt_counters(gen)
    batch_rows.align_prefill_group(gen, 2)
    seen["group_before"] = gen.prefill_batch_size
    prompt, _ = gen.next()  # long: 8 tokens; short: its first segment (2), then it stops
    seen["progress_0"] = {r.uid: r.progress for r in prompt}
    seen["queued_after"] = batch_rows.queued_uids(gen, [long_uid, short_uid])
    seen["counters_after"] = batch_rows.prompt_counters(gen)
    seen["state_at_segment_end"] = batch_rows.prompt_row_state(gen, short_uid, layout)
    batch_rows.align_prefill_group(gen, 2)
    seen["group_with_a_leaver"] = gen.prefill_batch_size
    prompt, _ = gen.next()  # short moves to decoding; long reaches its block boundary (10)
    seen["ended_prompt"] = [r.uid for r in prompt if r.end_of_prompt]
    tokens, cache = batch_rows.generation_row(gen, short_uid)
    seen["generation_row"] = (tokens, len(cache))
    seen["at_block_end_of_3"] = [
        (uid, block) for uid, block, _ in
        batch_rows.generation_rows_at_block_end(gen, 3, layout, {short_uid})]
    seen["at_block_end_unwanted"] = list(
        batch_rows.generation_rows_at_block_end(gen, 3, layout, set()))
    batch_rows.set_prefill_step(gen, 4)
    prompt, _ = gen.next()
    seen["progress_after_smaller_step"] = {r.uid: r.progress for r in prompt}
    return seen


@pytest.fixture(scope="module")
def seen(tiny_hybrid: Path, on_mlx_worker) -> dict:
    return on_mlx_worker(_scenario, tiny_hybrid)


def test_inserted_rows_are_queued_until_a_step_takes_them_into_the_prompt_batch(seen):
    assert seen["queued_before"] == set(seen["uids"])
    assert seen["queued_after"] == set()


def test_prompt_counters_count_the_tokens_each_step_prefilled(seen):
    assert seen["counters_before"] == (0.0, 0)
    seconds, tokens = seen["counters_after"]
    assert tokens == 8 + 2 and seconds > 0
    long_uid, short_uid = seen["uids"]
    assert seen["progress_0"] == {long_uid: (8, 20), short_uid: (2, 3)}


def test_the_prefill_group_counts_in_rows_about_to_leave_for_decoding(seen):
    assert seen["group_before"] == 2  # nothing in the prompt batch yet
    assert seen["group_with_a_leaver"] == 3  # the short prompt has one token left


def test_a_rows_state_at_a_segment_end_holds_only_its_recurrent_layers(seen):
    kinds = seen["layout"]
    assert ARRAYS in kinds and any(kind != ARRAYS for kind in kinds)
    state = seen["state_at_segment_end"]
    assert len(state) == len(kinds)
    assert [s is not None for s in state] == [kind == ARRAYS for kind in kinds]


def test_a_row_that_ended_its_prompt_is_read_from_the_generation_batch(seen):
    long_uid, short_uid = seen["uids"]
    assert seen["ended_prompt"] == [short_uid]
    assert seen["generation_row"] == (SHORT[0], len(seen["layout"]))


def test_decoding_rows_are_reported_where_their_cache_completes_a_block(seen):
    short_uid = seen["uids"][1]
    assert seen["at_block_end_of_3"] == [(short_uid, 0)]
    assert seen["at_block_end_unwanted"] == []


def test_a_smaller_prefill_step_applies_to_a_prompt_already_prefilling(seen):
    long_uid = seen["uids"][0]
    assert seen["progress_after_smaller_step"][long_uid] == (10 + 4, 20)


def _row_views_scenario(path: Path) -> dict:
    """Two prompts of different lengths (so mlx-lm pads them) prefilled in 8-token chunks
    on an attention-only model: a row's KV views must equal mlx-lm's own `extract`."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load_model

    mx = load_mlx()
    stream = mx.new_stream(mx.default_device())
    with mx.stream(stream):
        model, _ = load_model(path)
    layout = cache_layout(model)
    gen = BatchGenerator(model, stream=stream, prefill_batch_size=2, completion_batch_size=4,
                         prefill_step_size=8)
    uids = gen.insert([list(range(5, 25)), list(range(30, 43))], max_tokens=[3, 3])
    seen: dict = {"mid": [], "generation": [], "lengths": []}

    def same(views, batch, idx) -> bool:
        return all(mx.array_equal(v.state[0], c.extract(idx).keys).item()
                   and mx.array_equal(v.state[1], c.extract(idx).values).item()
                   for v, c in zip(views, batch.prompt_cache))

    for _ in range(6):
        gen.next()
        for uid in uids:
            for reader, batch, key in ((batch_rows.prompt_row_kv, gen._prompt_batch, "mid"),
                                       (batch_rows.generation_row_kv, gen._generation_batch,
                                        "generation")):
                row = reader(gen, uid, layout)
                if row is not None:
                    tokens, views = row
                    idx = batch.uids.index(uid)
                    seen[key].append((len(tokens), views[0].state[2], same(views, batch, idx)))
                    if key == "mid":
                        seen["lengths"].append((batch_rows.prompt_row_length(gen, uid), len(tokens)))
        seen["length_of_a_row_not_prefilling"] = batch_rows.prompt_row_length(gen, -1)
    seen["hybrid_layout"] = batch_rows.generation_row_kv(gen, uids[0], ("ArraysCache",) * len(layout))
    return seen


def test_a_rows_kv_views_equal_mlx_lms_own_extract_in_both_batches(tiny_llama: Path, on_mlx_worker):
    seen = on_mlx_worker(_row_views_scenario, tiny_llama)
    assert seen["mid"] and seen["generation"], seen
    for key in ("mid", "generation"):
        assert all(n_tokens == length and equal for n_tokens, length, equal in seen[key]), seen[key]
    assert seen["hybrid_layout"] is None  # recurrent layers are never read as views
    assert seen["lengths"] and all(read == held for read, held in seen["lengths"])
    assert seen["length_of_a_row_not_prefilling"] == 0

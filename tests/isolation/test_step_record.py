"""The step record: what the MLX thread works on, readable after the process is gone."""

from __future__ import annotations

import os

import hypothesis.strategies as st
from hypothesis import given

from omlx_actors.engine.step_record import (
    HEADER,
    PAYLOAD_OFFSET,
    StepRecorder,
    decode,
    encode,
    read_step_record,
)

ids = st.lists(st.text(min_size=1, max_size=40), max_size=300).map(tuple)


@given(seq=st.integers(0, 2**64 - 1), request_ids=ids)
def test_a_record_reads_back_what_was_written(seq, request_ids):
    header, payload = encode(seq, request_ids)
    assert decode(header, payload + b"\0" * 17) == request_ids


@given(old=ids, new=ids)
def test_a_new_payload_under_an_old_header_reads_as_no_record(old, new):
    """A death between the payload write and the header write."""
    old_header, old_payload = encode(1, old)
    _, new_payload = encode(2, new)
    region = new_payload + old_payload[len(new_payload):]
    # Never the new set under the old header: either torn (None) or, where the bytes the
    # old header covers are unchanged, the old set.
    assert decode(old_header, region) == (old if region[:len(old_payload)] == old_payload else None)


def test_the_recorder_writes_sets_and_the_empty_record_between_them(tmp_path):
    path = str(tmp_path / "engine.step")
    recorder = StepRecorder(path)
    assert read_step_record(path) == frozenset()
    recorder.working(("req-a", "req-b"))
    assert read_step_record(path) == {"req-a", "req-b"}
    recorder.working(())
    assert read_step_record(path) == frozenset()
    recorder.working(("req-b",))
    assert read_step_record(path) == {"req-b"}
    recorder.close()


def test_a_torn_record_reads_as_no_work(tmp_path):
    path = str(tmp_path / "engine.step")
    recorder = StepRecorder(path)
    recorder.working(("req-a",))
    recorder.close()
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b'["req-z"]', PAYLOAD_OFFSET)  # the payload changed, the header did not
    os.close(fd)
    assert read_step_record(path) == frozenset()


def test_no_file_and_no_path_mean_no_work(tmp_path):
    assert read_step_record(str(tmp_path / "missing")) == frozenset()
    StepRecorder(None).working(("a",))  # an in-process engine records nothing
    assert HEADER.size < PAYLOAD_OFFSET

"""wire.py: messages and typed errors survive encode/decode exactly; plain-data checks."""

from __future__ import annotations

import pickle

import attrs
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omlx_actors.kernel import (
    TAG_KEY,
    ActorCrashed,
    ActorError,
    ActorUnavailable,
    CallTimeout,
    InboxFull,
    RestartIntensityExceeded,
    UnknownMessage,
    assert_plain_data,
    decode,
    decode_error,
    encode,
    encode_error,
    make_converter,
)

from .examples import Abort, Batch, Echo, EngineMessage, Priority, Submit, Token

SUBMIT = Submit(
    request_id="req-1",
    prompt=(1, 2, 3),
    priority=Priority.HIGH,
    stop=frozenset({"</s>", "\n\n"}),
    max_tokens=None,
    temperature=float("inf"),
    payload=b"\x00\xff",
    first=Token(token_id=7, text="Hi"),
)

EXAMPLES = [
    SUBMIT,
    attrs.evolve(SUBMIT, max_tokens=128, temperature=0.7, first=None, stop=frozenset()),
    Abort(request_id="req-1"),
    Abort(request_id="req-2", reason="client disconnected"),
    Batch(items=(SUBMIT, Abort(request_id="req-1")), counts={"a": 1, "b": -2}),
    Batch(items=(), counts={}),
]

ERRORS = [
    ActorError("engine", "plain"),
    ActorCrashed("engine", "ValueError", "bad shape"),
    ActorUnavailable("engine", "actor was aborted"),
    CallTimeout("engine", "no reply within 2.0s"),
    InboxFull("engine", "inbox full"),
    RestartIntensityExceeded("engine", "4 crashes within 5.0s"),
    UnknownMessage("engine", "unknown message Stray: Stray()"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trips_through_the_union(message):
    assert decode(encode(message), EngineMessage) == message


def test_message_round_trips_as_its_own_class():
    assert decode(encode(SUBMIT), Submit) == SUBMIT


def test_encoded_message_is_tagged_with_its_class_name():
    raw = make_converter().unstructure(Abort(request_id="r"))
    assert raw == {"request_id": "r", "reason": None, TAG_KEY: "Abort"}


def test_decode_rejects_a_tag_outside_the_union():
    with pytest.raises(ValueError, match="tag 'Echo' is not a member of"):
        decode(encode(Echo(text="x")), EngineMessage)


def test_decode_rejects_a_message_of_another_class():
    with pytest.raises(ValueError, match="expected a Abort, got tag 'Echo'"):
        decode(encode(Echo(text="x")), Abort)


def test_encode_refuses_what_is_not_an_attrs_message():
    with pytest.raises(TypeError, match="encode\\(\\) takes an attrs message, not dict"):
        encode({"request_id": "r"})


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_actor_error_round_trips_with_its_type(error):
    decoded = decode_error(encode_error(error))
    assert type(decoded) is type(error)
    assert decoded == error
    assert str(decoded) == str(error)


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_actor_error_pickles_with_its_type_and_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy, str(copy)) == (type(error), error, str(error))


def test_error_of_a_class_unknown_here_decodes_as_a_plain_actor_error():
    data = msgspec.msgpack.encode(
        {TAG_KEY: "QuotaExceeded", "actor": "engine", "message": "over quota"}
    )
    decoded = decode_error(data)
    assert type(decoded) is ActorError
    assert decoded == ActorError("engine", "QuotaExceeded(message='over quota')")


def test_error_subclass_defined_elsewhere_round_trips_with_its_own_fields():
    class OutOfBlocks(ActorError):
        wire_fields = ("actor", "needed", "free")

        def __init__(self, actor, needed, free):
            super().__init__(actor, f"needs {needed} blocks, {free} free")
            self.needed, self.free = needed, free

    error = OutOfBlocks("kv", 12, 3)
    decoded = decode_error(encode_error(error))
    assert (type(decoded), decoded.needed, decoded.free) == (OutOfBlocks, 12, 3)


@pytest.mark.parametrize("message", EXAMPLES + [Echo(text="x")], ids=lambda m: type(m).__name__)
def test_assert_plain_data_accepts_plain_messages(message):
    assert_plain_data(message)


@attrs.frozen(kw_only=True)
class Holder:
    value: object


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (Holder(value=object()), "Holder.value is a object, which is not plain data"),
        (Holder(value={1, 2}), "Holder.value is a set, which is not plain data"),
        (Holder(value=(1, [2, bytearray()])), "Holder.value[1][1] is a bytearray"),
        (Holder(value={"k": lambda: 0}), "Holder.value['k'] is a function"),
        (Holder(value=Holder(value=ValueError())), "Holder.value.value is a ValueError"),
    ],
)
def test_assert_plain_data_names_the_path_to_what_is_not_plain(message, complaint):
    with pytest.raises(TypeError, match=complaint.replace("[", r"\[").replace("(", r"\(")):
        assert_plain_data(message)


def test_assert_plain_data_refuses_what_is_not_an_attrs_message():
    with pytest.raises(TypeError, match="dict is not an attrs message"):
        assert_plain_data({"text": "x"})


# msgpack carries integers in 64 bits; NaN is left out only because NaN != NaN.
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=False)
TOKENS = st.builds(Token, token_id=INT64, text=st.text())
SUBMITS = st.builds(
    Submit,
    request_id=st.text(),
    prompt=st.lists(INT64, max_size=20).map(tuple),
    priority=st.sampled_from(Priority),
    stop=st.frozensets(st.text(max_size=4), max_size=4),
    max_tokens=st.none() | INT64,
    temperature=FLOATS,
    payload=st.binary(max_size=32),
    first=st.none() | TOKENS,
)
ABORTS = st.builds(Abort, request_id=st.text(), reason=st.none() | st.text())
BATCHES = st.builds(
    Batch,
    items=st.lists(SUBMITS | ABORTS, max_size=4).map(tuple),
    counts=st.dictionaries(st.text(max_size=8), INT64, max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(SUBMITS | ABORTS | BATCHES)
def test_generated_messages_round_trip_exactly(message):
    assert_plain_data(message)
    assert decode(encode(message), EngineMessage) == message

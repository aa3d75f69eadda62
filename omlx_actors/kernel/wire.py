"""Messages as bytes, so an actor can later sit behind a process boundary.

Messages are `@attrs.frozen` classes holding plain data only (`assert_plain_data` checks
it). They are unstructured by a cattrs converter (the msgspec preconf one) and framed with
msgpack (`msgspec.msgpack`), which, unlike JSON, keeps non-finite floats and bytes exact.

Every attrs instance is written with its class name under `TAG_KEY`. A field or a decode
target that is a union of attrs classes is resolved by that tag, so closed unions of
messages round-trip exactly (member class names must be unique within a union). Integers
must fit in 64 bits (a msgpack limit).

Errors travel too: `encode_error` writes an `ActorError` with its class name and its
`wire_fields`; `decode_error` rebuilds the same class, so a remote refusal is raised
with its original type.
"""

from __future__ import annotations

import enum
import functools
import types
from collections.abc import Callable
from typing import Any, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
import msgspec
from cattrs.gen import make_dict_unstructure_fn
from cattrs.preconf.msgspec import MsgspecJsonConverter
from cattrs.preconf.msgspec import make_converter as _make_msgspec_converter

from .errors import ActorError

__all__ = [
    "TAG_KEY",
    "assert_plain_data",
    "decode",
    "decode_error",
    "encode",
    "encode_error",
    "make_converter",
]

T = TypeVar("T")

# "$" cannot start a Python identifier, so the tag never collides with a field name.
TAG_KEY = "$type"

_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))


def _is_attrs_union(type_: Any) -> bool:
    if get_origin(type_) not in (Union, types.UnionType):
        return False
    members = [arg for arg in get_args(type_) if arg is not type(None)]
    return len(members) >= 2 and all(attrs.has(arg) for arg in members)


def make_converter() -> MsgspecJsonConverter:
    """A cattrs converter that tags attrs classes and resolves unions of them by tag."""
    converter = _make_msgspec_converter()

    def unstructure_factory(cls: type) -> Callable[[Any], dict[str, Any]]:
        untagged: Callable[[Any], dict[str, Any]] = make_dict_unstructure_fn(cls, converter)
        tag = cls.__name__

        def unstructure(obj: Any) -> dict[str, Any]:
            data = untagged(obj)
            data[TAG_KEY] = tag
            return data

        return unstructure

    def union_structure_factory(union: Any) -> Callable[[Any, Any], Any]:
        by_tag: dict[str, type] = {}
        for member in get_args(union):
            if member is type(None):
                continue
            if member.__name__ in by_tag:
                raise TypeError(f"{union}: two members are named {member.__name__!r}")
            by_tag[member.__name__] = member
        optional = type(None) in get_args(union)

        def structure(data: Any, _: Any) -> Any:
            if data is None and optional:
                return None
            if not isinstance(data, dict) or TAG_KEY not in data:
                raise ValueError(f"expected a tagged {union}, got {data!r}")
            member = by_tag.get(data[TAG_KEY])
            if member is None:
                raise ValueError(f"tag {data[TAG_KEY]!r} is not a member of {union}")
            return converter.structure(data, member)

        return structure

    # Registered after the preconf hooks so they take precedence over its attrs passthrough.
    converter.register_unstructure_hook_factory(attrs.has, unstructure_factory)
    converter.register_structure_hook_factory(_is_attrs_union, union_structure_factory)
    return converter


@functools.cache
def _converter() -> MsgspecJsonConverter:
    return make_converter()


# msgspec encoders keep internal buffers; one each per process is the intended use.
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()


def encode(message: Any) -> bytes:
    """Encode an attrs message (tagged with its class name) as msgpack bytes."""
    if not attrs.has(type(message)):
        raise TypeError(f"encode() takes an attrs message, not {type(message).__qualname__}")
    return _ENCODER.encode(_converter().unstructure(message))


def decode(data: bytes, union_type: type[T] | Any) -> T:
    """Decode bytes from `encode` as `union_type`: a union of attrs classes, or one class.

    Raises ValueError when the tag names no member of `union_type`.
    """
    raw = _DECODER.decode(data)
    if attrs.has(union_type):
        tag = raw.get(TAG_KEY) if isinstance(raw, dict) else None
        if tag != union_type.__name__:
            raise ValueError(f"expected a {union_type.__name__}, got tag {tag!r}")
    try:
        message: T = _converter().structure(raw, union_type)
    except cattrs.BaseValidationError as error:
        raise ValueError(f"cannot decode {union_type}: {error!r}") from error
    return message


def decode_tagged(data: bytes, classes: dict[str, type]) -> Any:
    """Decode bytes from `encode` as whichever of `classes` (class name → class) its tag
    names - for a channel that carries many message types. ValueError on an unknown tag."""
    raw = _DECODER.decode(data)
    tag = raw.get(TAG_KEY) if isinstance(raw, dict) else None
    cls = classes.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ValueError(f"tag {tag!r} names no known message")
    try:
        return _converter().structure(raw, cls)
    except cattrs.BaseValidationError as error:
        raise ValueError(f"cannot decode {tag}: {error!r}") from error


def _error_classes() -> dict[str, type[ActorError]]:
    # Walked on each decode, so error classes defined in modules imported later count too.
    found: dict[str, type[ActorError]] = {ActorError.__name__: ActorError}
    pending = [ActorError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.setdefault(sub.__name__, sub)
            pending.append(sub)
    return found


def encode_error(error: ActorError) -> bytes:
    """Encode an `ActorError` with its class name and its `wire_fields`."""
    record = {name: getattr(error, name) for name in error.wire_fields}
    record[TAG_KEY] = type(error).__name__
    return _ENCODER.encode(record)


def decode_error(data: bytes) -> ActorError:
    """Rebuild the `ActorError` that `encode_error` wrote, with its original class.

    A class this process does not know becomes a plain `ActorError` whose message names
    the original type, so the failure is still reported, never lost.
    """
    record = _DECODER.decode(data)
    if not isinstance(record, dict) or not isinstance(record.get(TAG_KEY), str):
        raise ValueError(f"not an encoded ActorError: {record!r}")
    name = record.pop(TAG_KEY)
    cls = _error_classes().get(name)
    if cls is None:
        detail = ", ".join(f"{key}={value!r}" for key, value in record.items() if key != "actor")
        return ActorError(str(record.get("actor", "?")), f"{name}({detail})")
    try:
        return cls(**{field: record[field] for field in cls.wire_fields})
    except KeyError as missing:
        raise ValueError(f"encoded {name} lacks field {missing}") from None


def assert_plain_data(message: Any) -> None:
    """Raise TypeError unless `message` is an attrs instance holding only plain data.

    Plain data: str, int, float, bool, None, bytes, enum members, and tuples, lists,
    dicts and frozensets of plain data, and nested attrs instances of the same.
    The error names the path to the first offending value.
    """
    if not attrs.has(type(message)):
        raise TypeError(f"{type(message).__qualname__} is not an attrs message")
    _check(message, type(message).__qualname__)


def _check(value: Any, path: str) -> None:
    if isinstance(value, enum.Enum):
        _check(value.value, f"{path}.value")
    elif isinstance(value, _PLAIN_SCALARS):
        return
    elif attrs.has(type(value)):
        for field in attrs.fields(type(value)):
            _check(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
    elif isinstance(value, frozenset):
        for item in value:
            _check(item, f"{path}{{{item!r}}}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(key, f"{path} key {key!r}")
            _check(item, f"{path}[{key!r}]")
    else:
        raise TypeError(f"{path} is a {type(value).__qualname__}, which is not plain data")

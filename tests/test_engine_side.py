"""Both engine sides implement the interface the front is typed against (`engine.side`)."""

from __future__ import annotations

import attrs
import pytest

from omlx_actors.engine.assembly import LocalEngineSide
from omlx_actors.engine.side import EngineSide
from omlx_actors.isolation.remote_side import RemoteEngineSide

MEMBERS = sorted(name for name in dir(EngineSide) if not name.startswith("_"))


def test_the_interface_names_what_the_runtime_uses():
    assert MEMBERS == ["abort", "abort_nowait", "cache_stats", "events", "has_ssd", "info",
                       "inject_fault", "memory", "pid", "ping", "ssd_call", "stats", "status",
                       "submit"]


@pytest.mark.parametrize("side", [LocalEngineSide, RemoteEngineSide])
def test_each_engine_side_has_every_member_of_the_interface(side):
    has = set(dir(side)) | {field.name for field in attrs.fields(side)}
    assert [name for name in MEMBERS if name not in has] == []

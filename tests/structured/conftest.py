"""Fixtures of the structured-output tests: the HTTP tests' helpers (a real server on
loopback, the real clients) and the schemas the tests constrain to."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "http"))

from http_support import serve  # noqa: E402


@pytest.fixture
async def server(tiny_llama):
    async with serve(tiny_llama) as s:
        yield s

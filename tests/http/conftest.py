"""Fixtures of the HTTP tests (helpers live in http_support.py)."""

from __future__ import annotations

import pytest
from http_support import serve


@pytest.fixture
async def server(tiny_llama):
    """A real server over the tiny model on a loopback ephemeral port."""
    async with serve(tiny_llama) as s:
        yield s

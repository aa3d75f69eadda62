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


def _on_mlx_worker(fn, *args, timeout: float = 120):
    """`fn(*args)` on an idle MLX worker thread (MLX arrays are bound to the thread that
    made them); its value is returned here, its exception raised here."""
    import queue

    from omlx_actors.engine.mlx_thread import acquire_worker

    answers: queue.Queue = queue.Queue()

    def job() -> None:
        try:
            answers.put((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            answers.put((False, exc))

    acquire_worker().run_job(job)
    ok, value = answers.get(timeout=timeout)
    if not ok:
        raise value
    return value


@pytest.fixture(scope="session")
def on_mlx_worker():
    return _on_mlx_worker

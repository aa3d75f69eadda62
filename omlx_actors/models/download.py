"""Where the weights come from: a config's model, resolved to a directory before the engine starts.

`resolve_model(config)` picks the directory: the random-weight demo (built once), the real
default model (fetched and imported once, `models.resolve`), a GGUF file (imported once), a
local mlx-lm directory, or a Hugging Face repo (`download_from_hub`). Whatever runs MLX runs
in a child process: in a server, MLX belongs to the engine's thread.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.refusals import ModelNotFound

log = logging.getLogger(__name__)


def download_from_hub(repo: str) -> Path:
    """The local directory of a Hugging Face repo, downloaded if it is not cached yet
    (works offline for a repo already downloaded). Blocking: run it in a thread.

    Leans on mlx-lm's private `mlx_lm.utils._download` (as of mlx-lm 0.32: a local path
    as is, else huggingface_hub's `snapshot_download` of only the files mlx-lm loads, its
    DEFAULT_ALLOW_PATTERNS), so a repo fetched here is one `mlx_lm.load` accepts. No public
    mlx-lm function does the same; if a new mlx-lm drops or renames it, this is the one
    place to change."""
    from mlx_lm.utils import _download

    return Path(_download(repo))


async def resolve_model(config: RuntimeConfig) -> tuple[Path, bool]:
    """The model directory to load, and whether it is the random-weight demo.

    "smollm2-135m-instruct" is the real default model, fetched and imported once. A GGUF
    file is imported once into the user cache (`omlx_actors.models.resolve`), and a
    quantized GGUF import is served as float32 on the CPU; another local directory is used
    as is; anything else goes through mlx-lm's hub resolution
    (which works offline for already-downloaded repos). None builds/uses the demo model -
    built in a child process, because building runs MLX and MLX belongs to the executor's
    thread in this process.
    """
    from omlx_actors.models import demo_model_path, is_demo_model

    if config.model is None:
        path = demo_model_path(config.demo_model, config.model_cache_dir)
        if not is_demo_model(path):
            log.warning("building the random-weight demo model %s once into %s",
                        config.demo_model, path)
            script = ("import sys; from omlx_actors.models import ensure_demo_model; "
                      "ensure_demo_model(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)")
            args = [sys.executable, "-c", script, config.demo_model]
            if config.model_cache_dir is not None:
                args.append(str(config.model_cache_dir))
            await trio.run_process(args)
        return path, True
    local = Path(config.model).expanduser()
    from omlx_actors.models import resolve as model_resolve

    if config.model == model_resolve.DEFAULT_MODEL.name and not local.exists():
        # The real default model by its served name: fetched and imported once.
        proc = await trio.run_process(model_resolve.prepare_args("default"), check=False,
                                      capture_stdout=True)
        try:
            return model_resolve.parse_child(proc.returncode, proc.stdout.decode()), False
        except model_resolve.ModelUnavailable as exc:
            raise ModelNotFound(f"model {config.model!r}: {exc}") from None
    if model_resolve.needs_child(local):
        # A GGUF file (imported once into the cache) or a quantized import (float32 on the
        # CPU): MLX work, so in a child process; its progress goes to our stderr.
        what = "gguf" if local.is_file() else "dir"
        proc = await trio.run_process(model_resolve.prepare_args(what, local), check=False,
                                      capture_stdout=True)
        try:
            return model_resolve.parse_child(proc.returncode, proc.stdout.decode()), False
        except ValueError as exc:  # UnsupportedGguf
            raise ModelNotFound(f"cannot serve {local.name}: {exc}") from None
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFound(f"{local} has no config.json: not an mlx-lm model directory")
        return local, is_demo_model(local)
    try:
        return await trio.to_thread.run_sync(download_from_hub, config.model), False
    except Exception as exc:  # noqa: BLE001 - any resolution failure means "not found"
        raise ModelNotFound(f"model {config.model!r} not found locally or on the hub: {exc}") from exc

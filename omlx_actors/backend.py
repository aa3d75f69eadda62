"""The one place the package imports MLX from.

MLX's Linux CPU wheel bundles the reference netlib BLAS, which runs fp32 matmuls 50-100x
slower than the machine can. Loading a real BLAS (Debian's OpenBLAS) into the global symbol
namespace *before* `mlx.core` is first imported makes MLX's CPU backend bind to it instead.
That only works if it happens before anything else imports MLX, so every module of the
package that needs MLX goes through `load_mlx()` (or imports this module first).

Nothing here touches an MLX stream or array: importing is safe on any thread. Running MLX is
not - see `omlx_actors.engine.executor`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from types import ModuleType

# Debian/Ubuntu's libopenblas0-pthread. Searched in this order; the environment variable
# OMLX_OPENBLAS overrides (an explicit path, or "off" to skip the preload).
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_blas_status: str | None = None


def _preload_openblas() -> str:
    """Load OpenBLAS with RTLD_GLOBAL if we are on Linux and MLX is not imported yet.

    Returns a short human-readable status (kept for `omlx-actors serve` to print).
    """
    if not sys.platform.startswith("linux"):
        return "not needed (not Linux)"
    if "mlx.core" in sys.modules:
        return "skipped: mlx.core was imported before omlx_actors.backend"
    choice = os.environ.get("OMLX_OPENBLAS", "")
    if choice.lower() == "off":
        return "disabled by OMLX_OPENBLAS=off"
    candidates = (choice,) if choice else OPENBLAS_CANDIDATES
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:  # a broken install: say so, keep going slowly
                return f"failed to load {path}: {exc}"
            return f"OpenBLAS preloaded from {path}"
    warnings.warn(
        "OpenBLAS not found: MLX's CPU backend will use its bundled reference BLAS, which is "
        "50-100x slower for matmuls. Fix: `apt-get install libopenblas0-pthread` "
        "(or set OMLX_OPENBLAS=/path/to/libopenblas.so.0).",
        RuntimeWarning,
        stacklevel=3,
    )
    return "not found (slow reference BLAS in use)"


def blas_status() -> str:
    """What the BLAS preload did, e.g. for the server's banner."""
    return _blas_status or "MLX not loaded yet"


def load_mlx() -> ModuleType:
    """Import and return `mlx.core`, preloading OpenBLAS first on Linux (once)."""
    global _blas_status
    if _blas_status is None:
        _blas_status = _preload_openblas()
    import mlx.core as mx

    return mx


def device_name() -> str:
    """'gpu' on Metal/CUDA builds, 'cpu' otherwise (asks MLX; safe on any thread)."""
    mx = load_mlx()
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


# Importing this module is enough to fix the BLAS: `import omlx_actors.backend` first.
load_mlx()

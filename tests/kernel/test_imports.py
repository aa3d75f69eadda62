"""The kernel stays free of MLX, so it can be imported and tested anywhere."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_runtime_does_not_import_mlx():
    probe = (
        "import sys, omlx_actors.kernel; "
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"

"""The layers are a contract: import-linter checks pyproject.toml's contracts on every run.

The second test plants one forbidden import (the engine core importing the HTTP app) in a copy
of the package and shows the same check fails on it, so the first test can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The package under `root` comes first on the path, ahead of the editable install.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_every_layer_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "omlx_actors", tmp_path / "omlx_actors",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint_imports(tmp_path).returncode == 0  # the copy is as clean as the original
    core = tmp_path / "omlx_actors" / "engine" / "core.py"
    core.write_text(core.read_text() + "\nimport omlx_actors.http.app  # planted\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "omlx_actors.engine is not allowed to import omlx_actors.http" in result.stdout

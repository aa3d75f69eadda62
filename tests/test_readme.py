"""The README's embedding example runs as written (demo model built into a fresh cache)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_embedding_example_runs_and_prints_a_finish_reason(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "open_runtime" in b)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "length" in proc.stdout or "stop" in proc.stdout
    assert "Usage(prompt_tokens=" in proc.stdout
    assert list((tmp_path / "cache" / "omlx-actors" / "models").glob("tiny-llama-*"))

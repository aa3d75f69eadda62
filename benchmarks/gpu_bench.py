"""GPU benchmark (issue 8): random-weight bf16 llamas of ~1B and ~8B parameters,
(a) bare BatchGenerator vs (b) in-process vs (c) over HTTP at concurrency 1, 8, 64
(and (d) mlx_lm.server when OMLX_GPU_SIDES names it).

Run on the GPU machine (see ../shared/tools/gpu/README.md):
    PYTHONPATH=$PWD python3 benchmarks/gpu_bench.py 1b /tmp/models out.json [GIL_S [REPEAT]]
"""

import argparse
import os
import sys
from pathlib import Path

from omlx_actors.bench.servers import full_bench_main
from omlx_actors.config import RuntimeConfig
from omlx_actors.models import build_demo_model, get_spec

SPECS = {
    # ~1.2B: Llama-3.2-1B-like shapes with a 32k vocabulary.
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=32768),
    # ~7.5B: Llama-3-8B-like shapes with a 32k vocabulary.
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=32768),
}


def built_model(which: str, root: Path) -> Path:
    """The random-weight model `which` under `root`, built on first use (a 32k context, so
    the long-prompt benchmark can use the same weights)."""
    spec = get_spec("demo-150m").with_(name=f"llama-{which}-bf16", dtype="bfloat16", **SPECS[which])
    path = root / spec.name
    if not (path / "omlx_demo.json").exists():
        build_demo_model(spec, path, overwrite=True)
    print(f"built {path}", flush=True)
    return path


def main() -> int:
    which, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    gil = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] not in ("", "none") else None
    repeat = int(sys.argv[5]) if len(sys.argv) > 5 else 3  # the median run of each side is kept
    path = built_model(which, root)
    # OMLX_GPU_LEVELS / OMLX_GPU_SIDES narrow a run (e.g. "8" and "a,b,c,d": mlx_lm.server
    # against ours at one level, within the device's per-call limit).
    args = argparse.Namespace(concurrency=os.environ.get("OMLX_GPU_LEVELS", "1,8,64"),
                              prompt_words=100, max_tokens=64, repeat=repeat,
                              conversations=4, turns=1, history_words=600, json=out,
                              sides=os.environ.get("OMLX_GPU_SIDES", "a,b,c"),
                              gil_switch_interval=gil)
    # GIL_S also applies to (b): its engine shares this process's GIL with the sessions.
    config = RuntimeConfig(model=str(path), max_batch_size=64, prefill_batch_size=8,
                           prefill_step_size=2048, gil_switch_interval_s=gil)
    return full_bench_main(args, config)


if __name__ == "__main__":
    sys.exit(main())

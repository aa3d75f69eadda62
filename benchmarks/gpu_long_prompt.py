"""GPU long-prompt benchmark (issue 18 item 4): 8 streams decode on the random-weight ~7.5B
(or ~1.2B) llama; once each has 16 tokens a 16k-token prompt arrives. Reports the streams'
ITL p50 before it and p99 during its prefill for (a) the bare `BatchGenerator`, (b) this
runtime uncapped and (c) with the decode-time prefill cap.

    PYTHONPATH=$PWD python3 benchmarks/gpu_long_prompt.py 8b /tmp/models out.json [TOKENS [REPEAT [CAP]]]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import built_model  # noqa: E402

from omlx_actors.bench.long_prompt import long_prompt_bench_main  # noqa: E402
from omlx_actors.config import RuntimeConfig  # noqa: E402


def main() -> int:
    which, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 16384
    repeat = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    cap = int(sys.argv[6]) if len(sys.argv) > 6 else 128
    path = built_model(which, root)
    args = argparse.Namespace(streams=8, long_prompt_tokens=tokens, before_tokens=16,
                              repeat=repeat, json=out)
    config = RuntimeConfig(model=str(path), max_batch_size=64, prefill_batch_size=8,
                           prefill_step_size=2048, prefill_step_while_decoding=cap)
    return long_prompt_bench_main(args, config)


if __name__ == "__main__":
    sys.exit(main())

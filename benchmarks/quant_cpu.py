"""Decode tokens/s of model directories (e.g. a GGUF import as 4-bit and its float32
variant) at several batch sizes, with a bare mlx-lm BatchGenerator on this device.

    python benchmarks/quant_cpu.py DIR [DIR ...] [--batch 1,8,32] [--tokens 64]

Used to choose the per-backend default in `omlx_actors.models.resolve` (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time

import omlx_actors.mlx_loader  # noqa: F401 - OpenBLAS before MLX


def decode_rate(model, batch: int, tokens: int, prompt_tokens: int = 64) -> float:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, completion_batch_size=batch, prefill_batch_size=batch)
    prompts = [[(7 * i + j) % 5000 + 100 for j in range(prompt_tokens)] for i in range(batch)]
    remaining = set(gen.insert(prompts, max_tokens=[tokens] * batch))
    started: set[int] = set()
    produced, start = 0, None
    while remaining:
        _, responses = gen.next()
        for r in responses:
            if start is not None:
                produced += 1
            started.add(r.uid)
            if r.finish_reason is not None:
                remaining.discard(r.uid)
        if start is None and len(started) == batch:
            start = time.perf_counter()  # every row has its first token: decoding from here
    elapsed = time.perf_counter() - start
    gen.close()
    return produced / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    from pathlib import Path

    from mlx_lm.utils import load_model

    models = []
    for path in args.models:
        model, config = load_model(Path(path))
        models.append((path, "quantized" if "quantization" in config else "dense", model))
    # Interleaved per batch size, so both see the same machine load.
    for b in (int(x) for x in args.batch.split(",")):
        for path, kind, model in models:
            decode_rate(model, b, 2)  # warm-up
            rate = decode_rate(model, b, args.tokens)
            print(f"{path} ({kind}) batch {b:3d}: {rate:7.1f} tok/s", flush=True)

if __name__ == "__main__":
    main()

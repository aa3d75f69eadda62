"""Summarize py-spy raw profiles (`record -f raw --threads [--idle] [--native]`) per thread.

    python3 benchmarks/profile_summary.py PROFILE.txt[.gz] [--top N] [--window A:B]

For each thread with samples: its share of all samples, the share spent waiting for the GIL
(a native frame `take_gil`, or Python's own `PyEval_RestoreThread`), and the top entries by
the innermost frame of our code or mlx-lm (`omlx_actors/`, `mlx_lm/`), by innermost Python
frame and by innermost native library. `--window` keeps only stacks containing a frame
that matches (e.g. `runtime_level`); `--steady` drops start-up stacks (imports, loading).
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter, defaultdict

PY_FRAME = re.compile(r"^(?P<fn>.+) \((?P<file>[^:()]+\.py):\d+\)$")
NATIVE_LIB = re.compile(r"\((?P<lib>[^()]+\.so[^()]*)\)$")
STARTUP = ("<module> (", "load_model (", "load_tokenizer", "load (mlx_lm/tokenizer_utils",
           "load_mlx (", "serve_main (")
GIL_WAIT = ("take_gil", "PyEval_RestoreThread", "PyGILState_Ensure", "drop_gil")


def read(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack:
                yield stack.split(";"), int(count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--window", default=None)
    ap.add_argument("--steady", action="store_true",
                    help="drop start-up stacks (imports, model and tokenizer loading)")
    args = ap.parse_args()
    per_thread: dict[str, Counter] = defaultdict(Counter)
    ours: dict[str, Counter] = defaultdict(Counter)
    native: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    gil: Counter = Counter()
    for frames, n in read(args.profile):
        if args.window and not any(args.window in f for f in frames):
            continue
        if args.steady and any(s in f for f in frames for s in STARTUP):
            continue
        thread = next((f for f in frames if f.startswith("thread (")), "?")
        process = frames[0] if frames[0].startswith("process ") else ""
        key = f"{process.split(':')[0]} {thread}".strip()
        totals[key] += n
        if any(g in f for f in frames for g in GIL_WAIT):
            gil[key] += n
        py = [m for f in frames if (m := PY_FRAME.match(f))]
        if py:
            leaf = py[-1]
            per_thread[key][f"{leaf['fn']} ({leaf['file']})"] += n
        mine = [m for m in py if "omlx_actors/" in m["file"] or "mlx_lm/" in m["file"]]
        if mine:
            ours[key][f"{mine[-1]['fn']} ({mine[-1]['file']})"] += n
        libs = [m["lib"] for f in frames if (m := NATIVE_LIB.search(f)) and not PY_FRAME.match(f)]
        if libs:
            native[key][libs[-1]] += n
    grand = sum(totals.values())
    for key, total in totals.most_common():
        if total < grand * 0.01:
            continue
        print(f"\n## {key}: {total} samples ({100 * total / grand:.1f}%), "
              f"GIL wait {100 * gil[key] / total:.1f}%")
        for title, counter in (("our/mlx-lm innermost", ours[key]),
                               ("python innermost", per_thread[key]),
                               ("native library innermost", native[key])):
            if not counter:
                continue
            print(f"  {title}:")
            for name, n in counter.most_common(args.top):
                print(f"    {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()

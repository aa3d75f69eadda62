"""The benchmarks behind `omlx-actors bench*`, and the parts the scripts in benchmarks/ reuse.

- `common`: a level's result, deterministic prompts, a free port, a server subprocess.
- `inprocess`: `bench` ((a) a bare `BatchGenerator` loop vs (b) this runtime, one process)
  and `bench-cache` (a second turn's TTFT against the first's, or across a restart).
- `servers`: `bench-servers` ((a), (b), (c) this server over HTTP, (d) `mlx_lm.server`).
- `resume`: `bench-resume` (what an engine death costs a client).
- `ssd_window`: `python -m omlx_actors.bench.ssd_window` (how long after a prefill its
  blocks are durable on the SSD tier).
"""

"""What every benchmark shares: a level's result, deterministic prompts (token ids and
text), a free loopback port and a server subprocess on it.

Inter-token latency (ITL) everywhere here is the gap between two consecutive deliveries of
new tokens to one stream's reader (a `BatchGenerator` step's response, a session event, an
SSE chunk with text), pooled over the streams of a run: tokens delivered together count as
one delivery, as a reader of the stream sees them."""

from __future__ import annotations

import itertools
import random
import statistics
import time
from typing import Any

import attrs

from omlx_actors.units import percentile


@attrs.frozen
class LevelResult:
    side: str
    concurrency: int
    tokens: int
    wall_s: float
    ttft_s: tuple[float, ...]
    errors: int = 0  # requests that failed (a server that died or cut the stream)
    itl_s: tuple[float, ...] = ()  # inter-delivery gaps of every stream, pooled
    client_cpu_s: float | None = None  # CPU seconds of the busiest HTTP client process

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttft_s)

    @property
    def ttft_p99(self) -> float:
        return percentile(self.ttft_s, 99)

    @property
    def itl_p50(self) -> float:
        return percentile(self.itl_s, 50) if self.itl_s else float("nan")

    @property
    def itl_p99(self) -> float:
        return percentile(self.itl_s, 99) if self.itl_s else float("nan")

    @property
    def stagger(self) -> float:
        return max(self.ttft_s) - min(self.ttft_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "side": self.side, "concurrency": self.concurrency, "tokens": self.tokens,
            "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
            "ttft_p50_s": self.ttft_p50, "ttft_p99_s": self.ttft_p99, "stagger_s": self.stagger,
            "itl_p50_s": self.itl_p50, "itl_p99_s": self.itl_p99,
        }


def gaps(times: list[float]) -> list[float]:
    """The gaps between consecutive delivery times of one stream."""
    return [b - a for a, b in itertools.pairwise(times)]


def median_run(runs: list[LevelResult]) -> LevelResult:
    """The run with the median tokens/s (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]


def make_prompts(n: int, length: int, vocab: int, offset: int = 0) -> list[list[int]]:
    """Deterministic prompts of `length` token ids (no special ids below 16), each
    (offset, index) its own: no two share a prefix block, whatever the offsets."""
    rngs = [random.Random(f"{offset}:{i}") for i in range(n)]
    return [[rng.randrange(16, max(vocab, 17)) for _ in range(length)] for rng in rngs]


WORDS = ("river stone light table garden window music paper engine forest cloud number "
         "silver market letter orange bridge winter story signal").split()


def make_text_prompts(n: int, words: int, offset: int = 0) -> list[str]:
    """`n` deterministic prompts of `words` words, each (offset, index) its own: no two share
    a prefix block, so no side's prefix cache serves one prompt from another."""
    return [" ".join(random.Random(f"{offset}:{i}").choices(WORDS, k=words)) for i in range(n)]


def texts_of_lengths(encode, lengths: list[int], words: int, offset: int) -> list[str]:
    """Texts of `words` words whose token counts under `encode` equal `lengths`, one each and
    each (offset, index) its own: a warm-up or a later repeat on exactly the shapes of an
    earlier run, without sharing its prefix blocks (a new shape compiles kernels on a GPU).
    After 500 draws without a match, the nearest draw is kept."""
    out = []
    for i, want in enumerate(lengths):
        best = None
        for k in range(500):
            text = " ".join(random.Random(f"{offset}:{i}:{k}").choices(WORDS, k=words))
            miss = abs(len(encode(text)) - want)
            if best is None or miss < best[0]:
                best = (miss, text)
            if miss == 0:
                break
        out.append(best[1])
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server subprocess)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on a loopback port; stopped with SIGINT, then killed."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None):
        import os
        import subprocess

        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(f"/tmp/omlx-bench-{name.replace(' ', '_')}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not start within {timeout}s")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it had its chance
                self.proc.kill()
                self.proc.wait()
        self._log.close()

"""`omlx-actors serve`. The HTTP routes land with the server issue; until then this loads
the model through the same runtime path, says what it would serve, and exits."""

from __future__ import annotations

import trio

from omlx_actors.config import RuntimeConfig


def banner(rt, host: str, port: int) -> str:
    from omlx_actors.backend import blas_status

    kind = "RANDOM-WEIGHT DEMO model (not a real language model)" if rt.is_demo else "model"
    return (
        f"omlx-actors: serving {kind} {rt.model_path}\n"
        f"  type={rt.info.model_type} vocab={rt.info.vocab_size} context={rt.max_context} "
        f"device={rt.info.device} blas: {blas_status()}\n"
        f"  http://{host}:{port}/v1"
    )


def serve_main(config: RuntimeConfig, *, host: str, port: int) -> int:
    from omlx_actors.api import open_runtime

    async def main() -> None:
        async with open_runtime(config=config) as rt:
            print(banner(rt, host, port), flush=True)
            print("omlx-actors: the HTTP server is not built yet; exiting.", flush=True)

    trio.run(main)
    return 0

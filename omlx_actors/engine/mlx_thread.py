"""The OS threads that MLX runs on.

MLX binds arrays and streams to the thread that made them, so all of an executor's MLX work
runs on one long-lived thread. These threads never exit while the process lives: with MLX
0.32.4, a process whose MLX thread had *finished* aborted at interpreter exit in 10-25% of runs
(`terminate called without an active exception`: the dead thread's thread-local compile cache
calls back into Python during shutdown). So a thread whose executor stopped parks in an idle
pool, is reused by the next executor, and dies only with the process (daemon threads are not
joined at exit).

The pool is process-wide state shared by executors that may start on different trio runs;
the only shared structure is a `queue.SimpleQueue` of idle workers (thread-safe by itself), so
no lock of ours is involved.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable

_idle_workers: queue.SimpleQueue[MlxWorker] = queue.SimpleQueue()
_names = itertools.count(1)
_mlx_thread_ids: set[int] = set()  # every thread that has ever been an MLX worker


class NotOnMlxThread(RuntimeError):
    """Raised when code that must run on an executor's MLX thread runs elsewhere."""


def assert_on_mlx_thread(what: str) -> None:
    """Guard for functions that touch MLX: they may only run on an MLX worker thread."""
    if threading.get_ident() not in _mlx_thread_ids:
        raise NotOnMlxThread(
            f"{what} must run on an executor's MLX thread, not {threading.current_thread().name}"
        )


def is_mlx_thread(ident: int) -> bool:
    return ident in _mlx_thread_ids


class MlxWorker:
    """One daemon thread that runs one job at a time, then parks in the idle pool.

    `run_job(fn)` hands the thread a job; the job runs to completion on this thread (the
    executor's engine loop is one long job). The worker returns itself to the idle pool
    after the job, whether the job returned or raised (a job must report its own errors:
    an exception escaping a job is printed and otherwise ignored).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._main, name=f"omlx-mlx-{next(_names)}", daemon=True
        )
        self._started = threading.Event()
        self._thread.start()
        self._started.wait()

    @property
    def ident(self) -> int:
        ident = self._thread.ident
        assert ident is not None
        return ident

    @property
    def name(self) -> str:
        return self._thread.name

    def run_job(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _main(self) -> None:
        _mlx_thread_ids.add(threading.get_ident())
        self._started.set()
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job's failure must not kill the thread
                import traceback

                traceback.print_exc()
            finally:
                _idle_workers.put(self)


def acquire_worker() -> MlxWorker:
    """An idle MLX worker thread, or a new one if none is idle."""
    try:
        return _idle_workers.get_nowait()
    except queue.Empty:
        return MlxWorker()


def worker_count() -> int:
    """How many MLX worker threads this process has ever started (for leak tests)."""
    return len(_mlx_thread_ids)

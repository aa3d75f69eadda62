"""The writer actor under random saves, loads, cleanups, budget changes, write faults,
shutdowns and restarts, on a real directory.

Hypothesis' state machines are synchronous, so each example runs one trio loop on a
helper thread (`TrioThread`) hosting the writer; every rule is a real message to it.
After every step: the counters balance, every sent save is accounted for, no block file
exists that the model says cannot (a cleaned-up scope, a never-saved block), at most one
temp file exists (the write in progress), and a foreign file is never touched. After every
flush and restart, the directory and the writer's index agree exactly, `bytes_on_disk` is
the sum of the real file sizes and within the budget, and no temp file is left.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import threading
from pathlib import Path

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from omlx_actors.ssd import writer
from omlx_actors.ssd.block_directory import write_block
from omlx_actors.ssd.blockfile import (
    BlockRecord,
    CorruptBlock,
    ForeignBlock,
    block_path,
    read_header,
)
from omlx_actors.ssd.writer import (
    PENDING_CAPACITY,
    SsdCleanupAll,
    CleanupDone,
    SsdCleanupRequest,
    SsdContains,
    SsdFlush,
    SsdLoad,
    SsdSetBudget,
    SsdShutdown,
    SsdStatsQuery,
)

from .helpers import (
    IDENTITY,
    OTHER_IDENTITY,
    ROOMY,
    Disk,
    balanced,
    block_files,
    block_hash,
    config,
    make_save,
    temp_files,
    tensors,
)

BLOCKS = 10
UNIVERSE = tuple(block_hash(i) for i in range(BLOCKS))
SCOPES = ("", "r1", "r2")
# Blocks are ~0.7-1.7 kB: the small budgets hold none to a few, so saves evict and skip.
BUDGETS = (ROOMY, 1200, 2500, 6000)
# No reply within this: a lost acknowledgement.
CALL_TIMEOUT_S = 10
FOREIGN = block_hash(99)


class TrioThread:
    """One trio run on a helper thread; `run(afn, *args)` calls into it synchronously."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="trio-portal", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # surfaced by the next `run`
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, afn, *args):
        try:
            return trio.from_thread.run(afn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise AssertionError(f"the trio thread died: {self._error!r}") from self._error

    def close(self) -> None:
        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        self._thread.join(timeout=30)
        if self._error is not None:
            raise self._error


class WriterStateMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ssd-machine-"))
        foreign = BlockRecord(hash=FOREIGN, parent=None, scope="", tokens=16, tensors=tensors(99))
        write_block(self.root, OTHER_IDENTITY, foreign)
        self.foreign_path = block_path(self.root, FOREIGN)
        self.disk = Disk()
        self.budget = ROOMY
        # Model. hash -> scopes of its saves not cleaned up since, oldest first: a block
        # may be on disk only if its list is non-empty, and only under one of them.
        self.saved: dict[str, list[str]] = {}
        # Blocks that must load: saved while nothing could evict them or fail their write.
        self.must_exist: set[str] = set()
        self.portal = TrioThread()
        self.start_writer(expect_files=set())

    def teardown(self) -> None:
        try:
            if getattr(self, "portal", None) is not None:
                self.portal.run(self._stop_writer)
                self.portal.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- plumbing -------------------------------------------------------------------

    def start_writer(self, expect_files: set[str]) -> None:
        self.sent = 0
        ready = self.portal.run(self._start_writer)
        assert ready.files == len(expect_files)
        assert (ready.corrupt_discarded, ready.temps_removed, ready.foreign_skipped) == (0, 0, 1)
        assert set(self.call(SsdContains(hashes=UNIVERSE)).present) == expect_files

    async def _start_writer(self):
        self.address, control, saves = writer.open_writer_inboxes()
        self.cancel_scope = trio.CancelScope()
        self.stopped = trio.Event()
        settings_ = config(self.root, self.budget)

        async def incarnation(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with self.cancel_scope:
                    await writer.run(
                        control, saves, settings_, self.disk.io, task_status=task_status
                    )
            finally:
                self.stopped.set()

        return await self.portal.nursery.start(incarnation)

    async def _stop_writer(self) -> None:
        """Abort the writer and wait until it has stopped (after its write in progress)."""
        self.cancel_scope.cancel()
        await self.stopped.wait()

    def call(self, message):
        async def go():
            return await self.address.call(message, timeout=CALL_TIMEOUT_S)

        return self.portal.run(go)

    def cast_save(self, i: int, scope: str) -> None:
        self.portal.run(self.address.save, make_save(i, scope))
        self.note_save(i, scope)

    def note_save(self, i: int, scope: str) -> None:
        self.sent += 1
        self.saved.setdefault(block_hash(i), []).append(scope)
        if self.budget == ROOMY and not self.disk.errors:
            self.must_exist.add(block_hash(i))

    def ours_on_disk(self) -> dict[str, int]:
        files = block_files(self.root)
        files.pop(FOREIGN, None)
        return files

    def check_settled(self, stats, *, running: bool = True) -> None:
        """After a flush or a shutdown: disk and index agree exactly."""
        assert stats.pending == 0
        files = self.ours_on_disk()
        if running:
            assert set(files) == set(self.call(SsdContains(hashes=UNIVERSE)).present)
        assert stats.files == len(files)
        assert stats.bytes_on_disk == sum(files.values())
        assert stats.bytes_on_disk <= stats.effective_budget_bytes
        assert temp_files(self.root) == []

    # -- rules ----------------------------------------------------------------------

    @rule(i=st.integers(0, BLOCKS - 1), scope=st.sampled_from(SCOPES), flush=st.booleans())
    def save(self, i, scope, flush):
        self.cast_save(i, scope)
        if flush:
            self.check_settled(self.call(SsdFlush()))

    @rule(
        burst=st.lists(
            st.tuples(st.integers(0, BLOCKS - 1), st.sampled_from(SCOPES)), min_size=2, max_size=8
        )
    )
    def save_burst(self, burst):
        for i, scope in burst:
            self.cast_save(i, scope)

    def backlog(self) -> int:
        """Saves sent and not yet settled (pending or still in the save inbox). Only this
        test sends, so the backlog can only shrink until it sends again."""
        stats = self.call(SsdStatsQuery())
        return stats.pending + stats.saves_queued

    @rule(i=st.integers(0, BLOCKS - 1), scope=st.sampled_from(SCOPES))
    def save_then_load_at_once(self, i, scope):
        """A load right behind its save: served from the pending save, or from disk if the
        writer got to it first - a hit either way if nothing could refuse it, provided it
        fits the pending queue (saves still in the save inbox are not seen yet)."""
        fits_pending = self.backlog() < PENDING_CAPACITY
        save = make_save(i, scope)

        async def save_and_load():
            await self.address.save(save)
            return await self.address.call(SsdLoad(hash=save.hash), timeout=CALL_TIMEOUT_S)

        result = self.portal.run(save_and_load)
        self.note_save(i, scope)
        if save.hash in self.must_exist and fits_pending:
            assert result.hit, result.reason
        if result.hit:
            assert sorted(result.tensors, key=lambda t: t.name) == list(tensors(i))

    @rule(data=st.data())
    def load(self, data):
        # Mostly blocks that may exist (any block otherwise), so loads hit as well as miss.
        maybe = sorted(UNIVERSE.index(h) for h, scopes in self.saved.items() if scopes)
        pool = maybe if maybe and data.draw(st.integers(0, 3), "saved") else range(BLOCKS)
        i = data.draw(st.sampled_from(pool), "block")
        h = block_hash(i)
        settled = self.backlog() <= PENDING_CAPACITY  # every save sent is visible
        result = self.call(SsdLoad(hash=h))
        if result.hit:
            assert self.saved.get(h), f"{h} loaded but never saved or cleaned up"
            assert result.scope in self.saved[h]
            assert sorted(result.tensors, key=lambda t: t.name) == list(tensors(i))
        elif settled:
            assert h not in self.must_exist, f"{h} must be on disk, got {result.reason}"

    @rule()
    def contains(self):
        settled = self.backlog() <= PENDING_CAPACITY
        present = set(self.call(SsdContains(hashes=UNIVERSE)).present)
        if settled:
            assert self.must_exist <= present
        assert all(self.saved.get(h) for h in present)

    @rule(scope=st.sampled_from(SCOPES))
    def cleanup(self, scope):
        done = self.call(SsdCleanupRequest(scope=scope))
        assert isinstance(done, CleanupDone) and done.scope == scope and done.failed == 0
        gone = set()
        for h, scopes in self.saved.items():
            if scope in scopes:
                self.must_exist.discard(h)
                scopes[:] = [s for s in scopes if s != scope]
                if not scopes:
                    gone.add(h)
        present = set(self.call(SsdContains(hashes=UNIVERSE)).present)
        assert not gone & present
        assert not gone & set(self.ours_on_disk())

    @rule()
    def cleanup_all(self):
        done = self.call(SsdCleanupAll())
        assert done.scope is None and done.failed == 0
        self.saved.clear()
        self.must_exist.clear()
        assert self.call(SsdContains(hashes=UNIVERSE)).present == ()
        assert self.ours_on_disk() == {}

    @rule(budget=st.sampled_from(BUDGETS))
    def set_budget(self, budget):
        self.budget = budget
        stats = self.call(SsdSetBudget(budget_bytes=budget))
        assert stats.budget_bytes == budget
        if budget != ROOMY:
            self.must_exist.clear()

    @rule()
    def flush(self):
        self.check_settled(self.call(SsdFlush()))

    @rule(code=st.sampled_from([errno.ENOSPC, errno.EIO]))
    def arm_write_fault(self, code):
        self.disk.errors.append(code)
        self.must_exist.clear()  # it hits whichever write comes next

    @rule(how=st.sampled_from(["flush", "no-flush", "cleanup", "abort"]))
    def restart(self, how):
        if how == "abort":
            self.portal.run(self._stop_writer)
        else:
            stats = self.call(SsdShutdown(flush=how == "flush", cleanup=how == "cleanup"))
            self.portal.run(self.stopped.wait)
            assert balanced(stats)
            if how != "no-flush":
                self.check_settled(stats, running=False)
        if how == "cleanup":
            self.saved.clear()
            assert self.ours_on_disk() == {}
        if how != "flush":
            self.must_exist.clear()  # pending saves were cancelled or lost
        self.start_writer(expect_files=set(self.ours_on_disk()))

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def counters_balance(self):
        stats = self.call(SsdStatsQuery())
        assert balanced(stats), stats
        assert self.sent == stats.saves_enqueued + stats.saves_dropped + stats.saves_queued

    @invariant()
    def no_orphans(self):
        # Writes go on meanwhile, so the listing is not one instant (two temp files may be
        # seen one after the other) and files appear or vanish (written, evicted) between
        # listing and reading. Still: a temp file is only ever of a block that was sent,
        # and no block file exists that the model says cannot, or under a cleaned-up
        # scope. Settled points (flush, shutdown) check for no temp file at all.
        for temp in temp_files(self.root):
            assert temp.name.split(".")[1] in self.saved, f"stray temp file {temp}"
        for h in self.ours_on_disk():
            assert self.saved.get(h), f"orphan block file {h}"
            try:
                header = read_header(block_path(self.root, h), IDENTITY, h)
            except FileNotFoundError:
                continue
            except (CorruptBlock, ForeignBlock) as error:
                raise AssertionError(f"bad block file {h}: {error}") from error
            assert header.scope in self.saved[h], (h, header.scope, self.saved[h])

    @invariant()
    def foreign_file_untouched(self):
        assert self.foreign_path.exists()


WriterStateMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_writer_state_machine = WriterStateMachine.TestCase

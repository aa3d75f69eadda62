"""The SSD tier's checks of a replay: its writer's stats after each phase, and the final
check (flush, balanced counters, cleanup, an empty directory). Split from the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.replay.records import SsdCheck


async def ssd_stats(target) -> dict[str, Any] | None:
    engine = target.engine
    if engine is None or not engine.has_ssd:
        return None
    return attrs.asdict(await engine.ssd_stats())


# How long the last blocks of an idle engine may take to reach the SSD writer (they travel
# through the executor's forwarder, which `flush_ssd_cache` does not wait for).
SSD_SETTLE_S = 0.25


async def ssd_check(target) -> SsdCheck:
    """Flush the SSD tier; its counters must balance; then clean it up: the directory must
    be left with no file at all (an orphan - a block the writer no longer knows, a temp
    file - is what a cleanup racing writes leaves behind)."""
    engine = target.engine
    if engine is None or not engine.has_ssd:
        return SsdCheck(clean=None, detail="no SSD tier in this runtime (set [server] ssd_cache_dir)")
    await trio.sleep(SSD_SETTLE_S)
    await engine.flush_ssd_cache()
    s = await engine.ssd_stats()
    ends = (s.saves_persisted + s.saves_duplicate + s.saves_cancelled + s.saves_skipped
            + s.write_errors + s.pending)
    balance = (f"enqueued {s.saves_enqueued} = persisted {s.saves_persisted} + duplicate "
               f"{s.saves_duplicate} + cancelled {s.saves_cancelled} + skipped {s.saves_skipped} "
               f"+ errors {s.write_errors} + pending {s.pending}")
    if s.saves_enqueued != ends:
        return SsdCheck(clean=False, detail=f"the writer's counters do not balance: {balance.replace(' = ', ' != ', 1)}")
    files_before = s.files
    await engine.cleanup_ssd_cache()
    directory = Path(engine.config.ssd_cache_dir)
    left = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    after = await engine.ssd_stats()
    if left or after.files or after.bytes_on_disk:
        return SsdCheck(clean=False, detail=(
            f"after the cleanup {len(left)} files remain on disk ({', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''}); the writer counts {after.files} files, "
            f"{after.bytes_on_disk} bytes"))
    behind = (await engine.stats()).ssd_saves_dropped + s.saves_dropped
    return SsdCheck(clean=True, detail=(
        f"{balance}; {behind} more dropped while the writer was behind; the cleanup removed "
        f"all {files_before} files, none left"))

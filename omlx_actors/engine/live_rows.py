"""The engine core's table of admitted requests, each one row of mlx-lm's batch.

Keyed both ways: by the executor's slot, which the core's commands and outputs name, and by
mlx-lm's uid, which its step responses name. A request is in the table from its admission
until it finishes (or, after a failed step, until it is re-admitted under a new uid).

Pure bookkeeping: no trio, no MLX. The grammar matcher a row holds is opaque here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from omlx_actors.engine.core_messages import CoreSubmit
from omlx_actors.engine.messages import SamplingParams


@attrs.define
class LiveRequest:
    """The core's bookkeeping of one admitted request."""

    slot: int
    uid: int
    prompt_tokens: int
    sampling: SamplingParams
    command: CoreSubmit | None = None  # kept to re-admit it if a failed step never reached it
    completion_tokens: int = 0
    prefill_started: bool = False
    cached_tokens: int = 0
    # Blocks of its prompt already in the block store: its cached prefix, then those saved
    # as its prefill completed them (attention-only models).
    saved_blocks: int = 0
    # Block indexes whose end boundary the prefill stops at (hybrid models), in order.
    boundaries: list[int] = attrs.field(factory=list)
    # Its `GrammarProcessor` (also in its row's logits processors, where mlx-lm moves it
    # with the row); typed loosely so that this table needs no MLX.
    grammar: Any = None

    @property
    def cache_scope(self) -> str:
        """Who may reuse its blocks from the SSD tier (its `Submit.cache_scope`)."""
        return self.command.submit.cache_scope if self.command is not None else ""


@attrs.define
class LiveRows:
    """Admitted requests by slot, in admission order, and by uid."""

    _by_slot: dict[int, LiveRequest] = attrs.field(factory=dict)
    _slot_of_uid: dict[int, int] = attrs.field(factory=dict)
    # `request_ids()` is read twice per step (the step recorder); rebuilt only when a row
    # comes or goes, so an unchanged batch costs nothing (None: to rebuild).
    _request_ids: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self._by_slot)

    def __iter__(self) -> Iterator[LiveRequest]:
        """In admission order, over a copy: the loop may finish the requests it visits."""
        return iter(list(self._by_slot.values()))

    @property
    def slots_by_uid(self) -> Mapping[int, int]:
        return self._slot_of_uid

    def add(self, live: LiveRequest) -> None:
        self._by_slot[live.slot] = live
        self._slot_of_uid[live.uid] = live.slot
        self._request_ids = None

    def remove(self, live: LiveRequest) -> None:
        del self._by_slot[live.slot]
        self._slot_of_uid.pop(live.uid, None)
        self._request_ids = None

    def get(self, slot: int) -> LiveRequest | None:
        return self._by_slot.get(slot)

    def by_uid(self, uid: int) -> LiveRequest | None:
        """The request of a response's row; None for a row that left the table (aborted
        or failed) after the step took it."""
        slot = self._slot_of_uid.get(uid)
        return None if slot is None else self._by_slot[slot]

    def uids(self) -> list[int]:
        return [live.uid for live in self._by_slot.values()]

    def request_ids(self) -> tuple[str, ...]:
        """The live requests' ids in admission order; the same tuple object while the
        table is unchanged."""
        if self._request_ids is None:
            self._request_ids = tuple(live.command.submit.request_id
                                      for live in self._by_slot.values() if live.command is not None)
        return self._request_ids

    def prompts(self) -> Iterator[tuple[int, ...]]:
        return (live.command.submit.prompt_tokens for live in self._by_slot.values())

    def pending_prompt_tokens(self) -> int:
        """Prompt tokens still to prefill, over every request (their cached prefixes off)."""
        return sum(live.prompt_tokens - live.cached_tokens for live in self._by_slot.values())

    def mark_started(self, slots: Iterable[int]) -> None:
        """These slots' prefill has begun (they had progress or a token this step)."""
        for slot in slots:
            live = self._by_slot.get(slot)
            if live is not None:
                live.prefill_started = True

    def waiting(self) -> int:
        """Requests whose prefill has not begun: queued behind the batch."""
        return sum(1 for live in self._by_slot.values() if not live.prefill_started)

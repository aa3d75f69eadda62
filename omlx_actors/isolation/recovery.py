"""What to resume, hold or fail when the engine process dies: a pure state machine.

Imports neither trio nor MLX. The engine link (`isolation/link.py`) owns one `Recovery` and
feeds it what crosses the boundary - each `Submit` the front sends, each event the engine
sends back, each abort, each engine death - and does what it answers.

The model: every request the front has submitted and not yet seen finish is *tracked*, with
the tokens already delivered to its session. When the engine dies, each is re-submitted to
the next engine as a *continuation*: its prompt plus the delivered tokens, the remaining
`max_tokens`, the same sampling settings. Greedy decoding continues exactly where it
stopped; the session sees a pause, then more tokens.

Poison requests. Only evidence counts: the engine records, before each step, the requests
it is about to run (`engine/step_record.py`), and the link passes that set to `on_death`. A
death *strikes* the requests in the step that died; a request merely waiting (sent but not
yet admitted, or queued), or a death while the engine was loading or idle between steps,
strikes nobody. A strike is *alone* when the request was the only one in that step that had
not yet received a token from that engine (the others had run steps and survived them). A
token clears a request's strikes, so only consecutive deaths count.

A request with `POISON_DEATHS` strikes is a *suspect*: suspects are put on *probation* one
at a time, each resumed alone (nothing unproven runs with it; everything else is held)
until it receives a token or finishes. A request with `POISON_DEATHS` alone strikes is
failed (`EngineCrashLoop`). So a request that crashes every engine is failed after K deaths
if it ran alone, after at most 2K if it shared its batches (K to become a suspect, K alone
on probation), the requests that shared its batch finish, and an external kill at a random
moment is not enough to fail an innocent request: that takes K deaths, each inside a step
where it was the only unproven request, with no token in between.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

import attrs

from omlx_actors.engine.messages import (
    Admitted,
    Finished,
    FinishReason,
    PrefillProgress,
    Submit,
    TokenDelta,
)

# Consecutive engine deaths (with no token delivered in between) after which a request that
# was in the engine each time is a suspect. 2: one death can be anything (a SIGKILL from
# outside, a transient allocation failure); the same request at two in a row is a pattern.
POISON_DEATHS = 2

CRASH_LOOP_ERROR_TYPE = "EngineCrashLoop"


@attrs.define
class Tracked:
    """A request between its `Submit` and its `Finished`, as the front knows it."""

    submit: Submit  # as the session sent it (the original prompt and max_tokens)
    delivered: list[int] = attrs.field(factory=list)  # token ids its session has received
    base: int = 0  # tokens delivered before the current incarnation's submission
    admitted_seen: bool = False  # its session has had an `Admitted`
    prefill_seen: int = 0  # the largest `PrefillProgress.done` its session has had
    sent: bool = False  # submitted to the current engine incarnation
    strikes: int = 0  # deaths inside a step it was in, since its last delivered token
    alone_strikes: int = 0  # of those, the ones where it was the step's only unproven request


@attrs.frozen
class Failure:
    """A request to end with an error instead of resuming it."""

    request_id: str
    error_type: str
    error: str


class Recovery:
    """The tracked requests, the probation queue, and the decisions over them.

    Invariants (checked by `check()`, exercised by a hypothesis state machine): a probationer
    is tracked and is the only request sent that has not proven itself since its last strike;
    suspects waiting for probation are tracked and not sent; while any suspect is unproven,
    no other unsent request is sent; a request with K alone strikes is no longer tracked.
    """

    def __init__(self, poison_deaths: int = POISON_DEATHS) -> None:
        if poison_deaths < 1:
            raise ValueError("poison_deaths must be >= 1")
        self.poison_deaths = poison_deaths
        self.tracked: dict[str, Tracked] = {}
        self.probation: str | None = None
        self.suspects: deque[str] = deque()
        self.resumed_total = 0  # continuations handed out (metrics)
        self.poisoned_total = 0  # requests failed as crash loops (metrics)

    # -- the front's side -------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """True while suspects are being proven: new requests wait in the front."""
        return self.probation is not None or bool(self.suspects)

    def track(self, submit: Submit) -> None:
        """Record a new request, not yet sent (`sendable()` says when it may be)."""
        if submit.request_id in self.tracked:
            raise ValueError(f"request {submit.request_id!r} is already tracked")
        self.tracked[submit.request_id] = Tracked(submit=submit)

    def mark_sent(self, request_id: str) -> None:
        tracked = self.tracked.get(request_id)
        if tracked is not None:
            tracked.sent = True
            tracked.base = len(tracked.delivered)

    def untrack(self, request_id: str) -> Tracked | None:
        """Forget a request (aborted by the front, refused by the engine, or failed); its
        probation, if it was on one, ends. Returns it, or None if unknown."""
        tracked = self.tracked.pop(request_id, None)
        if request_id in self.suspects:
            self.suspects.remove(request_id)
        self._proven(request_id)
        return tracked

    # -- the engine's side ------------------------------------------------------------------

    def on_event(self, event) -> tuple:
        """An engine event → the events to forward to its session (none, it, or a rewrite).
        Afterwards `sendable()` may name requests this released."""
        tracked = self.tracked.get(event.request_id)
        if tracked is None:
            return (event,)  # not ours to rewrite (aborted meanwhile): pass it on
        match event:
            case Admitted():
                if tracked.admitted_seen:
                    return ()
                tracked.admitted_seen = True
                return (event,)
            case PrefillProgress(done=done):
                # A continuation's prompt is longer than the one the session knows, and a
                # restarted prefill would count down again: only new progress on the
                # original prompt is shown.
                if tracked.delivered or done <= tracked.prefill_seen:
                    return ()
                tracked.prefill_seen = done
                return (event,)
            case TokenDelta(tokens=tokens):
                tracked.delivered.extend(choice.token for choice in tokens)
                tracked.strikes = tracked.alone_strikes = 0
                self._proven(event.request_id)
                return (event,)
            case Finished():
                fixed = self._as_original(tracked, event)
                self.untrack(event.request_id)
                return (fixed,)
        return (event,)

    def on_death(self, in_step: Collection[str] = ()) -> tuple[Failure, ...]:
        """The engine died (or a starting engine did) while running a step of the requests
        `in_step` (empty: it was loading, idle, or between steps). Every tracked request is
        now unsent. Strike the ones in the step, fail those with K alone strikes (they are
        no longer tracked), queue new suspects for probation; `sendable()` then says what
        to send once the next engine is ready."""
        struck = [rid for rid in in_step if rid in self.tracked]
        unproven = [rid for rid in struck if not self._ran_here(self.tracked[rid])]
        for rid in struck:
            tracked = self.tracked[rid]
            tracked.strikes += 1
            if unproven == [rid]:
                tracked.alone_strikes += 1
        for tracked in self.tracked.values():
            tracked.sent = False
        failed = [
            self._crash_loop(rid, f"the engine died {t.alone_strikes} times, with no token "
                                  "for it in between, inside a step where it was the only "
                                  "request not yet seen to run")
            for rid, t in list(self.tracked.items()) if t.alone_strikes >= self.poison_deaths
        ]
        self.suspects.extend(
            rid for rid, t in self.tracked.items()
            if t.strikes >= self.poison_deaths and rid not in self.suspects and rid != self.probation
        )
        self._next_probation()
        return tuple(failed)

    def sendable(self) -> tuple[str, ...]:
        """The requests to send to a ready engine now: the probationer alone while there is
        one, else every tracked request not yet sent to it (in submission order)."""
        if self.probation is not None:
            return () if self.tracked[self.probation].sent else (self.probation,)
        return tuple(rid for rid, t in self.tracked.items() if not t.sent)

    def continuation(self, request_id: str) -> Submit | Finished:
        """The `Submit` that resumes a tracked request on a new engine - or, when nothing is
        left to generate (its last token was a stop token, or `max_tokens` is reached), the
        `Finished` the dead engine did not get to send (the request is then untracked)."""
        tracked = self.tracked[request_id]
        original = tracked.submit
        delivered = tracked.delivered
        if delivered and delivered[-1] in original.stop_token_ids:
            return self._ended(tracked, FinishReason.STOP)
        remaining = original.max_tokens - len(delivered)
        if remaining <= 0:
            return self._ended(tracked, FinishReason.LENGTH)
        if delivered:
            self.resumed_total += 1
        return attrs.evolve(
            original,
            prompt_tokens=original.prompt_tokens + tuple(delivered),
            max_tokens=remaining,
            cached_blocks=(),  # the lookup is redone against the new engine's cache
            # The delivered tokens were generated under the grammar: a fresh matcher
            # replays them to resume in step with what the client already has.
            grammar_replay=original.grammar_replay + len(delivered) if original.grammar else 0,
        )

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _ran_here(tracked: Tracked) -> bool:
        """It received a token from the engine it was last sent to: it ran steps there and
        survived them, so that engine's death is not its first step."""
        return len(tracked.delivered) > tracked.base

    def _proven(self, request_id: str) -> None:
        if self.probation == request_id:
            self.probation = None
            self._next_probation()

    def _next_probation(self) -> None:
        """Put the next suspect on probation, if none is on it (none left: `holding` ends,
        and `sendable()` releases everything held)."""
        while self.probation is None and self.suspects:
            candidate = self.suspects.popleft()
            if candidate in self.tracked:
                self.probation = candidate

    def _crash_loop(self, request_id: str, why: str) -> Failure:
        self.tracked.pop(request_id, None)
        if request_id in self.suspects:
            self.suspects.remove(request_id)
        if self.probation == request_id:
            self.probation = None
        self.poisoned_total += 1
        return Failure(
            request_id=request_id,
            error_type=CRASH_LOOP_ERROR_TYPE,
            error=f"request {request_id!r} was not retried: {why}, so it is taken to be "
                  "what crashes it",
        )

    def _ended(self, tracked: Tracked, reason: FinishReason) -> Finished:
        self.untrack(tracked.submit.request_id)
        return Finished(
            request_id=tracked.submit.request_id,
            reason=reason,
            prompt_tokens=len(tracked.submit.prompt_tokens),
            completion_tokens=len(tracked.delivered),
        )

    @staticmethod
    def _as_original(tracked: Tracked, event: Finished) -> Finished:
        """A continuation's `Finished`, counted as the session's request: the original
        prompt, every token delivered across incarnations."""
        if tracked.base == 0:
            return event
        original_prompt = len(tracked.submit.prompt_tokens)
        return attrs.evolve(
            event,
            prompt_tokens=original_prompt,
            completion_tokens=tracked.base + event.completion_tokens,
            cached_tokens=min(event.cached_tokens, original_prompt),
        )

    def check(self) -> None:
        """Assert the invariants (tests)."""
        if self.probation is not None:
            assert self.probation in self.tracked, "probationer not tracked"
            assert self.probation not in self.suspects
        for rid in self.suspects:
            assert rid in self.tracked, "suspect not tracked"
            assert not self.tracked[rid].sent, "a waiting suspect was sent"
        if self.holding:
            unproven_sent = [rid for rid, t in self.tracked.items()
                             if t.sent and t.strikes > 0 and rid != self.probation]
            assert not unproven_sent, f"unproven requests run beside a probation: {unproven_sent}"
        for rid, t in self.tracked.items():
            assert t.alone_strikes < self.poison_deaths, f"{rid} should have been failed"
            assert t.alone_strikes <= t.strikes


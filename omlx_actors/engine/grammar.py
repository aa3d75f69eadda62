"""Constrained decoding on the MLX thread: one llguidance matcher per request, applied as
that request's own mlx-lm logits processor.

A `Submit` carries its grammar as plain data (an llguidance grammar string, built and
validated on the front by `omlx_actors.front.structured`); the core turns it into a
`GrammarProcessor` at admission. mlx-lm's `BatchGenerator` keeps each row's processors in
the row's own slot and filters them with the row (`GenerationBatch.filter`/`extend`), so a
matcher moves with its request whenever the batch grows or shrinks: there is no batch-wide
grammar state to fall out of step (mlx-vlm #1574's trap).

The step protocol (mlx-lm 0.32.2, pinned): at each decode step a row's processors are called
with `(context, logits)` where `context[-1]` is the token fed to the model in this step -
the token *sampled in the previous step*, which is also the token this step returns for the
row. So the processor consumes `context[-1]` into its matcher (except on its first call,
where `context[-1]` is the last prompt token), then masks `logits` to the tokens the grammar
allows next. A token the matcher refuses (it cannot happen through the mask, but a
`logit_bias` of -inf on every allowed token could force one) puts the processor in error;
the core then fails that request with that very token withheld (fail closed).

A continuation after an engine restart has its delivered tokens at the end of its prompt;
`grammar_replay` of them are fed into the fresh matcher at admission, so it resumes in the
state the dead engine's matcher had.

Everything here runs on the MLX thread; MLX arrays made here never leave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omlx_actors.mlx_loader import load_mlx

mx = load_mlx()


class GrammarRejected(Exception):
    """A request's grammar could not be compiled, or a token could not be replayed into it."""


class GrammarTokenizers:
    """The llguidance tokenizer of the loaded model, built on first use (about 0.7 s for a
    50k vocabulary, so unconstrained serving never pays for it) and kept for the engine's
    life."""

    def __init__(self, model_path: str, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self._model_path = Path(model_path)
        self._vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance

            path = self._model_path / "tokenizer.json"
            if not path.exists():
                raise GrammarRejected(f"structured output needs {path} (llguidance reads it)")
            # n_vocab is the logits' width: a model may have more rows than the tokenizer
            # has tokens, and the mask must cover every row.
            self._tokenizer = llguidance.LLTokenizer(
                path.read_text(encoding="utf-8"),
                n_vocab=self._vocab_size or None,
                eos_token=list(self._eos_ids) or None,
            )
        return self._tokenizer

    def processor(self, grammar: str, replay: tuple[int, ...]) -> GrammarProcessor:
        """A fresh matcher for `grammar`, advanced by `replay` (a continuation's delivered
        tokens). Raises `GrammarRejected` if the grammar does not compile or a replayed
        token breaks it."""
        import llguidance

        tok = self.tokenizer()
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarRejected(f"grammar does not compile: {matcher.get_error()}")
        if replay and not matcher.consume_tokens(list(replay)):
            raise GrammarRejected(f"delivered tokens do not fit the grammar: {matcher.get_error()}")
        return GrammarProcessor(matcher, tok.vocab_size, tok.eos_tokens)


class GrammarProcessor:
    """One request's matcher as an mlx-lm logits processor. Owned by its row."""

    def __init__(self, matcher: Any, vocab_size: int, eos_tokens: Sequence[int]) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._first = True
        self._eos = frozenset(eos_tokens)
        self.error: str | None = None  # set once a token breaks the grammar; never cleared

    @property
    def accepting(self) -> bool:
        return self._matcher.is_accepting()

    def __call__(self, context: Any, logits: Any) -> Any:
        from llguidance.numpy import fill_next_token_bitmask

        # Start the step's forward pass before the CPU work below: the mask needs only the
        # previous token (already sampled), so the matcher runs while the device computes
        # the logits it will mask.
        mx.async_eval(logits)
        if self._first:
            self._first = False  # context[-1] is the last prompt token, not ours
        elif self.error is None:
            token = int(context[-1].item())
            if token in self._eos:
                # A stop token: the row leaves the batch with it, whatever is sampled next
                # is never delivered. It is allowed only once the grammar accepts.
                if not self._matcher.is_accepting():
                    self.error = f"stop token {token} before the grammar was complete"
                return logits
            if not self._matcher.consume_token(token):
                self.error = self._matcher.get_error() or f"token {token} breaks the grammar"
        if self.error is not None:
            return logits  # the core fails the request with this step's token withheld
        fill_next_token_bitmask(self._matcher, self._bitmask)
        if self._matcher.is_error():
            self.error = self._matcher.get_error()
            return logits
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        width = logits.shape[-1]
        if allowed.shape[0] < width:
            allowed = np.pad(allowed, (0, width - allowed.shape[0]))
        mask = mx.array(allowed[:width].astype(np.bool_))
        return mx.where(mask, logits, mx.array(-np.inf, dtype=logits.dtype))


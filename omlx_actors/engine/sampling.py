"""How a row of the batch picks its next token, and what it reports about the choice.

The engine core hands each admitted row to mlx-lm with its own sampler, logits processors
and stop sequences, built here from the request's `SamplingParams`; after each step it turns
a row's token and logprobs into the `TokenChoice` the request receives. MLX thread only: the
samplers and the logprobs are MLX work on the core's stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from omlx_actors.engine.messages import SamplingParams, TokenChoice, TokenLogprob
from omlx_actors.mlx_loader import load_mlx

mx = load_mlx()

Sampler = Callable[[Any], Any]


def seeded_sampler(p: SamplingParams) -> Sampler:
    """A sampler with its own PRNG key chain, so a seeded request draws the same tokens
    whatever its batch mates are (mlx-lm's samplers draw from MLX's global state)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    key = mx.random.key(p.seed)
    state = {"key": key}

    def sampler(logprobs):
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1 / p.temperature), key=sub)

    return sampler


def logits_processors(p: SamplingParams) -> list[Any]:
    """The row's penalties and biases as mlx-lm logits processors (none when it has none)."""
    if not p.needs_logits_processors:
        return []
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        dict(p.logit_bias) or None,
        p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
    )


@attrs.define
class SharedSamplers:
    """Samplers and stop sequences shared by every row with the same settings, so that
    same-setting rows sample in one batched call. Lives as long as the core's model:
    `clear` drops them with it."""

    _samplers: dict[SamplingParams, Sampler] = attrs.field(factory=dict)
    _stop_sequences: dict[tuple[int, ...], Any] = attrs.field(factory=dict)

    def sampler_for(self, p: SamplingParams) -> Sampler | None:
        """None (the batch's shared greedy sampler) for greedy requests; a sampler of its
        own for a seeded request; one shared sampler per distinct unseeded setting."""
        if p.is_greedy:
            return None
        if p.seed is not None:
            return seeded_sampler(p)
        key = attrs.evolve(p, logprobs=False, top_logprobs=0, logit_bias=())
        sampler = self._samplers.get(key)
        if sampler is None:
            from mlx_lm.sample_utils import make_sampler

            sampler = make_sampler(
                p.temperature,
                top_p=p.top_p if p.top_p < 1.0 else 0.0,
                min_p=p.min_p,
                top_k=p.top_k,
            )
            self._samplers[key] = sampler
        return sampler

    def stop_sequences(self, stop_token_ids: tuple[int, ...]) -> Any:
        """mlx-lm's `StopSequences` for these stop tokens, one per distinct set."""
        stops = self._stop_sequences.get(stop_token_ids)
        if stops is None:
            from mlx_lm.generate import StopSequences

            stops = StopSequences([[t] for t in stop_token_ids] or None)
            self._stop_sequences[stop_token_ids] = stops
        return stops

    def clear(self) -> None:
        self._samplers.clear()
        self._stop_sequences.clear()


def token_choice(p: SamplingParams, token: int, logprobs: Any) -> TokenChoice:
    """The token a row drew, with its logprob and its `top_logprobs` best alternatives
    when the request asked for them."""
    if not p.logprobs:
        return TokenChoice(token=int(token))
    top: tuple[TokenLogprob, ...] = ()
    if p.top_logprobs > 0:
        k = min(p.top_logprobs, logprobs.shape[-1])
        ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
        values = logprobs[ids]
        pairs = sorted(zip(ids.tolist(), values.tolist()), key=lambda t: -t[1])
        # A grammar masks tokens to -inf: they were never candidates, so they are not
        # alternatives (and -inf has no JSON form).
        top = tuple(TokenLogprob(token=int(i), logprob=float(v)) for i, v in pairs
                    if v != float("-inf"))
    return TokenChoice(token=int(token), logprob=float(logprobs[token].item()), top=top)

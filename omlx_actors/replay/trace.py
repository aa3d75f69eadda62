"""The request trace of a scenario, made concrete: what each request says and when it leaves.

Everything here is a pure function of the scenario (and its seed): the same file always
gives the same prompts, arrival offsets and cancellation points, so a reference pass and
every phase send byte-identical requests. Only a conversation's earlier answers are filled
in at run time (`conversation_messages`), since they are what the model said.

Pure: no trio, no MLX.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import attrs

from omlx_actors.replay.scenario import RequestParams, Scenario, Workload

# Generated prompts draw from these words: plain lowercase ASCII, so every tokenizer gives
# stable, ordinary tokens. Meaning is irrelevant (the demo models have random weights).
WORDS = (
    "agent alpha apple array batch block branch buffer build cache call check class cloud "
    "code commit config data debug delta deploy diff disk error event field file fix flag "
    "frame graph hash index input issue item key layer limit line list log loop memory merge "
    "model module node order output packet page patch path plan queue read record request "
    "result review river route rule run schema scope search server shard signal slice source "
    "stack state step stone store stream string table task test thread token tool trace tree "
    "type update value vector version window worker write"
).split()

# Token-id prompts use ids in this range: clear of the special tokens every vocabulary
# starts with, and inside any real model's vocabulary.
TOKEN_ID_RANGE = (10, 400)


@attrs.frozen(kw_only=True)
class CancelAt:
    """Where a request is cancelled: after this many tokens, or this many seconds."""

    tokens: int | None = None
    seconds: float | None = None

    def describe(self) -> str:
        return f"after {self.tokens} tokens" if self.tokens is not None else f"after {self.seconds:.3f} s"


@attrs.frozen(kw_only=True)
class TurnPlan:
    turn: int  # 1-based
    user_text: str | None  # chat, and text completions
    prompt_ids: tuple[int, ...] | None  # token-id completions
    tool_call: tuple[str, str] | None  # (name, JSON arguments) before this turn's user message
    tool_result: str | None
    cancel: CancelAt | None


@attrs.frozen(kw_only=True)
class ConversationPlan:
    workload: str
    index: int  # 0-based within its workload
    offset_s: float  # when its first turn leaves, from the phase's start
    system: str | None
    turns: tuple[TurnPlan, ...]

    def key(self, turn: int) -> str:
        return f"{self.workload}/{self.index}/{turn}"


@attrs.frozen(kw_only=True)
class RequestBody:
    """One request as every target sends it: chat messages (OpenAI format) or a prompt."""

    mode: str
    messages: tuple[dict[str, Any], ...] | None
    prompt: str | tuple[int, ...] | None
    tools: tuple[dict[str, Any], ...] | None
    params: RequestParams
    # Ask for the top-2 logprobs of every token, to tell a greedy tie (two tokens with equal
    # logprobs, which batching noise may order either way) from a real divergence.
    margins: bool = False
    model: str | None = None  # a model pool's model (None: the target's one model)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _rng(scenario: Scenario, *parts: object) -> random.Random:
    # String seeds hash with SHA-512: stable across processes and Python versions.
    return random.Random("/".join(str(p) for p in (scenario.seed, *parts)))


def tool_definitions(workload: Workload) -> tuple[dict[str, Any], ...]:
    """A small OpenAI function definition per tool name."""
    return tuple(
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"{name.replace('_', ' ')} in the workspace",
                "parameters": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "query": {"type": "string"}},
                    "required": ["path"],
                },
            },
        }
        for name in workload.tools
    )


def plan_workload(scenario: Scenario, workload: Workload) -> tuple[ConversationPlan, ...]:
    """Every conversation of a workload: its arrival offset, its turns' new text, and which
    requests are cancelled where."""
    system = workload.system
    if system is None and workload.system_words:
        system = words(_rng(scenario, workload.name, "system"), workload.system_words)
    offsets = arrival_offsets(scenario, workload)
    cancel_rng = _rng(scenario, workload.name, "cancel")
    plans = []
    for c in range(workload.conversations):
        turns = []
        for k in range(1, workload.turns + 1):
            rng = _rng(scenario, workload.name, c, k)
            user_text = prompt_ids = None
            if workload.prompt_tokens:
                size = workload.prompt_tokens[c % len(workload.prompt_tokens)]
                low, high = TOKEN_ID_RANGE
                prompt_ids = tuple(rng.randrange(low, high) for _ in range(size))
            else:
                size = workload.prompt_words[c % len(workload.prompt_words)]
                user_text = f"Task {c}.{k}: " + words(rng, size)
            tool_call = tool_result = None
            if workload.tool_calls_in_history and k > 1:
                name = workload.tools[(c + k) % len(workload.tools)]
                args = {"path": f"src/{rng.choice(WORDS)}/{rng.choice(WORDS)}.py",
                        "query": rng.choice(WORDS)}
                tool_call = (name, json.dumps(args, sort_keys=True))
                tool_result = words(rng, workload.tool_result_words)
            turns.append(TurnPlan(
                turn=k, user_text=user_text, prompt_ids=prompt_ids, tool_call=tool_call,
                tool_result=tool_result, cancel=_cancel_at(workload, cancel_rng),
            ))
        plans.append(ConversationPlan(
            workload=workload.name, index=c, offset_s=offsets[c], system=system, turns=tuple(turns),
        ))
    return tuple(plans)


def _cancel_at(workload: Workload, rng: random.Random) -> CancelAt | None:
    plan = workload.cancel
    if plan is None:
        return None
    # Draw every number whether or not it is used, so one request's choice does not shift
    # the next one's.
    chosen = rng.random() < plan.fraction
    if plan.after_tokens is not None:
        low, high = plan.after_tokens
        at = CancelAt(tokens=rng.randint(low, high))
    else:
        assert plan.after_s is not None
        low_s, high_s = plan.after_s
        at = CancelAt(seconds=round(rng.uniform(low_s, high_s), 4))
    return at if chosen else None


def arrival_offsets(scenario: Scenario, workload: Workload) -> list[float]:
    """When each conversation starts, in seconds from the phase's start."""
    n = workload.conversations
    if workload.arrival == "burst" or workload.rate is None:
        return [workload.start_s] * n
    if workload.arrival == "uniform":
        return [workload.start_s + i / workload.rate for i in range(n)]
    rng = _rng(scenario, workload.name, "arrivals")
    t, out = workload.start_s, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(workload.rate)
    return out


def conversation_body(
    workload: Workload,
    plan: ConversationPlan,
    turn: int,
    answers: Sequence[str],
) -> RequestBody:
    """The request for `turn` (1-based), given the texts of the earlier turns' answers."""
    body = _conversation_body(workload, plan, turn, answers)
    return body if workload.model is None else attrs.evolve(body, model=workload.model)


def _conversation_body(workload: Workload, plan: ConversationPlan, turn: int,
                       answers: Sequence[str]) -> RequestBody:
    assert len(answers) == turn - 1
    if workload.mode == "completion":
        if workload.prompt_tokens:
            return RequestBody(mode="completion", messages=None, prompt=plan.turns[0].prompt_ids,
                               tools=None, params=workload.params)
        parts = [plan.system] if plan.system else []
        for k in range(turn):
            parts.append(plan.turns[k].user_text or "")
            if k < turn - 1:
                parts.append(answers[k])
        return RequestBody(mode="completion", messages=None, prompt="\n".join(parts), tools=None,
                           params=workload.params)
    messages: list[dict[str, Any]] = []
    if plan.system:
        messages.append({"role": "system", "content": plan.system})
    for k in range(turn):
        step = plan.turns[k]
        if k > 0:
            answer = {"role": "assistant", "content": answers[k - 1]}
            if step.tool_call is not None:
                call_id = f"call_{plan.index}_{k}"
                name, arguments = step.tool_call
                answer["tool_calls"] = [{"id": call_id, "type": "function",
                                         "function": {"name": name, "arguments": arguments}}]
                messages.append(answer)
                messages.append({"role": "tool", "tool_call_id": call_id, "content": step.tool_result})
            else:
                messages.append(answer)
        messages.append({"role": "user", "content": step.user_text})
    return RequestBody(
        mode="chat", messages=tuple(messages), prompt=None,
        tools=tool_definitions(workload) or None, params=workload.params,
    )


def request_count(scenario: Scenario) -> int:
    """Requests the phases send (each conversation turn once per phase)."""
    total = 0
    for phase in scenario.phases:
        for name in phase.workloads:
            w = scenario.workload(name)
            total += w.conversations * w.turns
    return total


def reference_workloads(scenario: Scenario) -> list[Workload]:
    """The workloads a reference pass runs: each one any phase uses, once."""
    seen: list[str] = []
    for phase in scenario.phases:
        for name in phase.workloads:
            if name not in seen:
                seen.append(name)
    return [scenario.workload(n) for n in seen]

"""Request bodies of the OpenAI and Anthropic routes, as msgspec Structs.

Decoding validates types and ranges in one pass; a failure names the offending field
(`param`), e.g. `messages[0].role`. Unknown fields are ignored (SDKs send fields we do not
use, like `user` or `metadata`). Non-standard fields we accept, as vLLM does: `ignore_eos`,
`top_k`, `min_p`, `repetition_penalty`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from omlx_actors.http.wire_errors import invalid

T = TypeVar("T")

INT32_MAX = 2**31 - 1
MaxTokens = Annotated[int, Meta(ge=1, le=INT32_MAX)]
# Any 64-bit seed, signed or not (range checked by the route: msgspec bounds stop at
# int64); the route folds it into the engine's unsigned range.
Seed = int
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1, le=INT32_MAX)]  # -1 or 0: no top-k (vLLM uses -1)
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
LogitBiasValue = Annotated[float, Meta(ge=-100.0, le=100.0)]

_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


# Deepest nesting of arrays and objects a body may have (the body itself is level 1). Free-form
# values (tool schemas, tool inputs, metadata) travel on to the chat template and to
# json.dumps, which recurse: a bound well below Python's recursion limit keeps every later
# stage from failing on them. Real tool schemas are a few levels deep.
MAX_JSON_DEPTH = 64


def decode_body(raw: bytes, type_: type[T]) -> T:
    """Decode and validate a JSON body; raise a 400 `ApiError` naming the bad field.

    Any failure to parse is a 400: malformed JSON, invalid UTF-8, wrong types or ranges, and
    nesting deeper than `MAX_JSON_DEPTH` (checked after decoding; msgspec's own recursion
    limit, at about a thousand levels, is reported the same way)."""
    try:
        body = msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        message = str(exc)
        raise invalid(message, param=_param_of(message)) from None
    except msgspec.DecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if _depth_exceeds(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _too_deep():
    return invalid(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of "
                   "arrays and objects)", code="invalid_json")


def _depth_exceeds(body: Any, limit: int) -> bool:
    """Whether `body` (a decoded Struct) nests arrays/objects deeper than `limit`. Iterative,
    so it cannot itself hit the recursion limit; linear in the body's size."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, Struct):
            children = (getattr(value, f) for f in value.__struct_fields__)
        elif isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        stack.extend((c, depth + 1) for c in children if isinstance(c, (Struct, dict, list)))
    return False


def _param_of(message: str) -> str | None:
    at = _AT_PATH.search(message)
    path = at.group("path") if at else ""
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return path or None


# ---------------------------------------------------------------------------------------
# OpenAI


class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class ImageUrlPart(Struct, tag_field="type", tag="image_url"):
    image_url: Any = None


class InputAudioPart(Struct, tag_field="type", tag="input_audio"):
    input_audio: Any = None


class FilePart(Struct, tag_field="type", tag="file"):
    file: Any = None


class RefusalPart(Struct, tag_field="type", tag="refusal"):
    refusal: str


ContentPart = TextPart | ImageUrlPart | InputAudioPart | FilePart | RefusalPart


class FunctionCall(Struct):
    name: str
    arguments: str


class ToolCallIn(Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Struct):
    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class StreamOptions(Struct):
    include_usage: bool = False


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Any = None


class OpenAISampling(Struct, kw_only=True):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: dict[str, LogitBiasValue] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None


class ChatCompletionRequest(OpenAISampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(OpenAISampling, kw_only=True):
    # A string, token ids, or a batch of one of those (only batches of one are served).
    prompt: str | list[Any]
    # OpenAI's legacy default.
    max_tokens: MaxTokens | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None


# ---------------------------------------------------------------------------------------
# Anthropic


class ATextBlock(Struct, tag_field="type", tag="text"):
    text: str


class AImageBlock(Struct, tag_field="type", tag="image"):
    source: Any = None


class ADocumentBlock(Struct, tag_field="type", tag="document"):
    source: Any = None


class AToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class AToolResultBlock(Struct, tag_field="type", tag="tool_result"):
    tool_use_id: str
    content: str | list[ATextBlock | AImageBlock] | None = None
    is_error: bool = False


class AThinkingBlock(Struct, tag_field="type", tag="thinking"):
    thinking: str = ""
    signature: str | None = None


class ARedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking"):
    data: str = ""


AContentBlock = (
    ATextBlock
    | AImageBlock
    | ADocumentBlock
    | AToolUseBlock
    | AToolResultBlock
    | AThinkingBlock
    | ARedactedThinkingBlock
)


class AMessage(Struct):
    role: Literal["user", "assistant"]
    content: str | list[AContentBlock]


class ATool(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    strict: bool | None = None


class AToolChoice(Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(Struct, kw_only=True):
    model: str
    max_tokens: MaxTokens
    messages: Annotated[list[AMessage], Meta(min_length=1)]
    system: str | list[ATextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    tools: list[ATool] | None = None
    tool_choice: AToolChoice | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    ignore_eos: bool = False  # non-standard, for exact token counts in tests
    # Structured outputs: {"type": "json_schema", "schema": {...}} (constrained decoding).
    output_format: dict[str, Any] | None = None

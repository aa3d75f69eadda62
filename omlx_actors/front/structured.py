"""Structured output, request side: JSON schemas and forced tool calls turned into the plain
llguidance grammar string a `Submit` carries, validated before anything is submitted.

Pure (no trio, no MLX): llguidance's compiler runs without a tokenizer here, so an
uncompilable schema is refused (`InvalidRequest`, 400 before the first byte) with
llguidance's own message, which names the unsupported keyword. The engine compiles the same
string again against the model's tokenizer (`engine/grammar.py`).

Fail closed, everywhere: an option the grammar cannot honour is an error, never ignored.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import attrs

from omlx_actors.refusals import InvalidRequest

# JSON is generated compactly (no free whitespace between tokens): a small model given the
# choice can emit whitespace until max_tokens, and the compact form is what clients parse.
JSON_COMPILE_DEFAULTS = {"whitespace_flexible": False}


class OutputKind(enum.Enum):
    JSON = "json"  # the text is one JSON value matching the schema
    TOOL_CALL = "tool_call"  # the output is a tool call: {"name", "arguments"} or bare arguments
    # Free text with optional tool calls between the model's markers, each call's JSON
    # constrained (strict tools, tool_choice auto): the grammar needs the markers' token ids,
    # so the session builds it (`with_tool_markers`); `grammar` is "" until then.
    TEXT_OR_TOOL_CALLS = "text_or_tool_calls"


@attrs.frozen(kw_only=True)
class StructuredOutput:
    """What a session constrains its output to. `grammar` is the llguidance grammar string.
    For `TOOL_CALL`: `tool_name` set means the output is that tool's arguments object;
    None means it is `{"name": ..., "arguments": {...}}` over several tools."""

    kind: OutputKind
    grammar: str
    schema: dict[str, Any] | None = attrs.field(default=None, eq=False)
    tool_name: str | None = None


def compile_schema(schema: Any, *, param: str) -> str:
    """The llguidance grammar for a JSON schema, or `InvalidRequest` naming what failed."""
    import llguidance

    if not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be an object", param=param)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=JSON_COMPILE_DEFAULTS)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"unsupported JSON schema: {exc}", param=param) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequest(f"unsupported JSON schema: {'; '.join(messages)}", param=param)
    return grammar


def response_format_output(response_format: dict[str, Any] | None) -> StructuredOutput | None:
    """OpenAI `response_format`: text (None), json_object, or json_schema."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: dict[str, Any] = {"type": "object"}
        return StructuredOutput(kind=OutputKind.JSON, schema=schema,
                                grammar=compile_schema(schema, param="response_format"))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidRequest("response_format.json_schema needs a name",
                                 param="response_format.json_schema")
        schema = spec.get("schema", {})
        return StructuredOutput(kind=OutputKind.JSON, schema=schema,
                                grammar=compile_schema(schema, param="response_format.json_schema.schema"))
    raise InvalidRequest(f"unsupported response_format type {kind!r} (text, json_object, json_schema)",
                         param="response_format.type")


def tool_call_output(tools: list[dict[str, Any]], name: str | None,
                     *, param: str = "tools") -> StructuredOutput:
    """A forced call: of the tool `name` (the output is its arguments object), or of any of
    `tools` (the output is `{"name": ..., "arguments": ...}`). Each tool is a plain
    `{"name", "parameters"}` dict (the routes convert their API's form)."""
    if name is not None:
        (tool,) = [t for t in tools if t["name"] == name]
        schema = tool.get("parameters") or {"type": "object"}
        return StructuredOutput(kind=OutputKind.TOOL_CALL, schema=schema, tool_name=name,
                                grammar=compile_schema(schema, param=param))
    options = [
        {"type": "object",
         "properties": {"name": {"const": t["name"]},
                        "arguments": t.get("parameters") or {"type": "object"}},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return StructuredOutput(kind=OutputKind.TOOL_CALL, schema=schema,
                            grammar=compile_schema(schema, param=param))


def strict_tools_output(tools: list[dict[str, Any]], *, param: str = "tools") -> StructuredOutput:
    """Strict tools under tool_choice "auto": the model may answer in free text or call a
    tool, and a call it makes (`{"name": ..., "arguments": {...}}` between the tokenizer's
    tool-call markers) must match. Each tool is `{"name", "parameters", "strict"}`.

    Mixed strict and non-strict tools: once any tool is strict, every call is constrained to
    the union of the tools, where a strict tool's arguments follow its `parameters` and a
    non-strict tool's arguments are any JSON object (its name is still one of the tools, so
    no call names a tool that does not exist). The call schema is compiled here (an
    unsupported keyword is a 400 before anything is submitted); the grammar around it is
    built by the session, which knows the markers (`with_tool_markers`)."""
    options = [
        {"type": "object",
         "properties": {"name": {"const": t["name"]},
                        "arguments": (t.get("parameters") or {"type": "object"})
                        if t.get("strict") else {"type": "object"}},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    compile_schema(schema, param=param)
    return StructuredOutput(kind=OutputKind.TEXT_OR_TOOL_CALLS, schema=schema, grammar="")


def with_tool_markers(output: StructuredOutput, *, start: str, end: str,
                      start_ids: list[int], end_ids: list[int]) -> StructuredOutput:
    """`output` (TEXT_OR_TOOL_CALLS) with its llguidance grammar for the tokenizer's tool-call
    markers `start`/`end` (their texts, and their token ids when each is one token):

        start: TEXT (call TEXT)*
        call: START WS %json{call schema} WS END
        WS: at most two whitespace characters (unbounded, a small model emits newlines
            until max_tokens; the Hermes form has one)
        TEXT: any text that does not contain the start marker's text

    A marker that is one token is matched as that token (`<[id]>`: llguidance keeps a
    tokenizer's special tokens out of byte matching, so a text literal could never match
    one); a marker of several tokens is matched as its text. TEXT excludes the start marker
    as text too, so the session's tool-call scanner, which reads the text, never sees a call
    the grammar did not check. Calls flow through that scanner like unconstrained ones."""
    def marker(text: str, ids: list[int]) -> str:
        return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)

    # Compact JSON inside the call, as elsewhere (JSON_COMPILE_DEFAULTS): `%json` is
    # whitespace-flexible by default, and the schema's own `x-guidance` options say otherwise.
    call_schema = {**output.schema, "x-guidance": JSON_COMPILE_DEFAULTS}
    # The start marker's text as a regex literal: every non-alphanumeric character escaped.
    literal = "".join(f"\\x{{{ord(c):x}}}" if not c.isalnum() else c for c in start)
    grammar = (
        "start: TEXT (call TEXT)*\n"
        f"call: {marker(start, start_ids)} WS call_json WS {marker(end, end_ids)}\n"
        f"call_json: %json {json.dumps(call_schema)}\n"
        "WS: /[ \\t\\r\\n]{0,2}/\n"
        f"TEXT: /(?s:.*)/ & ~/(?s:.*){literal}(?s:.*)/\n"
    )
    return attrs.evolve(output, grammar=grammar)


def parse_tool_call(output: StructuredOutput, text: str) -> tuple[str, str]:
    """(name, arguments JSON) of a complete forced call's text. The grammar guarantees the
    shape; a text that does not parse is a bug and raises ValueError."""
    value = json.loads(text)
    if output.tool_name is not None:
        return output.tool_name, json.dumps(value)
    return value["name"], json.dumps(value["arguments"])

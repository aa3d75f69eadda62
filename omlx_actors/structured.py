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

from omlx_actors.errors import InvalidRequest

# JSON is generated compactly (no free whitespace between tokens): a small model given the
# choice can emit whitespace until max_tokens, and the compact form is what clients parse.
JSON_COMPILE_DEFAULTS = {"whitespace_flexible": False}


class OutputKind(enum.Enum):
    JSON = "json"  # the text is one JSON value matching the schema
    TOOL_CALL = "tool_call"  # the output is a tool call: {"name", "arguments"} or bare arguments


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


def parse_tool_call(output: StructuredOutput, text: str) -> tuple[str, str]:
    """(name, arguments JSON) of a complete forced call's text. The grammar guarantees the
    shape; a text that does not parse is a bug and raises ValueError."""
    value = json.loads(text)
    if output.tool_name is not None:
        return output.tool_name, json.dumps(value)
    return value["name"], json.dumps(value["arguments"])

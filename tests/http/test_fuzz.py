"""Hypothesis fuzz of malformed bodies and parameter values against each POST route of a real
server: every answer is a 4xx in the route's error shape (never a 5xx), the server stays
up, and valid requests sent concurrently all succeed.

Hypothesis drives a sync httpx client in a worker thread while the server (and a client
sending valid requests) run in the test's trio loop.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import httpx
import psutil
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from http_support import MODEL, chat_body, http_client

from omlx_actors.front.session import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

EXAMPLES = 100

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
not_number = st.booleans() | st.text(max_size=10) | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=5), json_scalars, max_size=2)
not_int = not_number | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))
not_string = st.booleans() | st.integers() | st.floats(allow_nan=False) | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=5), json_scalars, max_size=2)
not_bool = st.integers() | st.text(max_size=5) | st.lists(json_scalars, max_size=2) | st.floats(allow_nan=False)
not_list = st.integers() | st.booleans() | st.dictionaries(st.text(max_size=5), json_scalars, max_size=2) | st.floats(allow_nan=False)


def out_of(lo: float, hi: float, integer: bool = False, *, lo_open: bool = False):
    """Numbers outside [lo, hi] (outside (lo, hi] with `lo_open`)."""
    if integer:
        return st.integers(max_value=int(lo) - 1) | st.integers(min_value=int(hi) + 1)
    low = st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False)
    high = st.floats(min_value=hi, exclude_min=True, allow_nan=False)
    return low | high


bad_message = (
    st.fixed_dictionaries({"role": st.text(max_size=8).filter(
        lambda r: r not in ("system", "developer", "user", "assistant", "tool")), "content": st.just("x")})
    | st.fixed_dictionaries({"role": st.just("user"), "content": not_string.filter(lambda v: not isinstance(v, list) or v)})
    | st.fixed_dictionaries({"role": st.just("user")})
    | json_scalars
)
bad_stop = (
    not_string.filter(lambda v: not isinstance(v, list))
    | st.lists(st.integers(), min_size=1, max_size=3)
    | st.lists(st.just(""), min_size=1, max_size=2)
    | st.lists(st.text(min_size=1, max_size=3), min_size=17, max_size=20)
)

OPENAI_COMMON = {
    "model": not_string | st.text(max_size=12).filter(lambda m: m != MODEL),
    "temperature": not_number | out_of(0.0, 2.0),
    "top_p": not_number | out_of(0.0, 1.0, lo_open=True),
    "top_k": not_int | st.integers(max_value=-2),
    "min_p": not_number | out_of(0.0, 1.0),
    "seed": not_int | st.integers(min_value=2**64),
    "presence_penalty": not_number | out_of(-2.0, 2.0),
    "frequency_penalty": not_number | out_of(-2.0, 2.0),
    "repetition_penalty": not_number | out_of(0.0, 10.0, lo_open=True),
    "logit_bias": not_list.filter(lambda v: not isinstance(v, dict)) | st.dictionaries(
        st.text(alphabet="abcxyz", min_size=1, max_size=4), st.integers(), min_size=1, max_size=2)
    | st.dictionaries(st.integers(min_value=512).map(str), st.integers(-100, 100), min_size=1, max_size=2)
    | st.dictionaries(st.integers(0, 500).map(str), out_of(-100, 100), min_size=1, max_size=2),
    "stop": bad_stop,
    "n": not_int | st.integers(min_value=2) | st.integers(max_value=0),
    "stream": not_bool,
    "stream_options": not_list.filter(lambda v: not isinstance(v, dict)) | st.just({"include_usage": "yes"}),
    "ignore_eos": not_bool,
    "max_tokens": not_int | st.integers(max_value=0) | st.integers(min_value=3000),
}
CHAT_FIELDS = {
    **OPENAI_COMMON,
    "messages": not_list | st.just([]) | st.lists(bad_message, min_size=1, max_size=3),
    "max_completion_tokens": not_int | st.integers(max_value=0) | st.integers(min_value=3000),
    "logprobs": not_bool,
    "top_logprobs": not_int | out_of(0, 20, integer=True),
    "tools": not_list | st.lists(json_scalars | st.just({"type": "function"}), min_size=1, max_size=2),
    "tool_choice": st.integers() | st.text(max_size=6).filter(lambda v: v not in ("none", "auto", "required")),
    "response_format": st.just({"type": "json_object"}) | st.just({"type": "yaml"}) | not_string,
}
COMPLETION_FIELDS = {
    **OPENAI_COMMON,
    "prompt": st.integers() | st.booleans() | st.floats(allow_nan=False) | st.none() | st.just([])
    | st.lists(st.integers(min_value=512) | st.integers(max_value=-1), min_size=1, max_size=3)
    | st.lists(st.text(max_size=3), min_size=2, max_size=3)
    | st.lists(json_scalars.filter(lambda v: not isinstance(v, (int, str)) or isinstance(v, bool)), min_size=1, max_size=3),
    "logprobs": not_int | out_of(0, 20, integer=True),
    "echo": st.just(True) | not_bool,
    "best_of": not_int | st.integers(min_value=2) | st.integers(max_value=0),
}
MESSAGES_FIELDS = {
    "model": not_string | st.text(max_size=12).filter(lambda m: m != MODEL),
    "max_tokens": not_int | st.none() | st.integers(max_value=0) | st.integers(min_value=3000),
    "messages": not_list | st.just([]) | st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "x"]), "content": json_values})
        .filter(lambda m: m["role"] != "user" or not (isinstance(m["content"], str) or m["content"] == [])),
        min_size=1, max_size=2),
    "system": not_string.filter(lambda v: not isinstance(v, list)) | st.lists(st.integers(), min_size=1, max_size=2),
    "stop_sequences": bad_stop.filter(lambda v: not isinstance(v, str)) | st.text(max_size=3),
    "temperature": not_number | out_of(0.0, 1.0),
    "top_p": not_number | out_of(0.0, 1.0, lo_open=True),
    "top_k": not_int | st.integers(max_value=-2),
    "tools": not_list | st.lists(st.fixed_dictionaries({"name": st.text(max_size=3)}), min_size=1, max_size=2),
    "tool_choice": not_list.filter(lambda v: not isinstance(v, dict)) | st.just({"type": "sometimes"}),
    "stream": not_bool,
}

ROUTES = {
    "/v1/chat/completions": (chat_body(max_tokens=2), CHAT_FIELDS, ("model", "messages")),
    "/v1/completions": ({"model": MODEL, "prompt": "Hello", "max_tokens": 2}, COMPLETION_FIELDS, ("model", "prompt")),
    "/v1/messages": (
        {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hello"}]},
        MESSAGES_FIELDS, ("model", "max_tokens", "messages"),
    ),
}


def malformed_bodies(route: str):
    """Bodies that are invalid by construction: one field set to a bad value, a required
    field missing, any JSON that is not a request, or bytes that are not JSON."""
    valid, fields, required = ROUTES[route]
    one_bad_field = st.sampled_from(sorted(fields)).flatmap(
        lambda name: fields[name].map(lambda value: json.dumps({**valid, name: value}).encode())
    )
    missing = st.sampled_from(required).map(
        lambda name: json.dumps({k: v for k, v in valid.items() if k != name}).encode()
    )
    random_json = json_values.filter(
        lambda v: not (isinstance(v, dict) and "model" in v)
    ).map(lambda v: json.dumps(v).encode())
    garbage = st.binary(max_size=64).filter(lambda b: not _parses(b))
    return one_bad_field | missing | random_json | garbage


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def fuzz_route(base_url: str, route: str) -> list[int]:
    statuses: list[int] = []
    with httpx.Client(base_url=base_url, timeout=30.0) as http:

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=malformed_bodies(route))
        def check(body: bytes) -> None:
            response = http.post(route, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
            error = response.json()
            if route == "/v1/messages":
                assert error["type"] == "error", error
                assert set(error["error"]) == {"type", "message"}, error
            else:
                assert set(error) == {"error"}, error
                assert set(error["error"]) == {"message", "type", "code", "param"}, error
            statuses.append(response.status_code)

        check()
    return statuses


async def _fuzz_with_concurrent_valid_requests(server, route: str) -> None:
    done = trio.Event()
    valid_ok = 0
    async with http_client(server) as http, trio.open_nursery() as nursery:

        async def valid_requests() -> None:
            nonlocal valid_ok
            while not done.is_set():
                response = await http.post(
                    "/v1/chat/completions", json=chat_body(max_tokens=4, ignore_eos=True)
                )
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] == 4
                valid_ok += 1
                await trio.sleep(0.02)

        nursery.start_soon(valid_requests)
        statuses = await trio.to_thread.run_sync(fuzz_route, server.url, route)
        done.set()
    assert len(statuses) >= EXAMPLES
    assert valid_ok >= 1
    async with http_client(server) as http:
        assert (await http.get("/health")).json()["status"] == "ok"


async def test_fuzz_chat_completions_answers_4xx_in_shape(server):
    await _fuzz_with_concurrent_valid_requests(server, "/v1/chat/completions")


async def test_fuzz_completions_answers_4xx_in_shape(server):
    await _fuzz_with_concurrent_valid_requests(server, "/v1/completions")


async def test_fuzz_messages_answers_4xx_in_shape(server):
    await _fuzz_with_concurrent_valid_requests(server, "/v1/messages")


# ---------------------------------------------------------------------------------------
# Hostile bodies beside good streams (#15): a seeded generator, a server in its own process
# (so its RSS is the server's, not the test's), no 5xx, exact streams, memory returned.

FUZZ_SEED = 15
FUZZ_BODIES = 2_000
FUZZ_WORKERS = 4
BIG_EVERY = 50  # one body in this many carries a multi-MB prompt or stop string
RSS_SLACK = 0.10
WARMUP_FIRST, WARMUP_BODIES = 100_000, 1_000  # cases outside the measured ones (~5 s)
ROUTE_NAMES = ("/v1/chat/completions", "/v1/completions", "/v1/messages")
KINDS = ("deep", "stops", "utf8", "types", "numbers", "mutate", "valid", "tool_choice")

_SERVER_SCRIPT = """
import sys
import omlx_actors.mlx_loader  # OpenBLAS before MLX
import trio
from omlx_actors.config import RuntimeConfig
from omlx_actors.server import open_server

async def main():
    async with open_server(RuntimeConfig(model=sys.argv[1])) as server:
        print(server.url, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin

trio.run(main)
"""

HUGE_NUMBERS = ("1e400", "-1e400", "1e308", "-1.7976931348623157e308", "1e-400", "-0.0",
                str(2**63), str(2**64), str(-(2**63) - 1), "9" * 400, "-" + "9" * 400,
                "NaN", "Infinity", "-Infinity", "1E+99999", "0.0000000000000000000001")
NUMERIC_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                             "min_p", "seed", "presence_penalty", "frequency_penalty",
                             "repetition_penalty", "n", "top_logprobs"),
    "/v1/completions": ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
                        "logprobs", "best_of", "presence_penalty"),
    "/v1/messages": ("max_tokens", "temperature", "top_p", "top_k"),
}
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\xe2\x82",
            b"\x00", b"\\ud800", b"\\udfff\\ud800")


def _base_body(route: str, rng) -> dict:
    if route == "/v1/completions":
        return {"model": MODEL, "prompt": "Hello there", "max_tokens": rng.randint(1, 3)}
    body = {"model": MODEL, "max_tokens": rng.randint(1, 3),
            "messages": [{"role": "user", "content": "Hello there"}]}
    return body


def _random_json(rng, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice((0, -1, 1, 7, 2**31, -(2**40), 10**30))
    if kind == 3:
        return rng.choice((0.5, -2.5, 1e300, 3.0))
    if kind == 4:
        return "".join(rng.choice("ab\u00e9\u4e2d\U0001f600\n\"\\") for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice("abcxyz"): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _nested_raw(rng, depth: int) -> bytes:
    if rng.random() < 0.5:
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"k":' * depth + b"{}" + b"}" * depth


def _with_raw_field(body: dict, name: str, raw: bytes) -> bytes:
    """`body` as JSON with field `name` set to the raw JSON text `raw`."""
    encoded = json.dumps({**body, name: "\x00PLACEHOLDER\x00"}).encode()
    return encoded.replace(b'"\\u0000PLACEHOLDER\\u0000"', raw)


def _big_text(rng) -> str:
    size = rng.choice((1, 2, 4, 6, 8)) * 1_000_000
    unit = rng.choice(("hello world ", "x", "\u4e2d\u6587 ", "word\n", "{[\"\\"))
    return unit * (size // len(unit))


def _big_body(route: str, rng) -> bytes:
    body = _base_body(route, rng)
    text = _big_text(rng)
    where = rng.randrange(4)
    if where == 0:  # a multi-MB stop string
        body["stop_sequences" if route == "/v1/messages" else "stop"] = [text]
    elif route == "/v1/completions":
        body["prompt"] = text
    elif where == 1:
        body["messages"] = [{"role": "user", "content": text}]
    elif where == 2 and route == "/v1/messages":
        body["system"] = text
    elif where == 2:
        body["tools"] = [{"type": "function", "function": {"name": "f", "description": text}}]
    else:
        body["messages"] = [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": text}, {"role": "user", "content": "go"}]
    return json.dumps(body).encode()


def hostile_body(index: int) -> tuple[str, str, bytes]:
    """(route, kind, raw body) of fuzz case `index`: the same for the same index, always."""
    rng = random.Random(f"{FUZZ_SEED}:{index}")
    route = ROUTE_NAMES[index % 3]
    if index % BIG_EVERY == BIG_EVERY - 1:
        return route, "big", _big_body(route, rng)
    kind = KINDS[(index // 3) % len(KINDS)]
    body = _base_body(route, rng)
    stop_key = "stop_sequences" if route == "/v1/messages" else "stop"
    if kind == "deep":
        depth = rng.choice((63, 65, 200, 999, 1_001, 5_000, 100_000))
        field = rng.choice(("metadata", "tools", "messages", "prompt", stop_key, "logit_bias", "top"))
        raw = _nested_raw(rng, depth)
        if field == "top":
            return route, kind, raw
        if field == "tools" and route == "/v1/chat/completions":  # a deep tool schema
            raw = (b'[{"type":"function","function":{"name":"f","parameters":'
                   + b'{"k":' * depth + b"{}" + b"}" * depth + b"}}]")
        return route, kind, _with_raw_field(body, field, raw)
    if kind == "stops":
        cap_len, cap_count = MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
        choice = rng.randrange(4)
        if choice == 0:
            stops = ["ab" * (rng.choice((cap_len - 1, cap_len, cap_len + 1, 25_000)) // 2 + 1)]
        elif choice == 1:
            stops = [f"s{i}" for i in range(rng.choice((cap_count, cap_count + 1, 1_000, 50_000)))]
        elif choice == 2:
            stops = ["a" * rng.randrange(1, cap_len) for _ in range(rng.randrange(1, cap_count + 1))]
        else:
            stops = ["", "x"] if rng.random() < 0.5 else [1, "x"]
        body[stop_key] = stops
        return route, kind, json.dumps(body).encode()
    if kind == "utf8":
        raw = json.dumps(body).encode()
        bad = rng.choice(BAD_UTF8)
        at = raw.rfind(b"Hello") if rng.random() < 0.7 else rng.randrange(len(raw))
        return route, kind, raw[:at] + bad + raw[at:]
    if kind == "types":
        names = list(body) + list(NUMERIC_FIELDS[route]) + [stop_key, "stream", "tools", "tool_choice",
                                                             "system", "logit_bias", "stream_options"]
        body[rng.choice(names)] = _random_json(rng)
        return route, kind, json.dumps(body).encode()
    if kind == "numbers":
        field = rng.choice(NUMERIC_FIELDS[route])
        return route, kind, _with_raw_field(body, field, rng.choice(HUGE_NUMBERS).encode())
    if kind == "mutate":
        raw = bytearray(json.dumps(body).encode())
        for _ in range(rng.randrange(1, 4)):
            op, at = rng.randrange(3), rng.randrange(len(raw))
            if op == 0:
                raw[at] = rng.randrange(256)
            elif op == 1:
                del raw[at:]
            else:
                raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
            if not raw:
                break
        return route, kind, bytes(raw)
    if kind == "tool_choice":
        if route == "/v1/messages":
            body["tools"] = [{"name": "get_weather", "input_schema": {"type": "object"}}]
            body["tool_choice"] = rng.choice(({"type": "tool", "name": "nope"}, {"type": "tool"},
                                              {"type": "any"}, {"type": "tool", "name": "get_weather"}))
        elif route == "/v1/chat/completions":
            body["tools"] = [{"type": "function", "function": {"name": "get_weather"}}]
            body["tool_choice"] = rng.choice(({"type": "function", "function": {"name": "nope"}},
                                              "required", "auto",
                                              {"type": "function", "function": {"name": "get_weather"}}))
        if rng.random() < 0.3:
            body.pop("tools", None)
        return route, kind, json.dumps(body).encode()
    # valid: in-range sampling, maybe streamed, maybe with stop strings
    body["temperature"] = rng.choice((0.0, 0.5, 1.0))
    body["top_p"] = rng.choice((0.5, 1.0))
    body["stream"] = rng.random() < 0.5
    if rng.random() < 0.5:
        body[stop_key] = ["\u4e2d", "e", "zz"][: rng.randrange(1, 4)]
    if route != "/v1/messages" and rng.random() < 0.5:
        body["seed"] = rng.randrange(-(2**63), 2**64)
    return route, kind, json.dumps(body).encode()


def _describe(index: int, route: str, kind: str, raw: bytes) -> str:
    shown = raw if len(raw) <= 300 else raw[:200] + b"..." + raw[-60:]
    return f"case {index} ({kind}, {route}, {len(raw)} bytes; hostile_body({index})): {shown!r}"


def _problem(route: str, response_status: int, text: str) -> str | None:
    """What is wrong with an answer to a hostile body, or None."""
    if response_status >= 500:
        return f"status {response_status}: {text[:300]}"
    if response_status >= 400:
        try:
            error = json.loads(text)
        except ValueError:
            return f"status {response_status} without a JSON body: {text[:300]}"
        if route == "/v1/messages":
            ok = error.get("type") == "error" and set(error.get("error", {})) >= {"type", "message"}
        else:
            ok = set(error) == {"error"} and set(error["error"]) >= {"message", "type", "code", "param"}
        return None if ok else f"status {response_status}, not in the route's error shape: {text[:300]}"
    if '"error"' in text[-2000:] and ("event: error" in text or "data: {\"error\"" in text):
        return f"a 200 stream that ended with an error: {text[-300:]}"
    return None


GOOD_STREAMS = (
    ("/v1/chat/completions", chat_body(max_tokens=48, ignore_eos=True, stream=True,
                                       messages=[{"role": "user", "content": "Tell me a story"}])),
    ("/v1/chat/completions", chat_body(max_tokens=40, ignore_eos=True, stream=True, stop=["\u00e9t"])),
    ("/v1/completions", {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 48,
                         "ignore_eos": True, "stream": True}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 48, "ignore_eos": True, "stream": True,
                      "messages": [{"role": "user", "content": "Write a poem"}]}),
)


async def _stream_text(http: httpx.AsyncClient, route: str, body: dict) -> str:
    """The text of a streamed answer, from its SSE frames; fails on anything but a clean end."""
    parts: list[str] = []
    async with http.stream("POST", route, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line[len("data: "):])
            assert "error" not in frame or frame.get("type") == "message_start", frame
            if route == "/v1/messages":
                if frame["type"] == "content_block_delta":
                    parts.append(frame["delta"]["text"])
            elif frame.get("choices"):
                choice = frame["choices"][0]
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


async def _fuzz_beside_good_streams(http: httpx.AsyncClient, cases: range, alone: list[str]):
    """Post the hostile bodies `cases` from FUZZ_WORKERS workers while every good stream runs
    again and again (each at least once) and must equal its answer when run `alone`.
    Returns the bad answers, the count of each status, and each good stream's runs."""
    problems: list[str] = []
    statuses: dict[int, int] = {}
    next_case = iter(cases)
    fuzz_done = trio.Event()
    good_runs = [0] * len(GOOD_STREAMS)

    async def fuzz_worker() -> None:
        for index in next_case:
            route, kind, raw = hostile_body(index)
            try:
                response = await http.post(route, content=raw,
                                           headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                problems.append(f"{_describe(index, route, kind, raw)} -> {exc!r}")
                continue
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            problem = _problem(route, response.status_code, response.text)
            if problem is not None:
                problems.append(f"{_describe(index, route, kind, raw)} -> {problem}")

    async def good_stream(i: int) -> None:
        route, body = GOOD_STREAMS[i]
        while not fuzz_done.is_set() or good_runs[i] == 0:
            text = await _stream_text(http, route, body)
            assert text == alone[i], (route, body, text, alone[i])
            good_runs[i] += 1

    async with trio.open_nursery() as streams:
        for i in range(len(GOOD_STREAMS)):
            streams.start_soon(good_stream, i)
        async with trio.open_nursery() as fuzzers:
            for _ in range(FUZZ_WORKERS):
                fuzzers.start_soon(fuzz_worker)
        fuzz_done.set()
    return problems, statuses, good_runs


async def test_two_thousand_hostile_bodies_give_no_5xx_beside_exact_streams(tiny_llama):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(tiny_llama)], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(120):
            url = (await trio.to_thread.run_sync(process.stdout.readline)).strip()
        assert url.startswith("http://127.0.0.1:"), url
        front = psutil.Process(process.pid)
        limits = httpx.Limits(max_connections=FUZZ_WORKERS + len(GOOD_STREAMS) + 2)
        async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as http:
            alone = [await _stream_text(http, route, body) for route, body in GOOD_STREAMS]
            assert all(len(text) > 20 for text in alone), alone
            # Warm up every path (first-use imports, compiled templates, pools, and the
            # high-water marks of the allocators under this concurrency: MLX's buffer cache at
            # the batch shapes the valid bodies make, the heap with several multi-MB bodies in
            # flight at once) with other cases of the same kinds, run the same way, so that
            # what follows measures what is kept, not what is loaded or reached once.
            warm_problems, _, _ = await _fuzz_beside_good_streams(
                http, range(WARMUP_FIRST, WARMUP_FIRST + WARMUP_BODIES), alone)
            assert not warm_problems, warm_problems[:20]
            # A structured-output body loads llguidance into the front once (several MiB):
            # the hostile bodies may hold one, and a first import is not memory kept.
            await http.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"}})
            rss_before = front.memory_info().rss
            start = trio.current_time()
            problems, statuses, good_runs = await _fuzz_beside_good_streams(
                http, range(FUZZ_BODIES), alone)
            elapsed = trio.current_time() - start
            assert not problems, f"{len(problems)} bad answers (seed {FUZZ_SEED}):\n" + "\n".join(problems[:20])
            assert sum(statuses.values()) == FUZZ_BODIES
            assert statuses.get(200, 0) >= 100 and sum(n for s, n in statuses.items() if s >= 400) >= 1_000
            assert (await http.get("/health")).json()["status"] == "ok"
        await trio.sleep(1.0)  # the last answers' buffers are freed
        rss_after = front.memory_info().rss
        print(f"fuzz: {FUZZ_BODIES} bodies in {elapsed:.1f} s, statuses {sorted(statuses.items())}, "
              f"good stream runs {good_runs}, front RSS {rss_before / 2**20:.0f} -> "
              f"{rss_after / 2**20:.0f} MiB")
        assert rss_after <= rss_before * (1 + RSS_SLACK), (rss_before, rss_after)
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

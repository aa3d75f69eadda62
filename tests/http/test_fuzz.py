"""Hypothesis fuzz of malformed bodies and parameter values against each POST route of a real
server: every answer is a 4xx in the route's error shape (never a 5xx), the server stays
up, and valid requests sent concurrently all succeed.

Hypothesis drives a sync httpx client in a worker thread while the server (and a client
sending valid requests) run in the test's trio loop.
"""

from __future__ import annotations

import json

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from http_support import MODEL, chat_body, http_client

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

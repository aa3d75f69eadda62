"""Where a replay sends its requests: the in-process runtime, or an OpenAI-compatible URL.

Both fill the same `RequestRecord`: outcome and status, the text (and token ids in
process), usage, and the client-side times of the first token and of every delivery.
A target with an engine handle (in process, or a server started in this process) can also
inject faults, report engine memory and check that nothing leaked; a bare URL answers
what its `/metrics` says, if anything.

Cancellation contract: `send` returns once the request has a known outcome. A planned
cancellation after N tokens leaves the stream at the N-th token (in process, the session
is closed, which aborts the request in the engine; over HTTP, the connection is closed,
which the server sees as a disconnect). One after T seconds does the same when T passes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import trio

from omlx_actors.front.structured import response_format_output
from omlx_actors.replay.records import (
    CANCELLED,
    COMPLETED,
    FAILURE_STATUS,
    LeakCheck,
    MemorySample,
    RequestRecord,
)
from omlx_actors.replay.trace import CancelAt, RequestBody

Clock = Callable[[], float]

# How long a leak check waits for the engine to settle after a phase (aborts of cancelled
# requests land within a step or two; an HTTP disconnect is noticed a little later).
SETTLE_S = 5.0
SETTLE_POLL_S = 0.02
# Completion statuses a finish reason maps to.
_NORMAL_FINISH = ("stop", "length", "tool_calls")


def _finish_code(finish_reason: str, error_type: str | None) -> str:
    """In-process `Done` with an error → the HTTP front's error code for it."""
    if finish_reason == "abort":
        return "aborted"
    if error_type == "MemoryError":
        return "out_of_memory"
    if error_type in ("EngineStopped", "EngineStopping"):
        return "engine_unavailable"
    return "generation_failed"


def _response_format(schema_text: str) -> dict[str, Any]:
    """The OpenAI `response_format` of a workload's `response_schema`."""
    return {"type": "json_schema",
            "json_schema": {"name": "scenario", "schema": json.loads(schema_text), "strict": True}}


class InProcessTarget:
    """Drives `Runtime.chat` / `Runtime.complete` directly."""

    kind = "in-process"

    def __init__(self, runtime: Any):
        self.engine = runtime

    @property
    def has_engine(self) -> bool:
        return True

    async def send(self, body: RequestBody, cancel: CancelAt | None, rec: RequestRecord,
                   clock: Clock) -> None:
        from omlx_actors.front.session import Done, TextDelta, ToolCall
        from omlx_actors.refusals import RequestError

        rt = self.engine
        p = body.params
        kwargs = dict(max_tokens=p.max_tokens, stop=list(p.stop) or None, ignore_eos=p.ignore_eos,
                      temperature=p.temperature, top_p=p.top_p, seed=p.seed)
        if p.response_schema:
            kwargs["structured"] = response_format_output(_response_format(p.response_schema))
        if body.margins:
            kwargs.update(logprobs=True, top_logprobs=2)
            rec.token_margins = []
        if body.mode == "chat":
            session = rt.chat([dict(m) for m in body.messages],
                              tools=list(body.tools) if body.tools else None, **kwargs)
        else:
            prompt = body.prompt if isinstance(body.prompt, str) else list(body.prompt)
            session = rt.complete(prompt, **kwargs)
        rec.t_sent = clock()
        try:
            await session.start()
        except RequestError as exc:
            rec.refuse(exc.status, exc.code, exc.message)
            rec.t_end = clock()
            return
        done = None
        parts: list[str] = []
        seen = 0
        left_early = False
        deadline = math.inf if cancel is None or cancel.seconds is None else cancel.seconds
        try:
            with trio.move_on_after(deadline) as scope:
                async for event in session:
                    n = len(session.completion_token_ids)
                    if n > seen:
                        rec.add_tokens(clock(), n - seen)
                        seen = n
                    if isinstance(event, TextDelta):
                        parts.append(event.text)
                        if rec.token_margins is not None:
                            rec.token_margins.extend(_margin([a.logprob for a in t.top])
                                                     for t in event.tokens)
                    elif isinstance(event, ToolCall):
                        rec.tool_calls += 1
                    elif isinstance(event, Done):
                        done = event
                    if (cancel is not None and cancel.tokens is not None and done is None
                            and seen >= cancel.tokens):
                        left_early = True
                        break
        finally:
            session.close()
        rec.t_end = clock()
        rec.text = "".join(parts)
        rec.token_ids = list(session.completion_token_ids)
        rec.prompt_tokens = len(session.prompt_tokens)
        if done is None:
            if left_early or scope.cancelled_caught:
                rec.outcome = CANCELLED
                rec.completion_tokens = len(rec.token_ids)
            else:
                rec.lose("the session ended without a Done event")
            return
        rec.finish_reason = done.finish_reason
        rec.completion_tokens = done.usage.completion_tokens
        rec.cached_tokens = done.usage.cached_tokens
        rec.server_ttft_s = done.timings.ttft_s
        if done.finish_reason in _NORMAL_FINISH:
            rec.outcome, rec.status = COMPLETED, 200
        else:
            rec.fail(_finish_code(done.finish_reason, done.error_type),
                     done.error or done.error_type)

    async def sample(self, t: float) -> MemorySample | None:
        stats = await self.engine.stats()
        return MemorySample(
            t=t, active_bytes=stats.active_memory_bytes, peak_bytes=stats.peak_memory_bytes,
            cache_bytes=stats.cache_memory_bytes, prefix_cache_bytes=stats.prefix_cache_bytes,
            running=stats.running, waiting=stats.waiting,
        )

    async def budget_bytes(self) -> int | None:
        return engine_budget(self.engine)

    async def check_idle(self, phase: str) -> LeakCheck:
        return await engine_idle(self.engine, phase)

    async def aclose(self) -> None:
        pass


def engine_budget(rt: Any) -> int | None:
    if rt.config.memory_budget_bytes is not None:
        return rt.config.memory_budget_bytes
    latest = rt.memory.latest if rt.memory is not None else None
    return None if latest is None else latest.budget_bytes


async def engine_idle(rt: Any, phase: str) -> LeakCheck:
    """Wait (bounded) until nothing is registered with the dispatcher and the engine runs
    and queues nothing; say what was left if it does not get there."""
    with trio.move_on_after(SETTLE_S):
        while True:
            stats = await rt.stats()
            pending = len(rt.dispatcher)
            if pending == 0 and stats.running == 0 and stats.waiting == 0:
                return LeakCheck(phase=phase, clean=True,
                                 detail="dispatcher empty, engine running 0, waiting 0")
            await trio.sleep(SETTLE_POLL_S)
    return LeakCheck(phase=phase, clean=False,
                     detail=f"after {SETTLE_S:g} s: {pending} requests still registered with the "
                            f"dispatcher, engine running {stats.running}, waiting {stats.waiting}")


class HttpTarget:
    """Chat completions / completions over HTTP (SSE when streaming), with httpx.

    `engine`: the runtime behind the server when it runs in this process (faults, engine
    memory, leak checks); None for any other server, where `/metrics` is scraped if the
    server has one and what cannot be measured is reported as such."""

    kind = "url"

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 engine: Any = None, timeout_s: float = 60.0):
        import httpx

        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )
        self.model = model
        self.engine = engine
        self._metrics_missing = False

    @property
    def has_engine(self) -> bool:
        return self.engine is not None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def resolve_model(self, fallback: str) -> str:
        """The model id to send: the one given, else the server's first /v1/models entry."""
        if self.model is None:
            try:
                response = await self._client.get("/v1/models")
                self.model = response.json()["data"][0]["id"]
            except Exception:  # noqa: BLE001 - any server: fall back to the scenario's name
                self.model = fallback
        return self.model

    def _payload(self, body: RequestBody) -> dict[str, Any]:
        p = body.params
        payload: dict[str, Any] = {
            "model": body.model or self.model, "max_tokens": p.max_tokens, "stream": p.stream,
            "temperature": p.temperature,
        }
        if body.mode == "chat":
            payload["messages"] = [dict(m) for m in body.messages]
            if body.tools:
                payload["tools"] = list(body.tools)
        else:
            payload["prompt"] = body.prompt if isinstance(body.prompt, str) else list(body.prompt)
        if p.stream:
            payload["stream_options"] = {"include_usage": True}
        if p.top_p != 1.0:
            payload["top_p"] = p.top_p
        if p.seed is not None:
            payload["seed"] = p.seed
        if p.stop:
            payload["stop"] = list(p.stop)
        if p.ignore_eos:
            payload["ignore_eos"] = True  # non-standard; vLLM and this server accept it
        if p.response_schema:
            payload["response_format"] = _response_format(p.response_schema)
        if body.margins:
            if body.mode == "chat":
                payload.update(logprobs=True, top_logprobs=2)
            else:
                payload["logprobs"] = 2
        return payload

    async def send(self, body: RequestBody, cancel: CancelAt | None, rec: RequestRecord,
                   clock: Clock) -> None:
        import httpx

        path = "/v1/chat/completions" if body.mode == "chat" else "/v1/completions"
        payload = self._payload(body)
        if body.margins:
            rec.token_texts, rec.token_margins = [], []
        deadline = math.inf if cancel is None or cancel.seconds is None else cancel.seconds
        rec.t_sent = clock()
        try:
            with trio.move_on_after(deadline) as scope:
                if body.params.stream:
                    await self._stream(path, payload, body.mode, cancel, rec, clock)
                else:
                    await self._once(path, payload, body.mode, rec, clock)
            if scope.cancelled_caught and rec.outcome is None:
                rec.outcome = CANCELLED
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as exc:
            if rec.outcome is None:
                rec.lose(f"{type(exc).__name__}: {exc}")
        rec.t_end = clock()
        if rec.outcome == CANCELLED and rec.completion_tokens is None:
            rec.completion_tokens = rec.delivered_tokens

    async def _stream(self, path, payload, mode, cancel, rec, clock) -> None:
        parts: list[str] = []
        tokens = 0
        finish = None
        async with self._client.stream("POST", path, json=payload) as response:
            if response.status_code != 200:
                self._error_response(rec, response.status_code, await response.aread())
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # keep-alive comments, blank separators
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"] or {}
                    rec.fail(error.get("code") or "generation_failed", error.get("message"))
                    continue
                if chunk.get("usage"):
                    self._usage(rec, chunk["usage"])
                for choice in chunk.get("choices") or []:
                    counted = _add_logprobs(rec, choice.get("logprobs"))
                    piece, calls = _choice_text(choice, mode, delta=True)
                    rec.tool_calls += calls
                    # With logprobs, a chunk says how many tokens it carries (a token may
                    # have no text yet); without, a chunk with content is one token.
                    n = counted if counted is not None else int(bool(piece or calls))
                    if n:
                        tokens += n
                        rec.add_tokens(clock(), n)
                    parts.append(piece)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                rec.text = "".join(parts)
                if (cancel is not None and cancel.tokens is not None and finish is None
                        and rec.outcome is None and tokens >= cancel.tokens):
                    rec.outcome = CANCELLED
                    return  # leaving the block closes the connection: the server aborts
        rec.text = "".join(parts)
        if rec.outcome is not None:
            return
        if finish is None:
            rec.lose("the stream ended without a finish reason")
            return
        rec.finish_reason = finish
        rec.outcome, rec.status = COMPLETED, 200

    async def _once(self, path, payload, mode, rec, clock) -> None:
        response = await self._client.post(path, json=payload)
        if response.status_code != 200:
            self._error_response(rec, response.status_code, response.content)
            return
        body = response.json()
        choice = body["choices"][0]
        _add_logprobs(rec, choice.get("logprobs"))
        text, calls = _choice_text(choice, mode, delta=False)
        rec.text = text
        rec.tool_calls = calls
        rec.finish_reason = choice.get("finish_reason")
        if body.get("usage"):
            self._usage(rec, body["usage"])
        if rec.completion_tokens:
            rec.add_tokens(clock(), rec.completion_tokens)
        rec.outcome, rec.status = COMPLETED, 200

    @staticmethod
    def _usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None

    @staticmethod
    def _error_response(rec: RequestRecord, status: int, raw: bytes) -> None:
        code = message = None
        try:
            error = json.loads(raw).get("error") or {}
            if isinstance(error, dict):
                code, message = error.get("code"), error.get("message")
        except (ValueError, AttributeError):
            message = raw[:200].decode(errors="replace")
        if code in FAILURE_STATUS and code != "shutting_down":
            rec.fail(code, message, status=status)  # accepted, then failed before any byte
        else:
            rec.refuse(status, code, message)

    # -- what a server in this process, or its /metrics, can tell ---------------------------

    async def metrics(self) -> dict[str, float] | None:
        """`/metrics` as {"name{label=value}": value}; None if the server has none."""
        if self._metrics_missing:
            return None
        from prometheus_client.parser import text_string_to_metric_families

        try:
            response = await self._client.get("/metrics")
        except Exception:  # noqa: BLE001 - any failure: no metrics from this server
            return None
        if response.status_code != 200:
            self._metrics_missing = True
            return None
        out: dict[str, float] = {}
        try:
            for family in text_string_to_metric_families(response.text):
                for s in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        except ValueError:
            self._metrics_missing = True
            return None
        return out

    async def sample(self, t: float) -> MemorySample | None:
        if self.engine is not None:
            return await InProcessTarget(self.engine).sample(t)
        m = await self.metrics()
        if not m or "omlx_memory_bytes{what=mlx_active}" not in m:
            return None
        return MemorySample(
            t=t, active_bytes=int(m["omlx_memory_bytes{what=mlx_active}"]),
            peak_bytes=int(m.get("omlx_memory_bytes{what=mlx_peak}", 0)),
            cache_bytes=int(m.get("omlx_memory_bytes{what=mlx_cache}", 0)),
            prefix_cache_bytes=int(m.get("omlx_prefix_cache_engine_bytes", 0)),
            running=_opt_int(m.get("omlx_queue_running")), waiting=_opt_int(m.get("omlx_queue_waiting")),
        )

    async def budget_bytes(self) -> int | None:
        if self.engine is not None:
            return engine_budget(self.engine)
        m = await self.metrics()
        value = (m or {}).get("omlx_memory_bytes{what=budget_bytes}")
        return None if value is None else int(value)

    async def check_idle(self, phase: str) -> LeakCheck:
        if self.engine is not None:
            return await engine_idle(self.engine, phase)
        names = ("omlx_requests_pending", "omlx_queue_running", "omlx_queue_waiting",
                 "omlx_http_inflight")
        m: dict[str, float] | None = None
        with trio.move_on_after(SETTLE_S):
            while True:
                m = await self.metrics()
                if not m or any(n not in m for n in names):
                    return LeakCheck(phase=phase, clean=None,
                                     detail="the server's /metrics does not report pending requests")
                if all(m[n] == 0 for n in names):
                    return LeakCheck(phase=phase, clean=True,
                                     detail="/metrics: pending 0, running 0, waiting 0, in flight 0")
                await trio.sleep(0.05)
        assert m is not None
        left = ", ".join(f"{n} {int(m[n])}" for n in names)
        return LeakCheck(phase=phase, clean=False, detail=f"after {SETTLE_S:g} s, /metrics: {left}")


def _margin(logprobs: list[float | None]) -> float:
    """How far the chosen token led the runner-up (inf: no runner-up)."""
    values = sorted((v for v in logprobs if v is not None), reverse=True)
    return values[0] - values[1] if len(values) >= 2 else math.inf


def _add_logprobs(rec: RequestRecord, logprobs: Any) -> int | None:
    """Token texts and margins from an OpenAI choice's logprobs (chat or legacy shape);
    returns how many tokens they cover (None: no logprobs asked for or given)."""
    if rec.token_texts is None or not logprobs:
        return None
    before = len(rec.token_texts)
    if "content" in logprobs:  # chat: one entry per token
        for entry in logprobs["content"] or []:
            rec.token_texts.append(entry.get("token", ""))
            rec.token_margins.append(_margin([t.get("logprob") for t in entry.get("top_logprobs") or []]))
    elif "tokens" in logprobs:  # legacy completions: parallel lists
        for token, top in zip(logprobs["tokens"], logprobs.get("top_logprobs") or []):
            rec.token_texts.append(token)
            rec.token_margins.append(_margin(list((top or {}).values())))
    return len(rec.token_texts) - before


def _opt_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _choice_text(choice: dict[str, Any], mode: str, *, delta: bool) -> tuple[str, int]:
    """The text and the number of tool calls in one OpenAI choice (chunk or whole)."""
    if mode == "completion":
        return choice.get("text") or "", 0
    message = choice.get("delta" if delta else "message") or {}
    return message.get("content") or "", len(message.get("tool_calls") or [])

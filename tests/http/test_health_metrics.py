"""/health reflects the engine making progress; /metrics exposes Prometheus text from the
server's own registry."""

from __future__ import annotations

import trio
from http_support import MODEL, chat_body, http_client, serve
from prometheus_client.parser import text_string_to_metric_families

from omlx_actors.http.settings import HttpSettings


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_health_reports_engine_progress(server):
    async with http_client(server) as http:
        before = (await http.get("/health")).json()
        await http.post("/v1/chat/completions", json=chat_body(max_tokens=3))
        after = await http.get("/health")
    assert before["status"] == "ok"
    assert after.status_code == 200
    assert after.json()["steps"] > before["steps"]
    assert after.json()["last_step_age"] >= 0.0


async def test_health_is_503_when_running_requests_make_no_progress_for_too_long(tiny_llama):
    # A stall threshold no real step can beat: with a request running, the engine counts as stuck.
    async with serve(tiny_llama, HttpSettings(health_stall_s=1e-9)) as server:
        async with http_client(server) as http:
            idle = await http.get("/health")
            body = chat_body(stream=True, max_tokens=1900, ignore_eos=True)
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                data = 0
                async for line in response.aiter_lines():
                    data += line.startswith("data: ")
                    if data == 5:  # tokens are flowing: the request is in the batch
                        busy = await http.get("/health")
                        break
    assert idle.status_code == 200  # nothing running: an old last step is fine
    assert busy.status_code == 503
    assert busy.json()["status"] == "unhealthy"


async def test_metrics_count_requests_tokens_latencies_and_disconnects(server):
    async with http_client(server) as http:
        await http.post("/v1/chat/completions", json=chat_body(max_tokens=5, ignore_eos=True))
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat_body(max_tokens=7, ignore_eos=True, stream=True)
        ) as response:
            _ = [line async for line in response.aiter_lines()]
        async with http.stream(
            "POST", "/v1/messages",
            json={"model": MODEL, "max_tokens": 1900, "ignore_eos": True, "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]},
        ) as response:
            async for _ in response.aiter_lines():
                break
        await http.post("/v1/chat/completions", json=chat_body(model="nope"))
        await trio.sleep(0.2)
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    s = samples(response.text)
    chat = (("route", "/v1/chat/completions"),)
    assert s[("omlx_http_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == 2
    assert s[("omlx_http_requests_total", (("route", "/v1/chat/completions"), ("status", "404")))] == 1
    assert s[("omlx_completion_tokens_total", chat)] == 12
    assert s[("omlx_requests_finished_total", (("reason", "length"), ("route", "/v1/chat/completions")))] == 2
    assert s[("omlx_time_to_first_token_seconds_count", ())] == 2
    assert s[("omlx_inter_token_latency_seconds_count", ())] == 2
    assert s[("omlx_client_disconnects_total", (("route", "/v1/messages"),))] == 1
    assert s[("omlx_http_stream_seconds_count", chat)] == 1
    # Prompts shorter than a block: no hits, but the cache's and the memory's gauges exist.
    assert s[("omlx_prefix_cache_hits_total", ())] == 0
    assert ("omlx_prefix_cache", (("what", "budget_bytes"),)) in s
    assert s[("omlx_memory_bytes", (("what", "budget_bytes"),))] > 0
    assert s[("omlx_memory_level", ())] in (0, 1, 2)
    assert s[("omlx_queue_waiting", ())] == 0
    assert s[("omlx_queue_running", ())] == 0
    assert s[("omlx_http_inflight", ())] == 0


async def test_each_server_has_its_own_registry(tiny_llama):
    async with serve(tiny_llama) as first, serve(tiny_llama) as second:
        async with http_client(first) as http:
            await http.get("/v1/models")
            text = (await http.get("/metrics")).text
        async with http_client(second) as http:
            other = (await http.get("/metrics")).text
    assert 'omlx_http_requests_total{route="/v1/models",status="200"} 1.0' in text
    assert "/v1/models" not in other


def families(text: str) -> dict[str, str]:
    """Each metric family's name and Prometheus type."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


async def test_cumulative_numbers_are_counters_and_rss_is_labelled_by_process(tiny_llama, tmp_path):
    # The engine in its own process, with the SSD tier: every source of totals is present.
    async with serve(tiny_llama, isolation="process", block_size=16,
                     ssd_cache_dir=tmp_path / "ssd") as server:
        async with http_client(server) as http:
            long = chat_body(messages=[{"role": "user", "content": "word " * 60}], max_tokens=4)
            for _ in range(2):  # the second one hits the prefix cache
                assert (await http.post("/v1/chat/completions", json=long)).status_code == 200
            await server.runtime.flush_ssd_cache()
            text = (await http.get("/metrics")).text
    types, s = families(text), samples(text)
    for name in ("omlx_engine_restarts", "omlx_engine_resumed_requests",
                 "omlx_engine_crash_loop_failures", "omlx_prefix_cache_lookups",
                 "omlx_prefix_cache_hit_blocks", "omlx_prefix_cache_evictions",
                 "omlx_prefix_cache_inserted", "omlx_ssd_saves", "omlx_ssd_loads",
                 "omlx_ssd_write_errors", "omlx_ssd_engine_saves_dropped"):
        assert types[name] == "counter", name
    assert "omlx_engine" not in types  # the old gauge of totals is gone
    assert s[("omlx_engine_restarts_total", ())] == 0
    assert s[("omlx_engine_ready", ())] == 1
    assert s[("omlx_prefix_cache_lookups_total", (("result", "hit"),))] == 1
    assert s[("omlx_ssd_saves_total", (("result", "persisted"),))] > 0
    assert s[("omlx_ssd_saves_total", (("result", "skipped"),))] == 0
    front = s[("omlx_process_rss_bytes", (("process", "front"),))]
    engine = s[("omlx_process_rss_bytes", (("process", "engine"),))]
    assert front > 0 and engine > 0
    assert ("omlx_memory_bytes", (("what", "process_rss"),)) not in s

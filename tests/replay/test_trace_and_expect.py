"""The trace is a pure function of the scenario; expectations explain their failures."""

from __future__ import annotations

from omlx_actors.replay.expect import Observed, evaluate
from omlx_actors.replay.records import CANCELLED, COMPLETED, FAILED, RequestRecord
from omlx_actors.replay.schema import Expectations, parse_scenario
from omlx_actors.replay.trace import conversation_body, plan_workload

AGENTS = """\
[scenario]
name = "agents"
seed = 5

[workload.a]
conversations = 3
turns = 3
system_words = 12
prompt_words = [4, 6]
tools = ["read_file", "run_tests"]
tool_calls_in_history = true
tool_result_words = 5
arrival = "uniform"
rate = 10.0
cancel_fraction = 0.5
cancel_after_tokens = [2, 9]
"""


def test_the_same_file_gives_the_same_trace_and_another_seed_another():
    a = plan_workload(parse_scenario(AGENTS), parse_scenario(AGENTS).workload("a"))
    b = plan_workload(parse_scenario(AGENTS), parse_scenario(AGENTS).workload("a"))
    other = parse_scenario(AGENTS.replace("seed = 5", "seed = 6"))
    c = plan_workload(other, other.workload("a"))
    assert a == b
    assert a[0].turns[0].user_text != c[0].turns[0].user_text
    assert [p.offset_s for p in a] == [0.0, 0.1, 0.2]
    assert all(p.system == a[0].system for p in a) and len(a[0].system.split()) == 12
    cancels = [t.cancel for p in a for t in p.turns if t.cancel is not None]
    assert cancels and all(2 <= c.tokens <= 9 for c in cancels)


def test_a_later_turn_carries_the_earlier_answers_a_tool_call_and_its_result():
    s = parse_scenario(AGENTS)
    w = s.workload("a")
    plan = plan_workload(s, w)[1]
    first = conversation_body(w, plan, 1, [])
    third = conversation_body(w, plan, 3, ["answer one", "answer two"])
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert [m["role"] for m in third.messages] == [
        "system", "user", "assistant", "tool", "user", "assistant", "tool", "user"]
    assert third.messages[:2] == first.messages  # the history only grows
    assert third.messages[2]["content"] == "answer one"
    call = third.messages[2]["tool_calls"][0]
    assert call["function"]["name"] in ("read_file", "run_tests")
    assert third.messages[3]["tool_call_id"] == call["id"]
    assert [t["function"]["name"] for t in third.tools] == ["read_file", "run_tests"]


def _rec(key, outcome=COMPLETED, tokens=(1, 2, 3), phase="main", **kw):
    return RequestRecord(key=key, phase=phase, workload="w", conversation=0, turn=kw.pop("turn", 1),
                         reproducible=True, outcome=outcome, status=kw.pop("status", 200),
                         token_ids=list(tokens), **kw)


def _observe(records, reference):
    return Observed(records=records, reference={r.key: r for r in reference}, leak_checks=[],
                    budget_bytes=None, peak_bytes=None, new_request=None, compare_tokens=True)


def test_identity_names_the_request_and_the_first_differing_token():
    ref = [_rec("w/0/1"), _rec("w/1/1", tokens=(5, 6, 7, 8))]
    got = [_rec("w/0/1"), _rec("w/1/1", tokens=(5, 6, 9, 8)), _rec("w/0/1", CANCELLED, (1, 2))]
    [v] = [v for v in evaluate(Expectations(identical_to_reference=True), "run", _observe(got, ref))
           if v.name == "identical_to_reference"]
    assert v.ok is False
    assert v.line() == (
        "FAIL  identical_to_reference [run]: expected greedy/seeded outputs identical to the "
        "reference pass (cancelled ones a prefix of it); got 1 of 3 differ: w/1/1 in main differs "
        "at token 2 (reference 7, got 9)")


def test_outcome_bounds_and_statuses_say_expected_and_found():
    got = [_rec("w/0/1"), _rec("w/1/1", FAILED, status=503, error_code="out_of_memory",
                               error="injected out-of-memory")]
    verdicts = evaluate(Expectations(max_outcomes=(("failed", 0),), allowed_status=(200,)), "run",
                        _observe(got, []))
    lines = [v.line() for v in verdicts if v.ok is False]
    assert lines == [
        "FAIL  allowed_status [run]: expected statuses within [200]; got 1 outside: w/1/1 in main: "
        "503 out_of_memory injected out-of-memory",
        "FAIL  max_outcomes.failed [run]: expected at most 0 failed requests; got 1",
    ]


def test_cache_hit_ratio_counts_later_turns_only_by_default():
    got = [_rec("w/0/1", turn=1, prompt_tokens=100, cached_tokens=0),
           _rec("w/0/2", turn=2, prompt_tokens=200, cached_tokens=150)]
    [v] = [v for v in evaluate(Expectations(min_cache_hit_ratio=0.8), "run", _observe(got, []))
           if v.name == "min_cache_hit_ratio"]
    assert (v.ok, v.actual) == (False, "0.750 (150 of 200 prompt tokens over 1 requests)")


def test_latency_ratios_compare_with_the_reference_above_a_floor():
    ref = [_rec("w/0/1", t_sent=0.0, t_first=0.001)]
    got = [_rec("w/0/1", t_sent=0.0, t_first=0.02)]
    verdicts = evaluate(Expectations(ttft_p50_max_ratio=5.0, latency_floor_s=0.005), "run",
                        _observe(got, ref))
    [v] = [v for v in verdicts if v.name == "ttft_p50_max_ratio"]
    assert v.ok is True  # 20 ms <= 5 x max(1 ms, 5 ms floor)
    assert v.actual == "20.0 ms vs reference 1.0 ms (bound 25.0 ms, ratio 4.00)"


def test_a_divergence_at_a_greedy_tie_is_reported_but_not_counted():
    ref = [_rec("w/0/1", tokens=(5, 6, 7), token_margins=[0.5, 0.0, 0.3])]
    got = [_rec("w/0/1", tokens=(5, 9, 7), token_margins=[0.5, 2e-7, 0.3])]
    [v] = [v for v in evaluate(Expectations(identical_to_reference=True), "run", _observe(got, ref))
           if v.name == "identical_to_reference"]
    assert v.ok is True
    assert v.actual == ("all 0 of 1 token ids match; 1 diverged at a greedy tie (not counted): "
                        "w/0/1 in main at token 1, top-2 logprobs 0 apart (reference 6, got 9)")
    # The same divergence where the reference's choice led clearly is a failure.
    ref = [_rec("w/0/1", tokens=(5, 6, 7), token_margins=[0.5, 0.2, 0.3])]
    [v] = [v for v in evaluate(Expectations(identical_to_reference=True), "run", _observe(got, ref))
           if v.name == "identical_to_reference"]
    assert v.ok is False and "differs at token 1 (reference 6, got 9)" in v.actual

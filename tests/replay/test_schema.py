"""Scenario files: good ones load, bad ones say exactly what is wrong and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from omlx_actors.replay import ScenarioError, UnsupportedScenario, load_scenario, parse_scenario, replay
from omlx_actors.replay.tables import ByteSize, parse_size

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.toml"))

MINIMAL = """\
[scenario]
name = "minimal"

[workload.w]
prompt_words = 5
"""


def _errors(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return [line.replace(str(path), "s.toml") for line in info.value.problems]


def test_at_least_six_scenarios_ship():
    assert len(SCENARIOS) >= 6


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_shipped_scenario_loads(path):
    scenario = load_scenario(path)
    # Fast tiny-llama, or the real model where realism matters (the suite replays those on
    # tiny-llama: tests/replay/test_scenarios.py).
    assert scenario.model in ("tiny-llama", "smollm2-135m-instruct")
    assert scenario.phases and scenario.workloads


def test_a_minimal_file_gets_the_documented_defaults():
    s = parse_scenario(MINIMAL)
    assert s.name == "minimal" and s.seed == 0 and s.model == "tiny-llama"
    assert [p.name for p in s.phases] == ["main"] and s.phases[0].workloads == ("w",)
    w = s.workload("w")
    assert (w.conversations, w.turns, w.mode, w.arrival) == (1, 1, "chat", "burst")
    assert w.prompt_words == (5,)
    assert (w.params.max_tokens, w.params.stream, w.params.temperature) == (16, True, 0.0)
    assert s.expect.no_lost_requests and s.expect.allowed_status == (200,)
    assert not s.needs_reference


def test_defaults_apply_to_every_workload_and_a_workload_overrides_them():
    s = parse_scenario(MINIMAL + '\n[workload.v]\nmax_tokens = 3\n\n[defaults]\nmax_tokens = 9\nignore_eos = true\n')
    assert s.workload("w").params.max_tokens == 9 and s.workload("w").params.ignore_eos
    assert s.workload("v").params.max_tokens == 3 and s.workload("v").params.ignore_eos


def test_a_concurrency_list_expands_to_one_phase_per_level_and_faults_follow():
    s = parse_scenario(MINIMAL + '\n[[phase]]\nname = "sweep"\nconcurrency = [1, 4]\n'
                       '\n[[fault]]\nkind = "executor_oom"\nphase = "sweep"\nat_step = 3\n')
    assert [(p.name, p.concurrency) for p in s.phases] == [("sweep@c1", 1), ("sweep@c4", 4)]
    assert [f.phase for f in s.faults] == ["sweep@c1", "sweep@c4"]


def test_sizes_accept_bytes_units_and_weights_plus_a_margin():
    assert parse_size(1024) == ByteSize(plus_weights=False, bytes=1024)
    assert parse_size("512M").bytes == 512 * 2**20
    assert parse_size("1.5G").bytes == int(1.5 * 2**30)
    assert parse_size("weights + 6M").resolve(1000) == 1000 + 6 * 2**20
    with pytest.raises(ValueError, match="a size like"):
        parse_size("lots")


def test_an_unknown_key_is_rejected_with_its_line_and_a_suggestion(tmp_path):
    errors = _errors(MINIMAL + "turn = 3\n", tmp_path)
    assert errors == [
        "s.toml:6: [workload.w] turn: unknown key (did you mean 'turns'?); expected one of: "
        "arrival, cancel_after_s, cancel_after_tokens, cancel_fraction, concurrency, "
        "conversations, ignore_eos, max_tokens, mode, model, prompt_tokens, prompt_words, "
        "rate, "
        "response_schema, seed, "
        "start_s, stop, stream, system, system_words, temperature, think_s, tool_calls_in_history, "
        "tool_result_words, tools, top_p, turns"
    ]


def test_a_wrong_type_names_the_key_what_was_expected_and_what_was_found(tmp_path):
    errors = _errors(MINIMAL + 'turns = "three"\n', tmp_path)
    assert errors == ["s.toml:6: [workload.w] turns: expected an integer >= 1, got 'three' (a string)"]


def test_a_missing_required_field_is_named(tmp_path):
    errors = _errors('[scenario]\ndescription = "no name"\n\n[workload.w]\n', tmp_path)
    assert errors == ["s.toml:1: [scenario]: missing required key 'name'"]
    errors = _errors('[scenario]\nname = "x"\n', tmp_path)
    assert errors == ["s.toml:1: no workload: add at least one [workload.NAME] table"]


def test_every_problem_is_listed_in_file_order(tmp_path):
    errors = _errors(
        '[scenario]\nname = "x"\nseeds = 1\n\n[server]\nmax_batch_size = 0\n'
        '\n[workload.w]\nmode = "chat"\nprompt_tokens = 10\n'
        '\n[[phase]]\nworkloads = ["nope"]\n[phase.expect]\nmin_outcomes = { done = 1 }\n',
        tmp_path,
    )
    assert errors == [
        "s.toml:3: [scenario] seeds: unknown key (did you mean 'seed'?); expected one of: "
        "description, name, request_timeout_s, seed, timeout_s",
        "s.toml:5: [server]: invalid setting: max_batch_size must be > 0, got 0",
        's.toml:10: [workload.w] prompt_tokens: token-id prompts need mode = "completion"',
        "s.toml:13: [phase[1]] workloads: no workload named 'nope'; defined: w",
        "s.toml:15: [phase[1].expect] min_outcomes: unknown outcome 'done': expected one of "
        'completed, cancelled, refused, failed, lost, skipped or an HTTP status code like "413"',
    ]


def test_every_bad_key_of_one_table_is_listed_not_only_the_first(tmp_path):
    errors = _errors(MINIMAL + 'turns = 0\nmode = "x"\nturnz = 1\n', tmp_path)
    assert errors[:2] == [
        "s.toml:6: [workload.w] turns: expected an integer >= 1, got 0",
        "s.toml:7: [workload.w] mode: expected one of 'chat', 'completion', got 'x'",
    ]
    assert errors[2].startswith("s.toml:8: [workload.w] turnz: unknown key (did you mean 'turns'?)")
    assert len(errors) == 3


def test_a_workload_is_checked_with_the_defaults_it_inherits(tmp_path):
    errors = _errors('[scenario]\nname = "x"\n\n[defaults]\nstream = false\n'
                     '\n[workload.w]\ncancel_after_tokens = 3\n', tmp_path)
    assert errors == ["s.toml:8: [workload.w] cancel_after_tokens: cancelling after N tokens "
                      "needs stream = true"]


def test_invalid_toml_reports_the_parser_line(tmp_path):
    errors = _errors('[scenario]\nname = "x"\n[workload.w\n', tmp_path)
    assert errors == ["s.toml: not valid TOML: Expected ']' at the end of a table declaration "
                      "(at line 3, column 12)"]


def test_inconsistent_settings_say_which_combination_is_wrong(tmp_path):
    errors = _errors(MINIMAL + "stream = false\ncancel_after_tokens = 3\n", tmp_path)
    assert errors == ["s.toml:7: [workload.w] cancel_after_tokens: cancelling after N tokens "
                      "needs stream = true"]
    errors = _errors(MINIMAL + 'arrival = "poisson"\n', tmp_path)
    assert errors == ["s.toml:6: [workload.w] arrival: arrival = 'poisson' needs a rate "
                      "(conversations per second)"]
    errors = _errors(MINIMAL + '\n[[fault]]\nkind = "executor_oom"\n', tmp_path)
    assert errors == ["s.toml:8: [fault[1]] kind: an executor_oom fault needs exactly one of "
                      "at_step, after_s, above_bytes"]


def test_an_unknown_fault_kind_lists_the_known_ones(tmp_path):
    errors = _errors(MINIMAL + '\n[[fault]]\nkind = "oom"\nat_step = 1\n', tmp_path)
    assert errors == ["s.toml:8: [fault[1]] kind: expected one of 'executor_oom', "
                      "'process_restart', 'engine_abort', 'writer_stall', 'disk_full', got 'oom'"]


def test_an_engine_death_fault_needs_the_engine_in_its_own_process(tmp_path):
    errors = _errors(MINIMAL + '\n[[fault]]\nkind = "process_restart"\nat_step = 3\n', tmp_path)
    assert errors == ['s.toml:1: [server] isolation: a process_restart fault kills the engine '
                      'process: set isolation = "process"']
    errors = _errors(MINIMAL + '\n[server]\nisolation = "process"\n'
                     '\n[[fault]]\nkind = "process_restart"\nat_step = 3\nafter_s = 1\n', tmp_path)
    assert errors == ["s.toml:11: [fault[1]] kind: a process_restart fault needs exactly one of "
                      "at_step, after_s"]


@pytest.mark.parametrize(("fault", "error"), [
    ('kind = "disk_full"\nafter_s = 1\n',
     "s.toml:8: [fault[1]] kind: a disk_full fault needs writes (how many block writes it "
     "strikes)"),
    ('kind = "writer_stall"\nwrites = 1\nstall_s = 1\n',
     "s.toml:8: [fault[1]] kind: a writer_stall fault needs exactly one of at_step, after_s"),
    ('kind = "writer_stall"\nat_step = 2\nwrites = 1\n',
     "s.toml:8: [fault[1]] kind: a writer_stall fault needs stall_s (how long each struck "
     "write hangs)"),
    ('kind = "disk_full"\nat_step = 2\nwrites = 1\nstall_s = 1\n',
     "s.toml:11: [fault[1]] stall_s: a disk_full write fails at once: stall_s is only for "
     "writer_stall"),
    ('kind = "writer_stall"\nat_step = 2\nwrites = 1\nstall_s = 1\n',
     's.toml:1: [server] ssd_cache_dir: a writer_stall fault strikes the SSD tier: set '
     'ssd_cache_dir (e.g. "<tmp>")'),
    ('kind = "executor_oom"\nat_step = 2\nwrites = 1\n',
     "s.toml:10: [fault[1]] writes: only disk faults (writer_stall, disk_full) take writes, "
     "not executor_oom"),
    ('kind = "disk_full"\nafter_s = 1\nduration_s = 1\n',
     "s.toml:10: [fault[1]] duration_s: disk faults strike by count, not for a time: use "
     "writes (and after_writes, stall_s)"),
    ('kind = "disk_full"\nafter_s = 1\nwrites = 0\n',
     "s.toml:10: [fault[1]] writes: expected an integer >= 1, got 0"),
], ids=["no-count", "no-moment", "no-stall", "stall-on-full", "no-ssd-tier",
        "count-on-engine-fault", "old-duration", "zero-writes"])
def test_a_disk_fault_needs_a_count_a_moment_and_the_ssd_tier(tmp_path, fault, error):
    assert _errors(MINIMAL + "\n[[fault]]\n" + fault, tmp_path) == [error]


async def test_an_engine_fault_through_a_bare_url_is_refused_before_anything_runs():
    s = parse_scenario(MINIMAL + '\n[[fault]]\nkind = "executor_oom"\nat_step = 2\n')
    with pytest.raises(UnsupportedScenario) as info:
        await replay(s, url="http://127.0.0.1:9")
    assert str(info.value) == ("fault executor_oom needs the engine in this process: run in "
                               "process or with --serve, not against --url")


def test_restarts_actions_and_a_temporary_ssd_directory_load():
    s = parse_scenario(MINIMAL + '\n[server]\nssd_cache_dir = "<tmp>"\n'
                       '\n[[phase]]\nname = "a"\n\n[[phase]]\nname = "b"\nrestart_before = true\n'
                       '\n[[action]]\nkind = "ssd_cleanup"\nphase = "a"\nat_s = [0.1, 0.2]\n')
    assert [(p.name, p.restart_before) for p in s.phases] == [("a", False), ("b", True)]
    assert [(a.kind, a.phase, a.at_s) for a in s.actions] == [("ssd_cleanup", "a", (0.1, 0.2))]
    assert dict(s.server) == {"ssd_cache_dir": "<tmp>"}


async def test_a_restart_or_an_action_through_a_bare_url_is_refused():
    s = parse_scenario(MINIMAL + '\n[[phase]]\nname = "a"\n\n[[phase]]\nname = "b"\n'
                       'restart_before = true\n\n[[action]]\nkind = "ssd_cleanup"\nat_s = 0.1\n')
    with pytest.raises(UnsupportedScenario) as info:
        await replay(s, url="http://127.0.0.1:9")
    assert str(info.value) == (
        "action ssd_cleanup needs the engine in this process: run in process or with --serve, "
        "not against --url; phase b restarts the server: run in process or with --serve, not "
        "against --url")

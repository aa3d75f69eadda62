"""Scenario replay: drive the runtime (or any OpenAI-compatible server) through a scenario
file - request traces, faults, expectations - and report what happened.

    scenario = load_scenario("scenarios/cancellation_storm.toml")
    result = await replay(scenario)                  # in process
    result = await replay(scenario, url="http://127.0.0.1:8000")
    print(render_text(result)); result.passed

The CLI is `omlx-actors replay SCENARIO [--url URL] [--serve] [--out DIR] [--model M]`.
`scenarios/README.md` documents the file format and the report.
"""

from omlx_actors.replay.report import render_text, report_json, summary_table, write_report
from omlx_actors.replay.runner import ReplayResult, UnsupportedScenario, replay, runtime_config
from omlx_actors.replay.schema import Scenario, ScenarioError, load_scenario, parse_scenario

__all__ = [
    "ReplayResult",
    "Scenario",
    "ScenarioError",
    "UnsupportedScenario",
    "load_scenario",
    "parse_scenario",
    "render_text",
    "replay",
    "report_json",
    "runtime_config",
    "summary_table",
    "write_report",
]

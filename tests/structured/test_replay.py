"""The structured-output scenario over HTTP (response_format on the wire), and its
`schema_valid` expectation failing on an answer that breaks its schema."""

from __future__ import annotations

import json
from pathlib import Path

from schemas import PERSON

from omlx_actors.replay import load_scenario, render_text, replay
from omlx_actors.replay.expect import Observed, evaluate
from omlx_actors.replay.records import COMPLETED, RequestRecord
from omlx_actors.replay.schema import Expectations

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "structured_output.toml"


async def test_structured_scenario_passes_over_http(tiny_llama):
    result = await replay(load_scenario(SCENARIO), serve=True, model=str(tiny_llama))
    assert result.passed, render_text(result)
    [verdict] = [v for v in result.verdicts if v.name == "schema_valid"]
    assert verdict.ok is True


def _record(key: str, text: str, finish: str) -> RequestRecord:
    return RequestRecord(key=key, phase="main", workload="person", conversation=0, turn=1,
                         reproducible=True, outcome=COMPLETED, status=200, finish_reason=finish,
                         text=text)


def test_schema_valid_fails_naming_an_answer_that_breaks_its_schema():
    records = [
        _record("person/0/1", '{"name": "Ann", "age": 30}', "stop"),
        _record("person/1/1", '{"name": "Ann"', "length"),
        _record("person/2/1", '{"name": "Ann", "age": 300}', "stop"),  # out of bounds
        _record("person/3/1", '{"name": "Ann"', "stop"),  # cut, passed off as stop
    ]
    obs = Observed(records=records, reference=None, leak_checks=[], budget_bytes=None,
                   peak_bytes=None, new_request=None, compare_tokens=True,
                   schemas={"person": json.dumps(PERSON)})
    [verdict] = [v for v in evaluate(Expectations(schema_valid=True), "run", obs)
                 if v.name == "schema_valid"]
    assert verdict.ok is False
    assert verdict.actual.startswith("2 invalid: person/2/1: ")
    assert "person/3/1" in verdict.actual

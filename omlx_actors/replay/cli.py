"""`omlx-actors replay SCENARIO`: run a scenario, print the summary, write the report.

Exit status: 0 if every expectation held, 1 if one did not (each failure is printed with
what was expected and what was found), 2 if the scenario cannot be run at all (an invalid
file, an unsupported fault, a model that cannot be found).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

DEFAULT_OUT = Path("replay-out")


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", type=Path, help="a scenario file (see scenarios/README.md)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help="replay against this OpenAI-compatible server (base URL, with or "
                            "without /v1) instead of in process")
    where.add_argument("--serve", action="store_true",
                       help="start this project's HTTP server on loopback with the scenario's "
                            "settings and replay over HTTP against it")
    p.add_argument("--model", default=None,
                   help="override the scenario's model: a demo model name (tiny-llama, "
                        "tiny-hybrid, demo-150m) or an mlx-lm model directory / repo id")
    p.add_argument("--out", type=Path, default=None,
                   help=f"report directory (default: {DEFAULT_OUT}/<scenario name>)")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key")
    # The same name as serve's flag for the same thing (--served-model kept as an alias).
    p.add_argument("--served-model-name", "--served-model", dest="served_model", default=None,
                   help="with --url: the model id to send (default: the first of /v1/models)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def replay_main(args: argparse.Namespace) -> int:
    import trio

    from omlx_actors.refusals import RequestError
    from omlx_actors.replay.report import render_text, write_report
    from omlx_actors.replay.runner import UnsupportedScenario, replay
    from omlx_actors.replay.schema import ScenarioError, load_scenario

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"omlx-actors replay: invalid scenario file:\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"omlx-actors replay: cannot read {args.scenario}: {exc}", file=sys.stderr)
        return 2
    if (args.api_key or args.served_model) and not args.url:
        print("omlx-actors replay: --api-key and --served-model-name go with --url", file=sys.stderr)
        return 2
    run = partial(replay, scenario, url=args.url, serve=args.serve, model=args.model,
                  api_key=args.api_key, served_model=args.served_model,
                  progress=not args.no_progress)
    try:
        result = trio.run(run)
    except BaseException as exc:  # noqa: BLE001 - report what stopped the run in one line
        leaf = _single_leaf(exc)
        if isinstance(leaf, UnsupportedScenario):
            print(f"omlx-actors replay: cannot run {scenario.name}: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, RequestError):
            print(f"omlx-actors replay: {leaf.message}", file=sys.stderr)
            return 2
        if isinstance(leaf, trio.TooSlowError):
            print(f"omlx-actors replay: {scenario.name} did not finish within its timeout_s "
                  f"({scenario.timeout_s:g} s)", file=sys.stderr)
            return 1
        raise
    print(render_text(result))
    out = args.out or DEFAULT_OUT / scenario.name
    paths = write_report(result, out, plots=not args.no_plots)
    print("report: " + ", ".join(str(p) for p in paths))
    return 0 if result.passed else 1


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

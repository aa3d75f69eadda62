"""The replay's report: the summary table printed at the end, and `report.json`.

Table columns (one row per phase, then the whole run, then the reference pass):
requests, outcomes (ok = completed, cancel, refused, failed, lost, skipped), TTFT and
inter-token latency p50/p90/p99 in milliseconds (client side), completion tokens per second
over the phase's wall time, prefix-cache hit ratio (cached / prompt tokens of completed
requests), and the errors by code. Below it, one line per expectation (pass / FAIL / skip).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omlx_actors.replay.records import OUTCOME_ORDER, RequestRecord, Summary, summarize
from omlx_actors.replay.runner import ReplayResult

REPORT_VERSION = 1
_SHORT = {"completed": "ok", "cancelled": "cancel", "refused": "refused", "failed": "failed",
          "lost": "lost", "skipped": "skip"}


def phase_summaries(result: ReplayResult) -> list[tuple[str, Summary]]:
    """(name, summary) per phase, the whole run, and the reference pass if there was one."""
    rows = []
    for window in result.windows:
        records = [r for r in result.records if r.phase == window.name]
        rows.append((window.name, summarize(records, window.end_s - window.start_s)))
    busy = sum(w.end_s - w.start_s for w in result.windows)
    rows.append(("all phases", summarize(result.records, busy)))
    if result.reference is not None:
        rows.append(("reference", summarize(result.reference, result.reference_duration_s)))
    return rows


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _triple(d: dict[str, float | None]) -> str:
    return "/".join(_ms(d[k]) for k in ("p50", "p90", "p99"))


def summary_table(result: ReplayResult) -> str:
    head = ["phase", "reqs", *(_SHORT[o] for o in OUTCOME_ORDER), "TTFT ms p50/p90/p99",
            "ITL ms p50/p90/p99", "tok/s", "cache hit", "errors"]
    rows = [head]
    for name, s in phase_summaries(result):
        rows.append([
            name, str(s.requests), *(str(s.outcomes.get(o, 0)) for o in OUTCOME_ORDER),
            _triple(s.ttft_s), _triple(s.itl_s),
            "-" if s.throughput_tokens_per_s is None else f"{s.throughput_tokens_per_s:.0f}",
            "-" if s.cache_hit_ratio is None else f"{s.cache_hit_ratio:.2f}",
            ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "-",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    numeric = set(range(1, len(head) - 1))
    lines = []
    for j, row in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_text(result: ReplayResult) -> str:
    """The whole end-of-run text: header, table, memory line, faults, verdicts, result."""
    sc = result.scenario
    where = {"in-process": "in process", "serve": f"a server on {result.url or 'loopback'}",
             "url": f"{result.url}"}[result.target]
    out = [f"scenario {sc.name} ({sc.path or '-'}) against {where}, model {result.model}",
           f"ran {result.duration_s:.2f} s" + (
               f" (+ reference pass {result.reference_duration_s:.2f} s)" if result.reference else ""),
           "", summary_table(result), ""]
    if result.peak_bytes is not None:
        budget = "unknown" if result.budget_bytes is None else f"{result.budget_bytes / 2**20:.2f} MiB"
        out.append(f"memory: peak {result.peak_bytes / 2**20:.2f} MiB (MLX), budget {budget}, "
                   f"{len(result.samples)} samples")
    else:
        out.append("memory: not measured (the target reports none)")
    for f in result.faults:
        out.append(f"fault: {f.kind} armed in {f.phase} {f.what}")
    for t in result.restarts:
        out.append(f"restart: the runtime was stopped and started again at {t:.2f} s")
    if result.actions:
        took = max(a.took_s for a in result.actions)
        out.append(f"actions: {len(result.actions)} x " + ", ".join(sorted({a.kind for a in result.actions}))
                   + f" (slowest acknowledged in {took * 1000:.1f} ms)")
    for phase, stats in result.ssd_stats.items():
        out.append(f"ssd after {phase}: {stats['files']} files, persisted {stats['saves_persisted']}, "
                   f"loaded {stats['load_hits']}, cancelled {stats['saves_cancelled']}, "
                   f"removed by cleanups {stats['cleanup_removed']}")
    out.append("")
    out.extend(v.line() for v in result.verdicts)
    failed = result.failures
    out.append("")
    out.append("PASSED: every expectation held" if not failed else
               f"FAILED: {len(failed)} expectation{'s' if len(failed) > 1 else ''} did not hold")
    return "\n".join(out)


def report_json(result: ReplayResult) -> dict[str, Any]:
    sc = result.scenario
    summaries = dict(phase_summaries(result))
    return {
        "version": REPORT_VERSION,
        "passed": result.passed,
        "scenario": {"name": sc.name, "file": None if sc.path is None else str(sc.path),
                     "description": sc.description, "seed": sc.seed},
        "target": {"kind": result.target, "url": result.url, "model": result.model,
                   "config": result.config},
        "started_at": result.started_at,
        "duration_s": round(result.duration_s, 4),
        "expectations": [v.as_json() for v in result.verdicts],
        "phases": [
            {"name": w.name, "start_s": round(w.start_s, 4), "end_s": round(w.end_s, 4),
             **summaries[w.name].as_json()}
            for w in result.windows
        ],
        "total": summaries["all phases"].as_json(),
        "reference": None if result.reference is None else {
            "duration_s": round(result.reference_duration_s, 4),
            **summaries["reference"].as_json(),
        },
        "memory": {
            "budget_bytes": result.budget_bytes, "peak_bytes": result.peak_bytes,
            "samples": [s.as_json() for s in result.samples],
        },
        "leak_checks": [{"phase": c.phase, "clean": c.clean, "detail": c.detail}
                        for c in result.leak_checks],
        "faults": [{"kind": f.kind, "phase": f.phase, "what": f.what, "at_s": round(f.at_s, 4)}
                   for f in result.faults],
        "restarts_at_s": [round(t, 4) for t in result.restarts],
        "actions": [{"kind": a.kind, "phase": a.phase, "at_s": round(a.at_s, 4),
                     "took_s": round(a.took_s, 4)} for a in result.actions],
        "ssd": {"after_phase": result.ssd_stats,
                "check": None if result.ssd_check is None else {
                    "clean": result.ssd_check.clean, "detail": result.ssd_check.detail}},
        "new_request": None if result.new_request is None else result.new_request.as_json(),
        "requests": [r.as_json() for r in result.records],
        "reference_requests": None if result.reference is None else [
            r.as_json() for r in result.reference],
    }


def write_report(result: ReplayResult, out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write report.json, summary.txt and (with `plots`) the PNGs; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    path = out_dir / "report.json"
    path.write_text(json.dumps(report_json(result), indent=1) + "\n")
    written.append(path)
    path = out_dir / "summary.txt"
    path.write_text(render_text(result) + "\n")
    written.append(path)
    if plots:
        from omlx_actors.replay.plots import write_plots

        written.extend(write_plots(result, out_dir))
    return written


def records_of(result: ReplayResult, phase: str) -> list[RequestRecord]:
    return [r for r in result.records if r.phase == phase]

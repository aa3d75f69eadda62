"""PNG plots of a replay (matplotlib, Agg, object API: no global pyplot state).

- `latency.png`: the distribution (empirical CDF) of TTFT and of inter-token latency, one
  line per phase, the reference pass dashed.
- `throughput.png`: completion tokens per second over time, phases shaded and named,
  armed faults as red lines, restarts as dotted black lines, actions (SSD cleanups) as
  dashed purple lines, failed/refused requests as red ticks where they ended.
- `memory.png`: MLX active and peak memory and the prefix cache's bytes over time, with
  the budget as a line (omitted when the target reports no memory).
"""

from __future__ import annotations

from pathlib import Path

from omlx_actors.replay.records import FAILED, LOST, REFUSED, RequestRecord
from omlx_actors.replay.runner import ReplayResult

_SIZE = (7.5, 3.4)
_DPI = 90
_SHADES = ("#f2f2f2", "#e3ecf7")


def write_plots(result: ReplayResult, out_dir: Path) -> list[Path]:
    paths = [_latency(result, out_dir / "latency.png"), _throughput(result, out_dir / "throughput.png")]
    if result.samples:
        paths.append(_memory(result, out_dir / "memory.png"))
    return paths


def _figure(ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _ecdf(ax, values: list[float], label: str, **style) -> None:
    if not values:
        return
    xs = sorted(v * 1000 for v in values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label, linewidth=1.2, **style)


def _groups(result: ReplayResult) -> list[tuple[str, list[RequestRecord], dict]]:
    groups = [(w.name, [r for r in result.records if r.phase == w.name], {}) for w in result.windows]
    if result.reference is not None:
        groups.append(("reference", result.reference, {"linestyle": "--", "color": "black"}))
    return groups


def _latency(result: ReplayResult, path: Path) -> Path:
    fig, (ttft_ax, itl_ax) = _figure(2)
    for name, records, style in _groups(result):
        _ecdf(ttft_ax, [r.ttft_s for r in records if r.ttft_s is not None], name, **style)
        _ecdf(itl_ax, [g for r in records for g in r.itl_gaps()], name, **style)
    for ax, title in ((ttft_ax, "time to first token"), (itl_ax, "inter-token latency")):
        ax.set_title(f"{result.scenario.name}: {title}", fontsize=9)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if ax is ttft_ax else "fraction of tokens")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.set_xscale("log")
    if ttft_ax.lines:
        ttft_ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path)
    return path


def _shade_phases(ax, result: ReplayResult) -> None:
    for i, w in enumerate(result.windows):
        ax.axvspan(w.start_s, w.end_s, color=_SHADES[i % 2], zorder=0)
        ax.text((w.start_s + w.end_s) / 2, 1.0, w.name, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=6, clip_on=False)
    for f in result.faults:
        ax.axvline(f.at_s, color="red", linewidth=1, zorder=3)
    for t in result.restarts:
        ax.axvline(t, color="black", linestyle=":", linewidth=1.2, zorder=3)
    for a in result.actions:
        ax.axvline(a.at_s, color="tab:purple", linestyle="--", linewidth=0.8, zorder=3)


def _throughput(result: ReplayResult, path: Path) -> Path:
    fig, ax = _figure()
    end = max(result.duration_s, 1e-3)
    width = max(0.01, end / 120)
    bins = [0.0] * (int(end / width) + 1)
    for r in result.records:
        for t, n in r.token_times:
            bins[min(int(t / width), len(bins) - 1)] += n
    xs = [i * width for i in range(len(bins))]
    _shade_phases(ax, result)
    ax.step(xs, [b / width for b in bins], where="post", color="tab:blue", linewidth=1.2,
            label="completion tokens/s")
    bad = [r.t_end for r in result.records if r.outcome in (FAILED, REFUSED, LOST) and r.t_end]
    if bad:
        ax.plot(bad, [0] * len(bad), "|", color="red", markersize=12, label="failed/refused/lost")
    ax.set_xlim(0, end)
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{result.scenario.name}: throughput over time", fontsize=9, pad=12)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def _memory(result: ReplayResult, path: Path) -> Path:
    fig, ax = _figure()
    mib = 2**20
    ts = [s.t for s in result.samples]
    _shade_phases(ax, result)
    ax.plot(ts, [s.active_bytes / mib for s in result.samples], label="MLX active", linewidth=1.2)
    ax.plot(ts, [s.peak_bytes / mib for s in result.samples], label="MLX peak", linewidth=1.2)
    ax.plot(ts, [s.prefix_cache_bytes / mib for s in result.samples], label="prefix cache",
            linewidth=1.2)
    if result.budget_bytes is not None:
        top = max(s.peak_bytes for s in result.samples)
        if result.budget_bytes <= 4 * max(top, 1):
            ax.axhline(result.budget_bytes / mib, color="red", linestyle="--", linewidth=1,
                       label="budget")
        else:
            ax.text(0.01, 0.95, f"budget {result.budget_bytes / mib:.0f} MiB (off the chart)",
                    transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xlim(0, max(result.duration_s, 1e-3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(f"{result.scenario.name}: memory over time", fontsize=9, pad=12)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path

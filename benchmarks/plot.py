"""Turn a ``bench_core`` JSON report into PNGs: ms/token per contender, and a streamed decode step's timeline.

The bar chart answers "how far from the disk floor is each contender, cached and evicted"; the timeline
answers "do reads overlap compute", which is the whole point of lookahead, and shows where a step waits.

Usage: ``python -m benchmarks.plot benchmarks/results/core_<date>.json`` (bench_core calls it itself).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402 - must follow the backend choice

from benchmarks.bench_core import CONTENDERS  # noqa: E402

MODE_COLORS = {"warm": "#4c9be8", "evicted": "#e8704c"}
TIMELINE_CONTENDER = "c_schedule_2"


def plot_ms_per_token(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars (contender x cache mode) with the disk floor as a horizontal line."""
    rows = [r for r in report["rows"] if r.get("median_ms") is not None]
    contenders = [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]
    modes = report["settings"]["modes"]
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(10, 5.2))
    values: list[float] = []
    bars: list[tuple[float, float]] = []
    for m, mode in enumerate(modes):
        for i, contender in enumerate(contenders):
            row = next((r for r in rows if r["contender"] == contender and r["mode"] == mode), None)
            if row is None:
                continue
            x = i + (m - (len(modes) - 1) / 2) * width
            ax.bar(
                x, row["median_ms"], width, color=MODE_COLORS[mode], label=f"files {mode}" if i == 0 else None
            )
            values.append(row["median_ms"])
            bars.append((x, row["median_ms"]))
    floor = report["floor"]
    ax.axhline(
        floor["floor_ms"],
        color="black",
        linestyle="--",
        linewidth=1.2,
        label=f"disk floor, budget bytes ({floor['floor_ms']:.0f} ms)",
    )
    if floor.get("engine_floor_ms"):
        ax.axhline(
            floor["engine_floor_ms"],
            color="gray",
            linestyle=":",
            linewidth=1.2,
            label=f"disk floor, (c) bytes_read ({floor['engine_floor_ms']:.0f} ms)",
        )
    if values and max(values) / max(min(values), 1e-9) > 30:
        ax.set_yscale("log")  # the disk-offload rows would flatten everything else
    elif values:
        ax.set_ylim(0, max(values + [floor["floor_ms"]]) * 1.3)  # headroom for the legend and labels
    top = ax.get_ylim()[1]
    for x, value in bars:  # inside tall bars, so the floor lines never cross a label
        inside = value > 0.12 * top and ax.get_yscale() == "linear"
        ax.annotate(
            f"{value:.0f}",
            (x, value - 0.06 * top if inside else value),
            ha="center",
            va="top" if inside else "bottom",
            fontsize=8,
            color="white" if inside else "black",
        )
    ax.set_xticks(range(len(contenders)), [CONTENDERS[c] for c in contenders], rotation=15, ha="right")
    ax.set_ylabel("ms per decode token (median)")
    settings, model = report["settings"], report["model"]
    ax.set_title(
        f"{model['name']} ({model['bytes'] / 1e6:.0f} MB fp32), budget {settings['budget_fraction']:.0%} "
        f"= {settings['budget_bytes'] / 1e6:.0f} MB, {report['date']}"
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_timeline(report: dict[str, Any], path: Path) -> Path | None:
    """One decode step of (c) lookahead 2: a lane per reader thread, one for compute, one for demand reads."""
    rows = [r for r in report["rows"] if r["contender"] == TIMELINE_CONTENDER and r.get("timeline")]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.2 + 1.5 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows, strict=True):
        timeline = row["timeline"]
        events = timeline["events"]
        # Demand reads run on the thread that computes; they get a lane of their own so overlaps stay visible.
        lanes = sorted({t for kind, _, _, _, t in events if kind == "read" and not t.startswith("Main")})
        lanes = ["compute (main thread)", "demand read (main thread)"] + [f"read {t}" for t in lanes]
        for kind, unit, t0, t1, thread in events:
            if kind == "compute":
                lane, color = "compute (main thread)", "#f0a030"
            elif thread.startswith("Main"):
                lane, color = "demand read (main thread)", "#d04040"
            else:
                lane, color = f"read {thread}", "#4080d0"
            y = lanes.index(lane)
            ax.broken_barh(
                [(t0, t1 - t0)], (y - 0.4, 0.8), facecolors=color, edgecolors="white", linewidth=0.5
            )
            if t1 - t0 > timeline["duration_ms"] * 0.04:
                ax.text(
                    (t0 + t1) / 2,
                    y,
                    unit.replace("model.", "").replace("layers.", "L"),
                    ha="center",
                    va="center",
                    fontsize=6,
                    clip_on=True,
                )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.axvline(timeline["duration_ms"], color="black", linewidth=0.8)
        ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(min([0.0] + [e[2] for e in events]) - 1, timeline["duration_ms"] * 1.02 + 1)
        stats = row["steps"][timeline["step"]]
        ax.set_title(
            f"{CONTENDERS[TIMELINE_CONTENDER]}, files {row['mode']}: decode step {timeline['step'] + 1} "
            f"({timeline['duration_ms']:.0f} ms, engine read {stats['engine_bytes_read'] / 1e6:.0f} MB, "
            f"stall {stats['engine_stall_seconds'] * 1e3:.0f} ms); bars before 0 began in the previous step",
            fontsize=9,
        )
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms since the start of the decode step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_plots(json_path: Path, out: Path | None = None) -> list[Path]:
    """Both figures for one report; returns the files written (next to the JSON unless ``out`` is given)."""
    report = json.loads(Path(json_path).read_text())
    json_path = Path(json_path)
    base = (out or json_path.parent) / json_path.stem
    paths = [
        plot_ms_per_token(report, base.with_name(base.name + "_ms_per_token.png")),
        plot_timeline(report, base.with_name(base.name + "_timeline.png")),
    ]
    return [p for p in paths if p is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot a bench_core JSON report.")
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: next to the report)")
    args = parser.parse_args()
    for path in make_plots(args.report, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

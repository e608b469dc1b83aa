"""Plot a run's learning curves from RUN_DIR/metrics.jsonl into one PNG.

    python tools/plot_metrics.py runs/demo [--out runs/demo/metrics.png]

Subplots (each only when the run logged it): rollout/success_rate with eval/success_rate,
sampler/efficiency, train/loss, all per iteration. Exit 2 with one line on a missing or empty file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ript_ds.metrics import METRICS_FILE, read_metrics

# (title, metric names drawn together)
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("success rate", ("rollout/success_rate", "eval/success_rate")),
    ("sampler efficiency", ("sampler/efficiency",)),
    ("train loss", ("train/loss",)),
)


def series(rows: list[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of one metric; rows without it (or with a non-number) are skipped."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(float(row.get("iteration", i)))
            ys.append(float(value))
    return xs, ys


def plot(rows: list[dict[str, Any]], out: Path, title: str = "") -> list[str]:
    """Write the PNG; returns the metric names drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, [(n, series(rows, n)) for n in names]) for t, names in PANELS]
    panels = [(t, [(n, s) for n, s in curves if s[0]]) for t, curves in panels]
    panels = [(t, curves) for t, curves in panels if curves]
    if not panels:
        raise ValueError(f"none of {[n for _, names in PANELS for n in names]} is in the metrics")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    drawn = []
    for ax, (panel_title, curves) in zip(axes[:, 0], panels, strict=True):
        for name, (xs, ys) in curves:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
            drawn.append(name)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/metrics.png)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        print(f"plot_metrics: {metrics} does not exist (is {run_dir} a run directory?)", file=sys.stderr)
        return 2
    try:
        rows = read_metrics(run_dir)
        out = Path(args.out) if args.out else run_dir / "metrics.png"
        drawn = plot(rows, out, title=run_dir.name)
    except (ValueError, json.JSONDecodeError) as err:
        print(f"plot_metrics: {metrics}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation bookkeeping, free of simulators and models: Wilson intervals, aggregation, tables.

eval/runner.py runs the episodes; everything here is a pure function of per-episode records, so it
is unit-tested by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile

EVAL_SEED = 7  # DESIGN section 5: seed 7; episode i of a task resets with seed EVAL_SEED + i


@dataclass(frozen=True)
class EpisodeRecord:
    """One evaluation episode, as the ranks report it."""

    index: int  # global position in the protocol's episode list
    suite: str
    task_id: int
    init_state_idx: int
    seed: int
    success: bool
    length: int  # env steps executed
    failure_reason: str | None = None  # set when the episode crashed (worker died / timed out)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _summary(successes: int, episodes: int) -> dict[str, Any]:
    low, high = wilson_interval(successes, episodes)
    return {
        "successes": successes,
        "episodes": episodes,
        "rate": successes / episodes if episodes else 0.0,
        "ci95": [low, high],
    }


def aggregate(
    records: Iterable[EpisodeRecord], task_info: Mapping[tuple[str, int], Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Per task, per suite and overall summaries of episode records.

    task_info: optional extra fields per (suite, task_id), e.g. name and instruction.
    A suite's `rate` pools its episodes; `mean_task_rate` averages its tasks' rates (equal with equal
    episodes per task). The top-level `mean` averages the suites' mean_task_rate; `overall` pools every
    episode (the trainer's eval/success_rate).
    """
    records = sorted(records, key=lambda r: r.index)
    tasks: dict[tuple[str, int], list[EpisodeRecord]] = {}
    for r in records:
        tasks.setdefault((r.suite, r.task_id), []).append(r)
    task_rows = []
    for (suite, task_id), eps in sorted(tasks.items()):
        row = {"suite": suite, "task_id": task_id, **dict((task_info or {}).get((suite, task_id), {}))}
        row |= _summary(sum(e.success for e in eps), len(eps))
        row["crashed"] = sum(e.failure_reason is not None for e in eps)
        task_rows.append(row)
    suites: dict[str, dict[str, Any]] = {}
    for suite in sorted({row["suite"] for row in task_rows}):
        rows = [row for row in task_rows if row["suite"] == suite]
        summary = _summary(sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows))
        summary["tasks"] = len(rows)
        summary["mean_task_rate"] = sum(r["rate"] for r in rows) / len(rows)
        suites[suite] = summary
    mean = sum(s["mean_task_rate"] for s in suites.values()) / len(suites) if suites else 0.0
    overall = _summary(sum(r.success for r in records), len(records))
    return {"tasks": task_rows, "suites": suites, "mean": mean, "overall": overall, "episodes": len(records)}


def select_video_indices(records: Sequence[EpisodeRecord], n: int) -> list[int]:
    """Up to n episode indices, failures and successes alternating (first ones of each, by index)."""
    ok = [r.index for r in sorted(records, key=lambda r: r.index) if r.success]
    bad = [r.index for r in sorted(records, key=lambda r: r.index) if not r.success]
    chosen: list[int] = []
    while len(chosen) < n and (ok or bad):
        for pool in (bad, ok):
            if pool and len(chosen) < n:
                chosen.append(pool.pop(0))
    return sorted(chosen)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_table(summary: Mapping[str, Any], title: str = "Evaluation") -> str:
    """A per-task markdown table with Wilson 95% intervals, then one row per suite and the mean."""
    lines = [
        f"# {title}",
        "",
        "| suite | task | instruction | successes | episodes | success % | 95% CI (Wilson) |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for row in summary["tasks"]:
        low, high = row["ci95"]
        text = str(row.get("instruction", row.get("name", ""))).replace("|", "/")
        lines.append(
            f"| {row['suite']} | {row['task_id']} | {text} | {row['successes']} | {row['episodes']} | "
            f"{_pct(row['rate'])} | [{_pct(low)}, {_pct(high)}] |"
        )
    lines += [
        "",
        "| suite | tasks | successes | episodes | success % | 95% CI (Wilson) | mean of task rates % |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for suite, s in summary["suites"].items():
        low, high = s["ci95"]
        lines.append(
            f"| {suite} | {s['tasks']} | {s['successes']} | {s['episodes']} | {_pct(s['rate'])} | "
            f"[{_pct(low)}, {_pct(high)}] | {_pct(s['mean_task_rate'])} |"
        )
    lines += ["", f"**Mean success rate: {_pct(summary['mean'])}%**", ""]
    return "\n".join(lines)


def record_dicts(records: Iterable[EpisodeRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in sorted(records, key=lambda r: r.index)]

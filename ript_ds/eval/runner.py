"""Run an evaluation: which episodes, their split over ranks, the gather, results files and videos.

An evaluation is a list of rollout requests in a fixed global order (episode index i). Rank r runs
episodes r, r + W, ... through the caller's `roll_out` (the trainer's engine and env pool, or
launch/eval.py's policy and worker pool) and every rank all-gathers the records, so the numbers do not
depend on the number of ranks or envs. Every rank calls `roll_out`, with or without episodes of its
own: under ZeRO-3 entering the rollout gathers the parameters, a collective.

Two request lists exist: `protocol_requests` (the standard LIBERO protocol of DESIGN section 5: per
task, episode i starts from fixed init state i and resets with seed EVAL_SEED + i) and
`context_requests` (one episode per context, seed EVAL_SEED + position, or + init state for the
trainer's held-out eval: then launch/eval.py's episodes of those states).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ript_ds.engine import dist
from ript_ds.env.base import TaskSpec
from ript_ds.eval.stats import (
    EVAL_SEED,
    EpisodeRecord,
    aggregate,
    markdown_table,
    record_dicts,
    select_video_indices,
)
from ript_ds.eval.video import episode_video_name, write_episode_video
from ript_ds.rl.rollout import RolloutRequest
from ript_ds.rl.types import Context, Episode

log = logging.getLogger(__name__)

RollOut = Callable[[list[RolloutRequest]], list[Episode]]  # this rank's requests -> episodes, in order


def protocol_requests(
    tasks: Sequence[TaskSpec], episodes_per_task: int, seed: int = EVAL_SEED, first: int = 0
) -> list[RolloutRequest]:
    """The LIBERO protocol: per task, episode i from init state i with reset seed `seed` + i, for
    i = first .. first + episodes_per_task - 1 (first > 0: the protocol's episodes of held-out states)."""
    states = range(first, first + episodes_per_task)
    return [RolloutRequest(Context(t.task_id, i), t, seed + i) for t in tasks for i in states]


def context_requests(
    contexts: Sequence[Context], tasks: Sequence[TaskSpec], seed: int = EVAL_SEED, protocol: bool = False
) -> list[RolloutRequest]:
    """One episode per context, reset seed `seed` + its position, or with `protocol` `seed` + its init
    state: the trainer's held-out eval then runs exactly the episodes launch/eval.py runs for those states
    (protocol_requests with first = the first held-out state), so the two report the same number."""
    by_id = {t.task_id: t for t in tasks}
    return [
        RolloutRequest(c, by_id[c.task_id], seed + (c.init_state_idx if protocol else i))
        for i, c in enumerate(contexts)
    ]


@dataclass
class EvalResult:
    records: list[EpisodeRecord]  # every rank's, by global episode index
    episodes: dict[int, Episode]  # this rank's, by global episode index (videos)
    seconds: float  # the slowest rank's rollout time
    summary: dict[str, Any]  # stats.aggregate, rollout_seconds, episode_records, plus what the caller adds

    @property
    def success_rate(self) -> float:
        return self.summary["overall"]["rate"]

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """The trainer's scalars: pooled success rate, its Wilson interval, the episode count."""
        overall = self.summary["overall"]
        low, high = overall["ci95"]
        return {
            f"{prefix}/success_rate": overall["rate"],
            f"{prefix}/ci95_low": low,
            f"{prefix}/ci95_high": high,
            f"{prefix}/episodes": float(overall["episodes"]),
        }


def run_episodes(
    roll_out: RollOut, requests: Sequence[RolloutRequest], suite: str, tasks: Sequence[TaskSpec] = ()
) -> EvalResult:
    """This rank's share of `requests` through `roll_out`, then the gather (collective: every rank)."""
    rank, world = dist.rank(), dist.world_size()
    mine = list(range(len(requests)))[rank::world]
    start = time.perf_counter()
    episodes = roll_out([requests[i] for i in mine])
    seconds = time.perf_counter() - start
    records = [_record(i, suite, ep) for i, ep in zip(mine, episodes, strict=True)]
    gathered = dist.all_gather_object((records, seconds), op="eval results")
    every = sorted((r for rank_records, _ in gathered for r in rank_records), key=lambda r: r.index)
    info = {(suite, t.task_id): {"name": t.name, "instruction": t.instruction} for t in tasks}
    slowest = max(s for _, s in gathered)
    summary = aggregate(every, info) | {"rollout_seconds": slowest, "episode_records": record_dicts(every)}
    return EvalResult(every, dict(zip(mine, episodes, strict=True)), slowest, summary)


def _record(index: int, suite: str, ep: Episode) -> EpisodeRecord:
    ctx = ep.context
    return EpisodeRecord(
        index,
        suite,
        ctx.task_id,
        ctx.init_state_idx,
        ep.seed,
        bool(ep.success),
        int(ep.length),
        ep.failure_reason,
    )


def write_videos(result: EvalResult, directory: Path, n: int) -> list[Path]:
    """Up to n mp4s, failures and successes alternating; each rank writes the chosen episodes it ran
    (the choice is a function of the gathered records, the same on every rank)."""
    chosen = set(select_video_indices(result.records, n))
    paths = []
    for index, ep in sorted(result.episodes.items()):
        if index in chosen and ep.images.shape[0] > 0:
            paths.append(write_episode_video(ep, directory / episode_video_name(ep)))
    return paths


def write_results(result: EvalResult, out: Path, title: str) -> None:
    """results.json (summary + every episode record) and results.md; rank 0 only."""
    if not dist.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.summary, indent=2))
    (out / "results.md").write_text(markdown_table(result.summary, title))
    log.info("mean success %.3f over %d episodes -> %s", result.summary["mean"], len(result.records), out)

"""SmartSampler: which contexts to roll out, which groups to keep, and when to stop sampling.

A context is (task, fixed init state). The last init states of each task can be held out for
evaluation; they are never drawn for training. Each drawn context is rolled out K times; a group
whose K rewards are all 1 or all 0 has zero RLOO advantage everywhere and is dropped.

Distributed use (the sampler itself never communicates): the sampler's state must stay identical
on every rank, so it is a deterministic function of (seed, sequence of `next_contexts(n)` and
`record(outcomes)` calls). Every rank therefore

  1. calls `next_contexts(n_global)` with the same global count and takes its own share
     (`contexts[rank::world_size]`);
  2. all-gathers the `GroupOutcome`s of its groups and calls `phase.record(all_outcomes)` with the
     same gathered list, in the same order, on every rank;
  3. keeps its own groups with `sampler.filter(my_groups).kept`.

    phase = sampler.start_phase(target_groups=G, max_attempts=4)
    while not phase.done:
        contexts = sampler.next_contexts(phase.num_to_draw(world_size))[rank::world_size]
        groups = rollout(contexts)
        phase.record(all_gather([g.outcome() for g in groups]))
        kept += sampler.filter(groups).kept
    if not phase.should_update: skip this iteration's update

Crashed episodes (failure_reason set) are not policy outcomes: they are left out of the history,
and a group containing one is dropped (its rewards would be biased towards failure).
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ript_ds.env.base import TaskSpec
from ript_ds.rl.types import Context, Group, GroupOutcome

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


class GroupKind(enum.Enum):
    KEPT = "kept"
    ALL_SUCCESS = "all_success"
    ALL_FAIL = "all_fail"
    CRASHED = "crashed"


def classify(outcome: GroupOutcome) -> GroupKind:
    """The single rule shared by `filter` (local groups) and `SamplingPhase` (gathered outcomes)."""
    if outcome.any_crashed:
        return GroupKind.CRASHED
    if all(outcome.successes):
        return GroupKind.ALL_SUCCESS
    if not any(outcome.successes):
        return GroupKind.ALL_FAIL
    return GroupKind.KEPT


@dataclass
class FilterResult:
    kept: list[Group] = field(default_factory=list)
    dropped_all_success: list[Group] = field(default_factory=list)
    dropped_all_fail: list[Group] = field(default_factory=list)
    dropped_crashed: list[Group] = field(default_factory=list)


@dataclass(frozen=True)
class SamplerStats:
    """Counts of one sampling phase, over all ranks when fed gathered outcomes."""

    groups_sampled: int
    groups_kept: int
    dropped_all_success: int
    dropped_all_fail: int
    dropped_crashed: int
    attempts: int  # sampling rounds (record calls)
    capped: bool  # the attempt cap ended the phase before the target was met
    env_steps: int  # env steps of every sampled group, kept or not
    efficiency: float  # kept / sampled; 0.0 before anything was sampled
    env_steps_per_kept_group: float | None  # None when nothing was kept

    def metrics(self) -> dict[str, float]:
        """Namespaced metrics (DESIGN section 6); undefined values are left out, never NaN."""
        out = {
            "sampler/groups_sampled": float(self.groups_sampled),
            "sampler/groups_kept": float(self.groups_kept),
            "sampler/dropped_all_success": float(self.dropped_all_success),
            "sampler/dropped_all_fail": float(self.dropped_all_fail),
            "sampler/dropped_crashed": float(self.dropped_crashed),
            "sampler/attempts": float(self.attempts),
            "sampler/capped": float(self.capped),
            "sampler/efficiency": self.efficiency,
            "sampler/env_steps": float(self.env_steps),
        }
        if self.env_steps_per_kept_group is not None:
            out["sampler/env_steps_per_kept_group"] = self.env_steps_per_kept_group
        return out


def split_init_states(
    num_init_states: int, num_eval_init_states: int = 0, eval_fraction: float = 0.0
) -> tuple[list[int], list[int]]:
    """(train, eval) init state indices of one task: the last ones are held out.

    Holding out the last indices (not a random subset) makes the split independent of the seed,
    so runs with different seeds are evaluated on the same init states, in order.
    """
    if num_eval_init_states and eval_fraction:
        raise ValueError("give num_eval_init_states or eval_fraction, not both")
    if num_eval_init_states < 0 or not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"bad held-out split: count={num_eval_init_states}, fraction={eval_fraction}")
    n_eval = num_eval_init_states or int(eval_fraction * num_init_states)
    if num_init_states - n_eval < 1:
        raise ValueError(f"holding out {n_eval} of {num_init_states} init states leaves none for training")
    indices = list(range(num_init_states))
    return indices[: num_init_states - n_eval], indices[num_init_states - n_eval :]


class SmartSampler:
    """Draws training contexts with its own RNG and keeps a short outcome history per context."""

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        rollouts_per_context: int,
        seed: int,
        *,
        num_eval_init_states: int = 0,
        eval_fraction: float = 0.0,
        history_len: int = 8,
        skip_solved_after: int | None = None,
        mixed_bonus: float = 0.0,
    ) -> None:
        """
        rollouts_per_context: K, at least 2 (RLOO needs a leave-one-out baseline).
        history_len: outcomes (episodes) remembered per context.
        skip_solved_after: M; a context whose last M rollouts all succeeded is no longer drawn
            (permanently: it is never rolled out again, so its history does not change).
        mixed_bonus: a context whose history holds both successes and failures is drawn with
            weight 1 + mixed_bonus instead of 1; those are the contexts that give a learning signal.
        """
        if rollouts_per_context < 2:
            raise ValueError(f"rollouts_per_context (K) must be >= 2 for RLOO, got {rollouts_per_context}")
        if not tasks:
            raise ValueError("the sampler needs at least one task")
        if history_len < 1 or (skip_solved_after is not None and skip_solved_after < 1):
            raise ValueError(
                f"history_len={history_len} and skip_solved_after={skip_solved_after} must be >= 1"
            )
        if mixed_bonus < 0:
            raise ValueError(f"mixed_bonus must be >= 0, got {mixed_bonus}")
        self.k = rollouts_per_context
        self.seed = seed
        self.skip_solved_after = skip_solved_after
        self.mixed_bonus = mixed_bonus
        self._maxlen = max(history_len, skip_solved_after or 0)
        self.train_contexts: list[Context] = []
        self.eval_contexts: list[Context] = []
        for task in tasks:
            train, held_out = split_init_states(task.num_init_states, num_eval_init_states, eval_fraction)
            self.train_contexts += [Context(task.task_id, i) for i in train]
            self.eval_contexts += [Context(task.task_id, i) for i in held_out]
        if len(set(self.train_contexts)) != len(self.train_contexts):
            raise ValueError("task ids must be unique")
        self._rng = np.random.default_rng(seed)
        self._history: dict[Context, deque[bool]] = {
            c: deque(maxlen=self._maxlen) for c in self.train_contexts
        }
        self.groups_recorded = 0

    # ---- drawing ---------------------------------------------------------------------------

    def is_solved(self, context: Context) -> bool:
        m = self.skip_solved_after
        hist = self._history[context]
        return m is not None and len(hist) >= m and all(list(hist)[-m:])

    def is_mixed(self, context: Context) -> bool:
        hist = self._history[context]
        return any(hist) and not all(hist)

    def eligible_contexts(self) -> list[Context]:
        return [c for c in self.train_contexts if not self.is_solved(c)]

    def next_contexts(self, n: int) -> list[Context]:
        """n contexts, without repeats unless n exceeds the eligible count (then spread evenly)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        eligible = self.eligible_contexts()
        if not eligible:
            logger.warning("every training context is solved (skip_solved_after); drawing from all of them")
            eligible = list(self.train_contexts)
        weights = np.array([1.0 + self.mixed_bonus * self.is_mixed(c) for c in eligible])  # [C]
        p = weights / weights.sum()
        out: list[Context] = []
        while len(out) < n:
            m = min(n - len(out), len(eligible))
            idx = self._rng.choice(len(eligible), size=m, replace=False, p=p)
            out += [eligible[i] for i in idx]
        return out

    # ---- outcomes --------------------------------------------------------------------------

    def record(self, outcomes: Sequence[GroupOutcome]) -> None:
        """Append outcomes to the per-context histories, in the given order (same on every rank)."""
        for outcome in outcomes:
            if outcome.context not in self._history:
                raise ValueError(f"{outcome.context} is not a training context (held out or unknown)")
            if len(outcome.successes) != self.k or len(outcome.crashed) != self.k:
                raise ValueError(f"expected K={self.k} outcomes per group, got {len(outcome.successes)}")
            hist = self._history[outcome.context]
            hist.extend(
                s for s, crashed in zip(outcome.successes, outcome.crashed, strict=True) if not crashed
            )
            self.groups_recorded += 1

    def history(self, context: Context) -> tuple[bool, ...]:
        return tuple(self._history[context])

    def filter(self, groups: Sequence[Group]) -> FilterResult:
        """Split groups by `classify`; only `kept` has a non-zero advantage to learn from."""
        result = FilterResult()
        buckets = {
            GroupKind.KEPT: result.kept,
            GroupKind.ALL_SUCCESS: result.dropped_all_success,
            GroupKind.ALL_FAIL: result.dropped_all_fail,
            GroupKind.CRASHED: result.dropped_crashed,
        }
        for group in groups:
            if group.k != self.k:
                raise ValueError(f"expected K={self.k} episodes per group, got {group.k}")
            buckets[classify(group.outcome())].append(group)
        return result

    def start_phase(self, target_groups: int, max_attempts: int) -> SamplingPhase:
        return SamplingPhase(self, target_groups, max_attempts)

    # ---- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (picklable and JSON-able); contexts in a fixed order."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rng": self._rng.bit_generator.state,
            "train_contexts": [[c.task_id, c.init_state_idx] for c in self.train_contexts],
            "histories": [list(self._history[c]) for c in self.train_contexts],
            "groups_recorded": self.groups_recorded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"sampler state version {state['version']} != {_STATE_VERSION}")
        saved = [Context(t, i) for t, i in state["train_contexts"]]
        if saved != self.train_contexts:
            raise ValueError(
                "the saved sampler has different training contexts (task list or held-out split changed)"
            )
        self.seed = state["seed"]
        self._rng.bit_generator.state = state["rng"]
        for context, hist in zip(self.train_contexts, state["histories"], strict=True):
            self._history[context] = deque((bool(h) for h in hist), maxlen=self._maxlen)
        self.groups_recorded = state["groups_recorded"]


class SamplingPhase:
    """Counts one iteration's sampling rounds until `target_groups` kept groups or `max_attempts`.

    An attempt is one round: one `record()` of the (gathered) outcomes of the contexts drawn for it.
    Independent of how rollouts are run; it only sees outcomes.
    """

    def __init__(self, sampler: SmartSampler, target_groups: int, max_attempts: int) -> None:
        if target_groups < 1 or max_attempts < 1:
            raise ValueError(f"target_groups={target_groups} and max_attempts={max_attempts} must be >= 1")
        self.sampler = sampler
        self.target_groups = target_groups
        self.max_attempts = max_attempts
        self.attempts = 0
        self.env_steps = 0
        self.counts = dict.fromkeys(GroupKind, 0)

    @property
    def kept(self) -> int:
        return self.counts[GroupKind.KEPT]

    @property
    def remaining(self) -> int:
        """Kept groups still missing; the natural number of contexts to draw next round."""
        return max(0, self.target_groups - self.kept)

    def num_to_draw(self, multiple_of: int = 1) -> int:
        """`remaining` rounded up to a multiple (e.g. the world size, so every rank gets a share)."""
        return -(-self.remaining // multiple_of) * multiple_of

    @property
    def done(self) -> bool:
        return self.remaining == 0 or self.attempts >= self.max_attempts

    @property
    def capped(self) -> bool:
        return self.remaining > 0 and self.attempts >= self.max_attempts

    @property
    def should_update(self) -> bool:
        """False when the phase ended without a single group to learn from."""
        return self.kept > 0

    def record(self, outcomes: Sequence[GroupOutcome]) -> None:
        """Record one round's outcomes in the sampler's history and in this phase's counts."""
        if self.done:
            raise RuntimeError("the sampling phase is already done")
        self.sampler.record(outcomes)
        for outcome in outcomes:
            self.counts[classify(outcome)] += 1
            self.env_steps += outcome.env_steps
        self.attempts += 1
        if self.capped:
            action = "skip this update" if self.kept == 0 else "update with fewer groups"
            logger.warning(
                "sampling stopped after %d attempts with %d/%d kept groups (%d all-success, %d all-fail, "
                "%d crashed): %s",
                self.attempts,
                self.kept,
                self.target_groups,
                self.counts[GroupKind.ALL_SUCCESS],
                self.counts[GroupKind.ALL_FAIL],
                self.counts[GroupKind.CRASHED],
                action,
            )

    def stats(self) -> SamplerStats:
        sampled = sum(self.counts.values())
        return SamplerStats(
            groups_sampled=sampled,
            groups_kept=self.kept,
            dropped_all_success=self.counts[GroupKind.ALL_SUCCESS],
            dropped_all_fail=self.counts[GroupKind.ALL_FAIL],
            dropped_crashed=self.counts[GroupKind.CRASHED],
            attempts=self.attempts,
            capped=self.capped,
            env_steps=self.env_steps,
            efficiency=self.kept / sampled if sampled else 0.0,
            env_steps_per_kept_group=self.env_steps / self.kept if self.kept else None,
        )

"""EnvPool's driver interface over envs living in this process, for cheap numpy envs.

A worker process per env buys crash isolation and parallel rendering, which LIBERO needs; the
synthetic env steps in microseconds, so there the processes only add IPC and ~1 s of spawn time
each (tools/bench/inline_pool.py on 2 cores: 1.23x faster than 4 worker processes, 17.7x than 16,
which oversubscribe the cores). Commands execute at once; `gather()` returns the replies, as
EnvPool's would arrive. Nothing runs in the background, so a pipelined rollout gains nothing here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np

from ript_ds.env.base import Env, TaskSpec
from ript_ds.env.pool import EnvFactory, SlotReply, run_actions


class InlinePool:
    """`num_workers` slots, each with its own env per task, stepped in the calling process."""

    runs_in_background = False  # a command has run when its send returns: nothing overlaps the policy

    def __init__(self, factory: EnvFactory, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.factory = factory
        self._templates: dict[TaskSpec, Env] = {}
        self._envs: list[dict[TaskSpec, Env]] = [{} for _ in range(num_workers)]
        self._current: list[Env | None] = [None] * num_workers
        self._replies: dict[int, SlotReply] = {}

    @property
    def num_workers(self) -> int:
        return len(self._envs)

    def send_reset(self, slot: int, task: TaskSpec, init_state_idx: int, seed: int) -> None:
        if task not in self._envs[slot]:
            # Building a synthetic env generates all its init states; build one per task, copy it per slot.
            if task not in self._templates:
                self._templates[task] = self.factory.make(task)
            self._envs[slot][task] = copy.deepcopy(self._templates[task])
        env = self._current[slot] = self._envs[slot][task]
        self._replies[slot] = SlotReply(env.reset(init_state_idx, seed), 0, False, False)

    def send_step(self, slot: int, actions: np.ndarray) -> None:
        self._replies[slot] = run_actions(self._current[slot], np.asarray(actions, dtype=np.float32))

    def gather(self, slots: Iterable[int] | None = None) -> dict[int, SlotReply]:
        """The replies of `slots` (None: all) since their last gather, as EnvPool.gather."""
        if slots is None:
            replies, self._replies = self._replies, {}
            return replies
        return {s: self._replies.pop(s) for s in slots if s in self._replies}

    def close(self) -> None:
        for envs in self._envs:
            for env in envs.values():
                env.close()
        self._envs = [{} for _ in self._envs]
        self._templates.clear()

"""Preemption: SIGTERM / SIGUSR1 (SLURM's --signal) ask the trainer to save and exit.

The handler only sets a flag; the trainer polls it at safe points (between sampling rounds and after
each iteration), agrees on it across ranks with an all-reduce, saves, and exits with
PREEMPTED_EXIT_CODE, on which the sbatch scripts requeue the job.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 42  # launch/slurm/*.sbatch requeue on this code


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if not self.requested:
            log.warning(
                "received %s: will save a checkpoint and exit at the next safe point",
                signal.Signals(signum).name,
            )
        self.requested, self.signum = True, signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

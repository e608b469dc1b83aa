"""Preemption: SIGTERM / SIGUSR1 (SLURM's --signal) ask the trainer to save and exit.

The handler only sets a flag; the trainer polls it at safe points (after every round of env steps
while sampling, and after each iteration), agrees on it across ranks with an all-reduce, saves, and
exits with PREEMPTED_EXIT_CODE, on which the sbatch scripts requeue the job.

How the signal reaches every rank: srun signals every process of its step. A launcher (deepspeed,
torchrun) would die of SIGUSR1 and orphan its ranks, so launch/slurm/single_node.sbatch starts it with
SIGUSR1 ignored, which fork and exec pass down to the ranks; installing the handler here replaces the
inherited SIG_IGN (until then, early in setup, a rank ignores the signal and the script repeats it).
Env workers ignore both signals for good (env/pool.py): their rank stops them.
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

"""The learning-rate schedule handed to DeepSpeed: linear warm-up over optimizer steps, then constant or
cosine over training progress.

A RIPT run does not know its optimizer-step count in advance (how many windows an iteration yields
depends on the episodes), so the cosine runs over *iterations*: the trainer sets the progress of the
iteration it is about to update with, (i - 1) / (iterations - 1), so the first update trains at the peak
and the last at `min_lr_ratio`. Warm-up stays in optimizer steps (it protects the first few steps of
Adam, whatever an iteration holds). The state (step count, progress) travels in DeepSpeed's checkpoint
through state_dict/load_state_dict, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ript_ds.config import ConfigError

SCHEDULES = ("constant", "cosine")


class LRSchedule:
    """Sets every param group's lr to base_lr x factor(step, progress); DeepSpeed calls step() after
    each optimizer step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, schedule: str, min_lr_ratio: float
    ):
        if schedule not in SCHEDULES:
            raise ConfigError(f"engine.lr_schedule={schedule!r} is not one of {list(SCHEDULES)}")
        self.optimizer, self.warmup_steps = optimizer, warmup_steps
        self.schedule, self.min_lr_ratio = schedule, min_lr_ratio
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0  # optimizer steps taken
        self.progress = 0.0  # fraction of the run's updates done, in [0, 1]
        self._apply()

    def factor(self) -> float:
        warm = (self.step_count + 1) / self.warmup_steps if self.step_count < self.warmup_steps else 1.0
        if self.schedule == "constant":
            return warm
        cosine = 0.5 * (1 + math.cos(math.pi * self.progress))
        return warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def _apply(self) -> None:
        factor = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def set_progress(self, progress: float) -> None:
        self.progress = min(max(float(progress), 0.0), 1.0)
        self._apply()

    def step(self, **_: Any) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "progress": self.progress, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.progress = int(state["step_count"]), float(state["progress"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def iteration_progress(iteration: int, iterations: int) -> float:
    """Progress of the update of 1-based `iteration` out of `iterations`: 0 for the first, 1 for the last."""
    return (iteration - 1) / max(1, iterations - 1)

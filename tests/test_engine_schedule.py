"""The LR schedule: warm-up over optimizer steps, cosine over iterations, state through a checkpoint."""

from __future__ import annotations

import itertools

import pytest
import torch

from ript_ds.config import ConfigError
from ript_ds.engine.schedule import LRSchedule, iteration_progress


def make(schedule: str, warmup: int = 0) -> LRSchedule:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    return LRSchedule(opt, warmup, schedule, min_lr_ratio=0.1)


def test_warmup_then_constant():
    s = make("constant", warmup=4)
    lrs = [s.get_last_lr()[0]]
    for _ in range(5):
        s.step()
        lrs.append(s.get_last_lr()[0])
    assert lrs == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_cosine_over_iterations_needs_no_step_count():
    s = make("cosine")
    seen = []
    for it in range(1, 6):  # five iterations with different optimizer-step counts each
        s.set_progress(iteration_progress(it, 5))
        seen.append(s.get_last_lr()[0])
        for _ in range(it):
            s.step()
    assert seen[0] == pytest.approx(2.0) and seen[-1] == pytest.approx(0.2)
    assert seen[2] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert all(a > b for a, b in itertools.pairwise(seen))


def test_state_dict_round_trip_continues_the_curve():
    a = make("cosine", warmup=3)
    a.set_progress(0.25)
    a.step()
    b = make("cosine", warmup=3)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr()
    a.step(), b.step()
    assert b.get_last_lr() == a.get_last_lr()


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="lr_schedule"):
        make("linear")

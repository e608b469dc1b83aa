"""The LIBERO warm start's bookkeeping (ript_ds/libero_bc.py), without a simulator: demos come only
from the training init states and give floored normalization statistics (their storage:
tests/test_demos.py)."""

from __future__ import annotations

import numpy as np

from ript_ds.env.base import TaskSpec
from ript_ds.libero_bc import MIN_STD, LiberoSetup, demo_jobs, demo_norm_stats
from ript_ds.rl.types import Context, Episode

TASK = TaskSpec("libero_goal", 8, "t", "put the bowl on the plate", 150, 50)


def test_demos_never_start_from_a_held_out_init_state():
    for heldout in (25, 10):
        setup = LiberoSetup(heldout_init_states=heldout, demos_per_state=3)
        jobs = demo_jobs(setup, TASK, seed=0)
        states = {j.init_state_idx for j in jobs}
        assert states == set(range(50 - heldout))
        assert not states & set(setup.heldout_states(TASK))
        assert len(jobs) == 3 * (50 - heldout)
        assert len({j.seed for j in jobs}) == len(jobs)  # every demo its own noise draw
    assert [j.seed for j in demo_jobs(setup, TASK, 1)] != [j.seed for j in jobs]


def _episode(rng: np.random.Generator, state: int, length: int, success: bool) -> Episode:
    t = (length + 2) // 3
    return Episode(
        context=Context(8, state),
        seed=int(rng.integers(1 << 30)),
        images=rng.integers(0, 256, (t, 2, 8, 8, 3), dtype=np.uint8),
        states=rng.normal(size=(t, 8)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, 7)).astype(np.float32),
        replan_steps=np.arange(t, dtype=np.int64) * 3,
        success=success,
        length=length,
    )


def test_norm_stats_floor_a_constant_dimension():
    rng = np.random.default_rng(1)
    demos = [_episode(rng, 0, 9, True), _episode(rng, 1, 6, True)]
    for ep in demos:
        ep.actions[:, 6] = 1.0  # the gripper closed throughout: std 0
    stats = demo_norm_stats(demos)
    actions = np.concatenate([ep.actions for ep in demos]).astype(np.float64)
    np.testing.assert_allclose(stats.actions.mean, actions.mean(0))
    np.testing.assert_allclose(stats.actions.std[:6], actions.std(0)[:6])
    assert stats.actions.std[6] == MIN_STD

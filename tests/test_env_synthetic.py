"""The synthetic reaching env: shapes, determinism, the expert, difficulty, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ript_ds.env.base import simulator_seed
from ript_ds.env.synthetic import (
    ScriptedExpert,
    SyntheticEnv,
    expert_action,
    expert_chunk,
    init_states,
    synthetic_tasks,
    target_index,
)


def run_episode(env, policy, init_state_idx, seed, actions=None):
    """-> (observations, actions, success); replays `actions` when given."""
    obs = env.reset(init_state_idx, seed)
    observations, taken = [obs], []
    for i in range(env.task.max_steps):
        action = actions[i] if actions is not None else policy(obs.state)
        result = env.step(action)
        obs = result.obs
        observations.append(obs)
        taken.append(action)
        if result.done:
            return observations, taken, result.success
    raise AssertionError("episode did not end at the step cap")


def expert_success_rate(task, expert=None, difficulty=0.0, episodes=50):
    env = SyntheticEnv(task, difficulty=difficulty)
    wins = 0
    for i in range(episodes):
        if expert is not None:
            expert.reset(task)
        policy = expert if expert is not None else (lambda s: expert_action(s, task))
        wins += run_episode(env, policy, i % task.num_init_states, seed=i)[2]
    return wins / episodes


def test_tasks_and_shapes():
    tasks = synthetic_tasks(n_tasks=6, num_init_states=10, max_steps=30)
    assert [target_index(t) for t in tasks] == [0, 1, 2, 0, 1, 2]
    assert len({t.instruction for t in tasks}) == 6 and "red" in tasks[0].instruction
    assert all(t.suite == "synthetic" and t.max_steps == 30 for t in tasks)
    env = SyntheticEnv(tasks[1], image_size=24)
    obs = env.reset(3, seed=0)
    assert obs.images.shape == (2, 24, 24, 3) and obs.images.dtype == np.uint8
    assert obs.state.shape == (8,) and obs.state.dtype == np.float32
    assert np.array_equal(obs.state, init_states(tasks[1])[3])
    # The top view shows all three target colours; the wrist view is centred on the (white) agent.
    for rgb in ([230, 40, 40], [40, 200, 40], [50, 80, 240]):
        assert (obs.images[0] == rgb).all(-1).any()
    assert (obs.images[1, 12, 12] == 250).all()
    with pytest.raises(ValueError):
        env.step(np.zeros(2))
    with pytest.raises(IndexError):
        env.reset(10, seed=0)


def test_init_states_fixed_per_task():
    a, b = synthetic_tasks(2, num_init_states=20)
    assert np.array_equal(init_states(a), init_states(synthetic_tasks(1, num_init_states=20)[0]))
    assert not np.array_equal(init_states(a), init_states(b))


def test_reset_and_replay_are_deterministic():
    task = synthetic_tasks(3)[2]
    env = SyntheticEnv(task, difficulty=0.7)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(task.max_steps, 7)).astype(np.float32)
    obs_a, _, succ_a = run_episode(env, None, 4, seed=11, actions=actions)
    run_episode(env, None, 7, seed=3, actions=actions)  # an unrelated episode in between
    obs_b, _, succ_b = run_episode(env, None, 4, seed=11, actions=actions)
    assert succ_a == succ_b and len(obs_a) == len(obs_b)
    for x, y in zip(obs_a, obs_b, strict=True):
        assert np.array_equal(x.images, y.images) and np.array_equal(x.state, y.state)
    # The action noise really depends on the seed.
    obs_c, _, _ = run_episode(env, None, 4, seed=12, actions=actions)
    assert not np.array_equal(obs_a[5].state, obs_c[5].state)


def test_expert_succeeds_and_imperfection_hurts():
    task = synthetic_tasks(2)[1]
    assert expert_success_rate(task) == 1.0
    assert expert_success_rate(task, difficulty=1.0) >= 0.8
    half = expert_success_rate(task, ScriptedExpert(imperfection=0.5, seed=0))
    assert 0.25 <= half <= 0.75
    # Always heading for a wrong target succeeds only when its path crosses the named one.
    assert expert_success_rate(task, ScriptedExpert(imperfection=1.0, seed=0)) <= 0.1


def test_difficulty_shrinks_radius_and_validates():
    task = synthetic_tasks(1)[0]
    assert SyntheticEnv(task, difficulty=1.0).radius < SyntheticEnv(task, difficulty=0.0).radius
    with pytest.raises(ValueError):
        SyntheticEnv(task, difficulty=1.5)


def test_step_after_done_raises():
    task = synthetic_tasks(1, max_steps=2)[0]
    env = SyntheticEnv(task)
    env.reset(0, seed=0)
    env.step(np.zeros(7))
    assert env.step(np.zeros(7)).done
    with pytest.raises(RuntimeError):
        env.step(np.zeros(7))


def test_speed_at_least_1000_steps_per_s():
    task = synthetic_tasks(1, max_steps=100)[0]
    env = SyntheticEnv(task, difficulty=0.5)
    action = np.full(7, 0.01, dtype=np.float32)  # barely moves: episodes run to the cap
    steps, start = 0, time.perf_counter()
    while steps < 3000:
        env.reset(steps // 100 % task.num_init_states, seed=steps)
        for _ in range(100):
            steps += 1
            if env.step(action).done:
                break
    rate = steps / (time.perf_counter() - start)
    assert rate >= 1000, f"{rate:.0f} steps/s"


def test_expert_chunk_reaches_the_goal_open_loop():
    task = synthetic_tasks(3)[2]
    env = SyntheticEnv(task)
    obs = env.reset(0, seed=0)
    chunk = expert_chunk(obs.state, task, horizon=task.max_steps)
    assert np.array_equal(chunk[0], expert_action(obs.state, task))
    expert = ScriptedExpert(seed=0)
    expert.reset(task)
    assert np.array_equal(expert.chunk(obs.state, 7), chunk[:7])
    for action in chunk:
        result = env.step(action)
        if result.done:
            break
    assert result.success


def test_seeds_outside_32_bits_reset_and_replay():
    """Trainer seeds are train.seed * 10_000_000 + index, past 2**32 from train.seed=430; the env folds
    any int into its simulator's 32-bit range, so such episodes run and replay from Episode.seed."""
    task = synthetic_tasks(1)[0]
    env = SyntheticEnv(task, difficulty=0.7)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(task.max_steps, 7)).astype(np.float32)
    for seed in (430 * 10_000_000 + 3, 2**64 + 1, -5):
        obs_a, _, succ_a = run_episode(env, None, 2, seed, actions)
        obs_b, _, succ_b = run_episode(env, None, 2, seed, actions)
        assert succ_a == succ_b
        assert all(np.array_equal(x.state, y.state) for x, y in zip(obs_a, obs_b, strict=True))
    # Seeds already in range are applied as they are: existing episodes replay unchanged.
    assert simulator_seed(0) == 0 and simulator_seed(7) == 7 and simulator_seed(2**32 - 1) == 2**32 - 1
    # One run's seeds stay distinct after folding (they are < 10_000_000 apart).
    run = [430 * 10_000_000 + i for i in range(0, 10_000_000, 9_973)]
    assert len({simulator_seed(s) for s in run}) == len(run)
    assert all(0 <= simulator_seed(s) < 2**32 for s in (*run, -1, -(2**40), 2**100))


def test_step_reports_the_executed_action_clipped_to_the_action_space():
    task = synthetic_tasks(1)[0]
    a, b = SyntheticEnv(task, difficulty=0.5), SyntheticEnv(task, difficulty=0.5)
    a.reset(0, seed=4)
    b.reset(0, seed=4)
    asked = np.array([3.0, -0.5, 7.0, -2.0, 0.3, 1.5, -9.0], dtype=np.float32)
    result = a.step(asked)
    np.testing.assert_array_equal(result.action, np.clip(asked, -1.0, 1.0))
    # What it reports is what it did: stepping the reported action gives the same next state.
    np.testing.assert_array_equal(b.step(result.action).obs.state, result.obs.state)

"""Pipelined rollouts (rl/rollout.py, pipeline_groups): the same episodes as lockstep, real overlap,
and the pool's crash, hang and preemption handling kept."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import synthetic_processor, tiny_policy

from ript_ds.config import ConfigError, load_config
from ript_ds.env.inline import InlinePool
from ript_ds.env.pool import EnvFactory, EnvPool
from ript_ds.env.synthetic import expert_chunk, synthetic_tasks
from ript_ds.rl.rollout import (
    PREEMPTED,
    RolloutRequest,
    collect,
    make_pi0_policy_fn,
    noise_seed,
    pipeline_groups_for,
    slot_groups,
)
from ript_ds.rl.types import Context
from ript_ds.rl.windows import episode_windows

TASKS = synthetic_tasks(n_tasks=3, num_init_states=10, max_steps=30)
FACTORY = EnvFactory("synthetic", {"difficulty": 0.5})  # actuation noise: some episodes fail


def noisy_expert(observations, tasks, keys):
    """The expert plus noise drawn from each query's NoiseKey: batch-independent, like PI0's noise."""
    chunks = []
    for obs, task, key in zip(observations, tasks, keys, strict=True):
        noise = np.random.default_rng(noise_seed(key)).normal(0.0, 0.8, size=(6, 7))
        chunks.append(expert_chunk(obs.state, task, horizon=6) + noise.astype(np.float32))
    return np.stack(chunks)


def requests(n):
    return [RolloutRequest(Context(i % 3, i % 10), TASKS[i % 3], 300 + i) for i in range(n)]


def assert_same_episodes(a, b, atol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.seed, x.context, x.success, x.length, x.failure_reason) == (
            y.seed,
            y.context,
            y.success,
            y.length,
            y.failure_reason,
        )
        np.testing.assert_allclose(x.actions, y.actions, atol=atol, rtol=0)
        assert np.array_equal(x.images, y.images)
        np.testing.assert_allclose(x.states, y.states, atol=atol, rtol=0)
        assert np.array_equal(x.replan_steps, y.replan_steps)
        for u, v in zip(episode_windows(x, 1.0, 8), episode_windows(y, 1.0, 8), strict=True):
            assert u.key == v.key and np.array_equal(u.action_mask, v.action_mask)
            np.testing.assert_allclose(u.actions, v.actions, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def pool():
    with EnvPool(FACTORY, num_workers=4) as p:
        yield p


@pytest.fixture(scope="module")
def pi0_fn(tmp_path_factory):
    processor = synthetic_processor(tmp_path_factory.mktemp("tok"), TASKS)
    return make_pi0_policy_fn(tiny_policy(seed=0).eval(), processor, device="cpu", num_steps=2)


def test_pipelined_workers_give_the_lockstep_episodes(pool):
    overlapped, sizes = [], []

    def watching(observations, tasks, keys):
        # While the policy runs for one group, the other group's commands are in flight.
        overlapped.append(bool(pool._pending))
        sizes.append(len(keys))
        return noisy_expert(observations, tasks, keys)

    lockstep = collect(noisy_expert, pool, requests(14), pipeline_groups=1)
    piped = collect(watching, pool, requests(14), pipeline_groups=2)
    assert_same_episodes(lockstep.episodes, piped.episodes)
    assert 0 < sum(ep.success for ep in piped.episodes) < 14  # outcomes vary: a real comparison
    assert piped.stats.env_steps == lockstep.stats.env_steps
    assert max(sizes) == 2 and sum(overlapped) > len(overlapped) // 2
    assert pipeline_groups_for(pool, None, cores=5) == 2  # the default for 4 workers with a spare core


def test_pipelined_pi0_episodes_match_lockstep(pool, pi0_fn):
    lockstep = collect(pi0_fn, pool, requests(4), pipeline_groups=1).episodes
    piped = collect(pi0_fn, pool, requests(4), pipeline_groups=3).episodes
    # PI0's batched matmuls round differently per batch size (~1e-7, so states differ in their last
    # bits); the episodes stay the same.
    assert_same_episodes(lockstep, piped, atol=1e-5)
    assert np.abs(piped[0].actions).max() > 1e-3


def test_inline_pool_pipelined_gives_the_lockstep_episodes():
    inline = InlinePool(FACTORY, 4)
    assert pipeline_groups_for(inline, None, cores=16) == 1  # nothing runs in the background
    lockstep = collect(noisy_expert, inline, requests(10), pipeline_groups=1).episodes
    piped = collect(noisy_expert, inline, requests(10), pipeline_groups=2).episodes
    assert_same_episodes(lockstep, piped)


def test_worker_killed_while_its_group_steps():
    killed, calls = [], []

    def killing(observations, tasks, keys):
        calls.append(len(keys))
        if len(calls) == 4:  # group 1's policy call, round 2: group 0's workers are stepping
            killed.append(pool.pids()[0])
            os.kill(killed[0], signal.SIGKILL)
        return noisy_expert(observations, tasks, keys)

    with EnvPool(FACTORY, num_workers=4) as pool:
        result = collect(killing, pool, requests(10), pipeline_groups=2)
        assert pool.stats.crashes == 1 and pool.stats.restarts == 1 and killed[0] not in pool.pids()
        lockstep = collect(noisy_expert, pool, requests(10), pipeline_groups=1)  # the pool still works
    crashed = [i for i, ep in enumerate(result.episodes) if ep.crashed]
    assert len(crashed) == 1 and result.episodes[crashed[0]].failure_reason == "worker crashed (exit -9)"
    survivors = [ep for i, ep in enumerate(result.episodes) if i != crashed[0]]
    assert_same_episodes(survivors, [ep for i, ep in enumerate(lockstep.episodes) if i != crashed[0]])


def test_hanging_env_times_out_in_its_group():
    hang = EnvFactory("synthetic", {"difficulty": 0.5, "hang_seed": 303})
    with EnvPool(hang, num_workers=4, timeout_s=1.0) as pool:
        result = collect(noisy_expert, pool, requests(8), pipeline_groups=2)
        assert pool.stats.timeouts == 1
    bad = [ep for ep in result.episodes if ep.crashed]
    assert [ep.seed for ep in bad] == [303] and bad[0].failure_reason == "timeout after 1 s"


def test_preemption_and_policy_errors_leave_the_pool_idle(pool):
    asked = []

    def stop_after_three():
        asked.append(1)
        return len(asked) > 3

    result = collect(noisy_expert, pool, requests(8), should_stop=stop_after_three, pipeline_groups=2)
    # Stopped at group 1's second round: a few episodes may have ended already, none started since.
    reasons = [ep.failure_reason for ep in result.episodes]
    assert reasons.count(PREEMPTED) >= 4 and set(reasons) <= {PREEMPTED, None}

    def failing(observations, tasks, keys):
        if failing.calls == 2:
            raise RuntimeError("policy crashed")
        failing.calls += 1
        return noisy_expert(observations, tasks, keys)

    failing.calls = 0
    with pytest.raises(RuntimeError, match="policy crashed"):
        collect(failing, pool, requests(8), pipeline_groups=2)
    # Nothing left pending: the next rollout on the same pool runs normally.
    again = collect(noisy_expert, pool, requests(4), pipeline_groups=2).episodes
    assert all(ep.failure_reason is None for ep in again)


def test_default_groups_and_bounds():
    workers = [SimpleNamespace(num_workers=n, runs_in_background=True) for n in (1, 2, 3, 4, 9)]
    assert [pipeline_groups_for(p, None, cores=16) for p in workers] == [1, 1, 1, 2, 2]
    # No core left for the policy's process beyond the workers' (this 2-core machine): lockstep.
    assert [pipeline_groups_for(p, None, cores=4) for p in workers] == [1, 1, 1, 1, 1]
    assert pipeline_groups_for(SimpleNamespace(num_workers=8, runs_in_background=False), None, 16) == 1
    assert pipeline_groups_for(workers[3], 4) == 4
    for bad in (0, 5):
        with pytest.raises(ValueError, match="pipeline_groups must be in"):
            pipeline_groups_for(workers[3], bad)
    assert slot_groups(5, 2) == [[0, 1], [2, 3, 4]] and slot_groups(4, 1) == [[0, 1, 2, 3]]


def test_default_counts_the_cores_the_nodes_ranks_share(monkeypatch):
    """Under torchrun every rank sees all cores of the node; its share is cores / LOCAL_WORLD_SIZE."""
    pool = SimpleNamespace(num_workers=4, runs_in_background=True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pipeline_groups_for(pool, None) == 2  # 16 cores for 4 workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert pipeline_groups_for(pool, None) == 1  # 4 cores each: none left for the policy


def test_config_knob_is_validated():
    assert load_config(overrides=["rollout.num_envs=4"]).rollout.pipeline_groups is None
    assert (
        load_config(overrides=["rollout.num_envs=4", "rollout.pipeline_groups=2"]).rollout.pipeline_groups
        == 2
    )
    cases = [
        (["rollout.pipeline_groups=0"], "rollout.pipeline_groups must be >= 1"),
        (["rollout.pipeline_groups=3"], "exceeds rollout.num_envs=2"),
        (["rollout.in_process=true", "rollout.pipeline_groups=2"], "needs env worker processes"),
        (["rollout.pipeline_groups=two"], "rollout.pipeline_groups must be int"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=overrides)
    assert load_config(overrides=["rollout.in_process=true", "rollout.pipeline_groups=1"])

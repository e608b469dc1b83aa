"""EnvPool: episodes in worker processes, crash and hang recovery, no orphan processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import OrderedDict

import numpy as np
import pytest

from ript_ds.env.pool import EnvFactory, EnvPool, _cached_env
from ript_ds.env.synthetic import expert_action, expert_chunk, synthetic_tasks
from ript_ds.rl.rollout import RolloutRequest, collect
from ript_ds.rl.types import Context

TASKS = synthetic_tasks(n_tasks=3, num_init_states=10, max_steps=40)


def expert_fn(observations, tasks, keys):
    """The perfect expert as a PolicyFn."""
    return np.stack([expert_chunk(o.state, t, horizon=8) for o, t in zip(observations, tasks, strict=True)])


def requests(n, seed0=0):
    return [RolloutRequest(Context(i % 3, i % 10), TASKS[i % 3], seed0 + i) for i in range(n)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); count it as dead (our pool joins its children anyway).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_dead(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_factory_validates_kind():
    with pytest.raises(ValueError):
        EnvFactory("mujoco")


def test_pool_runs_episodes_and_closes():
    with EnvPool(EnvFactory("synthetic"), num_workers=2) as pool:
        pids = pool.pids()
        assert len(pids) == 2 and all(alive(p) for p in pids)
        result = collect(expert_fn, pool, requests(6))
    assert wait_dead(pids) == []
    assert [ep.seed for ep in result.episodes] == list(range(6))
    assert all(ep.success and ep.failure_reason is None for ep in result.episodes)
    assert result.stats.success_rate == 1.0 and result.stats.env_steps == sum(
        ep.length for ep in result.episodes
    )


def test_reset_and_step_protocol():
    with EnvPool(EnvFactory("synthetic"), num_workers=2) as pool:
        pool.send_reset(0, TASKS[0], 0, 1)
        pool.send_reset(1, TASKS[1], 0, 1)
        replies = pool.gather()
        assert set(replies) == {0, 1} and replies[0].obs.state.shape == (8,)
        far = expert_action(replies[0].obs.state, TASKS[0])
        pool.send_step(0, np.repeat(far[None], 3, axis=0))
        pool.send_step(1, np.zeros((100, 7), np.float32))  # cap is 40: stops early at done
        replies = pool.gather()
        assert replies[0].executed == 3 and not replies[0].done
        assert replies[1].executed == 40 and replies[1].done and not replies[1].success
        with pytest.raises(RuntimeError):
            pool.send_step(0, np.zeros((1, 7)))
            pool.send_step(0, np.zeros((1, 7)))
        pool.gather()


def test_killed_worker_is_reported_and_restarted():
    killed, calls = [], []

    def killing_expert(observations, tasks, keys):
        calls.append(len(keys))
        if len(calls) == 3:  # both slots are mid-episode: SIGKILL slot 0's worker
            killed.append(pool.pids()[0])
            os.kill(killed[0], signal.SIGKILL)
        return expert_fn(observations, tasks, keys)

    with EnvPool(EnvFactory("synthetic"), num_workers=2) as pool:
        result = collect(killing_expert, pool, requests(8))
        assert pool.stats.crashes == 1 and pool.stats.restarts == 1
        assert killed[0] not in pool.pids() and wait_dead(killed) == []
        pids = pool.pids()
    crashed = [ep for ep in result.episodes if ep.crashed]
    assert len(crashed) == 1 and not crashed[0].success
    assert crashed[0].failure_reason == "worker crashed (exit -9)"
    # It observed its last replanning step but the chunk sent from there never ran.
    assert crashed[0].length == crashed[0].replan_steps[-1]
    others = [ep for ep in result.episodes if not ep.crashed]
    assert len(others) == 7 and all(ep.success for ep in others)
    assert result.stats.failures == 1
    # The restarted worker served the later requests (more than the 3 done before the kill).
    assert sum(calls) > 3 * 2
    assert wait_dead(pids) == []


def test_hanging_env_times_out():
    factory = EnvFactory("synthetic", {"hang_seed": 3})
    start = time.monotonic()
    with EnvPool(factory, num_workers=2, timeout_s=1.0) as pool:
        result = collect(expert_fn, pool, requests(6))
        assert pool.stats.timeouts == 1
    assert time.monotonic() - start < 20
    bad = [ep for ep in result.episodes if ep.crashed]
    assert [ep.seed for ep in bad] == [3] and bad[0].failure_reason == "timeout after 1 s"
    assert bad[0].length == 0 and bad[0].images.shape[0] == 0
    assert all(ep.success for ep in result.episodes if not ep.crashed)


def test_worker_dying_during_a_command():
    # The env hangs in reset; the worker is killed while the driver waits in gather().
    with EnvPool(EnvFactory("synthetic", {"hang_seed": 5}), num_workers=2, timeout_s=60) as pool:
        pool.send_reset(0, TASKS[0], 0, seed=5)
        pool.send_reset(1, TASKS[1], 0, seed=6)
        threading.Timer(0.5, os.kill, (pool.pids()[0], signal.SIGKILL)).start()
        start = time.monotonic()
        replies = pool.gather()
        assert time.monotonic() - start < 10  # the crash is seen at once, not at the 60 s timeout
        assert replies[0].failure == "worker crashed (exit -9)" and replies[0].obs is None
        assert replies[1].failure is None and pool.stats.crashes == 1 and pool.stats.timeouts == 0


def test_env_cache_is_bounded():
    factory = EnvFactory("synthetic", max_cached_envs=2)
    envs = OrderedDict()
    first = _cached_env(envs, TASKS[0], factory)
    assert _cached_env(envs, TASKS[0], factory) is first  # cached, not rebuilt
    _cached_env(envs, TASKS[1], factory)
    _cached_env(envs, TASKS[0], factory)  # now the most recently used
    _cached_env(envs, TASKS[2], factory)
    assert list(envs) == [TASKS[0], TASKS[2]] and envs[TASKS[0]] is first


def test_no_orphans_after_exception():
    pids = []
    with pytest.raises(KeyError), EnvPool(EnvFactory("synthetic"), num_workers=2) as pool:
        pids = pool.pids()
        pool.send_reset(0, TASKS[0], 0, 0)
        raise KeyError("boom")
    assert len(pids) == 2 and wait_dead(pids) == []


def test_env_error_is_a_failed_episode():
    with EnvPool(EnvFactory("synthetic"), num_workers=1) as pool:
        pool.send_reset(0, TASKS[0], 99, 0)  # no such init state: the env raises in the worker
        reply = pool.gather()[0]
        assert reply.failure.startswith("env error: IndexError") and pool.stats.errors == 1
        pool.send_reset(0, TASKS[0], 1, 0)  # the same worker keeps serving
        assert pool.gather()[0].failure is None and pool.stats.restarts == 0


def test_render_threads_split_the_cores(monkeypatch):
    from ript_ds.env.pool import render_threads

    monkeypatch.delenv("LP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [render_threads(n) for n in (1, 2, 3, 8, 16)] == ["8", "4", "2", "1", "1"]
    monkeypatch.setenv("LP_NUM_THREADS", "3")
    assert render_threads(4) == "3"  # the user's setting wins


def test_workers_outlive_preemption_signals():
    """SLURM's --signal reaches every process of a job step and the sbatch scripts signal the rank's
    whole tree: workers must survive SIGUSR1/SIGTERM (the driver handles them and stops its workers),
    also in their first milliseconds, before their own code runs."""
    with EnvPool(EnvFactory("synthetic"), num_workers=2) as pool:
        pids = pool.pids()
        for pid in pids:  # at once: the workers are still starting their interpreter
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGTERM)
        time.sleep(1.0)
        for pid in pids:  # and again once they run their loop
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGTERM)
        result = collect(expert_fn, pool, requests(4))
        assert pool.pids() == pids and pool.stats.crashes == 0
        assert all(ep.success and ep.failure_reason is None for ep in result.episodes)
    assert wait_dead(pids) == []

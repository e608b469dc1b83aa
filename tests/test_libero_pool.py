"""A pool of real LIBERO workers driven by a tiny PI0: a worker SIGKILLed mid-episode is reported, the
rollout completes and the other episodes are intact."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
from conftest import tiny_policy

from ript_ds.env.libero import get_task
from ript_ds.env.pool import EnvFactory, EnvPool
from ript_ds.model.normalization import NormStats
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.rollout import RolloutRequest, collect, make_pi0_policy_fn
from ript_ds.rl.types import Context

pytestmark = [pytest.mark.libero, pytest.mark.slow]


def test_libero_pool_survives_a_killed_worker(tmp_path):
    # Short episodes keep this under a minute: 12 env steps after the 10 settle steps.
    task = dataclasses.replace(get_task("libero_spatial", 0), max_steps=12)
    policy = tiny_policy(image_size=64).eval()
    tok = PromptTokenizer(build_tiny_tokenizer(tmp_path, [task.instruction]), max_length=32)
    proc = Processor(tok, NormStats.identity(8, 7), action_dim=7)
    pi0_fn = make_pi0_policy_fn(policy, proc, device="cpu", num_steps=2, guidance=None, base_seed=0)
    calls, killed = [], []

    def killing_fn(observations, tasks, keys):
        calls.append(len(keys))
        if len(calls) == 2:  # both workers are mid-episode
            killed.append(pool.pids()[1])
            os.kill(killed[0], signal.SIGKILL)
        return pi0_fn(observations, tasks, keys) * 0.05  # small, finite arm motions

    factory = EnvFactory("libero", {"camera_size": 64, "model_image_size": 64})
    requests = [RolloutRequest(Context(0, i), task, seed=7 + i) for i in range(3)]
    with EnvPool(factory, num_workers=2, timeout_s=120) as pool:
        result = collect(killing_fn, pool, requests, replan_every=4)
        assert pool.stats.crashes == 1 and pool.stats.restarts == 1
    episodes = result.episodes
    assert len(episodes) == 3 and [ep.seed for ep in episodes] == [7, 8, 9]
    crashed = [ep for ep in episodes if ep.crashed]
    assert len(crashed) == 1 and crashed[0].failure_reason == "worker crashed (exit -9)"
    intact = [ep for ep in episodes if not ep.crashed]
    assert all(ep.length == 12 and ep.images.shape[1:] == (2, 64, 64, 3) for ep in intact)
    # The third request ran on a worker after the kill (possibly the restarted one).
    assert any(ep.seed == 9 for ep in intact)

"""Rollout collection: one batched policy call per replanning step, replayable PI0 episodes, videos."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_processor, tiny_policy

from ript_ds.env.inline import InlinePool
from ript_ds.env.pool import EnvFactory, EnvPool
from ript_ds.env.synthetic import SyntheticEnv, expert_chunk, synthetic_tasks
from ript_ds.eval.video import episode_frames, write_videos
from ript_ds.rl.rollout import PREEMPTED, NoiseKey, RolloutRequest, collect, make_pi0_policy_fn, noise_seed
from ript_ds.rl.types import Context

TASKS = synthetic_tasks(n_tasks=3, num_init_states=10, max_steps=20)


@pytest.fixture(scope="module")
def pool():
    with EnvPool(EnvFactory("synthetic", {"difficulty": 0.5}), num_workers=2) as p:
        yield p


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return synthetic_processor(tmp_path_factory.mktemp("tok"), TASKS)


@pytest.fixture(scope="module")
def pi0_fn(processor):
    return make_pi0_policy_fn(tiny_policy(seed=0).eval(), processor, device="cpu", num_steps=3)


def make_requests(specs):
    return [RolloutRequest(Context(task, init), TASKS[task], seed) for task, init, seed in specs]


def test_one_batched_call_per_replanning_step(pool):
    calls = []

    def expert(observations, tasks, keys):
        calls.append([(k.seed, k.replan_index) for k in keys])
        return np.stack(
            [expert_chunk(o.state, t, horizon=6) for o, t in zip(observations, tasks, strict=True)]
        )

    result = collect(expert, pool, make_requests([(i % 3, i, 100 + i) for i in range(5)]), replan_every=5)
    eps = result.episodes
    assert result.stats.policy_calls == len(calls)
    # Every replanning step of every episode was answered by exactly one call ...
    queried = sorted(q for call in calls for q in call)
    assert queried == sorted((ep.seed, i) for ep in eps for i in range(len(ep.replan_steps)))
    # ... and calls were shared: never more envs than slots, and at least once all slots together.
    assert max(len(c) for c in calls) == pool.num_workers and len(calls) < len(queried)
    for ep in eps:
        assert ep.images.shape[1:] == (2, 32, 32, 3) and ep.images.dtype == np.uint8
        assert ep.states.shape == (len(ep.replan_steps), 8)
        assert list(ep.replan_steps) == list(range(0, 5 * len(ep.replan_steps), 5))
        assert ep.actions.shape == (ep.length, 7) and ep.length > ep.replan_steps[-1]
    assert result.stats.env_steps == sum(ep.length for ep in eps)
    assert result.stats.success_rate == np.mean([ep.success for ep in eps])


def test_policy_output_is_validated(pool):
    with pytest.raises(ValueError, match="shorter than replan_every"):
        collect(lambda o, t, k: np.zeros((len(o), 3, 7)), pool, make_requests([(0, 0, 0)]), replan_every=5)


def test_noise_seed_depends_on_every_key_field():
    base = NoiseKey(1, Context(0, 2), 3)
    others = [NoiseKey(2, Context(0, 2), 3), NoiseKey(1, Context(1, 2), 3), NoiseKey(1, Context(0, 3), 3)]
    others.append(NoiseKey(1, Context(0, 2), 4))
    seeds = {noise_seed(k) for k in [base, *others]}
    assert len(seeds) == 5 and noise_seed(base) == noise_seed(NoiseKey(1, Context(0, 2), 3))


def test_pi0_rollouts_replay_exactly(pool, pi0_fn):
    shared = [(0, 1, 7), (1, 2, 8)]
    first = collect(pi0_fn, pool, make_requests([*shared, (2, 3, 9), (0, 4, 10)])).episodes
    # Same two requests, now batched with different companions and served in another order.
    second = collect(pi0_fn, pool, make_requests([(2, 5, 11), (1, 2, 8), (1, 6, 12), (0, 1, 7)])).episodes
    pairs = [(first[0], second[3]), (first[1], second[1])]
    for a, b in pairs:
        assert a.success == b.success and a.length == b.length
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-5)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.replan_steps, b.replan_steps)
    # The tiny random PI0 really acts (not zeros), and different seeds give different actions.
    assert np.abs(first[0].actions).max() > 1e-3
    assert not np.allclose(first[0].actions[:5], first[3].actions[:5])
    # An env replay of the recorded actions gives the recorded outcome (Episode's replay contract).
    ep = first[1]
    env = SyntheticEnv(TASKS[ep.context.task_id], difficulty=0.5)
    obs = env.reset(ep.context.init_state_idx, ep.seed)
    for step, action in enumerate(ep.actions):
        if step in ep.replan_steps:
            assert np.array_equal(obs.images, ep.images[list(ep.replan_steps).index(step)])
        result = env.step(action)
        obs = result.obs
    assert result.done and result.success == ep.success


def test_video_written(pool, tmp_path):
    def expert(observations, tasks, keys):
        return np.stack(
            [expert_chunk(o.state, t, horizon=5) for o, t in zip(observations, tasks, strict=True)]
        )

    eps = collect(expert, pool, make_requests([(0, 0, 1), (1, 1, 2), (2, 2, 3)])).episodes
    frames = episode_frames(eps[0])
    assert frames.shape[1] % 16 == 0 and frames.shape[2] % 16 == 0 and frames.shape[2] > frames.shape[1]
    border = frames[0, 0, 0]
    assert list(border) == ([0, 200, 0] if eps[0].success else [220, 0, 0])
    paths = write_videos(eps, tmp_path / "videos", max_videos=2)
    assert len(paths) == 2 and all(p.exists() and p.stat().st_size > 0 for p in paths)
    import imageio.v2 as imageio

    reader = imageio.get_reader(paths[0], format="FFMPEG")
    assert reader.count_frames() == len(eps[0].replan_steps)
    assert reader.get_data(0).shape == frames.shape[1:]


def test_noise_scale_widens_chunks_and_one_is_the_default(processor):
    """rollout.noise_scale multiplies the flow's initial noise: 1 is the policy itself, > 1 explores."""
    env = SyntheticEnv(TASKS[0])
    obs = [env.reset(i % 10, 0) for i in range(32)]
    keys = [NoiseKey(100 + i, Context(0, i % 10), 0) for i in range(32)]  # same obs, different noise
    policy = tiny_policy(seed=0).eval()

    def chunks(**kwargs):
        fn = make_pi0_policy_fn(policy, processor, device="cpu", num_steps=3, **kwargs)
        return fn(obs, [TASKS[0]] * 32, keys)

    np.testing.assert_array_equal(chunks(noise_scale=1.0), chunks())
    spread = [chunks(noise_scale=s).reshape(32, -1).std(axis=0).mean() for s in (1.0, 2.0)]
    assert spread[1] > 1.3 * spread[0], spread
    with pytest.raises(ValueError, match="noise_scale must be > 0"):
        make_pi0_policy_fn(policy, processor, device="cpu", noise_scale=0.0)


@pytest.mark.parametrize("in_process", [False, True])
def test_episodes_record_the_actions_the_env_executed(pool, in_process):
    """A policy asking for more than the action space allows: the env clips to [-1, 1], and the
    episode (whose actions become training targets) must hold what was executed, not what was asked."""
    asked = {}

    def overshooting(observations, tasks, keys):
        chunks = []
        for o, t, k in zip(observations, tasks, keys, strict=True):
            chunk = expert_chunk(o.state, t, horizon=6) * 4.0  # arm dims up to +-4
            chunk[:, 2:] = np.random.default_rng([k.seed, k.replan_index]).uniform(-3, 3, (6, 5))
            asked[k.seed, k.replan_index] = chunk
            chunks.append(chunk)
        return np.stack(chunks)

    slots = InlinePool(EnvFactory("synthetic", {"difficulty": 0.5}), 2) if in_process else pool
    requests = make_requests([(0, 0, 21), (1, 1, 22), (2, 2, 23)])
    eps = collect(overshooting, slots, requests, replan_every=5).episodes
    for ep in eps:
        wanted = np.concatenate([asked[ep.seed, i][:5] for i in range(len(ep.replan_steps))])[: ep.length]
        assert np.abs(wanted).max() > 1.5  # the policy really overshot
        np.testing.assert_array_equal(ep.actions, np.clip(wanted, -1.0, 1.0).astype(np.float32))


def test_should_stop_ends_the_collection_at_the_next_round(pool):
    """A preemption must not wait for every queued episode: once should_stop() is true, collect
    returns after the current round with the unfinished episodes marked, never to be learned from."""
    rounds = []

    def expert(observations, tasks, keys):
        return np.stack(
            [expert_chunk(o.state, t, horizon=5) * 0.2 for o, t in zip(observations, tasks, strict=True)]
        )  # slow: no episode ends within the rounds below

    def stop_after_three():
        rounds.append(len(rounds))
        return len(rounds) > 3

    requests = make_requests([(i % 3, i, 40 + i) for i in range(6)])
    result = collect(expert, pool, requests, replan_every=2, should_stop=stop_after_three)
    eps = result.episodes
    assert len(rounds) == 4 and [ep.seed for ep in eps] == [40 + i for i in range(6)]
    assert all(ep.failure_reason == PREEMPTED and ep.crashed and not ep.success for ep in eps)
    assert [ep.length for ep in eps] == [6, 6, 0, 0, 0, 0]  # 3 step rounds of 2 on both slots
    assert result.stats.failures == 6 and result.stats.env_steps == 12
    # Nothing was left pending: the pool serves the next collection normally.
    again = collect(expert_fn_full, pool, make_requests([(0, 0, 1)]), replan_every=5).episodes
    assert again[0].failure_reason is None and again[0].success


def expert_fn_full(observations, tasks, keys):
    return np.stack([expert_chunk(o.state, t, horizon=6) for o, t in zip(observations, tasks, strict=True)])

"""Demonstrations kept in every update (ript.demos, rl/demos.py): storage, the pool, its per-update draw
over ranks, the update's weighting of demo windows, and bad demo files through launch/train.py.
The 1-rank vs 2-rank trainer with demos is the z2_cosine_demos cell of tests/test_trainer_matrix.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import load_script, tiny_policy
from test_rl_update import PROMPTS, settings
from test_rl_update import windows as rollout_windows

from ript_ds.rl.demos import DEMO_ADVANTAGE, DEMO_KEY_BASE, DemoPool, load_episodes, save_episodes
from ript_ds.rl.types import Context, Episode
from ript_ds.rl.update import TorchBackend, run_update

train_cli = load_script("launch/train.py")


def episode(rng: np.random.Generator, state: int, length: int, success: bool, size: int = 8, task: int = 0):
    t = (length + 2) // 3
    return Episode(
        context=Context(task, state),
        seed=int(rng.integers(1 << 30)),
        images=rng.integers(0, 256, (t, 2, size, size, 3), dtype=np.uint8),
        states=rng.normal(size=(t, 8)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, 7)).astype(np.float32),
        replan_steps=np.arange(t, dtype=np.int64) * 3,
        success=success,
        length=length,
    )


def test_episodes_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    demos = [episode(rng, 3, 7, True), episode(rng, 11, 5, False)]
    save_episodes(demos, tmp_path / "demos.npz")
    loaded = load_episodes(tmp_path / "demos.npz")
    assert len(loaded) == 2
    for a, b in zip(demos, loaded, strict=True):
        assert (a.context, a.seed, a.success, a.length) == (b.context, b.seed, b.success, b.length)
        for field in ("images", "states", "actions", "replan_steps"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert getattr(a, field).dtype == getattr(b, field).dtype


def test_a_file_that_is_not_episodes_is_one_line(tmp_path):
    (tmp_path / "text.npz").write_text("not an archive")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for name in ("text.npz", "other.npz", "missing.npz"):
        with pytest.raises(ValueError) as err:
            load_episodes(tmp_path / name)
        assert str(err.value).count("\n") == 0 and name in str(err.value)


def test_pool_keeps_successful_demos_as_positive_weighted_windows_with_their_own_keys():
    rng = np.random.default_rng(1)
    eps = [episode(rng, 0, 9, True), episode(rng, 1, 6, False), episode(rng, 2, 12, True)]
    eps.append(episode(rng, 3, 9, True))
    eps[3].failure_reason = "worker crashed"
    pool = DemoPool.from_episodes(eps, chunk_size=4, weight=0.5)
    assert pool.episodes == 2 and len(pool.windows) == 3 + 4  # ceil(9 / 3) + ceil(12 / 3) windows
    assert {w.advantage for w in pool.windows} == {DEMO_ADVANTAGE} and {w.weight for w in pool.windows} == {
        0.5
    }
    keys = [w.key for w in pool.windows]
    assert len(set(keys)) == len(keys) and min(k[0] for k in keys) >= DEMO_KEY_BASE
    np.testing.assert_array_equal(pool.windows[3].actions[:4], eps[2].actions[:4])  # executed actions


def test_draw_is_one_global_set_whatever_the_rank_layout():
    rng = np.random.default_rng(2)
    pool = DemoPool.from_episodes([episode(rng, i, 15, True) for i in range(4)], chunk_size=4, weight=1.0)
    assert len(pool.windows) == 20
    one = {w.key for w in pool.draw(7, seed=11)}
    assert len(one) == 7 == pool.size(7)
    for world in (2, 3):
        shares = [pool.draw(7, 11, rank, world) for rank in range(world)]
        assert sorted(len(s) for s in shares)[-1] - sorted(len(s) for s in shares)[0] <= 1
        assert {w.key for s in shares for w in s} == one
    assert {w.key for w in pool.draw(7, seed=12)} != one  # another update, another subset
    assert len(pool.draw(None, 0)) == len(pool.draw(100, 0)) == 20 == pool.size(None)


def test_load_checks_the_demos_against_the_run(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "demos.npz"
    save_episodes([episode(rng, 0, 9, True, size=8, task=2)], path)
    args = dict(chunk_size=4, weight=1.0, task_ids=[2], image_size=8, action_dim=7, state_dim=8)
    assert len(DemoPool.load(path, **args).windows) == 3
    for change, message in (
        ({"task_ids": [0, 1]}, "demos of tasks [2] that env.task_ids [0, 1] does not train"),
        ({"image_size": 32}, "images of 8x8 px; the policy takes 32 px"),
        ({"action_dim": 14}, "actions of dim 7"),
        ({"state_dim": 32}, "states of dim 8"),
    ):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            DemoPool.load(path, **(args | change))
    save_episodes([episode(rng, 0, 9, False)], path)
    with pytest.raises(ValueError, match="no successful demo"):
        DemoPool.load(path, **args)


def test_a_demo_window_weighs_its_demo_weight_in_the_step_loss(processor):
    """One optimizer step over [rollout windows + one demo window of weight w]: the step loss is the mean
    over all windows, the demo's term scaled by w (the same window at w = 2 adds twice its w = 1 term)."""
    rollouts = rollout_windows(3, [0.5, -0.5, 0.5])
    demo = rollout_windows(1, [DEMO_ADVANTAGE], seed=9)[0]
    losses = {}
    for w in (0.0, 1.0, 2.0):
        ws = [*rollouts, replace(demo, weight=w, key=(DEMO_KEY_BASE, 0))]
        policy = tiny_policy()
        cfg = settings(loss="cfg", micro_batch_size=8)
        backend = TorchBackend(policy, lr=1e-9)
        losses[w] = run_update(backend, policy.arch, processor, ws, PROMPTS, *cfg, seed=3).loss
    # The step's normalizer is its 4 windows whatever their weights: L_w = (l_1 + l_2 + l_3 + w l_d) / 4.
    demo_term = losses[2.0] - losses[1.0]
    assert demo_term > 0
    assert losses[1.0] == pytest.approx(losses[0.0] + demo_term, rel=1e-5)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from ript_ds.model.normalization import NormStats
    from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer

    tok = PromptTokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), list(PROMPTS.values())), 16)
    return Processor(tok, NormStats.identity(8, 7), action_dim=7)


def test_bad_demos_are_one_clear_line_before_distributed_init(tmp_path, capsys):
    rng = np.random.default_rng(4)
    bad_size = tmp_path / "demos64.npz"
    save_episodes([episode(rng, 0, 9, True, size=64)], bad_size)
    (tmp_path / "junk.npz").write_text("junk")
    cases = [
        ([f"ript.demos={tmp_path / 'none.npz'}"], "does not exist"),
        ([f"ript.demos={tmp_path / 'junk.npz'}"], "is not a readable .npz of episodes"),
        ([f"ript.demos={bad_size}"], "images of 64x64 px; the policy takes 32 px"),  # the tiny model's
        (["ript.demo_windows=8"], "ript.demo_windows is set but ript.demos is not"),
        ([f"ript.demos={bad_size}", "ript.demo_weight=0"], "ript.demo_weight must be > 0"),
    ]
    for argv, message in cases:
        assert train_cli.main([*argv, f"output_dir={tmp_path}"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err

import numpy as np
import pytest
import torch

from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.types import Context, Episode, Group
from ript_ds.rl.windows import episode_windows, groups_to_windows, windows_batch


def _episode(length=12, replan_every=5, success=True, failure_reason=None, ctx=None):
    steps = np.arange(0, length, replan_every)  # [T]
    t = len(steps)
    return Episode(
        context=ctx or Context(3, 1),
        seed=7,
        images=np.arange(t, dtype=np.uint8).reshape(t, 1, 1, 1, 1).repeat(3, axis=-1),  # [T, 1, 1, 1, 3]
        states=np.arange(t * 2, dtype=np.float32).reshape(t, 2),
        # action i = [i, 10 * i]: the row index is visible in the values
        actions=np.stack([np.arange(length), 10 * np.arange(length)], axis=1).astype(np.float32),
        replan_steps=steps,
        success=success,
        length=length,
        failure_reason=failure_reason,
    )


def test_tiny_episode_windows_by_hand():
    # length 12, replan every 5, H = 8 -> windows at t = 0, 5, 10 with 8, 7, 2 valid steps
    ws = episode_windows(_episode(), advantage=0.5, chunk_size=8)
    assert [int(w.action_mask.sum()) for w in ws] == [8, 7, 2]
    assert [int(w.images[0, 0, 0, 0]) for w in ws] == [0, 1, 2]  # observation i of the episode
    np.testing.assert_array_equal(ws[1].state, [2.0, 3.0])
    # t = 5: actions 5..11 then one zero row
    np.testing.assert_array_equal(ws[1].actions[:, 0], [5, 6, 7, 8, 9, 10, 11, 0])
    np.testing.assert_array_equal(ws[1].action_mask, [1, 1, 1, 1, 1, 1, 1, 0])
    # t = 10: actions 10, 11 then six zero rows
    np.testing.assert_array_equal(ws[2].actions[:, 1], [100, 110, 0, 0, 0, 0, 0, 0])
    assert all(w.advantage == 0.5 and w.task_id == 3 and w.weight == 1.0 for w in ws)
    assert ws[0].actions.shape == (8, 2) and ws[0].actions.dtype == np.float32


def test_observation_at_episode_end_gives_no_window():
    # a run cut at step 10 after observing step 10: the observation has no executed action
    ep = _episode(length=11)
    ep = Episode(**{**ep.__dict__, "actions": ep.actions[:10], "length": 10})
    assert [int(w.action_mask.sum()) for w in episode_windows(ep, 1.0, chunk_size=8)] == [8, 5]


def test_groups_to_windows_advantages_crash_and_zero_drop():
    c = Context(3, 1)
    g0 = Group(c, [_episode(success=True), _episode(success=False)])
    g1 = Group(c, [_episode(success=False), _episode(success=False, failure_reason="worker crash")])
    adv = np.array([[1.0, -1.0], [0.0, 0.0]], np.float32)
    ws = groups_to_windows([g0, g1], adv, chunk_size=8)
    # 3 windows per episode; the crashed episode contributes none
    assert [w.advantage for w in ws] == [1.0] * 3 + [-1.0] * 3 + [0.0] * 3
    ws = groups_to_windows([g0, g1], adv, chunk_size=8, drop_zero_advantage=True)
    assert [w.advantage for w in ws] == [1.0] * 3 + [-1.0] * 3
    with pytest.raises(ValueError):
        groups_to_windows([g0], adv, chunk_size=8)


def test_windows_batch_stacks_normalizes_and_pads(tmp_path):
    """The one path from windows to model tensors: the Processor's batch (normalized, padded to the
    model's 32 dims, the task's prompt) plus the loss's per-window mask, advantage and weight."""
    tok = PromptTokenizer(build_tiny_tokenizer(tmp_path, ["reach it"]), 8)
    stats = NormStats(
        state=FeatureStats(np.array([1.0, 1.0]), np.array([2.0, 2.0])),
        actions=FeatureStats(np.array([0.0, 10.0]), np.array([1.0, 10.0])),
    )
    processor = Processor(tok, stats, action_dim=2)
    ws = episode_windows(_episode(), advantage=-0.25, chunk_size=8)
    ws.append(ws[0].as_padding())
    b = windows_batch(processor, ws, {3: "reach it"}, "cpu")
    assert len(b) == 4 and b.batch.images.shape == (4, 1, 3, 1, 1)
    assert b.step_mask.sum(dim=1).tolist() == [8, 7, 2, 8]
    assert b.weight.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert b.advantage.tolist() == [-0.25, -0.25, -0.25, 0.0]
    # window 1 starts at env step 5: action [5, 50] -> ((5 - 0) / 1, (50 - 10) / 10), then zero padding
    assert b.batch.actions.shape == (4, 8, 32)
    assert b.batch.actions[1, 0, :3].tolist() == pytest.approx([5.0, 4.0, 0.0], abs=1e-4)
    assert b.batch.state[1, :3].tolist() == pytest.approx(
        [0.5, 1.0, 0.0], abs=1e-4
    )  # state [2, 3] -> ((2 - 1) / 2, (3 - 1) / 2)
    assert torch.equal(b.batch.tokens[0], torch.from_numpy(tok.encode("reach it")[0]))
    with pytest.raises(ValueError, match="no windows"):
        windows_batch(processor, [], {}, "cpu")


def test_episode_validates_shapes():
    ep = _episode()
    with pytest.raises(ValueError, match="length"):
        Episode(**{**ep.__dict__, "length": 11})
    with pytest.raises(ValueError, match="first dim"):
        Episode(**{**ep.__dict__, "states": ep.states[:2]})
    with pytest.raises(ValueError, match="uint8"):
        Episode(**{**ep.__dict__, "images": ep.images.astype(np.float32)})
    with pytest.raises(ValueError, match="Context"):
        Group(Context(0, 0), [ep])

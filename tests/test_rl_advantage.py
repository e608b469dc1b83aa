import numpy as np
import pytest
import torch

from ript_ds.rl.advantage import group_advantages, rloo
from ript_ds.rl.types import Context, Episode, Group


def test_rloo_hand_derived_numpy():
    # K=4, R = [1, 0, 1, 1], sum 3:
    #   A_0 = 1 - (3 - 1)/3 = 1/3;  A_1 = 0 - 3/3 = -1;  A_2 = A_3 = 1/3
    # second group all-fail: sum 0 -> every A = 0
    a = rloo(np.array([[1, 0, 1, 1], [0, 0, 0, 0]]))
    np.testing.assert_allclose(a, [[1 / 3, -1, 1 / 3, 1 / 3], [0, 0, 0, 0]], rtol=1e-6)
    assert a.dtype == np.float32
    # K=3, R = [0, 0, 1]: A = [0 - 1/2, 0 - 1/2, 1 - 0] = [-0.5, -0.5, 1]
    np.testing.assert_allclose(rloo(np.array([[0.0, 0.0, 1.0]])), [[-0.5, -0.5, 1.0]])


def test_rloo_torch_matches_and_keeps_type():
    # K=2, R = [1, 0]: A = [1 - 0, 0 - 1] = [1, -1]; R = [0.5, 0.25]: A = [0.25, -0.25]
    r = torch.tensor([[1, 0], [0.5, 0.25]])
    a = rloo(r)
    assert isinstance(a, torch.Tensor)
    torch.testing.assert_close(a, torch.tensor([[1.0, -1.0], [0.25, -0.25]]))
    # integer tensors become float, not an integer division
    torch.testing.assert_close(rloo(torch.tensor([[1, 0, 0]])), torch.tensor([[1.0, -0.5, -0.5]]))


def test_rloo_rejects_k_below_two():
    with pytest.raises(ValueError, match="K=1"):
        rloo(np.ones((3, 1)))
    with pytest.raises(ValueError):
        rloo(torch.ones(0))


def _episode(ctx, success):
    return Episode(
        context=ctx,
        seed=0,
        images=np.zeros((1, 1, 2, 2, 3), np.uint8),
        states=np.zeros((1, 2), np.float32),
        actions=np.zeros((3, 7), np.float32),
        replan_steps=np.array([0]),
        success=success,
        length=3,
    )


def test_group_advantages():
    c0, c1 = Context(0, 0), Context(1, 4)
    groups = [
        Group(c0, [_episode(c0, s) for s in (True, False)]),
        Group(c1, [_episode(c1, s) for s in (False, False)]),
    ]
    np.testing.assert_allclose(group_advantages(groups), [[1, -1], [0, 0]])
    uneven = [groups[0], Group(c1, [_episode(c1, False)] * 3)]
    with pytest.raises(ValueError, match="same number"):
        group_advantages(uneven)

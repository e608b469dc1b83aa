import math

import pytest
import torch

from ript_ds.model.flow import reduce_loss as flow_matching_loss_reduce
from ript_ds.rl.losses import awr_loss, fpo_loss, guided_loss


def _t(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ---- flow_matching_loss_reduce -------------------------------------------------------------


def test_fm_reduce_hand_derived():
    nan = float("nan")
    # sample 0: steps 0, 1 valid, real dims 0, 1 -> (1 + 2 + 3 + 4) / (2 steps * 2 dims) = 2.5;
    #           dim 2 is model padding (100s) and step 2 is padding (NaN): both ignored.
    # sample 1: only step 1 valid -> (5 + 7) / (1 * 2) = 6.
    # sample 2: no valid step -> 0, even though it is all inf.
    x = _t(
        [
            [[1, 2, 100], [3, 4, 100], [nan, nan, nan]],
            [[9, 9, 9], [5, 7, 100], [9, 9, 9]],
            [[math.inf] * 3] * 3,
        ]
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out = flow_matching_loss_reduce(x, mask, action_dim=2)
    torch.testing.assert_close(out, torch.tensor([2.5, 6.0, 0.0], dtype=torch.float64))
    out.sum().backward()
    # d out_0 / d x_0[h, a] = 1/4 on valid real entries; d out_1 / d x_1[1, a] = 1/2
    expected = torch.zeros(3, 3, 3, dtype=torch.float64)
    expected[0, :2, :2] = 0.25
    expected[1, 1, :2] = 0.5
    torch.testing.assert_close(x.grad, expected)


def test_fm_reduce_rejects_bad_action_dim():
    with pytest.raises(ValueError):
        flow_matching_loss_reduce(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), action_dim=4)
    with pytest.raises(ValueError):
        flow_matching_loss_reduce(torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool), action_dim=2)


# ---- cfg -----------------------------------------------------------------------------------


def test_guided_loss_hand_derived():
    # real samples 0..2 (sample 3 is padding with A > 0 and a NaN loss that must not leak)
    # cond terms: 1[A>0] * loss_cond = [2, 0, 0] -> 2 / 3;  uncond: (1 + 3 + 5) / 3 = 3
    # total = 2/3 + 0.1 * 3 = 0.9666...
    lc, lu = _t([2, 4, 6, float("nan")]), _t([1, 3, 5, 7])
    adv = torch.tensor([0.5, -0.5, 0.0, 1.0], dtype=torch.float64)
    w = torch.tensor([1, 1, 1, 0], dtype=torch.float64)
    res = guided_loss(lc, lu, adv, uncond_weight=0.1, weight=w)
    torch.testing.assert_close(res.loss, torch.tensor(2 / 3 + 0.3, dtype=torch.float64))
    torch.testing.assert_close(res.cond, torch.tensor(2 / 3, dtype=torch.float64))
    torch.testing.assert_close(res.uncond, torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(res.frac_positive, torch.tensor(1 / 3, dtype=torch.float64))
    assert not res.cond.requires_grad
    res.loss.backward()
    torch.testing.assert_close(lc.grad, torch.tensor([1 / 3, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(lu.grad, torch.tensor([0.1 / 3] * 3 + [0], dtype=torch.float64))


def test_guided_loss_normalizer_and_default_weight():
    lc, lu = _t([2.0, 4.0]), _t([1.0, 3.0])
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # no weight -> both real; normalizer 4: cond = (2 + 4) / 4 = 1.5, uncond = 4 / 4 = 1, total 1.5 + 0.5 * 1
    res = guided_loss(lc, lu, adv, uncond_weight=0.5, normalizer=4.0)
    torch.testing.assert_close(res.loss, torch.tensor(2.0, dtype=torch.float64))
    with pytest.raises(ValueError):
        guided_loss(lc, lu, adv, normalizer=0.0)


def test_guided_loss_all_padding_is_zero_with_grad_path():
    lc, lu = _t([2.0, 4.0]), _t([1.0, 3.0])
    res = guided_loss(lc, lu, torch.ones(2, dtype=torch.float64), weight=torch.zeros(2, dtype=torch.float64))
    assert res.loss.item() == 0.0 and res.loss.requires_grad
    res.loss.backward()
    assert lc.grad.tolist() == [0.0, 0.0] and lu.grad.tolist() == [0.0, 0.0]


# ---- awr -----------------------------------------------------------------------------------


def test_awr_loss_hand_derived():
    # beta 0.5, max 3: exp(A / beta) = exp(0) = 1, exp(ln 2) = 2, exp(4) ~ 54.6 -> clipped to 3
    # loss = (1 * 1 + 2 * 2 + 3 * 3) / 3 = 14 / 3
    loss = _t([1.0, 2.0, 3.0])
    adv = torch.tensor([0.0, 0.5 * math.log(2.0), 2.0], dtype=torch.float64, requires_grad=True)
    res = awr_loss(loss, adv, beta=0.5, max_weight=3.0)
    torch.testing.assert_close(res.loss, torch.tensor(14 / 3, dtype=torch.float64))
    torch.testing.assert_close(res.mean_weight, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(res.clip_frac, torch.tensor(1 / 3, dtype=torch.float64))
    res.loss.backward()
    torch.testing.assert_close(loss.grad, torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64))
    assert adv.grad is None  # the weights are constants


def test_awr_loss_padding_and_huge_advantage():
    loss = _t([1.0, float("nan")])
    adv = torch.tensor([1e6, 1.0], dtype=torch.float64)
    res = awr_loss(
        loss, adv, beta=0.01, max_weight=20.0, weight=torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(res.loss, torch.tensor(20.0, dtype=torch.float64))
    res.loss.backward()
    assert torch.isfinite(loss.grad).all()


# ---- fpo -----------------------------------------------------------------------------------


def test_fpo_loss_hand_derived():
    # eps 0.2, M 2.
    # s0: mean(old - new) = 0.1 -> r = e^0.1 = 1.10517, A = 1: unclipped 1.10517 <= clipped -> 1.10517
    # s1: mean([0.5, 0.1]) = 0.3 -> r = e^0.3 = 1.34986, A = 2: min(2.69972, 1.2 * 2) = 2.4 (clipped, no grad)
    # s2: mean = 0.3 -> r = 1.34986, A = -1: min(-1.34986, -1.2) = -1.34986 (unclipped, pessimistic)
    # loss = -(1.10517 + 2.4 - 1.34986) / 3
    new = _t([[0.9, 0.9], [0.5, 0.5], [0.7, 0.7]])
    old = torch.tensor([[1.0, 1.0], [1.0, 0.6], [1.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    e1, e3 = math.exp(0.1), math.exp(0.3)
    res = fpo_loss(new, old, adv, clip_eps=0.2)
    torch.testing.assert_close(res.loss, torch.tensor(-(e1 + 2.4 - e3) / 3, dtype=torch.float64))
    torch.testing.assert_close(res.clip_frac, torch.tensor(1 / 3, dtype=torch.float64))
    torch.testing.assert_close(res.ratio_mean, torch.tensor((e1 + 2 * e3) / 3, dtype=torch.float64))
    res.loss.backward()
    # d(-r A / 3) / d new_bm = -A / 3 * r * (-1 / M) = A r / 6
    expected = torch.tensor([[e1 / 6] * 2, [0.0, 0.0], [-e3 / 6] * 2], dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected)


def test_fpo_on_policy_ratio_is_one():
    # at the rollout policy r = 1 and the loss is -mean(A); gradient = A / (B * M) per entry
    new = _t([[0.3, 0.7], [0.2, 0.4]])
    res = fpo_loss(new, new.detach().clone(), torch.tensor([1.0, -3.0], dtype=torch.float64), clip_eps=0.2)
    torch.testing.assert_close(res.loss, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(res.ratio_mean, torch.tensor(1.0, dtype=torch.float64))
    res.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.25, 0.25], [-0.75, -0.75]], dtype=torch.float64))


def test_fpo_padding_nan_and_all_padding():
    new = _t([[0.9, 0.9], [float("nan"), 1e9]])
    old = torch.tensor([[1.0, 1.0], [float("nan"), 0.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    res = fpo_loss(new, old, torch.tensor([1.0, 1.0], dtype=torch.float64), clip_eps=0.2, weight=w)
    torch.testing.assert_close(res.loss, torch.tensor(-math.exp(0.1), dtype=torch.float64))
    res.loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[1].tolist() == [0.0, 0.0]
    new.grad = None
    res = fpo_loss(
        new, old, torch.ones(2, dtype=torch.float64), 0.2, weight=torch.zeros(2, dtype=torch.float64)
    )
    assert res.loss.item() == 0.0 and res.loss.requires_grad
    res.loss.backward()
    assert new.grad.abs().sum().item() == 0.0


def test_fpo_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), clip_eps=0.2)
    with pytest.raises(ValueError):
        fpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), clip_eps=0.0)

"""RLOO advantages (REINFORCE leave-one-out), DESIGN section 2 step 4.

For the K rewards of one group, A_k = R_k - (sum_j R_j - R_k) / (K - 1): each rollout is compared
with the mean of the other K - 1 rollouts of the same context, which is an unbiased baseline
because it does not depend on rollout k itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from ript_ds.rl.types import Group

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def rloo(rewards: ArrayT) -> ArrayT:
    """Leave-one-out advantages along the last axis.

    rewards: [..., K] (typically [G, K]) numpy array or torch tensor; returns the same type and shape
    as a floating array. K < 2 has no leave-one-out baseline, so it is a configuration error.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 rollouts per context, got K={k}")
    if isinstance(rewards, torch.Tensor):
        r = rewards if rewards.is_floating_point() else rewards.float()
        total = r.sum(dim=-1, keepdim=True)  # [..., 1]
    else:
        r = rewards.astype(np.float32) if not np.issubdtype(rewards.dtype, np.floating) else rewards
        total = r.sum(axis=-1, keepdims=True)  # [..., 1]
    return r - (total - r) / (k - 1)


def group_advantages(groups: Sequence[Group]) -> np.ndarray:
    """RLOO advantages of groups that all have the same K; returns [G, K] float32."""
    if not groups:
        return np.zeros((0, 0), dtype=np.float32)
    ks = {g.k for g in groups}
    if len(ks) != 1:
        raise ValueError(f"all groups must have the same number of rollouts, got {sorted(ks)}")
    rewards = np.stack([g.rewards for g in groups])  # [G, K]
    return rloo(rewards).astype(np.float32)

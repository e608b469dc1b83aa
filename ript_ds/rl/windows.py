"""Episodes -> training windows (DESIGN section 2 step 5) -> model tensors (`windows_batch`).

Each stored observation (one per replanning step t) becomes one window whose targets are the
actions actually executed at env steps t .. t+H-1. Near the end of an episode fewer than H actions
were executed; the rest are zero-padded and masked out of the loss, never invented.

Zero-advantage windows: after filtering out uniform groups, RLOO with 0/1 rewards never gives a
zero advantage, so `drop_zero_advantage` only matters when unfiltered groups are passed. It is off
by default because under the `cfg` loss an A = 0 window still trains the unconditional branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ript_ds.model.pi0 import PI0Batch
from ript_ds.model.processing import Processor
from ript_ds.rl.types import Episode, Group, Window


def episode_windows(episode: Episode, advantage: float, chunk_size: int) -> list[Window]:
    """All windows of one episode; steps with no executed action after them give no window."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    action_dim = episode.actions.shape[1]
    windows = []
    for i, t in enumerate(episode.replan_steps.tolist()):
        n_valid = min(chunk_size, episode.length - t)
        if n_valid <= 0:
            continue
        actions = np.zeros((chunk_size, action_dim), dtype=np.float32)  # [H, A]
        actions[:n_valid] = episode.actions[t : t + n_valid]
        mask = np.zeros(chunk_size, dtype=bool)  # [H]
        mask[:n_valid] = True
        windows.append(
            Window(
                images=episode.images[i],  # a view: windows share the episode's image memory
                state=episode.states[i].astype(np.float32, copy=False),
                task_id=episode.context.task_id,
                actions=actions,
                action_mask=mask,
                advantage=float(advantage),
                key=(int(episode.seed), i),
            )
        )
    return windows


def groups_to_windows(
    groups: Sequence[Group],
    advantages: np.ndarray,
    chunk_size: int,
    drop_zero_advantage: bool = False,
) -> list[Window]:
    """Windows of every episode of every group; advantages is [G, K] (see advantage.group_advantages).

    Crashed episodes are skipped: their actions are not a policy outcome worth imitating or avoiding.
    """
    if advantages.shape[:1] != (len(groups),):
        raise ValueError(f"advantages {advantages.shape} do not match {len(groups)} groups")
    windows: list[Window] = []
    for g, group in enumerate(groups):
        if advantages.shape[1] != group.k:
            raise ValueError(f"group {g} has {group.k} episodes but advantages has {advantages.shape[1]}")
        for k, episode in enumerate(group.episodes):
            adv = float(advantages[g, k])
            if episode.crashed or (drop_zero_advantage and adv == 0.0):
                continue
            windows.extend(episode_windows(episode, adv, chunk_size))
    return windows


@dataclass
class WindowBatch:
    """Windows as model inputs on one device: the Processor's PI0Batch (normalized actions as targets)
    and the per-window terms of the loss."""

    batch: PI0Batch
    step_mask: Tensor  # [B, H] bool, True where the action was executed
    advantage: Tensor  # [B] float32
    weight: Tensor  # [B] float32, 0 for padding windows

    def __len__(self) -> int:
        return self.step_mask.shape[0]


def windows_batch(
    processor: Processor, windows: Sequence[Window], prompts: Mapping[int, str], device: torch.device | str
) -> WindowBatch:
    """The one path from windows to model tensors (the update and behaviour cloning): stacked, through
    Processor.batch (the rollouts' path for observations), on `device`. prompts: task id -> instruction."""
    if not windows:
        raise ValueError("windows_batch: no windows")
    batch = processor.batch(
        np.stack([w.images for w in windows]),
        np.stack([w.state for w in windows]),
        [prompts[w.task_id] for w in windows],
        np.stack([w.actions for w in windows]),
        device=device,
    )
    return WindowBatch(
        batch=batch,
        step_mask=torch.from_numpy(np.stack([w.action_mask for w in windows]).astype(bool)).to(device),
        advantage=torch.tensor([w.advantage for w in windows], dtype=torch.float32, device=device),
        weight=torch.tensor([w.weight for w in windows], dtype=torch.float32, device=device),
    )

"""The environment interface shared by LIBERO, the synthetic env and the worker pool.

An environment runs one episode at a time for one task. Observations come out already in the
model's convention (orientation, resolution, state layout), so rollout code never needs to know
which simulator produced them. Actions go in in the environment's own units (7-dim for LIBERO:
delta eef pose + gripper), already unnormalized and unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

ACTION_DIM = 7  # LIBERO's: delta eef position (3) + delta eef rotation (3) + gripper (-1 open, +1 close)


def check_action(action: np.ndarray) -> np.ndarray:
    """One env action as float64 [ACTION_DIM]; any other shape is a caller bug, reported as such."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (ACTION_DIM,):
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
    return action


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: what the policy is told and how long it may try."""

    suite: str  # e.g. "libero_spatial" or "synthetic"
    task_id: int  # index inside the suite
    name: str  # short identifier (BDDL problem name for LIBERO)
    instruction: str  # natural-language prompt given to the policy
    max_steps: int  # episode cap in env steps (settle steps excluded)
    num_init_states: int  # fixed initial states available for this task


@dataclass
class Observation:
    """What the policy sees at one step."""

    images: np.ndarray  # [N_cam, H, W, 3] uint8, model orientation and resolution (agentview first)
    state: np.ndarray  # [S] float32, the robot's proprioceptive state (8 dims for LIBERO)


@dataclass
class StepResult:
    obs: Observation
    success: bool  # the task's success predicate holds after this step
    done: bool  # success, or the step cap was reached


class Env(Protocol):
    """A single-task environment. Implementations: env.libero.LiberoEnv, env.synthetic.SyntheticEnv."""

    task: TaskSpec
    action_dim: int

    def reset(self, init_state_idx: int, seed: int) -> Observation:
        """Seed, reset to the task's fixed initial state `init_state_idx`, settle, and observe."""
        ...

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one action of shape [action_dim]."""
        ...

    def close(self) -> None: ...

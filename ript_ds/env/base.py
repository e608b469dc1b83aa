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
STATE_DIM = 8  # proprioceptive state of LIBERO (eef position, axis-angle, gripper qpos) and the synthetic env
ACTION_LOW, ACTION_HIGH = -1.0, 1.0  # the action space per dim (robosuite's OSC and gripper input range)
SIMULATOR_SEEDS = 2**32  # numpy's legacy seeding (LIBERO's env.seed) takes 0 <= seed < 2**32


def simulator_seed(seed: int) -> int:
    """Any int folded into [0, 2**32), the range simulators accept; an env applies this, so callers
    keep their own seeds (trainer seeds pass 2**32 from train.seed=430) and replay with them.

    Seeds already in range are unchanged (openpi's evaluation seed 7 stays 7). Folding is modulo
    2**32 rather than a hash: seeds less than 2**32 apart, as all of one run's are, never collide.
    """
    return int(seed) % SIMULATOR_SEEDS


def executed_action(action: np.ndarray) -> np.ndarray:
    """One env action as float64 [ACTION_DIM], clipped to the action space [ACTION_LOW, ACTION_HIGH].

    Any other shape is a caller bug, reported as such. robosuite clips LIBERO's arm command to
    [-1, 1] and uses only the gripper command's sign, so the clipped action is exactly what the
    simulator runs. Envs execute and report this one, so an episode records (and training learns)
    what was executed, not the policy's out-of-range request.
    """
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (ACTION_DIM,):
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
    return np.clip(action, ACTION_LOW, ACTION_HIGH)


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
    obs: Observation | None  # None when the step was not observed (step(..., observe=False))
    success: bool  # the task's success predicate holds after this step
    done: bool  # success, or the step cap was reached
    action: np.ndarray  # [ACTION_DIM] float64, the action executed: the input clipped (executed_action)


class Env(Protocol):
    """A single-task environment. Implementations: env.libero.LiberoEnv, env.synthetic.SyntheticEnv."""

    task: TaskSpec
    action_dim: int

    def reset(self, init_state_idx: int, seed: int) -> Observation:
        """Seed (any int, folded by simulator_seed), reset to the task's fixed initial state
        `init_state_idx`, settle, and observe."""
        ...

    def step(self, action: np.ndarray, observe: bool = True) -> StepResult:
        """Apply one action of shape [action_dim], clipped to the action space (executed_action).

        observe=False: nobody will look at this step's observation (an action inside a chunk), so
        the env may skip producing it (LIBERO then skips rendering, its main cost) and obs is None."""
        ...

    def close(self) -> None: ...

"""Typed containers that pass between rollout, sampler, advantage and update.

Shapes use T = stored observations (one per replanning step), L = env steps executed, K = rollouts
per context, H = action chunk length, A = env action dim, S = state dim, N_cam = cameras.

An episode's env steps exclude the settle no-ops that `Env.reset` performs, so `actions[i]` is the
action executed at env step i and `length == len(actions)`. Replaying an episode means
`env.reset(context.init_state_idx, seed)` and stepping `actions` in order (section 5 of DESIGN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Context:
    """A training context: a task with one of its fixed initial states."""

    task_id: int
    init_state_idx: int


@dataclass
class Episode:
    """One rollout, keeping only what training, logging and replay need."""

    context: Context
    seed: int  # applied right before this episode's own reset (LIBERO determinism, DESIGN section 5)
    images: np.ndarray  # [T, N_cam, H, W, 3] uint8, model resolution, observation at each replan step
    states: np.ndarray  # [T, S] float32, state at each replan step
    actions: np.ndarray  # [L, A] float32, every action executed, in env units
    replan_steps: np.ndarray  # [T] int64, env step index of each stored observation (0, 5, 10, ...)
    success: bool
    length: int  # env steps executed (L)
    failure_reason: str | None = None  # set when the episode did not run normally (worker crash, timeout)

    def __post_init__(self) -> None:
        t = self.images.shape[0]
        if self.images.dtype != np.uint8 or self.images.ndim != 5:
            raise ValueError(
                f"images must be uint8 [T, N_cam, H, W, 3], got {self.images.dtype} {self.images.shape}"
            )
        if self.states.shape[0] != t or self.replan_steps.shape != (t,):
            raise ValueError(
                f"images {self.images.shape}, states {self.states.shape} and replan_steps "
                f"{self.replan_steps.shape} must share their first dim"
            )
        if self.actions.ndim != 2 or self.actions.shape[0] != self.length:
            raise ValueError(f"actions must be [length={self.length}, A], got {self.actions.shape}")
        if t and (np.any(np.diff(self.replan_steps) <= 0) or self.replan_steps[0] < 0):
            raise ValueError(f"replan_steps must be increasing and >= 0, got {self.replan_steps}")
        # <= rather than <: an episode cut short (crash, timeout) may have observed a step it never executed.
        if t and self.replan_steps[-1] > self.length:
            raise ValueError(f"replan step {self.replan_steps[-1]} is past the episode length {self.length}")

    @property
    def crashed(self) -> bool:
        """True when the episode is not a genuine policy outcome and must not be learned from."""
        return self.failure_reason is not None

    @property
    def reward(self) -> float:
        return 1.0 if self.success else 0.0


@dataclass(frozen=True)
class GroupOutcome:
    """The small, picklable summary of a group that ranks all-gather to update the sampler."""

    context: Context
    successes: tuple[bool, ...]  # [K]
    crashed: tuple[bool, ...]  # [K] True where the episode has a failure_reason
    env_steps: int  # sum of the K episode lengths

    @property
    def any_crashed(self) -> bool:
        return any(self.crashed)


@dataclass
class Group:
    """K rollouts of one context; the unit of filtering and of RLOO."""

    context: Context
    episodes: list[Episode]  # [K]

    def __post_init__(self) -> None:
        for ep in self.episodes:
            if ep.context != self.context:
                raise ValueError(f"episode context {ep.context} differs from group context {self.context}")

    @property
    def k(self) -> int:
        return len(self.episodes)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([ep.reward for ep in self.episodes], dtype=np.float32)  # [K]

    @property
    def env_steps(self) -> int:
        return sum(ep.length for ep in self.episodes)

    def outcome(self) -> GroupOutcome:
        return GroupOutcome(
            context=self.context,
            successes=tuple(ep.success for ep in self.episodes),
            crashed=tuple(ep.crashed for ep in self.episodes),
            env_steps=self.env_steps,
        )


@dataclass
class Window:
    """One training sample: the observation at a replanning step and the actions executed from it.

    The prompt is not stored: it is the instruction of task `task_id`, resolved by the caller.
    """

    images: np.ndarray  # [N_cam, H_img, W_img, 3] uint8
    state: np.ndarray  # [S] float32
    task_id: int
    actions: np.ndarray  # [H, A] float32, executed actions, zero past the episode end
    action_mask: np.ndarray  # [H] bool, True where the action was really executed
    advantage: float
    weight: float = 1.0  # 0 for padding samples that only equalize micro-step counts across ranks
    # (episode seed, index in the episode): names the window the same way on any rank layout, so the
    # update's plan and its (noise, time) draws do not depend on which rank rolled it out
    key: tuple[int, int] | None = None

    def as_padding(self) -> Window:
        """A copy that contributes nothing to the loss but has valid shapes."""
        return Window(
            images=self.images,
            state=self.state,
            task_id=self.task_id,
            actions=self.actions,
            action_mask=self.action_mask,
            advantage=0.0,
            weight=0.0,
            key=None,
        )

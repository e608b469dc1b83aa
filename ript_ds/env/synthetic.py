"""A tiny 2-D reaching world that implements the Env protocol in pure numpy.

It stands in for LIBERO wherever a test, the demo or a CPU learning check needs thousands of env
steps per second: an agent point and three coloured targets (red, green, blue) in the unit square;
the instruction names one target and the episode succeeds when the agent is within `radius` of it.
Like LIBERO, every task has fixed initial states (generated from the task id) and an episode is
exactly replayable from (init state, reset seed, actions).

Action: 7 dims like LIBERO, clipped to [-1, 1] like LIBERO's (the step reports the clipped one); dims
0-1 are a velocity in units of `max_step`, the other dims are ignored. State: float32 [8] = agent xy, then the red, green and blue targets' xy.
Images: [2, S, S, 3] uint8 = a top view of the whole square and a "wrist" view centred on the agent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ript_ds.env.base import ACTION_DIM, Observation, StepResult, TaskSpec, executed_action, simulator_seed

SUITE = "synthetic"
STATE_DIM = 8
COLORS = ("red", "green", "blue")
RGB = np.array([[230, 40, 40], [40, 200, 40], [50, 80, 240]], dtype=np.uint8)  # [3 targets, 3]
AGENT_RGB = np.array([250, 250, 250], dtype=np.uint8)
FLOOR_RGB = np.array([70, 70, 70], dtype=np.uint8)
OUTSIDE_RGB = np.array([15, 15, 15], dtype=np.uint8)  # beyond the unit square (wrist view only)
PHRASINGS = ("move to the {} target", "reach the {} square", "go to the {} one")
MIN_TARGET_GAP = 0.25  # targets further apart than this, so a wrong target is a clear failure
MIN_START_DIST = 0.3  # agent starts at least this far from every target: no free successes
BASE_RADIUS = 0.08


def target_index(task: TaskSpec) -> int:
    """Which target (0 red, 1 green, 2 blue) the task names."""
    if task.suite != SUITE:
        raise ValueError(f"not a synthetic task: suite {task.suite!r}")
    return task.task_id % len(COLORS)


def synthetic_tasks(n_tasks: int = 3, num_init_states: int = 50, max_steps: int = 40) -> list[TaskSpec]:
    """Tasks cycle through the colours first, then through the phrasings (task 3 = red, 2nd phrasing)."""
    if not 1 <= n_tasks <= len(COLORS) * len(PHRASINGS):
        raise ValueError(f"n_tasks must be in [1, {len(COLORS) * len(PHRASINGS)}], got {n_tasks}")
    tasks = []
    for i in range(n_tasks):
        color, phrasing = COLORS[i % len(COLORS)], i // len(COLORS)
        tasks.append(
            TaskSpec(
                suite=SUITE,
                task_id=i,
                name=f"reach_{color}_{phrasing}",
                instruction=PHRASINGS[phrasing].format(color),
                max_steps=max_steps,
                num_init_states=num_init_states,
            )
        )
    return tasks


def init_states(task: TaskSpec) -> np.ndarray:
    """The task's fixed initial states [num_init_states, 8], a pure function of the task id."""
    rng = np.random.default_rng([20240, task.task_id])
    out = np.empty((task.num_init_states, STATE_DIM), dtype=np.float32)
    for i in range(task.num_init_states):
        while True:  # rejection sampling; accepts within a few tries at these gaps
            pts = rng.uniform(0.05, 0.95, size=(4, 2))
            gaps = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
            if (
                gaps[1:, 1:][np.triu_indices(3, 1)].min() > MIN_TARGET_GAP
                and gaps[0, 1:].min() > MIN_START_DIST
            ):
                break
        out[i] = pts.reshape(-1)
    return out


@dataclass(frozen=True)
class Difficulty:
    """What `difficulty` in [0, 1] does: a smaller success radius and noisier actuation."""

    radius: float
    action_noise: float  # std of Gaussian noise added to each step's displacement, in world units

    @classmethod
    def from_level(cls, level: float, max_step: float) -> Difficulty:
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {level}")
        return cls(radius=BASE_RADIUS * (1.0 - 0.6 * level), action_noise=0.5 * max_step * level)


class SyntheticEnv:
    """One synthetic reaching task; see the module docstring.

    `hang_seed` is fault injection for the env pool's tests: reset(.., seed=hang_seed) sleeps for
    `hang_s` seconds, like a simulator that locks up.
    """

    action_dim: int = ACTION_DIM

    def __init__(
        self,
        task: TaskSpec,
        image_size: int = 32,
        difficulty: float = 0.0,
        max_step: float = 0.05,  # world units moved by a full-scale action (|a| = 1)
        wrist_fov: float = 0.5,  # side of the square the wrist view shows, in world units
        hang_seed: int | None = None,
        hang_s: float = 3600.0,
    ) -> None:
        self.task = task
        self._target = target_index(task)
        self.image_size = image_size
        self.max_step = max_step
        self.wrist_fov = wrist_fov
        self.difficulty = Difficulty.from_level(difficulty, max_step)
        self.hang_seed, self.hang_s = hang_seed, hang_s
        self._init_states = init_states(task)
        self._marker = max(1, image_size // 16)  # half-size of a drawn square, in pixels
        self._pos = np.zeros(2)
        self._targets = np.zeros((3, 2))
        self._rng = np.random.default_rng(0)
        self._steps = 0
        self._done = True  # no episode yet: step() before reset() is an error

    @property
    def radius(self) -> float:
        return self.difficulty.radius

    def reset(self, init_state_idx: int, seed: int) -> Observation:
        if not 0 <= init_state_idx < len(self._init_states):
            raise IndexError(f"init_state_idx {init_state_idx} outside [0, {len(self._init_states)})")
        if self.hang_seed is not None and seed == self.hang_seed:
            time.sleep(self.hang_s)
        state = self._init_states[init_state_idx].astype(np.float64)
        self._pos, self._targets = state[:2].copy(), state[2:].reshape(3, 2).copy()
        # The action noise is the only randomness; one generator per episode makes it replayable.
        self._rng = np.random.default_rng(simulator_seed(seed))
        self._steps, self._done = 0, False
        return self._observe()

    def step(self, action: np.ndarray, observe: bool = True) -> StepResult:
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset() first")
        action = executed_action(action)
        delta = action[:2] * self.max_step
        if self.difficulty.action_noise > 0:
            delta = delta + self._rng.normal(0.0, self.difficulty.action_noise, size=2)
        self._pos = np.clip(self._pos + delta, 0.0, 1.0)
        self._steps += 1
        success = bool(np.linalg.norm(self._pos - self._targets[self._target]) < self.radius)
        self._done = success or self._steps >= self.task.max_steps
        obs = self._observe() if observe else None
        return StepResult(obs=obs, success=success, done=self._done, action=action)

    def close(self) -> None:
        self._done = True

    def _observe(self) -> Observation:
        s = self.image_size
        images = np.empty((2, s, s, 3), dtype=np.uint8)
        self._draw(images[0], origin=np.zeros(2), scale=float(s))
        self._draw(images[1], origin=self._pos - self.wrist_fov / 2, scale=s / self.wrist_fov)
        state = np.concatenate([self._pos, self._targets.reshape(-1)]).astype(np.float32)
        return Observation(images=images, state=state)

    def _draw(self, img: np.ndarray, origin: np.ndarray, scale: float) -> None:
        """Render the world window [origin, origin + S/scale]^2 into img [S, S, 3], y pointing down."""
        s = img.shape[0]
        lo = np.clip(np.floor(-origin * scale).astype(int), 0, s)  # the unit square's pixel bounds
        hi = np.clip(np.ceil((1.0 - origin) * scale).astype(int), 0, s)
        img[:] = OUTSIDE_RGB
        img[lo[1] : hi[1], lo[0] : hi[0]] = FLOOR_RGB
        for rgb, xy in zip((*RGB, AGENT_RGB), (*self._targets, self._pos), strict=True):
            cx, cy = ((xy - origin) * scale).astype(int)
            m = self._marker
            x0, x1, y0, y1 = max(cx - m, 0), min(cx + m + 1, s), max(cy - m, 0), min(cy + m + 1, s)
            if x0 < x1 and y0 < y1:
                img[y0:y1, x0:x1] = rgb


def expert_action(state: np.ndarray, task: TaskSpec, max_step: float = 0.05) -> np.ndarray:
    """The perfect expert: the action [7] that moves straight to the task's named target."""
    return toward_target(state, target_index(task), max_step)


def toward_target(state: np.ndarray, target: int, max_step: float = 0.05) -> np.ndarray:
    """The action [7] that moves straight to target `target` (0 red, 1 green, 2 blue) from `state`."""
    state = np.asarray(state, dtype=np.float64)
    goal = state[2 + 2 * target : 4 + 2 * target]
    velocity = (goal - state[:2]) / max_step
    action = np.zeros(ACTION_DIM, dtype=np.float32)
    action[:2] = velocity / max(1.0, np.abs(velocity).max())  # scaled, not clipped: a straight line
    return action


def expert_chunk(state: np.ndarray, task: TaskSpec, horizon: int, max_step: float = 0.05) -> np.ndarray:
    """A chunk [horizon, 7] of expert actions, planned open loop on the noise-free dynamics."""
    return _plan(state, target_index(task), horizon, max_step)


def _plan(state: np.ndarray, target: int, horizon: int, max_step: float) -> np.ndarray:
    state = np.asarray(state, dtype=np.float64).copy()
    chunk = np.empty((horizon, ACTION_DIM), dtype=np.float32)
    for i in range(horizon):
        chunk[i] = toward_target(state, target, max_step)
        state[:2] = np.clip(state[:2] + chunk[i, :2] * max_step, 0.0, 1.0)
    return chunk


class ScriptedExpert:
    """A demonstrator for behaviour cloning, deliberately imperfect.

    Per episode, with probability `imperfection` it heads for a wrong target for the whole episode
    (a clean, learnable failure mode: the cloned policy then succeeds about 1 - imperfection of the
    time); `noise` adds Gaussian jitter to every action. Seeded so demonstrations are reproducible.
    """

    def __init__(self, imperfection: float = 0.0, noise: float = 0.0, seed: int = 0, max_step: float = 0.05):
        if not 0.0 <= imperfection <= 1.0:
            raise ValueError(f"imperfection must be in [0, 1], got {imperfection}")
        self.imperfection, self.noise, self.max_step = imperfection, noise, max_step
        self._rng = np.random.default_rng(seed)
        self._goal: int | None = None

    def reset(self, task: TaskSpec) -> None:
        """Choose this episode's goal: the named target, or with probability imperfection another."""
        goal = target_index(task)
        if self._rng.random() < self.imperfection:
            goal = (goal + int(self._rng.integers(1, len(COLORS)))) % len(COLORS)
        self._goal = goal

    def __call__(self, state: np.ndarray) -> np.ndarray:
        if self._goal is None:
            raise RuntimeError("call reset(task) at the start of every episode")
        action = toward_target(state, self._goal, self.max_step)
        if self.noise > 0:
            action[:2] += self._rng.normal(0.0, self.noise, size=2).astype(np.float32)
        return action

    def chunk(self, state: np.ndarray, horizon: int) -> np.ndarray:
        """A chunk [horizon, 7] toward this episode's goal (open loop, noise on every action)."""
        if self._goal is None:
            raise RuntimeError("call reset(task) at the start of every episode")
        chunk = _plan(state, self._goal, horizon, self.max_step)
        if self.noise > 0:
            chunk[:, :2] += self._rng.normal(0.0, self.noise, size=(horizon, 2)).astype(np.float32)
        return chunk

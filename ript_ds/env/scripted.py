"""A scripted demonstrator for LIBERO-Goal task 8, "put the bowl on the plate".

It reads privileged poses from the MuJoCo sim (bowl and plate body positions, the eef site) and
emits one 7-dim OSC_POSE delta action per env step, like a policy would: dims 0-2 move the eef
(1.0 = 0.05 m of goal offset, ~1.1 cm of actual motion per step), 3-5 hold it pointing straight
down with the fingers along world y, dim 6 is the gripper (-1 open, +1 close).

Phases, each a proportional move to a waypoint recomputed from the current poses every step:
hover above the bowl's +y rim, descend until the fingers straddle the rim wall, close, lift, carry
until the bowl's centre is above the plate's, lower, open. Leaving a phase depends on the measured
eef / gripper state, not on a clock, so what the demo does next is visible in the images + state.

`noise` makes demos imperfect: a per-episode offset of the grasp point and of the place point
(std 8 mm / 20 mm per unit noise) plus smooth AR(1) gaussian noise on the arm action dims. All of
it comes from one generator seeded with (seed, episode), so a demo replays exactly.

Measured over the 50 fixed init states, one blind episode each (`make bench-libero`, its table in
docs/benchmarks.md "RIPT on real LIBERO"; seeds libero_bc.demonstrator_success): noise 0: 50/50
successful, 67 steps on average; noise 1: 25/50, successes in 72 steps on average, every failure
ran to the 150-step cap (the bowl slipped or was set down beside the plate, and retries took too long).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import numpy as np

from ript_ds.env.base import ACTION_DIM, TaskSpec

if TYPE_CHECKING:
    from ript_ds.env.libero import LiberoEnv

SUPPORTED_TASKS: tuple[tuple[str, int], ...] = (("libero_goal", 8),)

POS_SCALE = 0.05  # m of goal offset per unit action (robosuite OSC_POSE output_max)
ROT_SCALE = 0.5  # rad per unit action
OPEN, CLOSE = -1.0, 1.0

# Eef orientation held throughout: z axis straight down, fingers opening along world y (the
# columns are the eef x, y, z axes in world coordinates; LIBERO's robot starts close to this).
DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])

# Geometry of the akita black bowl (body origin = centre of its bottom), measured from its mesh.
RIM_RADIUS = 0.052  # m from the centre to the rim wall, where the fingers straddle it
RIM_HEIGHT = 0.053  # rim top above the bowl's bottom
GRASP_DEPTH = 0.025  # how far below the rim top the eef site goes before closing
HOVER = 0.06  # approach height above the grasp point
CARRY_Z = 1.06  # eef height while carrying: bowl bottom well above the plate's rim
LIFTED = 0.03  # bowl this far above where it rested counts as held; less after LIFT = a miss
DROP = 0.02  # bowl bottom height above the plate's body origin when releasing

GAIN = 1.0 / 0.02  # action per metre of error: full speed beyond 2 cm from the waypoint
MAX_SPEED = 1.0  # cap on the norm of the position action, keeps paths straight
ROT_GAIN = 2.0  # action per radian of orientation error
GRASP_STEPS = 8  # steps with the gripper closing before lifting (the fingers take ~6 to close)
RELEASE_STEPS = 10  # steps to wait after opening before retreating


class Phase(enum.Enum):
    HOVER = 0
    DESCEND = 1
    GRASP = 2
    LIFT = 3
    CARRY = 4
    LOWER = 5
    RELEASE = 6
    RETREAT = 7


def rotation_log(rot: np.ndarray) -> np.ndarray:
    """Axis-angle (axis * angle) of a rotation matrix; our errors stay far from pi."""
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    skew = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    if angle < 1e-6:
        return skew / 2.0
    return skew * angle / (2.0 * np.sin(angle))


class ScriptedDemonstrator:
    """Privileged-state controller for one supported task; `act` gives one env action per step."""

    def __init__(self, task: TaskSpec, noise: float = 0.0, seed: int = 0) -> None:
        if (task.suite, task.task_id) not in SUPPORTED_TASKS:
            raise ValueError(
                f"ScriptedDemonstrator supports only {SUPPORTED_TASKS}; got ({task.suite!r}, {task.task_id})"
            )
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.task = task
        self.noise = float(noise)
        self.seed = int(seed)
        self.episode = -1  # reset() advances it; the noise of episode k depends on (seed, k) only
        self.phase = Phase.HOVER
        self._phase_steps = 0
        self._rng = np.random.default_rng()
        self._ar = np.zeros(6)
        self._grasp_offset = np.zeros(3)
        self._place_offset = np.zeros(3)
        self._table_z = 0.0
        self._lift_xy = np.zeros(2)
        self._release_at = np.zeros(3)

    # ---------------------------------------------------------------- privileged reads
    @staticmethod
    def _sim(env: LiberoEnv) -> tuple[Any, Any]:
        robosuite_env = env.libero_env.env
        return robosuite_env, robosuite_env.sim

    def _body_pos(self, env: LiberoEnv, name: str) -> np.ndarray:
        rs, sim = self._sim(env)
        return sim.data.body_xpos[rs.obj_body_id[name]].copy()

    def _eef(self, env: LiberoEnv) -> tuple[np.ndarray, np.ndarray]:
        rs, sim = self._sim(env)
        site = rs.robots[0].eef_site_id
        return sim.data.site_xpos[site].copy(), sim.data.site_xmat[site].reshape(3, 3).copy()

    # ---------------------------------------------------------------- episode
    def reset(self, env: LiberoEnv, episode: int | None = None) -> None:
        """Start an episode after env.reset: draw this episode's noise; `episode` defaults to the
        count of resets so far, pass it to replay a particular demo."""
        self.episode = self.episode + 1 if episode is None else int(episode)
        self._rng = np.random.default_rng([self.seed, self.episode])
        self.phase = Phase.HOVER
        self._phase_steps = 0
        self._ar = np.zeros(6)
        self._table_z = float(self._body_pos(env, "akita_black_bowl_1")[2])  # bowl resting on the table
        # Per-episode target errors: the main source of near-misses (grasping the rim off-centre,
        # setting the bowl down beside the plate's centre; success needs < 3 cm).
        self._grasp_offset = self._rng.normal(0.0, 1.0, 3) * self.noise * np.array([0.008, 0.008, 0.006])
        self._place_offset = self._rng.normal(0.0, 1.0, 3) * self.noise * np.array([0.02, 0.02, 0.0])

    def _advance(self, phase: Phase) -> None:
        self.phase = phase
        self._phase_steps = 0

    def act(self, env: LiberoEnv) -> np.ndarray:
        """The action for the env's current state (float64 [7]); call once per env.step."""
        eef, rot = self._eef(env)
        bowl = self._body_pos(env, "akita_black_bowl_1")
        plate = self._body_pos(env, "plate_1")
        grasp = bowl + np.array([0.0, RIM_RADIUS, RIM_HEIGHT - GRASP_DEPTH]) + self._grasp_offset
        # Once held, the eef-to-bowl offset is whatever the grasp produced: carry the bowl, not the eef.
        held = eef - bowl
        lifted = bowl[2] > self._table_z + LIFTED
        place = plate + self._place_offset + np.array([0.0, 0.0, DROP]) + held
        self._phase_steps += 1
        gripper = OPEN
        ph = self.phase
        if ph is Phase.HOVER:
            target = grasp + np.array([0.0, 0.0, HOVER])
            if np.linalg.norm((target - eef)[:2]) < 0.01 and abs(target[2] - eef[2]) < 0.02:
                self._advance(Phase.DESCEND)
        if self.phase is Phase.DESCEND:
            target = grasp
            if np.linalg.norm(target - eef) < 0.008:
                self._advance(Phase.GRASP)
        if self.phase is Phase.GRASP:
            target, gripper = grasp, CLOSE
            if self._phase_steps > GRASP_STEPS:
                self._lift_xy = eef[:2].copy()
                self._advance(Phase.LIFT)
        if self.phase is Phase.LIFT:
            target, gripper = np.array([*self._lift_xy, CARRY_Z]), CLOSE
            if eef[2] > CARRY_Z - 0.04:
                self._advance(Phase.CARRY if lifted else Phase.HOVER)  # missed: open, try again
        if self.phase is Phase.CARRY:
            target, gripper = np.array([place[0], place[1], CARRY_Z]), CLOSE
            if not lifted:  # slipped out: chasing `place` would drag the eef away with it
                self._advance(Phase.HOVER)
                target, gripper = grasp + np.array([0.0, 0.0, HOVER]), OPEN
            elif np.linalg.norm((target - eef)[:2]) < 0.01:
                self._advance(Phase.LOWER)
        if self.phase is Phase.LOWER:
            target, gripper = place, CLOSE
            if np.linalg.norm(target - eef) < 0.008:
                self._release_at = eef.copy()
                self._advance(Phase.RELEASE)
        if self.phase is Phase.RELEASE:
            target, gripper = self._release_at, OPEN
            if self._phase_steps > RELEASE_STEPS:
                self._advance(Phase.RETREAT)
        if self.phase is Phase.RETREAT:
            target = self._release_at + np.array([0.0, 0.0, 0.1])

        action = np.zeros(ACTION_DIM)
        move = GAIN * (target - eef)
        speed = np.linalg.norm(move)
        action[:3] = move if speed <= MAX_SPEED else move * (MAX_SPEED / speed)
        # OSC applies the rotation delta in the world frame: goal = R(delta) @ current.
        action[3:6] = np.clip(ROT_GAIN * rotation_log(DOWN @ rot.T), -1.0, 1.0)
        action[6] = gripper
        if self.noise > 0:
            # AR(1): correlated over ~5 steps, so noise shows as wobbles and drifts, not jitter.
            self._ar = 0.8 * self._ar + 0.6 * self._rng.normal(0.0, 1.0, 6)
            action[:6] += self.noise * self._ar * np.array([0.15, 0.15, 0.15, 0.05, 0.05, 0.05])
        return np.clip(action, -1.0, 1.0)

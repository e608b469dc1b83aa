"""Behaviour-cloning warm start on the synthetic env, and the one shared synthetic set-up.

The CPU learning check (DESIGN: RIPT must raise success) needs a starting policy that is decent but
not perfect: a tiny PI0 is cloned from ScriptedExpert demos in which a fraction `imperfection` of
the episodes head for a wrong target for the whole episode, and the wrong-target behaviour is what
RL must learn to drop. The clone succeeds less often than its demos' target choice alone would
suggest: a Markov policy re-decides the target at every replanning step, so many episodes mix
targets and stall in between.

Why one task, 3 demos per state, and RL contexts beyond the BC states (measured, 2026-11-25, see
docs/benchmarks.md "RIPT learning check"): with three tasks (one per colour) and one demo per
init state, the clone memorised each training state's demo and barely read the instruction (at
held-out states its first chunks pointed at the named target no more often than at the others),
so RL repaired the training contexts it rolled out (0.36 -> 0.51) while held-out success did not
move; sharpening "which target" there means learning to read the prompt from a few hundred
successful episodes. With one task the right target is a global preference that RL sharpens for
every state at once, and 3 demos per BC state (different seeds, so different goals) make the
clone learn the mixture instead of one goal per state. Held-out init states are the last
`heldout_init_states`; RL trains on every other state, most of which BC never saw.

`SyntheticSetup` holds every number (arch, env, tokenizer, norm stats, sampling) so the trainer,
tests, the demo and the benchmark share one definition; `build_synthetic_setup` makes the objects.

BC trains the unconditioned branch only (cond=None): the condition embedding stays at its zero
init, so after BC both CFG branches are the same network, exactly like a pretrained PI0 at step 0.

Evaluation runs the synthetic envs in-process (env/inline.py) through rollout.collect.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript_ds.bc import behaviour_clone
from ript_ds.env.base import ACTION_DIM, TaskSpec
from ript_ds.env.inline import InlinePool
from ript_ds.env.pool import EnvFactory
from ript_ds.env.synthetic import STATE_DIM, ScriptedExpert, SyntheticEnv, synthetic_tasks
from ript_ds.eval.runner import context_requests, run_episodes
from ript_ds.model.arch import PI0Arch, reduced_pi0_arch
from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.rollout import RolloutRequest, RolloutResult, collect, make_pi0_policy_fn
from ript_ds.rl.types import Context, Episode

logger = logging.getLogger(__name__)

IDLE_ACTION = 1e-4  # an expert action below this (velocity units) means "arrived, standing still"


@dataclass(frozen=True)
class SyntheticSetup:
    """Every setting of the synthetic learning check, chosen so BC + RL run in minutes on 2 CPU cores."""

    # env
    n_tasks: int = 1  # one target colour named by the instruction (see the module docstring)
    num_init_states: int = 1000  # per task: BC demos, RL training contexts and held-out states
    heldout_init_states: int = 200  # the last ones, never trained on: eval/success_rate (std ~0.035)
    bc_init_states: int = 300  # BC demos start from init states [0, bc_init_states)
    bc_demos_per_state: int = 3  # demos per BC init state (different seeds, so different goals)
    max_steps: int = 40  # env steps per episode
    difficulty: float = 0.0  # synthetic env difficulty (success radius, actuation noise)
    image_size: int = 32
    # policy
    chunk_size: int = 10  # H
    replan_every: int = 5  # actions executed per chunk
    num_inference_steps: int = 4  # denoising steps per chunk when sampling
    vlm_width: int = 64
    expert_width: int = 64
    depth: int = 2
    vision_width: int = 32
    patch_size: int = 16  # 2 x 2 tokens per 32 px camera: the state carries the geometry
    tokenizer_vocab: int = 64
    max_prompt_tokens: int = 12
    state_mean: float = 0.5  # state normalization: positions in [0, 1] -> about [-1.7, 1.7]
    state_std: float = 0.3
    extra_env_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. max_step
    # behaviour-cloning warm start (measured: see tests/test_synthetic_bc.py and the module docstring)
    expert_imperfection: float = 0.65  # share of demos that head for a wrong target
    bc_steps: int = 1000  # ~30 s on one CPU thread
    bc_micro_batch: int = 32
    bc_lr: float = 3e-3

    def arch(self) -> PI0Arch:
        return reduced_pi0_arch(
            vlm_width=self.vlm_width,
            expert_width=self.expert_width,
            depth=self.depth,
            head_dim=16,
            vision_width=self.vision_width,
            patch_size=self.patch_size,
            image_size=self.image_size,
            vocab_size=self.tokenizer_vocab,
            chunk_size=self.chunk_size,
            state_dim=STATE_DIM,
            action_dim=ACTION_DIM,
            num_inference_steps=self.num_inference_steps,
        )

    def tasks(self) -> list[TaskSpec]:
        return synthetic_tasks(self.n_tasks, self.num_init_states, self.max_steps)

    def env_kwargs(self) -> dict[str, Any]:
        """SyntheticEnv keyword arguments (also EnvFactory("synthetic", setup.env_kwargs()))."""
        return {"image_size": self.image_size, "difficulty": self.difficulty, **self.extra_env_kwargs}

    def norm_stats(self) -> NormStats:
        # Expert actions already lie in [-1, 1]; dims 2-6 are always 0, so identity suits them.
        return NormStats(
            state=FeatureStats(
                mean=np.full(STATE_DIM, self.state_mean), std=np.full(STATE_DIM, self.state_std)
            ),
            actions=FeatureStats(mean=np.zeros(ACTION_DIM), std=np.ones(ACTION_DIM)),
        )

    @property
    def bc_states(self) -> list[int]:
        return list(range(self.bc_init_states))

    @property
    def heldout_states(self) -> list[int]:
        return list(range(self.num_init_states - self.heldout_init_states, self.num_init_states))


def build_synthetic_setup(
    seed: int, setup: SyntheticSetup | None = None, tokenizer_dir: str | Path | None = None
) -> tuple[PI0Policy, Processor, list[TaskSpec]]:
    """A freshly initialised tiny PI0 (seeded), its processor (tiny tokenizer, fixed norm stats), the tasks.

    tokenizer_dir: where the tokenizer.model is written to stay (a checkpoint directory, so whoever
    loads the checkpoint finds the tokenizer it was trained with); default a temporary directory."""
    setup = setup or SyntheticSetup()
    tasks = setup.tasks()
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer reads its model file once, at load
        texts = [t.instruction for t in tasks]
        path = build_tiny_tokenizer(tokenizer_dir or tmp, texts, vocab_size=setup.tokenizer_vocab)
        tokenizer = PromptTokenizer(path, max_length=setup.max_prompt_tokens)
    if tokenizer.vocab_size > setup.tokenizer_vocab:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces > arch vocab {setup.tokenizer_vocab}")
    torch.manual_seed(seed)
    policy = PI0Policy(setup.arch())
    processor = Processor(
        tokenizer=tokenizer,
        norm_stats=setup.norm_stats(),
        action_dim=ACTION_DIM,
        max_state_dim=STATE_DIM,
        max_action_dim=ACTION_DIM,
    )
    return policy, processor, tasks


# ---------------------------------------------------------------------------- demonstrations
def collect_demos(
    tasks: Sequence[TaskSpec],
    expert_imperfection: float,
    episodes_per_task: int,
    seed: int,
    init_states: Sequence[int] | None = None,
    replan_every: int = 5,
    env_kwargs: dict[str, Any] | None = None,
    expert_noise: float = 0.0,
    stop_at_goal: bool = True,
) -> list[Episode]:
    """ScriptedExpert episodes in the rollout Episode format (observation per replan step, all actions).

    Episode i of a task starts from init state init_states[i % len(init_states)] (default: all of
    the task's states) with reset seed `seed * 100_003 + task_id * 10_007 + i`. At each replanning
    step the expert plans an open-loop chunk of `replan_every` actions, as the policy would.
    With `stop_at_goal` a wrong-target demo ends (unsuccessfully) once the expert stands at its goal.
    """
    env_kwargs = env_kwargs or {}
    expert = ScriptedExpert(imperfection=expert_imperfection, noise=expert_noise, seed=seed)
    demos = []
    for task in tasks:
        env = SyntheticEnv(task, **env_kwargs)
        starts = list(init_states) if init_states is not None else list(range(task.num_init_states))
        for i in range(episodes_per_task):
            context = Context(task.task_id, starts[i % len(starts)])
            ep_seed = seed * 100_003 + task.task_id * 10_007 + i
            demos.append(_expert_episode(env, expert, task, context, ep_seed, replan_every, stop_at_goal))
        env.close()
    return demos


def _at_any_target(state: np.ndarray, radius: float) -> bool:
    targets = state[2:].reshape(-1, 2)  # [3, 2]
    return bool((np.linalg.norm(targets - state[:2], axis=1) < radius).any())


def _expert_episode(
    env: SyntheticEnv,
    expert: ScriptedExpert,
    task: TaskSpec,
    context: Context,
    seed: int,
    replan: int,
    stop_at_goal: bool,
) -> Episode:
    obs = env.reset(context.init_state_idx, seed)
    expert.reset(task)
    images, states, actions, replan_steps = [], [], [], []
    success, done = False, False
    while not done:
        images.append(obs.images)
        states.append(obs.state)
        replan_steps.append(len(actions))
        for action in expert.chunk(obs.state, replan):
            # The demonstrator ends its recording once it stands still at its goal, right or wrong
            # (as a human would); otherwise a wrong-target demo idles there to max_steps and its zero
            # actions swamp the data (a success gives ~2 windows, an idling failure ~8). The expert's
            # open-loop plan lands exactly on its goal, then plans zeros; with expert noise it never
            # stands still and demos run to max_steps as before.
            if (
                stop_at_goal
                and np.abs(action[:2]).max() < IDLE_ACTION
                and _at_any_target(obs.state, env.radius)
            ):
                done = True
                break
            result = env.step(action)
            actions.append(action)
            obs, success, done = result.obs, result.success, result.done
            if done:
                break
    if replan_steps[-1] == len(actions):  # stopped before acting on the last observation: drop it
        del images[-1], states[-1], replan_steps[-1]
    return Episode(
        context=context,
        seed=seed,
        images=np.stack(images),
        states=np.stack(states).astype(np.float32),
        actions=np.array(actions, dtype=np.float32),
        replan_steps=np.array(replan_steps, dtype=np.int64),
        success=success,
        length=len(actions),
    )


def warm_start(
    seed: int, setup: SyntheticSetup | None = None, tokenizer_dir: str | Path | None = None
) -> tuple[PI0Policy, Processor, list[TaskSpec], list[float]]:
    """build_synthetic_setup + demos (setup.expert_imperfection, one per training init state) + BC."""
    setup = setup or SyntheticSetup()
    policy, processor, tasks = build_synthetic_setup(seed, setup, tokenizer_dir)
    demos = collect_demos(
        tasks,
        setup.expert_imperfection,
        setup.bc_init_states * setup.bc_demos_per_state,
        seed,
        init_states=setup.bc_states,
        replan_every=setup.replan_every,
        env_kwargs=setup.env_kwargs(),
    )
    logger.info("bc: %d demos, %.2f successful", len(demos), np.mean([ep.success for ep in demos]))
    losses = behaviour_clone(
        policy, processor, demos, setup.bc_steps, setup.bc_micro_batch, setup.bc_lr, seed, tasks
    )
    return policy, processor, tasks, losses


# ---------------------------------------------------------------------------- evaluation
def rollout_inline(
    policy: PI0Policy,
    processor: Processor,
    requests: Sequence[RolloutRequest],
    num_envs: int,
    replan_every: int,
    env_kwargs: dict[str, Any] | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
) -> RolloutResult:
    """rollout.collect with the PI0 policy on `num_envs` in-process synthetic envs."""
    device = next(policy.parameters()).device
    fn = make_pi0_policy_fn(policy.eval(), processor, device=device, num_steps=num_steps, guidance=guidance)
    pool = InlinePool(EnvFactory("synthetic", env_kwargs or {}), num_envs)
    return collect(fn, pool, requests, replan_every=replan_every)


def evaluate(
    policy: PI0Policy,
    processor: Processor,
    tasks: Sequence[TaskSpec],
    init_state_indices: Sequence[int],
    seed: int,
    num_envs: int = 1,
    guidance: float | None = None,
    setup: SyntheticSetup | None = None,
) -> float:
    """Success rate of one episode per (task, init state), seeds `seed + i`, through the package's
    evaluator (eval/runner.py) on in-process envs; settings from `setup`."""
    setup = setup or SyntheticSetup()
    contexts = [Context(t.task_id, s) for t in tasks for s in init_state_indices]

    def roll_out(requests: list[RolloutRequest]) -> list[Episode]:
        settings = (setup.replan_every, setup.env_kwargs(), setup.num_inference_steps, guidance)
        return rollout_inline(policy, processor, requests, num_envs, *settings).episodes

    result = run_episodes(roll_out, context_requests(contexts, tasks, seed), "synthetic", tasks)
    logger.info(
        "eval: %d episodes, success %.3f, %.1f s", len(result.records), result.success_rate, result.seconds
    )
    return result.success_rate

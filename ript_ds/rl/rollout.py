"""Rollouts: many episodes through an EnvPool with one batched policy call per replanning step.

Lockstep (pipeline_groups=1): observe -> one policy call for every live env -> each env executes
the first `replan_every` actions of its chunk, while the driver waits. A slot whose episode ended
takes the next queued request at once; its reset goes out together with the other slots' step
commands.

Pipelined (pipeline_groups=G >= 2): the slots form G groups that take turns. The driver gathers
group g's replies, runs the policy for group g alone and sends its chunks, then turns to group
g + 1 while group g's workers step: one group's env steps overlap the policy calls of the others.
Episodes are the same as in lockstep (tests/test_pipelined_rollout.py), because of the seeding
below, up to the policy kernels' rounding for a different batch size (exact for batch-independent
policies; 1e-5 for the tiny PI0 on CPU; GPU bf16 kernels may round further apart, which a long
episode can amplify). The default (None) pipelines only where it can pay (tools/bench/pipelined_rollout.py, 2
cores: 1.63x with the policy on a core of its own, 0.95-0.98x where the driver shares the env
workers' cores): envs in worker processes (pool.runs_in_background), at least MIN_GROUP_ENVS per
group (each group adds one policy call per round), and a CPU core beyond one per env worker, so
the policy's process is not scheduled against the envs it should overlap.

Noise seeding (make_pi0_policy_fn): the flow-matching noise of an env's chunk is drawn from a torch
Generator seeded by (episode seed, task id, init state, replan index) alone, so an episode's actions
do not depend on which other envs share the batch or on the order requests are served.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ript_ds.env.base import Observation, TaskSpec
from ript_ds.env.pool import EnvPool, SlotReply
from ript_ds.model.pi0 import PI0Policy, precision
from ript_ds.model.processing import Processor
from ript_ds.rl.types import Context, Episode

logger = logging.getLogger(__name__)

PREEMPTED = "preempted"  # failure_reason of the episodes that collect(should_stop=...) cut short


@dataclass(frozen=True)
class NoiseKey:
    """Everything that identifies one policy query of one episode, for seeding its noise."""

    seed: int  # the episode's reset seed
    context: Context
    replan_index: int  # 0 for the first chunk of the episode, 1 for the next, ...


# observations [n], tasks [n], noise keys [n] -> action chunks [n, H, A] in env units
PolicyFn = Callable[[list[Observation], list[TaskSpec], list[NoiseKey]], np.ndarray]


@dataclass(frozen=True)
class RolloutRequest:
    context: Context
    task: TaskSpec
    seed: int


@dataclass
class RolloutStats:
    episodes: int
    env_steps: int
    seconds: float
    env_steps_per_s: float
    success_rate: float  # over all episodes, failed (crashed) ones counting as unsuccessful
    failures: int  # episodes with a failure_reason
    policy_calls: int


@dataclass
class RolloutResult:
    episodes: list[Episode]  # in request order
    stats: RolloutStats


@dataclass
class _Live:
    """An episode in progress on one pool slot."""

    index: int  # position in the request list
    request: RolloutRequest
    images: list[np.ndarray] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    replan_steps: list[int] = field(default_factory=list)
    obs: Observation | None = None  # latest observation, awaiting a policy call

    @property
    def length(self) -> int:
        return len(self.actions)

    def observe(self, obs: Observation) -> None:
        self.obs = obs
        self.images.append(obs.images)
        self.states.append(obs.state.astype(np.float32))
        self.replan_steps.append(self.length)

    def finish(self, success: bool, failure: str | None, action_dim: int) -> Episode:
        req = self.request
        if self.images:
            images, states = np.stack(self.images), np.stack(self.states)
        else:  # failed at its reset: nothing observed
            images, states = np.zeros((0, 0, 0, 0, 3), np.uint8), np.zeros((0, 0), np.float32)
        return Episode(
            context=req.context,
            seed=req.seed,
            images=images,
            states=states,
            actions=np.array(self.actions, dtype=np.float32).reshape(-1, action_dim),
            replan_steps=np.array(self.replan_steps, dtype=np.int64),
            success=success,
            length=self.length,
            failure_reason=failure,
        )


def collect(
    policy_fn: PolicyFn,
    pool: EnvPool,
    requests: Sequence[RolloutRequest | tuple[Context, TaskSpec, int]],
    replan_every: int = 5,
    action_dim: int = 7,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    pipeline_groups: int | None = None,
) -> RolloutResult:
    """Run every request to the end (success, step cap or failure); see the module docstring.

    on_progress(episodes finished, env steps so far) is called after every gathered group (progress bars).
    should_stop() is asked after every gathered group too: once true, no episode starts and every
    unfinished one, live or queued, ends with failure_reason PREEMPTED, so it is never learned from;
    the other groups' commands are awaited, leaving the pool idle. A preemption thus waits one round
    (replan_every env steps) for a safe point instead of the whole request list (minutes on libero_10).
    pipeline_groups: 1 = lockstep, G >= 2 = G alternating groups, None = pipeline_groups_for's default.
    """
    if replan_every < 1:
        raise ValueError(f"replan_every must be >= 1, got {replan_every}")
    reqs = [r if isinstance(r, RolloutRequest) else RolloutRequest(*r) for r in requests]
    groups = slot_groups(pool.num_workers, pipeline_groups_for(pool, pipeline_groups))
    run = _Run(pool, reqs, action_dim)
    try:
        for slot in range(pool.num_workers):
            run.start_next(slot)
        while run.busy():
            for group in groups:
                run.absorb(pool.gather(group))
                if on_progress is not None:
                    on_progress(run.finished, run.env_steps)
                if should_stop is not None and should_stop():
                    run.preempt()
                    pool.gather()  # the other groups' commands: the pool's next user finds it idle
                    return run.result()
                run.step(policy_fn, group, replan_every)
    except Exception:
        pool.gather()  # as above, so a caller that handles the error can reuse the pool
        raise
    return run.result()


MIN_GROUP_ENVS = 2  # default pipelining only with this many envs per group: one env per call wastes a batch


def pipeline_groups_for(pool: EnvPool, requested: int | None, cores: int | None = None) -> int:
    """How many slot groups collect() alternates: `requested` (checked), or with None 2 when the pool
    steps its envs in worker processes, MIN_GROUP_ENVS or more per group, and this process may use
    more `cores` than there are workers; else 1 (lockstep). Default cores: this process's CPU affinity
    shared by the ranks on the node (LOCAL_WORLD_SIZE, set by torchrun and the deepspeed launcher), whose
    env workers compete for the same cores."""
    if requested is None:
        if cores is None:
            ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            cores = len(os.sched_getaffinity(0)) // ranks_here
        background = getattr(pool, "runs_in_background", False)
        return 2 if background and 2 * MIN_GROUP_ENVS <= pool.num_workers < cores else 1
    if not 1 <= requested <= pool.num_workers:
        raise ValueError(f"pipeline_groups must be in [1, {pool.num_workers}] (the slots), got {requested}")
    return requested


def slot_groups(num_slots: int, groups: int) -> list[list[int]]:
    """Contiguous groups of near-equal size: 5 slots in 2 groups -> [[0, 1], [2, 3, 4]]."""
    return [list(range(g * num_slots // groups, (g + 1) * num_slots // groups)) for g in range(groups)]


class _Run:
    """One collect()'s bookkeeping: the episode on each slot, the queue, the finished episodes."""

    def __init__(self, pool: EnvPool, reqs: list[RolloutRequest], action_dim: int) -> None:
        self.pool, self.action_dim = pool, action_dim
        self.queue = deque(enumerate(reqs))
        self.slots: list[_Live | None] = [None] * pool.num_workers
        self.episodes: list[Episode | None] = [None] * len(reqs)
        self.start = time.perf_counter()
        self.env_steps = self.calls = self.finished = 0

    def busy(self) -> bool:
        return any(s is not None for s in self.slots)

    def start_next(self, slot: int) -> None:
        if self.queue:
            index, req = self.queue.popleft()
            self.slots[slot] = _Live(index, req)
            self.pool.send_reset(slot, req.task, req.context.init_state_idx, req.seed)

    def absorb(self, replies: dict[int, SlotReply]) -> None:
        for slot, reply in replies.items():
            live = self.slots[slot]
            self.env_steps += _apply_reply(live, reply)
            if reply.failure is not None or reply.done:
                self.episodes[live.index] = live.finish(reply.success, reply.failure, self.action_dim)
                self.slots[slot] = None
                self.finished += 1

    def step(self, policy_fn: PolicyFn, group: list[int], replan_every: int) -> None:
        """One policy call for the group's slots that observed; their chunks go out, and the group's
        free slots take the next requests (their resets travel with the chunks)."""
        waiting = [i for i in group if self.slots[i] is not None and self.slots[i].obs is not None]
        if waiting:
            self.calls += 1
            chunks = _query(policy_fn, [self.slots[i] for i in waiting], replan_every, self.action_dim)
            for i, chunk in zip(waiting, chunks, strict=True):
                self.slots[i].obs = None
                self.pool.send_step(i, chunk)
        for slot in group:
            if self.slots[slot] is None:
                self.start_next(slot)

    def preempt(self) -> None:
        unfinished = [s for s in self.slots if s is not None] + [_Live(i, r) for i, r in self.queue]
        for live in unfinished:
            self.episodes[live.index] = live.finish(False, PREEMPTED, self.action_dim)
        self.slots, self.queue = [None] * len(self.slots), deque()

    def result(self) -> RolloutResult:
        stats = _stats(self.episodes, self.env_steps, self.start, self.calls)
        return RolloutResult(episodes=list(self.episodes), stats=stats)


def _apply_reply(live: _Live, reply: SlotReply) -> int:
    """Record a reset or step reply; returns the env steps it executed."""
    if reply.executed:
        # What the env executed (clipped to its action space), not what was sent: these become the
        # training targets, and replaying them must reproduce the episode.
        live.actions.extend(reply.actions)
    if reply.failure is None and not reply.done:
        live.observe(reply.obs)
    return reply.executed


def _query(policy_fn: PolicyFn, lives: list[_Live], replan_every: int, action_dim: int) -> list[np.ndarray]:
    keys = [NoiseKey(lv.request.seed, lv.request.context, len(lv.replan_steps) - 1) for lv in lives]
    chunks = np.asarray(policy_fn([lv.obs for lv in lives], [lv.request.task for lv in lives], keys))
    if chunks.ndim != 3 or chunks.shape[0] != len(lives) or chunks.shape[2] != action_dim:
        raise ValueError(f"policy_fn returned {chunks.shape}; expected [{len(lives)}, H, {action_dim}]")
    if chunks.shape[1] < replan_every:
        raise ValueError(
            f"action chunks of {chunks.shape[1]} steps are shorter than replan_every={replan_every}"
        )
    return [c[:replan_every].astype(np.float32) for c in chunks]


def _stats(episodes: Sequence[Episode], env_steps: int, start: float, calls: int) -> RolloutStats:
    seconds = time.perf_counter() - start
    n = len(episodes)
    return RolloutStats(
        episodes=n,
        env_steps=env_steps,
        seconds=seconds,
        env_steps_per_s=env_steps / max(seconds, 1e-9),
        success_rate=sum(ep.success for ep in episodes) / n if n else 0.0,
        failures=sum(ep.crashed for ep in episodes),
        policy_calls=calls,
    )


def noise_seed(key: NoiseKey) -> int:
    """A 63-bit torch seed from a NoiseKey, well mixed so nearby seeds give unrelated noise."""
    c = key.context
    entropy = [key.seed & 0xFFFFFFFF, c.task_id, c.init_state_idx, key.replan_index]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def make_pi0_policy_fn(
    policy: PI0Policy,
    processor: Processor,
    *,
    device: torch.device | str,
    dtype: str = "float32",
    num_steps: int | None = None,
    guidance: float | None = None,
    base_seed: int = 0,
    noise_scale: float = 1.0,
) -> PolicyFn:
    """A PolicyFn that runs PI0 once per call for the whole batch; noise per env from its NoiseKey.

    `device` is where the policy's parameters live (the engine's device in training); `dtype` is the
    run's precision (model.pi0.precision), the same for training rollouts and evaluation.
    `base_seed` is added to every episode seed (one knob to vary all noise, e.g. per iteration).
    `noise_scale` multiplies the flow's initial noise: > 1 widens the sampled chunks (exploration in
    training rollouts); evaluation keeps 1, the policy's own distribution.
    """
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
    arch = policy.arch

    def policy_fn(observations: list[Observation], tasks: list[TaskSpec], keys: list[NoiseKey]) -> np.ndarray:
        images = np.stack([o.images for o in observations])
        states = np.stack([o.state for o in observations])
        batch = processor.batch(images, states, [t.instruction for t in tasks], device=device)
        noise = torch.stack(
            [
                torch.randn(
                    arch.chunk_size,
                    arch.max_action_dim,
                    generator=torch.Generator().manual_seed(
                        noise_seed(NoiseKey(k.seed + base_seed, k.context, k.replan_index))
                    ),
                )
                for k in keys
            ]
        ).to(device)  # [n, H, A_max], drawn on CPU so it is identical on every device
        if noise_scale != 1.0:
            noise = noise * noise_scale
        with torch.no_grad(), precision(device, dtype):
            actions = policy.sample_actions(batch, noise, num_steps, guidance)
        return processor.decode_actions(actions, states)  # [n, H, action_dim], env frame

    return policy_fn

"""The RIPT trainer: every rank runs the same phases in lockstep (DESIGN section 2).

    iterate() = sample contexts -> roll out K episodes each -> all-gather group outcomes -> keep
                mixed groups (refill until the target or the attempt cap) -> RLOO advantages ->
                windows -> all-gather window refs -> one global update plan (rl/update.py: the same
                optimizer steps and micro-step counts on every rank, whatever the layout) -> update ->
                globally reduced metrics

Ranks coordinate only through collectives in engine/dist.py (all_gather_object, all_reduce); the
sampler's state is a deterministic function of the gathered outcomes, so it is identical everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from ript_ds import progress
from ript_ds.build import Components, build_components
from ript_ds.ckpt.manager import CheckpointManager, TrainState, check_config, rng_state, tag_for
from ript_ds.ckpt.signals import PREEMPTED_EXIT_CODE, PreemptionFlag
from ript_ds.config import ConfigError, ExperimentCfg
from ript_ds.engine import dist
from ript_ds.engine.schedule import iteration_progress
from ript_ds.env.inline import InlinePool
from ript_ds.env.pool import EnvPool
from ript_ds.eval import runner as eval_runner
from ript_ds.eval.video import write_videos
from ript_ds.metrics import MetricsWriter
from ript_ds.model.convention import PolicyConvention
from ript_ds.model.weights import CANONICAL_ARCH
from ript_ds.rl.advantage import group_advantages
from ript_ds.rl.demos import load_demo_pool
from ript_ds.rl.rollout import RolloutRequest, collect, make_pi0_policy_fn
from ript_ds.rl.sampler import SamplingPhase, SmartSampler
from ript_ds.rl.types import Context, Episode, Group, Window
from ript_ds.rl.update import UpdateStats, plan_update, run_update, update_seed, window_refs
from ript_ds.rl.windows import episode_windows, groups_to_windows

log = logging.getLogger(__name__)

HELDOUT_EVAL_DIR = Path("eval") / "heldout"  # the periodic eval's results, <run>/eval/heldout/iter_N
SEEDS_PER_RUN = 10_000_000  # episode seeds of run seed s are s * SEEDS_PER_RUN + global episode index


def write_policy_files(run_dir: Path, comp: Components, arch) -> None:
    """policy.json, norm_stats.json and the tokenizer the run's rollouts use, beside its checkpoints: an
    export (tools/export.py) or launch/eval.py of any tag then applies exactly what training applied, also
    for a run that started from no checkpoint (there is no base to read them from). Rank 0."""
    proc = comp.processor
    state = proc.norm_stats.state
    conv = proc.convention or PolicyConvention(  # what the processor does without one, spelled out
        model_type=arch.model_type,
        norm_mode=proc.norm_stats.mode,  # the statistics' own mode: loaders normalise in the convention's
        image_slots=(),
        max_token_len=proc.tokenizer.max_length,
        state_dim=len(state.mean if state.mean is not None else state.q01),
        action_dim=proc.action_dim,
        source="run",
    )
    replace(conv, action_horizon=arch.chunk_size, replan_steps=comp.replan_every).save(run_dir)
    proc.norm_stats.save(run_dir)
    tokenizer = Path(proc.tokenizer.path)
    target = run_dir / tokenizer.name
    if not target.exists() or not target.samefile(tokenizer):
        shutil.copyfile(tokenizer, target)


class Preempted(Exception):
    """Every rank agreed to stop for a preemption signal in the middle of a sampling phase."""


@dataclass
class PhaseResult:
    """What one rank keeps from a sampling phase."""

    kept: list[Group] = field(default_factory=list)  # this rank's mixed-outcome groups
    episodes: list[Episode] = field(default_factory=list)  # every episode this rank rolled out
    successes: int = 0  # over all ranks
    episodes_total: int = 0  # over all ranks
    env_steps: int = 0  # over all ranks
    seconds: float = 0.0


class Trainer:
    """setup() -> run() -> close(); `iterate()` is one RIPT iteration."""

    def __init__(self, cfg: ExperimentCfg, ds_config: str | None = None):
        self.cfg = cfg
        self.ds_config = ds_config
        self.iteration = 0
        self.episode_cursor = 0  # global count of episodes drawn so far: the source of episode seeds

    # ------------------------------------------------------------------ set-up
    def setup(self) -> Trainer:
        cfg = self.cfg
        dist.init_distributed(cfg.train.collective_timeout_s)
        seed = cfg.train.seed + dist.rank()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.engine = self._build_engine()
        self.comp: Components = build_components(cfg, policy=self.engine.module)
        self.demos = load_demo_pool(cfg, self.engine.module.arch)  # ript.demos, kept in every update
        # The resolved value (the checkpoint's replan_steps when unset) is what config.yaml and the
        # checkpoints record and what a resume compares; unset, a resume keeps the run's own (_resume).
        self._replan_unset = cfg.rollout.replan_every is None
        cfg.rollout = replace(cfg.rollout, replan_every=self.comp.replan_every)
        self.sampler = SmartSampler(
            self.comp.tasks,
            cfg.ript.rollouts_per_context,
            cfg.train.seed,
            num_eval_init_states=cfg.env.num_eval_init_states,
            skip_solved_after=cfg.ript.skip_solved_after,
            mixed_bonus=cfg.ript.mixed_bonus,
        )
        if cfg.rollout.in_process:
            self.pool = InlinePool(self.comp.env_factory, cfg.rollout.num_envs)
        else:
            self.pool = EnvPool(
                self.comp.env_factory, cfg.rollout.num_envs, timeout_s=cfg.rollout.step_timeout_s
            )
        self._write_run_files()
        self.ckpt = CheckpointManager(
            cfg.run_dir, cfg.ckpt.keep_last, dist.rank(), dist.world_size(), dist.barrier
        )
        self.preemption = PreemptionFlag()
        resumed = self._resume()
        self.metrics = MetricsWriter(
            cfg.run_dir, dist.is_main(), self._wandb_cfg(resumed), tensorboard=cfg.log.tensorboard
        )
        if resumed is not None:
            self.metrics.truncate_after(resumed.iteration)
        return self

    def _write_run_files(self) -> None:
        """config.yaml, the arch and the policy files beside the checkpoints (rank 0)."""
        if not dist.is_main():
            return
        cfg = self.cfg
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # The trained network's sizes, so export / launch/eval.py need no guessing (a random-init run
        # has no base checkpoint to read them from).
        arch = json.dumps(self.engine.module.arch.to_dict(), indent=1)
        (cfg.run_dir / CANONICAL_ARCH).write_text(arch)
        write_policy_files(cfg.run_dir, self.comp, self.engine.module.arch)

    def _keep_resumed_replan(self, saved: dict) -> None:
        """rollout.replan_every left unset on resume means the run's own value, not a new default (a run
        saved before the default became "the checkpoint's replan_steps" recorded 5)."""
        value = (saved.get("rollout") or {}).get("replan_every")
        if not self._replan_unset or not isinstance(value, int) or value == self.comp.replan_every:
            return
        log.info("rollout.replan_every unset: keeping the resumed run's %d", value)
        self.comp.replan_every = value
        self.cfg.rollout = replace(self.cfg.rollout, replan_every=value)
        self._write_run_files()

    def _wandb_cfg(self, resumed: TrainState | None) -> dict | None:
        """wandb.init arguments; offline unless WANDB_MODE says otherwise; the run id survives resume."""
        if not self.cfg.log.wandb:
            return None
        return {
            "project": self.cfg.log.wandb_project,
            "name": self.cfg.run_name,
            "id": resumed.wandb_run_id if resumed is not None else None,
            "mode": os.environ.get("WANDB_MODE", "offline"),
            "config": self.cfg.to_dict(),
        }

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> TrainState:
        return TrainState(
            iteration=self.iteration,
            episode_cursor=self.episode_cursor,
            sampler=self.sampler.state_dict(),
            config=self.cfg.to_dict(),
            wandb_run_id=self.metrics.wandb_run_id,
        )

    def _resume(self) -> TrainState | None:
        """--resume auto|PATH|none; rank 0 decides which checkpoint, every rank loads it."""
        found = self.ckpt.resolve(self.cfg.ckpt.resume) if dist.is_main() else None
        path = dist.broadcast_object(None if found is None else str(found))
        if path is None:
            return None
        state = self.ckpt.load(self.engine, Path(path))
        self._keep_resumed_replan(state.config)
        check_config(state.config, self.cfg.to_dict(), self.cfg.ckpt.allow_config_change)
        self.iteration, self.episode_cursor = state.iteration, state.episode_cursor
        self.sampler.load_state_dict(state.sampler)
        log.info("resumed from %s at iteration %d", path, state.iteration)
        return state

    def _stop_requested(self) -> bool:
        """Did any rank get a preemption signal? (collective: call on every rank)"""
        return dist.all_reduce_sum({"stop": float(self.preemption.requested)})["stop"] > 0

    def _preempt(self, state: TrainState, rng: dict, metrics: dict[str, float]) -> None:
        """Save `state` and exit with the requeue code. A state this process just saved or resumed from is
        not written again: a full model's checkpoint can outlast the signal's grace time, and the saved
        marker keeps the iteration's metrics (its eval score decides which checkpoint retention keeps)."""
        code = PREEMPTED_EXIT_CODE
        if self.ckpt.holds(state.iteration):
            self.ckpt.point_latest_at(state.iteration)
            log.warning(
                "preempted: iteration %d is saved already; exiting with code %d", state.iteration, code
            )
        else:
            self.ckpt.save(self.engine, state, metrics, rng)
            log.warning("preempted: saved iteration %d; exiting with code %d", state.iteration, code)
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def _build_engine(self):
        from ript_ds.build import build_policy
        from ript_ds.engine.deepspeed import build_engine

        return build_engine(lambda: build_policy(self.cfg)[0], self.cfg, self.ds_config)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Iterate to train.iterations, checkpointing on schedule, at the end and on preemption."""
        every = self.cfg.ckpt.every
        try:
            if self.cfg.train.eval_every and self.iteration == 0:
                baseline = self.evaluate()  # iteration 0: the starting policy, for learning curves
                self.metrics.log(0, baseline)
                log.info("it 0 | eval %.2f", baseline.get("eval/success_rate", float("nan")))
            while self.iteration < self.cfg.train.iterations:
                # Snapshot before the iteration: a signal during sampling abandons the iteration (the
                # model is untouched until the update), so this state resumes it exactly.
                before, before_rng = self._state(), rng_state()
                try:
                    metrics = self.iterate()
                except Preempted:
                    self._preempt(before, before_rng, {})
                self.metrics.log(self.iteration, metrics)
                log.info(_summary(self.iteration, metrics))
                last = self.iteration == self.cfg.train.iterations
                if (every and self.iteration % every == 0) or last:
                    self.ckpt.save(self.engine, self._state(), metrics)
                if not last and self._stop_requested():
                    self._preempt(self._state(), rng_state(), metrics)
        finally:
            self.close()

    def iterate(self) -> dict[str, float]:
        start = time.perf_counter()
        phase, result = self.sample_phase()
        self.iteration += 1
        rollout_s = time.perf_counter() - start
        stats = self.update_phase(result) if phase.should_update else None  # None: skipped
        metrics = self._metrics(phase, result, stats)
        metrics |= {"time/rollout_s": rollout_s, "time/update_s": time.perf_counter() - start - rollout_s}
        if self.cfg.train.eval_every and self.iteration % self.cfg.train.eval_every == 0:
            metrics |= self.evaluate()
        return metrics

    # ------------------------------------------------------------------ phases
    def _requests(self, contexts: list[Context]) -> list[RolloutRequest]:
        """This rank's share of the round's contexts, K requests each, seeded by global position."""
        rank, world, k = dist.rank(), dist.world_size(), self.cfg.ript.rollouts_per_context
        tasks = {t.task_id: t for t in self.comp.tasks}
        base = self.cfg.train.seed * SEEDS_PER_RUN + self.episode_cursor
        requests = [
            RolloutRequest(ctx, tasks[ctx.task_id], base + pos * k + j)
            for pos, ctx in list(enumerate(contexts))[rank::world]
            for j in range(k)
        ]
        self.episode_cursor += len(contexts) * k
        return requests

    def _rollout(
        self,
        requests: list[RolloutRequest],
        guidance: float | None,
        noise_scale: float = 1.0,
        stop_on_signal: bool = False,
    ) -> list[Episode]:
        """stop_on_signal: a preemption signal cuts the rollout short (its episodes then end as
        rl.rollout.PREEMPTED); only for sampling, whose iteration is then abandoned and redone."""
        should_stop = (lambda: self.preemption.requested) if stop_on_signal else None
        policy_fn = make_pi0_policy_fn(
            self.engine.module,
            self.comp.processor,
            device=self.engine.device,
            dtype=self.cfg.model.dtype,
            guidance=guidance,
            noise_scale=noise_scale,
        )
        bar = progress.episode_bar(len(requests), dist.is_main())
        with self.engine.rollout_context(), bar as on_progress:
            replan = self.comp.replan_every
            result = collect(
                policy_fn,
                self.pool,
                requests,
                replan,
                on_progress=on_progress,
                should_stop=should_stop,
                pipeline_groups=self.cfg.rollout.pipeline_groups,
            )
            return result.episodes

    def sample_phase(self) -> tuple[SamplingPhase, PhaseResult]:
        """Sample and roll out until enough mixed groups are kept (collective: call on every rank)."""
        ript, k = self.cfg.ript, self.cfg.ript.rollouts_per_context
        phase = self.sampler.start_phase(ript.groups_per_iteration, ript.max_sampling_rounds)
        result = PhaseResult()
        guidance = self.cfg.rollout.guidance if ript.guided else None
        start = time.perf_counter()
        while not phase.done:
            contexts = self.sampler.next_contexts(phase.num_to_draw(dist.world_size()))
            requests = self._requests(contexts)
            # A signal ends the rollout at its next round, then every rank agrees below: the safe point
            # comes within seconds, not after the rest of a round of minutes-long episodes.
            episodes = self._rollout(requests, guidance, self.cfg.rollout.noise_scale, stop_on_signal=True)
            groups = [Group(r.context, episodes[i : i + k]) for i, r in list(enumerate(requests))[::k]]
            phase.record(_in_draw_order(dist.all_gather_object([g.outcome() for g in groups])))
            result.kept += self.sampler.filter(groups).kept
            result.episodes += episodes
            if self._stop_requested():
                raise Preempted
        totals = dist.all_reduce_sum(
            {
                "successes": sum(ep.success for ep in result.episodes),
                "episodes": len(result.episodes),
                "env_steps": sum(ep.length for ep in result.episodes),
            }
        )
        self._check_sampler_in_sync()
        result.successes, result.episodes_total = int(totals["successes"]), int(totals["episodes"])
        result.env_steps, result.seconds = int(totals["env_steps"]), time.perf_counter() - start
        if self.cfg.rollout.videos_per_iteration and dist.is_main():
            paths = write_videos(
                result.episodes,
                self.cfg.run_dir / "videos",
                self.cfg.rollout.videos_per_iteration,
                prefix=f"it{self.iteration:05d}_",
            )
            self.metrics.log_videos(self.iteration + 1, paths)  # the iteration being sampled
        return phase, result

    def _check_sampler_in_sync(self) -> None:
        """Every rank must hold the same sampler state (it decides the next contexts); a cheap hash
        comparison turns a silent divergence into an immediate error (collective)."""
        digest = hashlib.sha256(json.dumps(self.sampler.state_dict(), sort_keys=True).encode()).hexdigest()
        digests = dist.all_gather_object(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"sampler state diverged across ranks: {digests}")
        self.sampler_digest = digest

    def update_phase(self, result: PhaseResult) -> UpdateStats | None:
        """RLOO -> windows -> the global plan -> run_update, the same passes on every rank (collective).
        None when no rank has a window to learn from (every kept episode crashed)."""
        chunk = self.engine.module.arch.chunk_size
        windows: list[Window] = []
        if result.kept:
            windows = groups_to_windows(result.kept, group_advantages(result.kept), chunk)
        own = windows[0].as_padding() if windows else _template_window(result.episodes, chunk)
        seed = update_seed(self.cfg.train.seed, self.iteration)
        # Demos anchor an update; they never make one: with no rollout window anywhere it is skipped.
        rollout_windows = len(windows)
        windows += self._demo_windows(seed)
        gathered = dist.all_gather_object(
            (window_refs(windows, dist.rank()), own is not None, rollout_windows), op="update plan"
        )
        shards = [refs for refs, _, _ in gathered]
        if not any(n for _, _, n in gathered):
            return None
        if not all(has for _, has, _ in gathered):  # a rank with nothing observed pads with another's shapes
            src = next(r for r, (_, has, _) in enumerate(gathered) if has)
            shared = dist.broadcast_object(own if dist.rank() == src else None, src=src)
            own = own or shared
        self._check_demo_cameras(own)
        plan = plan_update(shards, dist.rank(), self.cfg.train, seed, self.cfg.ript.loss)
        self.engine.set_progress(iteration_progress(self.iteration, self.cfg.train.iterations))
        self.engine.train()
        bar = progress.micro_step_bar(self.engine, plan.micro_steps, dist.is_main())
        with bar as backend:
            stats = run_update(
                backend,
                self.engine.module.arch,
                self.comp.processor,
                windows,
                self.comp.prompts,
                self.cfg.ript,
                self.cfg.train,
                seed,
                plan=plan,
                padding=own,
                rank=dist.rank(),
            )
        self.engine.eval()
        stats.sums = dist.all_reduce_sum(stats.sums)  # this rank's shares -> the global totals
        return stats

    def _demo_windows(self, seed: int) -> list[Window]:
        """This rank's share of the update's demo windows (ript.demos; none without), drawn by the update
        seed: the same global set on any rank layout and after a resume."""
        if self.demos is None:
            return []
        return self.demos.draw(self.cfg.ript.demo_windows, seed, dist.rank(), dist.world_size())

    def _check_demo_cameras(self, template: Window) -> None:
        """Demos were checked before start-up against what the config says; the camera count only shows
        in the rollouts. Every rank holds the same template and pool here, so all raise or none does."""
        if self.demos is not None and self.demos.windows[0].images.shape != template.images.shape:
            raise ConfigError(
                f"ript.demos: demo images are {self.demos.windows[0].images.shape} (cameras, H, W, 3) but "
                f"this run's rollouts observe {template.images.shape}; record the demos with the run's cameras"
            )

    def evaluate(self) -> dict[str, float]:
        """One episode per held-out context through the package's evaluator (eval/runner.py), with
        launch/eval.py's reset seeds (7 + init state: the same episodes as its --first-init-state), sharded
        over ranks; eval/success_rate and its Wilson interval, results under <run>/eval/heldout/<tag>
        (collective). Not <run>/eval/<tag>: that is launch/eval.py's default for the checkpoint of that tag
        (the full protocol, from init state 0), a different evaluation that must not overwrite this one."""
        contexts = self.sampler.eval_contexts
        if not contexts:
            return {}
        guidance = self.cfg.rollout.guidance if self.cfg.ript.guided else None
        requests = eval_runner.context_requests(contexts, self.comp.tasks, protocol=True)
        # Every rank enters the rollout (its context gathers the parameters under ZeRO-3), with or
        # without held-out contexts of its own.
        result = eval_runner.run_episodes(
            lambda mine: self._rollout(mine, guidance), requests, self.cfg.env.suite, self.comp.tasks
        )
        out = self.cfg.run_dir / HELDOUT_EVAL_DIR / tag_for(self.iteration)
        eval_runner.write_results(result, out, f"held-out contexts after iteration {self.iteration}")
        return result.metrics()

    # ------------------------------------------------------------------ reporting
    def _metrics(
        self, phase: SamplingPhase, result: PhaseResult, stats: UpdateStats | None
    ) -> dict[str, float]:
        m: dict[str, float] = {
            "rollout/success_rate": result.successes / max(result.episodes_total, 1),
            "rollout/episodes": result.episodes_total,
            "rollout/env_steps": result.env_steps,
            "rollout/env_steps_per_s": result.env_steps / max(result.seconds, 1e-9),
            **phase.stats().metrics(),
            "train/skipped": float(stats is None),
            "mem/peak_gb": self.engine.peak_memory_gb(),
        }
        if stats is not None:  # already global: update_phase reduced the sums; the norm is the global one
            m |= {
                "train/loss": stats.loss,
                "train/loss_cond": stats.loss_cond,
                "train/loss_uncond": stats.loss_uncond,
                "train/grad_norm": stats.grad_norm,
                **{f"train/{k}": v for k, v in stats.extra.items()},
                "train/windows": stats.windows,  # rollout and demo windows
                "train/optimizer_steps": stats.optimizer_steps,
                "train/lr": self.engine.lr,
            }
            if self.demos is not None:
                m["train/demo_windows"] = float(self.demos.size(self.cfg.ript.demo_windows))
        return m

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "preemption", None) is not None:
            self.preemption.restore()


def _in_draw_order(per_rank: list[list]) -> list:
    """Rank r holds the round's contexts r, r + W, ... (Trainer._requests): interleave them back, so the
    sampler records outcomes in the order they were drawn, whatever the world size."""
    world, total = len(per_rank), sum(len(x) for x in per_rank)
    return [per_rank[pos % world][pos // world] for pos in range(total)]


def _template_window(episodes: list[Episode], chunk: int) -> Window | None:
    """A padding shape template from this rank's own episodes, if any observed something."""
    for ep in episodes:
        if ep.images.shape[0] and ep.length > ep.replan_steps[0]:
            return episode_windows(ep, 0.0, chunk)[0].as_padding()
    return None


def _summary(iteration: int, m: dict[str, float]) -> str:
    parts = [
        f"it {iteration}",
        f"success {m['rollout/success_rate']:.2f}",
        f"kept {m.get('sampler/groups_kept', 0):.0f}/{m.get('sampler/groups_sampled', 0):.0f}",
    ]
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    if "eval/success_rate" in m:
        parts.append(f"eval {m['eval/success_rate']:.2f}")
    return " | ".join(parts)

"""Experiment config -> the objects a run needs: tasks, policy, processor, env factory.

One place decides how a config maps onto components, so the trainer, launch/eval.py, the demo and
the tests build them the same way. No distributed code here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ript_ds.config import ConfigError, ExperimentCfg
from ript_ds.env.base import ACTION_DIM, TaskSpec
from ript_ds.env.pool import EnvFactory
from ript_ds.model.arch import PI0Arch
from ript_ds.model.normalization import NormStats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.model.weights import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

STATE_DIM = 8  # LIBERO's and the synthetic env's proprioceptive state


def build_tasks(cfg: ExperimentCfg) -> list[TaskSpec]:
    """The configured tasks; a bad suite or task id is a ConfigError naming the valid choices."""
    env = cfg.env
    if env.kind == "synthetic":
        from ript_ds.env.synthetic import synthetic_tasks

        all_tasks = synthetic_tasks(max(env.task_ids) + 1, env.synthetic_init_states, env.max_steps or 40)
    else:
        from ript_ds.env import libero

        try:
            all_tasks = [libero.get_task(env.suite, i) for i in env.task_ids]
        except ValueError as err:
            raise ConfigError(f"env: {err}") from None
        if env.max_steps is not None:
            all_tasks = [replace(t, max_steps=env.max_steps) for t in all_tasks]
        return all_tasks
    bad = [i for i in env.task_ids if i < 0]
    if bad:
        raise ConfigError(f"env.task_ids {bad} are negative")
    return [all_tasks[i] for i in env.task_ids]


def build_arch(cfg: ExperimentCfg) -> PI0Arch:
    m = cfg.model
    if m.arch == "pi0":
        return PI0Arch(num_inference_steps=m.num_inference_steps)
    tiny = PI0Arch.tiny(chunk_size=m.chunk_size, image_size=m.image_size)
    return replace(tiny, num_inference_steps=m.num_inference_steps)


@dataclass
class Components:
    tasks: list[TaskSpec]
    policy: PI0Policy
    processor: Processor
    env_factory: EnvFactory

    @property
    def prompts(self) -> dict[int, str]:
        return {t.task_id: t.instruction for t in self.tasks}


def build_policy(cfg: ExperimentCfg) -> tuple[PI0Policy, NormStats | None]:
    """Random init of the configured arch, or a checkpoint of any supported layout."""
    if cfg.model.checkpoint is None:
        return PI0Policy(build_arch(cfg)), None
    path = Path(cfg.model.checkpoint)
    if not path.is_dir():
        raise ConfigError(f"model.checkpoint {path} does not exist (a PI0 checkpoint directory is expected)")
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"model.checkpoint: {err}") from None
    return loaded.policy, loaded.norm_stats


def build_processor(
    cfg: ExperimentCfg, tasks: list[TaskSpec], norm_stats: NormStats | None, arch: PI0Arch
) -> Processor:
    m = cfg.model
    if m.tokenizer_path is not None:
        tokenizer = PromptTokenizer(m.tokenizer_path, m.tokenizer_max_length)
    else:
        # No hub: a tiny tokenizer made in code from this run's instructions (tests, demo, synthetic).
        directory = cfg.run_dir / "tokenizer"
        tokenizer = PromptTokenizer(
            build_tiny_tokenizer(directory, [t.instruction for t in tasks]), m.tokenizer_max_length
        )
    if norm_stats is None:
        if cfg.env.kind == "libero" and cfg.model.checkpoint is not None:
            raise ConfigError("model.checkpoint has no normalization statistics; LIBERO needs them")
        norm_stats = NormStats.identity(STATE_DIM, ACTION_DIM)
    return Processor(
        tokenizer,
        norm_stats,
        ACTION_DIM,
        max_state_dim=arch.max_state_dim,
        max_action_dim=arch.max_action_dim,
    )


def build_env_factory(cfg: ExperimentCfg, arch: PI0Arch) -> EnvFactory:
    size = arch.vision.image_size
    if cfg.env.kind == "synthetic":
        return EnvFactory("synthetic", {"image_size": size, "difficulty": cfg.env.difficulty})
    return EnvFactory("libero", {"camera_size": cfg.env.camera_size, "model_image_size": size})


def build_components(cfg: ExperimentCfg, policy: PI0Policy | None = None) -> Components:
    """Everything but the engine. Pass `policy` when it was built elsewhere (e.g. under zero.Init)."""
    tasks = build_tasks(cfg)
    norm_stats = None
    if policy is None:
        policy, norm_stats = build_policy(cfg)
    elif cfg.model.checkpoint is not None:
        from ript_ds.model.normalization import load_norm_stats

        norm_stats = load_norm_stats(cfg.model.checkpoint)
    processor = build_processor(cfg, tasks, norm_stats, policy.arch)
    return Components(tasks, policy, processor, build_env_factory(cfg, policy.arch))

"""Experiment config -> the objects a run needs: tasks, policy, processor, env factory.

One place decides how a config maps onto components, so the trainer, launch/eval.py, the demo and
the tests build them the same way. No distributed code here.

Tokenizer rule: `model.tokenizer_path` when set; else `tokenizer.model` / `tokenizer.json` in the
`model.checkpoint` directory; else, only for a tiny model (a token embedding of at most TINY_VOCAB rows:
`model.arch=tiny` without a checkpoint, or a tiny checkpoint such as the tests' or the synthetic
demo's), a small tokenizer trained in code on the run's task prompts. Anything else (a real PI0 with no
tokenizer) is a config error, as is a tokenizer with more pieces than the embedding has rows. A tiny
checkpoint trained with a tiny tokenizer should carry it (the demo's warm start does): one rebuilt from
other prompts maps words to other ids. `check_model` runs all of it from file headers before
distributed init (launch/train.py); build_processor applies the same functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ript_ds.config import ConfigError, ExperimentCfg
from ript_ds.env.base import ACTION_DIM, STATE_DIM, TaskSpec
from ript_ds.env.pool import EnvFactory
from ript_ds.model.arch import PI0Arch
from ript_ds.model.convention import ConventionError, PolicyConvention, load_convention
from ript_ds.model.normalization import NormStats, load_norm_stats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.pi05 import make_policy
from ript_ds.model.processing import TOKENIZER_FILES, Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.model.weights import (
    CheckpointError,
    inspect_checkpoint,
    load_checkpoint,
    missing_convention_hint,
)

log = logging.getLogger(__name__)

DEFAULT_REPLAN_STEPS = 5  # openpi examples/libero/main.py replan_steps
# A token embedding this small is one of the built-in tiny models (PI0Arch.tiny, the synthetic set-up):
# no real tokenizer fits it, so the tiny tokenizer cannot stand in for a real one by accident.
TINY_VOCAB = PI0Arch.tiny().vocab_size


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


def arch_overrides(cfg: ExperimentCfg) -> dict[str, int]:
    """Arch fields the run config sets over a checkpoint's own: the one place that applies them, for a
    fresh model, load_checkpoint and the ZeRO-3 engine alike (model.num_inference_steps; None keeps the
    checkpoint's)."""
    steps = cfg.model.num_inference_steps
    return {} if steps is None else {"num_inference_steps": steps}


def build_arch(cfg: ExperimentCfg) -> PI0Arch:
    """The arch of a fresh model (no checkpoint): PI0's sizes or the tiny ones, plus the run's overrides."""
    m = cfg.model
    model_type = "pi05" if m.arch in ("pi05", "tiny_pi05") else "pi0"
    if m.arch in ("pi0", "pi05"):
        arch = PI0Arch(model_type=model_type)
    else:
        arch = PI0Arch.tiny(chunk_size=m.chunk_size, image_size=m.image_size, model_type=model_type)
    return replace(arch, **arch_overrides(cfg))


def checkpoint_arch(cfg: ExperimentCfg) -> PI0Arch:
    """The arch the run will build, from the checkpoint's headers alone (model/weights.inspect_checkpoint:
    files whole, keys and shapes strict) or the config; cheap, so it runs before distributed init."""
    if cfg.model.checkpoint is None:
        return build_arch(cfg)
    try:
        return inspect_checkpoint(cfg.model.checkpoint, **arch_overrides(cfg))
    except CheckpointError as err:
        raise ConfigError(f"model.checkpoint: {err}") from None


def resolve_tokenizer(cfg: ExperimentCfg, arch: PI0Arch) -> Path | None:
    """Where the tokenizer comes from (None: the tiny one built in code); see the module docstring."""
    m = cfg.model
    if m.tokenizer_path is not None:
        return Path(m.tokenizer_path)
    if m.checkpoint is not None:
        found = [Path(m.checkpoint) / f for f in TOKENIZER_FILES if (Path(m.checkpoint) / f).exists()]
        if found:
            return found[0]
    if arch.vocab_size <= TINY_VOCAB:
        return None
    where = f"model.checkpoint={m.checkpoint} holds no {' or '.join(TOKENIZER_FILES)}"
    if m.checkpoint is None:
        where = f"model.arch={m.arch} without a checkpoint has no tokenizer"
    raise ConfigError(
        f"{where}, and its token embedding has {arch.vocab_size} rows (not a tiny model): set "
        "model.tokenizer_path to PaliGemma's tokenizer.model (nothing is downloaded)"
    )


def check_vocab(tokenizer: PromptTokenizer, arch: PI0Arch) -> None:
    """Token ids index the embedding: a tokenizer with more pieces than rows would index past it."""
    if tokenizer.vocab_size > arch.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model has "
            f"{arch.vocab_size} token embeddings; use the tokenizer the checkpoint was trained with "
            "(model.tokenizer_path)"
        )


def checkpoint_convention(cfg: ExperimentCfg) -> PolicyConvention | None:
    """The checkpoint's policy convention (policy.json, or lerobot's config.json), None without one."""
    if cfg.model.checkpoint is None:
        return None
    try:
        conv = load_convention(cfg.model.checkpoint)
        if conv is not None:
            conv.check_supported()
    except ConventionError as err:
        raise ConfigError(f"model.checkpoint: {err}") from None
    return conv


def checkpoint_norm_stats(cfg: ExperimentCfg) -> NormStats | None:
    """The checkpoint's normalization statistics, by the one route of model/normalization.load_norm_stats
    (the same for the trainer, whose engine built the policy, and for eval, which loads it here), in the
    normalisation mode its policy convention names."""
    if cfg.model.checkpoint is None:
        return None
    conv = checkpoint_convention(cfg)
    try:
        stats = load_norm_stats(cfg.model.checkpoint, mode=None if conv is None else conv.norm_mode)
    except (ValueError, OSError) as err:  # e.g. several openpi asset folders, a malformed stats file
        raise ConfigError(f"model.checkpoint: {str(err).splitlines()[0]}") from None
    if stats is None and cfg.env.kind == "libero":
        raise ConfigError("model.checkpoint has no normalization statistics; LIBERO needs them")
    return stats


def check_model(cfg: ExperimentCfg) -> PI0Arch:
    """Before distributed init: the checkpoint's files, keys and shapes, its normalization statistics, the
    tokenizer rule and that the tokenizer fits the embedding. Raises ConfigError (one line)."""
    arch = checkpoint_arch(cfg)
    conv = checkpoint_convention(cfg)
    if conv is not None and conv.model_type != arch.model_type:
        raise ConfigError(
            f"model.checkpoint: {conv.source} describes a {conv.model_type} policy but the weights are "
            f"{arch.model_type}; fix or remove the policy convention"
        )
    check_horizon(conv, arch, cfg.rollout.replan_every)
    checkpoint_norm_stats(cfg)
    path = resolve_tokenizer(cfg, arch)
    if path is not None:
        check_vocab(_load_tokenizer(path, cfg), arch)
    return arch


def check_horizon(conv: PolicyConvention | None, arch: PI0Arch, replan_every: int | None = None) -> None:
    """The convention's action_horizon is the chunk the weights predict, and a chunk must hold the actions
    executed before replanning. Raises ConfigError (one line)."""
    if conv is not None and conv.action_horizon is not None and conv.action_horizon != arch.chunk_size:
        raise ConfigError(
            f"model.checkpoint: {conv.source} says action_horizon {conv.action_horizon} but the weights "
            f"predict chunks of {arch.chunk_size}; fix the convention's action_horizon"
        )
    replan = replan_steps(replan_every, conv)
    if replan > arch.chunk_size:
        where = "rollout.replan_every" if replan_every is not None else f"{conv.source} replan_steps"
        raise ConfigError(f"{where}={replan} is more than the {arch.chunk_size} actions of a chunk; lower it")


def replan_steps(replan_every: int | None, conv: PolicyConvention | None) -> int:
    """Actions executed per chunk: rollout.replan_every when set, else the checkpoint's convention
    (policy.json replan_steps: what its own harness executes), else openpi's LIBERO client's 5."""
    if replan_every is not None:
        return replan_every
    return conv.replan_steps if conv is not None else DEFAULT_REPLAN_STEPS


@dataclass
class Components:
    tasks: list[TaskSpec]
    policy: PI0Policy
    processor: Processor
    env_factory: EnvFactory
    replan_every: int = DEFAULT_REPLAN_STEPS  # resolved rollout.replan_every (replan_steps)

    @property
    def prompts(self) -> dict[int, str]:
        return {t.task_id: t.instruction for t in self.tasks}


def build_policy(cfg: ExperimentCfg) -> tuple[PI0Policy, NormStats | None]:
    """Random init of the configured arch, or a checkpoint of any supported layout."""
    if cfg.model.checkpoint is None:
        return make_policy(build_arch(cfg)), None
    path = Path(cfg.model.checkpoint)
    if not path.is_dir():
        raise ConfigError(f"model.checkpoint {path} does not exist (a PI0 checkpoint directory is expected)")
    try:
        loaded = load_checkpoint(path, **arch_overrides(cfg))
    except CheckpointError as err:
        raise ConfigError(f"model.checkpoint: {err}") from None
    return loaded.policy, loaded.norm_stats


def token_limit(cfg: ExperimentCfg) -> int:
    """A checkpoint's convention fixes the prompt length it was trained with; else model.tokenizer_max_length."""
    conv = checkpoint_convention(cfg)
    return (
        cfg.model.tokenizer_max_length if conv is None or conv.max_token_len is None else conv.max_token_len
    )


def _load_tokenizer(path: Path, cfg: ExperimentCfg) -> PromptTokenizer:
    try:
        return PromptTokenizer(path, token_limit(cfg))
    except (OSError, RuntimeError, ValueError) as err:  # sentencepiece / tokenizers refuse a bad file
        raise ConfigError(f"tokenizer {path} cannot be read: {str(err).splitlines()[0]}") from None


def build_processor(
    cfg: ExperimentCfg, tasks: list[TaskSpec], norm_stats: NormStats | None, arch: PI0Arch
) -> Processor:
    path = resolve_tokenizer(cfg, arch)
    if path is None:
        if cfg.model.checkpoint is not None:
            log.warning("model.checkpoint holds no tokenizer: building the tiny one from the task prompts")
        # No hub: a tiny tokenizer made in code from this run's instructions (tests, demo, synthetic).
        path = build_tiny_tokenizer(cfg.run_dir / "tokenizer", [t.instruction for t in tasks])
    tokenizer = _load_tokenizer(path, cfg)
    check_vocab(tokenizer, arch)
    if norm_stats is None:  # a fresh model, or a checkpoint without statistics on the synthetic env
        norm_stats = NormStats.identity(STATE_DIM, ACTION_DIM)
    convention = checkpoint_convention(cfg)
    if convention is None and cfg.model.checkpoint is not None:
        hint = missing_convention_hint(cfg.model.checkpoint)
        if hint:
            log.warning(hint)
    return Processor(
        tokenizer,
        norm_stats,
        ACTION_DIM,
        max_state_dim=arch.max_state_dim,
        max_action_dim=arch.max_action_dim,
        convention=convention,
    )


def build_env_factory(
    cfg: ExperimentCfg, arch: PI0Arch | None = None, image_size: int | None = None
) -> EnvFactory:
    """Call in the rank's process: LIBERO workers render on this rank's GPU (rollout.render_device).
    Observations come at the model's resolution (`arch`), or at `image_size` for a remote policy."""
    size = image_size if image_size is not None else arch.vision.image_size
    if cfg.env.kind == "synthetic":
        return EnvFactory("synthetic", {"image_size": size, "difficulty": cfg.env.difficulty})
    import torch

    from ript_ds.env.libero import render_device_for_rank

    try:
        device = render_device_for_rank(cfg.rollout.render_device, torch.cuda.device_count())
    except ValueError as err:
        raise ConfigError(f"rollout.render_device: {err}") from None
    kwargs = {"camera_size": cfg.env.camera_size, "model_image_size": size}
    return EnvFactory("libero", kwargs, render_device=device)


def build_components(cfg: ExperimentCfg, policy: PI0Policy | None = None) -> Components:
    """Everything but the engine. Pass `policy` when it was built elsewhere (e.g. under zero.Init)."""
    tasks = build_tasks(cfg)
    policy = build_policy(cfg)[0] if policy is None else policy
    processor = build_processor(cfg, tasks, checkpoint_norm_stats(cfg), policy.arch)
    check_horizon(processor.convention, policy.arch, cfg.rollout.replan_every)
    try:
        processor.check_prompts([t.instruction for t in tasks])
    except ValueError as err:  # over the checkpoint's token limit
        raise ConfigError(f"env tasks: {err}") from None
    replan = replan_steps(cfg.rollout.replan_every, processor.convention)
    return Components(tasks, policy, processor, build_env_factory(cfg, policy.arch), replan)

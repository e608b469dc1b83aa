"""Typed experiment configuration: YAML file + `key=value` overrides, validated before any distributed init.

Every field has a comment; `python launch/train.py --help` will list them. Unknown keys fail with a
"did you mean" hint, wrong types and out-of-range values with one line naming the key. The resolved
config is never mutated after `validate()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Tasks per LIBERO suite (as LIBERO's benchmark reports them), so task ids are checked without
# importing LIBERO; tests/test_libero_env.py compares this table with the installed package.
LIBERO_SUITES: dict[str, int] = {
    "libero_spatial": 10,
    "libero_object": 10,
    "libero_goal": 10,
    "libero_10": 10,
    "libero_90": 90,
}


GUIDED = "cfg"  # ript.loss of classifier-free-guidance RIPT; in code, "cfg" otherwise means a config

# Old key -> new key. An old key in a YAML file, an override or a checkpoint's saved config is read as
# the new one (with a warning), so the config.yaml of an earlier run still loads and resumes.
RENAMED_KEYS: dict[str, str] = {"ript.cfg_alpha": "ript.uncond_weight"}


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and how to fix it."""


@dataclass
class ModelCfg:
    checkpoint: str | None = None  # PI0 checkpoint directory (any supported layout); None = random init
    # sizes when no checkpoint is given: PI0 / PI0.5 full size, or the tiny ones (tests, CPU checks)
    arch: Literal["pi0", "pi05", "tiny", "tiny_pi05"] = "tiny"
    chunk_size: int = 8  # tiny arch only: actions per predicted chunk (PI0: 50)
    image_size: int = 32  # tiny arch only: model image resolution (PI0: 224)
    # PaliGemma tokenizer.model / tokenizer.json; None = the checkpoint directory's (tiny models: built in code)
    tokenizer_path: str | None = None
    tokenizer_max_length: int = 48  # prompt tokens (padded)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of the Gemma stacks
    gradient_checkpointing: bool = False  # per-layer activation checkpointing
    num_inference_steps: int | None = None  # denoising steps when sampling; None = the checkpoint's (10)


@dataclass
class EnvCfg:
    kind: Literal["synthetic", "libero"] = "synthetic"  # which simulator
    suite: str = (
        "synthetic"  # libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | synthetic
    )
    task_ids: list[int] = field(default_factory=lambda: [0])  # tasks of the suite to train on
    camera_size: int = 256  # simulator render size before resize-with-pad to the model's image size
    num_eval_init_states: int = 0  # per task, held out from training for evaluation
    difficulty: float = 0.5  # synthetic env only
    synthetic_init_states: int = 50  # synthetic env only: fixed init states per task
    max_steps: int | None = None  # override the suite's episode cap (tests, debugging)


@dataclass
class RolloutCfg:
    num_envs: int = 2  # env worker processes per rank (or in-process slots with in_process)
    in_process: bool = False  # synthetic env only: step envs in the trainer process (env/inline.py)
    # actions executed from each predicted chunk before replanning; None: the checkpoint's policy
    # convention (policy.json replan_steps), else 5 (openpi's LIBERO client); build.replan_steps resolves it
    replan_every: int | None = None
    # env groups that take turns, one stepping in its workers while the policy runs for another
    # (rl/rollout.py); 1 = lockstep; null = 2 with worker processes, num_envs >= 4 and more CPU
    # cores than num_envs, else 1
    pipeline_groups: int | None = None
    guidance: float = 1.0  # w in v = v_none + w (v_pos - v_none) for rollouts
    noise_scale: float = 1.0  # training rollouts only: x the flow's initial noise (exploration)
    step_timeout_s: float = 120.0  # a worker silent this long is restarted, its episode failed
    videos_per_iteration: int = 0  # mp4s written per iteration (rank 0)
    # LIBERO: GPU (physical index, as in CUDA_VISIBLE_DEVICES and EGL) the env workers render on;
    # None = this rank's GPU (LOCAL_RANK through CUDA_VISIBLE_DEVICES), no GPU: MuJoCo's default
    render_device: int | None = None


@dataclass
class RiptCfg:
    rollouts_per_context: int = 8  # K
    groups_per_iteration: int = 4  # kept (mixed-outcome) groups wanted per iteration, all ranks together
    max_sampling_rounds: int = 8  # attempt cap of the smart sampler per iteration
    # update objective (DESIGN section 3): cfg = classifier-free-guidance RIPT (CFGRL), awr, fpo
    loss: Literal["cfg", "awr", "fpo"] = "cfg"
    uncond_weight: float = 0.1  # cfg: weight of the unconditional flow-matching term (CFGRL's alpha)
    awr_beta: float = 1.0  # awr: temperature of the weights exp(A / beta)
    awr_max_weight: float = 20.0  # awr: weights are clipped here
    fpo_clip: float = 0.2  # fpo: PPO clip range of the likelihood-ratio proxy
    fpo_samples: int = 4  # (noise, time) samples per window for the FPO ratio
    skip_solved_after: int | None = None  # skip contexts whose last M rollouts all succeeded
    mixed_bonus: float = 0.0  # extra sampling weight for contexts with mixed history
    # demonstrations kept in every update (rl/demos.py): a save_episodes .npz whose successful
    # episodes' windows join the rollout windows with advantage +1, against self-imitation narrowing
    demos: str | None = None
    demo_windows: int | None = None  # demo windows per update, all ranks together; None = all of them
    demo_weight: float = 1.0  # loss weight of a demo window (a rollout window weighs 1)

    @property
    def guided(self) -> bool:
        """The classifier-free-guidance objective: rollouts sample with rollout.guidance."""
        return self.loss == GUIDED


@dataclass
class TrainCfg:
    iterations: int = 10  # RIPT iterations (sample -> rollout -> update)
    epochs: int = 1  # passes over the iteration's windows
    micro_batch_size: int = 8  # windows per forward, per rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    seed: int = 0  # seeds the sampler, episode seeds and update draws
    eval_every: int = 0  # evaluate on held-out init states every N iterations (0 = never)
    collective_timeout_s: float = 600.0  # a rank silent this long ends the job with an error


# Projections that LoRA may wrap, by their module name inside a Gemma layer.
LORA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraCfg:
    enabled: bool = False  # when on, only the adapters (and optionally cond_embed) train
    rank: int = 16  # r of the low-rank update
    alpha: int = 32  # scaling = alpha / rank
    dropout: float = 0.0  # dropout on the adapter input
    target: Literal["both", "vlm", "expert"] = "both"  # stacks with adapters; expert = action expert
    modules: list[str] = field(default_factory=lambda: list(LORA_PROJECTIONS))  # projections wrapped
    train_cond_embed: bool = True  # the condition embedding trains too (the cfg objective needs it)
    # Storage of the frozen base weights. auto: with model.dtype=bfloat16, the Gemma stacks' linear and
    # token-embedding weights in bf16 (autocast computes them in bf16 anyway; the vision tower, norms and
    # projections stay fp32), about half the frozen memory; float32: all fp32, as full fine-tuning keeps them.
    frozen_dtype: Literal["auto", "float32"] = "auto"


@dataclass
class EngineCfg:
    deepspeed_config: str = "ds_configs/zero2.json"  # engine knobs; batch sizes / clipping come from train
    # ZeRO stage of deepspeed_config, recorded at launch so a resume notices an edited JSON; leave unset
    zero_stage: int | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after train.warmup_steps of linear warm-up
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of train.lr
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    adam_eps: float = 1e-8  # AdamW epsilon
    lora: LoraCfg = field(default_factory=LoraCfg)


@dataclass
class CkptCfg:
    every: int = 0  # save every N iterations (0 = only at the end and on signals)
    keep_last: int = 2  # complete checkpoints kept (plus the best)
    resume: str = "auto"  # auto | none | PATH
    allow_config_change: bool = False  # resume even if the config differs


@dataclass
class LogCfg:
    wandb: bool = False  # also log to Weights & Biases (offline unless configured)
    wandb_project: str = "ript-ds"  # wandb project name
    tensorboard: bool = False  # also write TensorBoard event files
    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"  # console log level (rank 0)


# (key, lower bound): every number with a floor; None (an unset optional field) is not checked.
_AT_LEAST: tuple[tuple[str, int], ...] = (
    ("model.chunk_size", 1),
    ("model.image_size", 8),
    ("model.tokenizer_max_length", 2),
    ("model.num_inference_steps", 1),
    ("env.camera_size", 8),
    ("env.num_eval_init_states", 0),
    ("env.synthetic_init_states", 1),
    ("env.max_steps", 1),
    ("rollout.num_envs", 1),
    ("rollout.replan_every", 1),
    ("rollout.pipeline_groups", 1),
    ("rollout.videos_per_iteration", 0),
    ("ript.demo_windows", 1),
    ("ript.rollouts_per_context", 2),
    ("ript.groups_per_iteration", 1),
    ("ript.max_sampling_rounds", 1),
    ("ript.uncond_weight", 0),
    ("ript.fpo_samples", 1),
    ("ript.skip_solved_after", 1),
    ("ript.mixed_bonus", 0),
    ("train.iterations", 0),
    ("train.epochs", 1),
    ("train.micro_batch_size", 1),
    ("train.grad_accum_steps", 1),
    ("train.weight_decay", 0),
    ("train.warmup_steps", 0),
    ("train.grad_clip", 0),
    ("train.eval_every", 0),
    ("ckpt.every", 0),
    ("ckpt.keep_last", 1),
    ("engine.lora.rank", 1),
)
_WHY = {
    "ript.rollouts_per_context": " (RLOO needs K >= 2)",
    "model.tokenizer_max_length": " (BOS and the closing newline take two)",
}
_POSITIVE = (
    "train.lr",
    "train.collective_timeout_s",
    "rollout.step_timeout_s",
    "ript.awr_beta",
    "ript.awr_max_weight",
    "ript.fpo_clip",
    "ript.demo_weight",
    "engine.adam_eps",
    "engine.lora.alpha",
)


@dataclass
class ExperimentCfg:
    run_name: str = "run"  # the run directory is output_dir/run_name
    output_dir: str = "runs"  # parent of run directories
    model: ModelCfg = field(default_factory=ModelCfg)
    env: EnvCfg = field(default_factory=EnvCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    ript: RiptCfg = field(default_factory=RiptCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    ckpt: CkptCfg = field(default_factory=CkptCfg)
    log: LogCfg = field(default_factory=LogCfg)
    engine: EngineCfg = field(default_factory=EngineCfg)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _value(self, key: str) -> Any:
        """The value of a dotted key (`train.lr`)."""
        return functools.reduce(getattr, key.split("."), self)

    def validate(self) -> ExperimentCfg:
        """Ranges and combinations; raises ConfigError with one line."""
        for key, bound in _AT_LEAST:
            value = self._value(key)
            if value is not None and not value >= bound:
                raise ConfigError(f"{key} must be >= {bound}" + _WHY.get(key, ""))
        for key in _POSITIVE:
            if not self._value(key) > 0:
                raise ConfigError(f"{key} must be > 0")
        checks = [
            (0.0 <= self.env.difficulty <= 1.0, "env.difficulty must be in [0, 1]"),
            (len(self.env.task_ids) > 0, "env.task_ids must name at least one task"),
            (len(self.engine.adam_betas) == 2, "engine.adam_betas must be [beta1, beta2]"),
            (all(0.0 <= b < 1.0 for b in self.engine.adam_betas), "engine.adam_betas must be in [0, 1)"),
            (0.0 <= self.engine.min_lr_ratio <= 1.0, "engine.min_lr_ratio must be in [0, 1]"),
            (0.0 <= self.engine.lora.dropout < 1.0, "engine.lora.dropout must be in [0, 1)"),
            (
                self.engine.zero_stage in (None, 0, 1, 2, 3),
                "engine.zero_stage must be 0, 1, 2 or 3; leave it unset (launch/train.py records the JSON's)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.rollout.in_process and self.env.kind != "synthetic":
            raise ConfigError(
                "rollout.in_process=true is for env.kind=synthetic only: LIBERO envs need worker "
                "processes (crash isolation, parallel rendering); remove rollout.in_process"
            )
        self._validate_pipeline()
        if self.env.kind == "synthetic" and self.env.suite != "synthetic":
            raise ConfigError(f"env.kind=synthetic needs env.suite=synthetic, got {self.env.suite!r}")
        self._validate_paths_and_suite()
        return self

    def _validate_pipeline(self) -> None:
        groups = self.rollout.pipeline_groups
        if groups is not None and groups > self.rollout.num_envs:
            raise ConfigError(
                f"rollout.pipeline_groups={groups} exceeds rollout.num_envs={self.rollout.num_envs}: "
                "every group needs an env"
            )
        if groups is not None and groups > 1 and self.rollout.in_process:
            raise ConfigError(
                "rollout.pipeline_groups > 1 needs env worker processes: in-process envs step in the "
                "policy's process, so nothing overlaps; remove rollout.pipeline_groups"
            )

    def _validate_paths_and_suite(self) -> None:
        """What can be checked without importing LIBERO or starting ranks."""
        if self.env.kind == "libero" and self.env.suite not in LIBERO_SUITES:
            raise ConfigError(
                f"env.suite={self.env.suite!r} is not a LIBERO suite"
                + _suggest(self.env.suite, list(LIBERO_SUITES))
            )
        if any(i < 0 for i in self.env.task_ids):
            raise ConfigError(f"env.task_ids {self.env.task_ids} must be >= 0")
        if self.env.kind == "libero":
            n = LIBERO_SUITES[self.env.suite]
            bad = [i for i in self.env.task_ids if i >= n]
            if bad:
                raise ConfigError(f"env.task_ids {bad} out of range: {self.env.suite} has tasks 0..{n - 1}")
        # find_spec, not import: cheap; otherwise a missing package surfaces after distributed init.
        if self.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard")
        for key, path in (
            ("model.checkpoint", self.model.checkpoint),
            ("model.tokenizer_path", self.model.tokenizer_path),
            ("ript.demos", self.ript.demos),
        ):
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{key}={path} does not exist")
        if self.ckpt.resume not in ("auto", "none") and not Path(self.ckpt.resume).is_dir():
            raise ConfigError(
                f"ckpt.resume={self.ckpt.resume} is neither auto, none nor a checkpoint directory"
            )
        if self.ript.demos is None and self.ript.demo_windows is not None:
            raise ConfigError(
                "ript.demo_windows is set but ript.demos is not: name the demos file or drop it"
            )
        if self.engine.lora.enabled and not self.engine.lora.modules:
            raise ConfigError("engine.lora.modules is empty: LoRA would wrap nothing")
        if not self.rollout.noise_scale > 0:
            raise ConfigError(
                f"rollout.noise_scale={self.rollout.noise_scale} must be > 0 (1 = the policy's own noise)"
            )
        if self.rollout.guidance < 0:
            raise ConfigError(f"rollout.guidance={self.rollout.guidance} must be >= 0 (0 = base policy)")
        if self.rollout.render_device is not None and self.rollout.render_device < 0:
            raise ConfigError(
                f"rollout.render_device={self.rollout.render_device} must be a GPU index >= 0, or null for "
                "this rank's GPU"
            )


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and for CLI strings, convert) a value against a field annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[]") for v in value]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, str):
            try:  # "1e-5" is a string to YAML 1.1 but a number to everyone else
                value = annotation(value)
            except ValueError:
                raise ConfigError(f"{key} must be {annotation.__name__}, got {value!r}") from None
        ok = isinstance(value, int) and not isinstance(value, bool)
        if annotation is float and ok:
            return float(value)
        if not ok and not (annotation is float and isinstance(value, float)):
            raise ConfigError(f"{key} must be {annotation.__name__}, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}" + _suggest(key, list(fields)))
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a section (mapping), got {value!r}")
            kwargs[key] = _build(hints[key], value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    path, value = item.split("=", 1)
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentCfg:
    """YAML file (optional) + `section.key=value` overrides -> validated ExperimentCfg."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        _apply_override(data, item)
    return _build(ExperimentCfg, migrate_renamed(data), "").validate()


def migrate_renamed(data: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict with RENAMED_KEYS moved to their new names (a copy); both given: an error."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        if new_key in out.get(new_section, {}):
            raise ConfigError(f"{old} was renamed to {new}: give only {new}")
        logging.getLogger(__name__).warning(
            "config key %s was renamed to %s; reading it as %s", old, new, new
        )
        out.setdefault(new_section, {})[new_key] = section.pop(old_key)
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's doc: the `# comment`s inside its statement (which the formatter may wrap), else the
    comment lines right above it. Read with tokenize, so `#` or parentheses inside a doc are kept."""
    import ast
    import inspect
    import io
    import tokenize

    source = inspect.getsource(cls)
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.removeprefix("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            inside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            above, line = [], node.lineno - 1
            while line in comments and line not in code_lines:  # a comment-only line above the field
                above.insert(0, comments[line])
                line -= 1
            docs[node.target.id] = " ".join(inside or above)
    return docs


def describe_config(cls: type = ExperimentCfg, prefix: str = "", defaults: Any = None) -> str:
    """Every config field as `section.key (type, default): doc`, for --help-config."""
    defaults = cls() if defaults is None else defaults
    hints, docs, lines = typing.get_type_hints(cls), _field_docs(cls), []
    for name in _fields(cls):
        value = getattr(defaults, name)
        if dataclasses.is_dataclass(hints[name]):
            lines.append(f"[{prefix}{name}]")
            lines.append(describe_config(hints[name], f"{prefix}{name}.", value))
        else:
            lines.append(
                f"  {prefix}{name} ({_type_name(hints[name])}, default {value!r}): {docs.get(name, '')}"
            )
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")

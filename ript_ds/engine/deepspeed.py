"""The whole DeepSpeed surface of ript-ds: the only module that imports deepspeed.

`DeepSpeedEngine` builds the PI0 policy (inside `zero.Init` under ZeRO-3, so no rank ever holds the whole
model), loads its weights parameter by parameter, freezes what PI0 never reads, optionally wraps LoRA
adapters (peft), and hands DeepSpeed a client torch AdamW (fused) plus a warm-up/constant-or-cosine schedule.
Trainers call only this object: forward/backward/step, `rollout_context()` for sampling, save/load.

The DeepSpeed JSON holds engine knobs only (stage, offload, buckets, overlap). Batch sizes, accumulation,
clipping and the bf16 flag are written from the training config in `build_ds_config`, the one place that
does it; values already in the JSON must be "auto" or agree, so the two never silently disagree.

Choices worth knowing:
- bf16 (model.dtype=bfloat16) is DeepSpeed's `torch_autocast`: parameters, gradients and optimizer state
  stay fp32 and the forward (training and rollouts) runs under torch.autocast(bf16). DeepSpeed's own
  `bf16.enabled` casts every parameter to bf16, which breaks PI0's fp32 norms / vision / projections
  (dtype errors in its forward), so the JSON may not turn it on. Costs fp32 parameter memory.
- Offloading uses DeepSpeedCPUAdam (JIT-built); if that build fails we fall back to torch AdamW, which
  DeepSpeed then runs on the CPU partitions (slower, same maths), and log a warning.
- Under ZeRO-3 whatever a factory writes into parameters after construction is lost (each sub-module is
  partitioned as its __init__ returns), so weights are passed as a state dict and loaded here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import re
import resource
import sys
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import Tensor, nn

from ript_ds.config import ConfigError, EngineCfg, ExperimentCfg, LoraCfg, TrainCfg
from ript_ds.engine import dist
from ript_ds.engine.ds_json import check_ds_json, load_ds_json, offloads_optimizer
from ript_ds.model.arch import PI0Arch
from ript_ds.model.pi0 import PI0Batch, PI0Policy, unused_parameter_names

logger = logging.getLogger(__name__)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(
    path: str | Path,
    train: TrainCfg,
    world_size: int,
    bf16: bool,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` (+ overrides) with the training-owned fields filled in; returned so the
    trainer can log and save exactly what DeepSpeed ran with. The checks are ds_json's (the same ones
    launch/train.py runs before distributed init), repeated here because overrides and callers other than
    the CLI (tests, tools) reach this without the pre-flight."""
    path, data = load_ds_json(path)
    cfg = _merge(data, overrides or {})
    check_ds_json(path, cfg, train, bf16, cuda_available=torch.cuda.is_available())
    batch = train.micro_batch_size * train.grad_accum_steps * world_size
    if cfg.get("train_batch_size", "auto") not in ("auto", batch):  # the one owned key that needs the world
        raise ConfigError(
            f"{path}: train_batch_size={cfg['train_batch_size']!r} disagrees with micro_batch_size x "
            f"grad_accum_steps x world size ({batch}); use 'auto'"
        )
    cfg["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    cfg["gradient_accumulation_steps"] = train.grad_accum_steps
    cfg["train_batch_size"] = batch
    cfg["gradient_clipping"] = train.grad_clip
    cfg.pop("bf16", None)
    autocast = cfg.setdefault("torch_autocast", {"dtype": "bfloat16"})
    autocast["enabled"] = bf16
    autocast.setdefault("dtype", "bfloat16")
    zero = cfg.setdefault("zero_optimization", {})
    if offloads_optimizer(cfg):
        # Lets the fallback (torch AdamW on CPU partitions) run when DeepSpeedCPUAdam cannot be built.
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    zero.setdefault("stage", 0)
    return cfg


def lr_lambda(warmup_steps: int, schedule: str, total_steps: int | None, min_lr_ratio: float) -> Callable:
    """Multiplier of train.lr at optimizer step s: linear warm-up, then constant or cosine to min_lr_ratio."""
    if schedule == "cosine" and not total_steps:
        raise ConfigError("engine.lr_schedule=cosine needs the number of optimizer steps (total_steps)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _hf_init(stage: int) -> Iterator[None]:
    """Under ZeRO-3 skip transformers' post-construction weight init: it runs after zero.Init has already
    partitioned the sub-modules (and indexes the now-empty embedding tensors). torch's per-layer default
    init still runs before partitioning; real values come from `weights`."""
    if stage != 3:
        yield
        return
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original


def lora_target_names(policy: PI0Policy, lora: LoraCfg) -> list[str]:
    """Full module names that get adapters: the chosen projections of the chosen Gemma stacks, minus the
    ones PI0 never runs (their adapters would get no gradient, which ZeRO rejects)."""
    stacks = {"vlm": [r"model\.vlm\.language_model"], "expert": [r"model\.dit"]}
    roots = stacks.get(lora.target, stacks["vlm"] + stacks["expert"])
    projections = "|".join(re.escape(m) for m in lora.modules)
    pattern = re.compile(rf"({'|'.join(roots)})\.layers\.\d+\.(self_attn|mlp)\.({projections})")
    unused = {n.removesuffix(".weight") for n in unused_parameter_names(policy.arch)}
    names = [n for n, _ in policy.named_modules() if pattern.fullmatch(n) and n not in unused]
    if not names:
        raise ConfigError(f"engine.lora: no module matches target={lora.target} modules={lora.modules}")
    return names


class DeepSpeedEngine:
    """PI0 inside DeepSpeed. Every method with a collective (all but `module`, `train`, `eval`, properties)
    must be called on every rank, in the same order."""

    def __init__(
        self,
        policy_factory: Callable[[], PI0Policy],
        train: TrainCfg,
        engine: EngineCfg,
        *,
        bf16: bool = False,
        gradient_checkpointing: bool = False,
        weights: Mapping[str, Tensor] | None = None,
        total_steps: int | None = None,
        ds_overrides: Mapping[str, Any] | None = None,
    ):
        """policy_factory builds the PI0Policy (called inside zero.Init under ZeRO-3); weights: a canonical
        state dict (missing keys keep their init; cond_embed is re-zeroed when absent); total_steps: the
        number of optimizer steps, needed by the cosine schedule."""
        dist.init_distributed(train.collective_timeout_s)
        if not dist.is_main():  # DeepSpeed logs through its own logger on every rank
            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        self.ds_config = build_ds_config(
            engine.deepspeed_config, train, dist.world_size(), bf16, ds_overrides
        )
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.bf16 = bf16
        self.lora = engine.lora
        logger.info("DeepSpeed config (merged):\n%s", json.dumps(self.ds_config, indent=1))

        with (
            deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=self.stage == 3),
            _hf_init(self.stage),
        ):
            policy = policy_factory()
        self._policy = policy
        self._load_weights(policy, weights or {})
        policy.set_gradient_checkpointing(gradient_checkpointing)
        for name in unused_parameter_names(policy.arch):
            policy.get_parameter(name).requires_grad_(False)
        model: nn.Module = self._wrap_lora(policy) if engine.lora.enabled else policy

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = self._make_optimizer(trainable, train, engine)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(train.warmup_steps, engine.lr_schedule, total_steps, engine.min_lr_ratio)
        )
        self._engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self._trainable = trainable
        if self.stage == 0 and dist.world_size() == 1:
            # Without ZeRO, DeepSpeed all-reduces every gradient through a flat buffer (flatten, reduce
            # with itself, copy back): three passes over the gradients that change nothing on one rank.
            self._engine.enable_backward_allreduce = False
        n_train = sum(_numel(p) for p in trainable)
        n_all = sum(_numel(p) for p in model.parameters())
        logger.info(
            "engine: ZeRO-%d, %d / %d parameters train, world %d",
            self.stage,
            n_train,
            n_all,
            dist.world_size(),
        )

    # ------------------------------------------------------------------ construction helpers
    def _load_weights(self, policy: PI0Policy, weights: Mapping[str, Tensor]) -> None:
        """Copy a state dict into (possibly partitioned) parameters, one gathered parameter at a time."""
        own = dict(policy.named_parameters())
        unknown = sorted(set(weights) - set(own) - {n for n, _ in policy.named_buffers()})
        if unknown:
            raise ValueError(f"weights hold keys the policy does not have: {unknown[:10]}")
        missing = [n for n in own if n not in weights and n != "cond_embed.weight"]
        if missing and self.stage == 3:
            logger.warning("ZeRO-3: %d parameters not in `weights` keep torch's default init", len(missing))
        with torch.no_grad():
            for name, param in own.items():
                value = weights.get(name)
                if value is None and name != "cond_embed.weight":
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=self.stage == 3):
                    if value is None:  # zero.Init swallowed PI0's zero-init of the condition embedding
                        param.zero_()
                    else:
                        param.copy_(value.to(param.dtype))
            for name, buf in policy.named_buffers():
                if name in weights:
                    buf.copy_(weights[name].to(buf.dtype))

    def _wrap_lora(self, policy: PI0Policy) -> nn.Module:
        from peft import LoraConfig, get_peft_model  # peft only matters with LoRA on

        targets = lora_target_names(policy, self.lora)
        config = LoraConfig(
            r=self.lora.rank,
            lora_alpha=self.lora.alpha,
            lora_dropout=self.lora.dropout,
            target_modules=targets,
            bias="none",
        )
        model = get_peft_model(policy, config)  # freezes every base parameter
        policy.cond_embed.weight.requires_grad_(self.lora.train_cond_embed)
        logger.info("LoRA: %d modules (%s), rank %d", len(targets), self.lora.target, self.lora.rank)
        return model

    def _make_optimizer(self, params: list[nn.Parameter], train: TrainCfg, engine: EngineCfg):
        kwargs = {"lr": train.lr, "betas": tuple(engine.adam_betas), "eps": engine.adam_eps}
        kwargs["weight_decay"] = train.weight_decay
        if offloads_optimizer(self.ds_config):
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
            except Exception as err:  # a JIT build failure (no compiler / headers): keep training, slower
                logger.warning(
                    "DeepSpeedCPUAdam unavailable (%s); using torch AdamW on the CPU partitions", err
                )
        # Fused: one kernel over each tensor. ZeRO-1/2 hand AdamW one flat fp32 partition, where the default
        # for-loop AdamW's full-size temporaries cost ~2x the step (docs/benchmarks.md, engine_overhead).
        return torch.optim.AdamW(params, fused=True, **kwargs)

    # ------------------------------------------------------------------ training
    @property
    def module(self) -> PI0Policy:
        """The PI0Policy (LoRA layers, if any, injected in place): for sampling inside rollout_context()."""
        return self._policy

    @property
    def wrapped(self) -> nn.Module:
        """What DeepSpeed wraps: the PI0Policy, or the peft model around it."""
        return self._engine.module

    @property
    def device(self) -> torch.device:
        """Where batches go (this rank's accelerator, or cpu)."""
        return self._engine.device

    def train(self) -> None:
        self._engine.train()

    def eval(self) -> None:
        self._engine.eval()

    def forward(self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None = None) -> Tensor:
        """Per-element flow-matching loss [B, H, A] (PI0Policy.forward) through DeepSpeed's hooks."""
        return self._engine(batch, noise, time, cond)

    __call__ = forward

    def backward(self, loss: Tensor) -> None:
        """Scales by 1/grad_accum_steps and accumulates; reduction happens at the boundary."""
        self._engine.backward(loss)

    def step(self) -> float | None:
        """Optimizer step at an accumulation boundary (clip, step, LR schedule); returns the grad norm
        before clipping there, None on the other micro-steps."""
        boundary = self._engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.stage == 0:
            # Without ZeRO, DeepSpeed clips but keeps no norm (get_global_grad_norm() stays None); the
            # gradients are already reduced over ranks at the boundary's backward.
            norm = torch.nn.utils.get_total_norm([p.grad for p in self._trainable if p.grad is not None])
        self._engine.step()
        if not boundary:
            return None
        norm = self._engine.get_global_grad_norm() if norm is None else norm
        return None if norm is None else float(norm)

    @property
    def lr(self) -> float:
        return float(self._engine.get_lr()[0])

    @property
    def global_steps(self) -> int:
        return int(self._engine.global_steps)

    # ------------------------------------------------------------------ rollout
    @contextlib.contextmanager
    def rollout_context(self) -> Iterator[PI0Policy]:
        """Sampling phase: under ZeRO-3 gather every parameter once (read-only) and switch DeepSpeed's
        per-module fetch/release hooks off until the end, so a whole rollout costs one all-gather instead
        of one per forward. A no-op otherwise. Call on every rank; yields the policy in eval mode."""
        was_training = self._engine.module.training
        self._engine.eval()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)  # as in training
        try:
            if self.stage != 3:
                with torch.no_grad(), autocast:
                    yield self._policy
                return
            offload = self._engine.optimizer.parameter_offload
            params = list(self._engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params), torch.no_grad(), autocast:
                for param in self._engine.module.parameters():
                    param.ds_active_sub_modules.clear()
                for hook in offload.forward_hooks + offload.backward_hooks:
                    hook.remove()
                offload.forward_hooks, offload.backward_hooks = [], []
                try:
                    yield self._policy
                finally:
                    offload._register_deepspeed_module(offload.module)
        finally:
            self._engine.train(was_training)

    # ------------------------------------------------------------------ weights and checkpoints
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, Tensor]:
        """Consolidated fp32 CPU copy of the (trainable) parameters, names as in `wrapped`, on every rank.
        Gathers one parameter at a time. Call on every rank."""
        out = {}
        for name, param in self._engine.module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([param], enabled=self.stage == 3):
                out[name] = param.detach().to("cpu", torch.float32, copy=True)
        return out

    def save_adapters(self, directory: str | Path) -> None:
        """LoRA adapters in peft's format (adapter_config.json + adapter_model.safetensors), plus
        cond_embed.pt when it trains. Rank 0 writes. Call on every rank."""
        if not self.lora.enabled:
            raise RuntimeError("save_adapters: LoRA is off")
        state = self.full_state_dict(trainable_only=True)
        if dist.is_main():
            self._engine.module.save_pretrained(str(directory), state_dict=state)
            cond = {k: v for k, v in state.items() if k.endswith("cond_embed.weight")}
            if cond:
                torch.save(next(iter(cond.values())), Path(directory) / "cond_embed.pt")
        dist.barrier("save_adapters")

    def save(self, directory: str | Path, tag: str, client_state: Mapping[str, Any] | None = None) -> None:
        """DeepSpeed's native checkpoint (module, optimizer and LR state, partitioned as trained) under
        directory/tag, plus `client_state`; with LoRA, frozen base weights are left out and the adapters
        are also exported in peft's format under directory/tag/adapter. Call on every rank."""
        self._engine.save_checkpoint(
            str(directory),
            tag=tag,
            client_state=dict(client_state or {}),
            save_latest=False,  # ckpt/ owns the `latest` pointer
            exclude_frozen_parameters=self.lora.enabled,
        )
        if self.lora.enabled:
            self.save_adapters(Path(directory) / tag / "adapter")
        dist.barrier("save")

    def load(self, directory: str | Path, tag: str) -> dict[str, Any]:
        """Restore what save() wrote; returns the client state. Call on every rank."""
        path, client_state = self._engine.load_checkpoint(
            str(directory), tag=tag, load_module_strict=not self.lora.enabled
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
        return dict(client_state or {})

    def load_consolidated(self, tag_dir: str | Path) -> dict[str, Any]:
        """Resume from a checkpoint written with another world size: DeepSpeed's zero_to_fp32 rebuilds
        the fp32 weights, which are copied into this engine's partitions. Limits: the optimizer starts
        fresh (Adam moments and the LR-schedule step are not carried over) and LoRA runs are refused
        (their checkpoints hold adapters only). Call on every rank; returns the client state."""
        from ript_ds.engine.consolidate import client_state, fp32_state_dict

        if self.lora.enabled:
            raise ConfigError("changing the world size on resume is not supported for LoRA runs yet")
        weights, states = fp32_state_dict(Path(tag_dir))
        self._load_weights(self.module, weights)
        return client_state(states)

    # ------------------------------------------------------------------ diagnostics
    def partition_numel(self) -> tuple[int, int]:
        """(elements this rank stores, elements of the whole model): ~1/world under ZeRO-3."""
        local = total = 0
        for param in self._engine.module.parameters():
            if hasattr(param, "ds_tensor"):
                local += param.ds_tensor.numel()
            else:
                local += param.numel()
            total += _numel(param)
        return local, total

    def peak_memory_gb(self) -> float:
        """Peak accelerator memory on CUDA; the process's peak resident set on CPU."""
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**30
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def build_engine(
    policy_factory: Callable[[], PI0Policy],
    cfg: ExperimentCfg,
    ds_config: str | None = None,
    total_steps: int | None = None,
) -> DeepSpeedEngine:
    """The engine for an experiment config; `ds_config` (the --deepspeed flag) overrides
    engine.deepspeed_config. Call on every rank.

    Under ZeRO-3 with model.checkpoint set, the factory is replaced: a checkpoint loader writes into whole
    tensors, which zero.Init has already partitioned away, so the arch is read from the checkpoint, the
    policy built empty and partitioned, and the canonical tensors copied in one parameter at a time.
    """
    engine_cfg = dataclasses.replace(cfg.engine, deepspeed_config=ds_config) if ds_config else cfg.engine
    _, ds_json = load_ds_json(engine_cfg.deepspeed_config)
    stage = ds_json.get("zero_optimization", {}).get("stage", 0)
    weights = None
    if stage == 3 and cfg.model.checkpoint is not None:
        arch, weights = _checkpoint_for_zero3(Path(cfg.model.checkpoint))
        policy_factory = partial(PI0Policy, arch)
    return DeepSpeedEngine(
        policy_factory,
        cfg.train,
        engine_cfg,
        bf16=cfg.model.dtype == "bfloat16",
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        weights=weights,
        total_steps=total_steps,
    )


def _checkpoint_for_zero3(directory: Path) -> tuple[PI0Arch, dict[str, Tensor]]:
    """(arch, canonical tensors) of a checkpoint directory, as model/weights.load_checkpoint finds them.
    Every rank reads the file (CPU memory: one copy of the weights per rank while loading)."""
    from ript_ds.model import weights as w

    state, _ = w.to_canonical(w.read_safetensors(directory / w.CANONICAL_WEIGHTS))
    arch_file = directory / w.CANONICAL_ARCH
    if arch_file.exists():
        return PI0Arch.from_dict(json.loads(arch_file.read_text())), state
    return w.infer_arch(state, **w._reference_overrides(directory)), state


def _numel(param: Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def all_params_gathered(module: nn.Module) -> bool:
    """True when every ZeRO-3 parameter of `module` is currently whole on this rank (tests, asserts)."""
    return all(
        getattr(p, "ds_status", ZeroParamStatus.AVAILABLE) == ZeroParamStatus.AVAILABLE
        for p in module.parameters()
    )


def zero_fp32_state_dict(tag_dir: Path) -> dict[str, Tensor]:
    """Consolidated fp32 weights of a ZeRO checkpoint tag (DeepSpeed's zero_to_fp32), quietly."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints progress (stdout) and progress bars (stderr): keep tool output clean.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)

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
  (dtype errors in its forward), so the JSON may not turn it on. Costs fp32 parameter memory, except that
  with LoRA the frozen Gemma weights are stored in bf16 (engine/lora.store_frozen_bf16; autocast computes
  them in bf16 anyway), the trainable ones and the reference's fp32 modules staying fp32.
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

from ript_ds.config import ConfigError, EngineCfg, ExperimentCfg, TrainCfg
from ript_ds.engine import dist
from ript_ds.engine.ds_json import (
    check_ds_json,
    check_lora_frozen_bf16,
    check_zero_section,
    load_ds_json,
    offloads_optimizer,
    zero_stage,
)
from ript_ds.engine.lora import wrap_lora
from ript_ds.engine.schedule import LRSchedule
from ript_ds.model.arch import PI0Arch
from ript_ds.model.pi0 import PI0Batch, PI0Policy, unused_parameter_names
from ript_ds.model.pi05 import make_policy
from ript_ds.model.weights import CheckpointError, check_state

logger = logging.getLogger(__name__)

_ALLREDUCE_BUCKET = 500_000_000  # elements per bucket of the stage-0 gradient all-reduce (DeepSpeed's)


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
    # The update (rl/update.py) owns the accumulation boundary: it steps once per planned optimizer step,
    # after however many micro-batches that step has, so no half-accumulated gradient outlives an update.
    cfg["managed_gradient_accumulation"] = False
    cfg.pop("bf16", None)
    autocast = cfg.setdefault("torch_autocast", {"dtype": "bfloat16"})
    autocast["enabled"] = bf16
    autocast.setdefault("dtype", "bfloat16")
    # DeepSpeed would otherwise all-reduce the gradients of every nn.Linear in bf16; keep reductions fp32
    # (as DDP under autocast does): the parameters and the optimizer are fp32.
    autocast.setdefault("lower_precision_safe_modules", [])
    zero = cfg.setdefault("zero_optimization", {})
    if offloads_optimizer(cfg):
        # Lets the fallback (torch AdamW on CPU partitions) run when DeepSpeedCPUAdam cannot be built.
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    zero.setdefault("stage", 0)
    return cfg


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
        ds_overrides: Mapping[str, Any] | None = None,
    ):
        """policy_factory builds the PI0Policy (called inside zero.Init under ZeRO-3); weights: a canonical
        state dict, checked as strictly as model/weights.load_checkpoint (cond_embed is re-zeroed when absent)."""
        dist.init_distributed(train.collective_timeout_s)
        if not dist.is_main():  # DeepSpeed logs through its own logger on every rank
            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        self.ds_config = build_ds_config(
            engine.deepspeed_config, train, dist.world_size(), bf16, ds_overrides
        )
        check_lora_frozen_bf16(engine.deepspeed_config, self.ds_config, engine.lora, bf16)
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
        model: nn.Module = wrap_lora(policy, engine.lora, bf16) if engine.lora.enabled else policy

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = self._make_optimizer(trainable, train, engine)
        self.schedule = LRSchedule(optimizer, train.warmup_steps, engine.lr_schedule, engine.min_lr_ratio)
        self._engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.schedule, config=self.ds_config
        )
        self._trainable = trainable
        self.world_size = dist.world_size()
        if self.stage == 0:
            # Without ZeRO, step() reduces the gradients itself (before it measures their norm, which
            # DeepSpeed does not report at stage 0); on one rank it skips the reduction altogether.
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
        """Copy a canonical state dict into (possibly partitioned) parameters, one gathered parameter at a
        time, after the strict key and shape check that every loader shares (model/weights.check_state;
        a partitioned parameter reports its whole shape as ds_shape). Empty `weights`: a fresh policy.

        The zero-initialised parameters (policy.zero_init_names: the condition embedding, PI0.5's adaptive
        norms) are zeroed only under ZeRO-3 and only when `weights` lacks them: zero.Init swallowed the
        policy's zero-init there. Below ZeRO-3 the factory's policy already holds the right values
        (zeros, or the trained embedding of the checkpoint it loaded), which must survive."""
        if weights:
            expected = policy.state_dict(keep_vars=True)  # parameters and persistent buffers
            check_state(
                {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in expected.items()},
                {k: tuple(v.shape) for k, v in weights.items()},
                "weights",
            )
        zeroed = set(policy.zero_init_names())
        with torch.no_grad():
            for name, param in policy.named_parameters():
                value = weights.get(name)
                rezero = value is None and name in zeroed and self.stage == 3
                if value is None and not rezero:
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=self.stage == 3):
                    if rezero:
                        param.zero_()
                    else:
                        param.copy_(value.to(param.dtype))
            for name, buf in policy.named_buffers():
                if name in weights:
                    buf.copy_(weights[name].to(buf.dtype))

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

    def forward(
        self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None = None, repeats: int = 1
    ) -> Tensor:
        """Per-element flow-matching loss [R*B, H, A] (PI0Policy.forward: `repeats` branches per window
        share one prefix pass) through DeepSpeed's hooks. Every input goes to this rank's device here, the
        one place batches cross into the engine."""
        dev = self.device
        cond = None if cond is None else cond.to(dev, non_blocking=True)
        noise = noise.to(dev, non_blocking=True)
        return self._engine(batch.to(dev), noise, time.to(dev), cond, repeats=repeats)

    __call__ = forward

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of `loss` as given: the update normalizes each micro-batch's share of its
        optimizer step itself (rl/update.py), so DeepSpeed's 1/grad_accum_steps scaling is off."""
        self._engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Optimizer step now (reduce, clip, step, LR schedule) over everything accumulated since the last
        one; returns the global gradient norm before clipping. Call on every rank."""
        norm = None
        if self.stage == 0:
            if self.world_size > 1:  # DeepSpeed's own bucketed all-reduce (averages over ranks)
                self._engine.buffered_allreduce_fallback(elements_per_buffer=_ALLREDUCE_BUCKET)
            norm = torch.nn.utils.get_total_norm([p.grad for p in self._trainable if p.grad is not None])
        self._engine.step()
        norm = self._engine.get_global_grad_norm() if norm is None else norm
        return 0.0 if norm is None else float(norm)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] for the cosine schedule (engine/schedule.py)."""
        self.schedule.set_progress(progress)

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
        # Precision is the policy function's (rl/rollout.py make_pi0_policy_fn, model.pi0.precision), so
        # trainer rollouts and launch/eval.py sample with the same numerics.
        try:
            if self.stage != 3:
                with torch.no_grad():
                    yield self._policy
                return
            offload = self._engine.optimizer.parameter_offload
            params = list(self._engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params), torch.no_grad():
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

    def load_consolidated(self, read_weights: Callable[[], Mapping[str, Tensor]]) -> None:
        """Resume from a checkpoint written with another world size: `read_weights()` returns its consolidated
        fp32 weights (engine/consolidate.fp32_state_dict), copied into this engine's partitions; it is called
        only after the refusals, so a refused resume reads nothing (the whole model, per rank). Limits: the
        optimizer starts fresh (Adam moments and the LR-schedule step are not carried over) and LoRA
        runs are refused (their checkpoints hold adapters only). Call on every rank."""
        if self.lora.enabled:
            raise ConfigError("changing the world size on resume is not supported for LoRA runs yet")
        self._load_weights(self.module, read_weights())

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
) -> DeepSpeedEngine:
    """The engine for an experiment config; `ds_config` (the --deepspeed flag) overrides
    engine.deepspeed_config. Call on every rank.

    Under ZeRO-3 with model.checkpoint set, the factory is replaced: a checkpoint loader writes into whole
    tensors, which zero.Init has already partitioned away, so the arch is read from the checkpoint (with
    the run's overrides, as build_policy applies them), the policy built empty and partitioned, and the
    canonical tensors copied in one parameter at a time, after the same strict checks as load_checkpoint.
    """
    from ript_ds.build import arch_overrides

    engine_cfg = dataclasses.replace(cfg.engine, deepspeed_config=ds_config) if ds_config else cfg.engine
    path, ds_json = load_ds_json(engine_cfg.deepspeed_config)
    check_zero_section(path, ds_json)
    weights = None
    if zero_stage(ds_json) == 3 and cfg.model.checkpoint is not None:
        try:
            arch, weights = _checkpoint_for_zero3(Path(cfg.model.checkpoint), **arch_overrides(cfg))
        except CheckpointError as err:
            raise ConfigError(f"model.checkpoint: {err}") from None
        policy_factory = partial(make_policy, arch)  # PI0 or PI0.5, as the checkpoint says
    return DeepSpeedEngine(
        policy_factory,
        cfg.train,
        engine_cfg,
        bf16=cfg.model.dtype == "bfloat16",
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        weights=weights,
    )


def _checkpoint_for_zero3(directory: Path, **overrides) -> tuple[PI0Arch, dict[str, Tensor]]:
    """(arch, canonical tensors) of a checkpoint directory, as model/weights.load_checkpoint finds them:
    inspect_checkpoint checks files, keys and shapes (naming keys as the checkpoint spells them) before
    any tensor is read. Every rank reads the file (CPU memory: one copy of the weights per rank)."""
    from ript_ds.model import weights as w

    arch = w.inspect_checkpoint(directory, **overrides)
    state, _ = w.to_canonical(w.read_safetensors(directory / w.CANONICAL_WEIGHTS))
    return arch, state


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

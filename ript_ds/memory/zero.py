"""Per-rank memory of a DeepSpeed ZeRO engine as engine/deepspeed.py builds it (DeepSpeed 0.19), from the
parameter inventory and activation model of memory/activations.py. Pure arithmetic: no deepspeed import.

How the engine keeps parameters (this dominates): bf16 runs as DeepSpeed's `torch_autocast`, so the model's
parameters stay fp32 and every optimizer holds its own fp32 master partition as well (Psi = all parameters,
Psi_t = trainable, N = ranks, bytes per rank). Under LoRA the frozen weights of the modules autocast runs in
bf16 (the Gemma projections and token embedding: Psi_b) are stored in bf16 (engine/lora.store_frozen_bf16),
so "4 Psi" below reads 4 (Psi - Psi_b) + 2 Psi_b (ParamInfo.storage: bytes per element):

| | ZeRO-2 | ZeRO-3 |
|---|---|---|
| parameters | 4 Psi (whole model on every rank) | 4 Psi / N partitions + 4 Psi_p (whole copies of "persistent" parameters, numel <= stage3_param_persistence_threshold) |
| master copy | 4 Psi_t / N | 4 Psi_t / N (DeepSpeed's path that would share it with the fp32 partition compares a torch.device to a string and never fires: measured) |
| Adam moments | 8 Psi_t / N | 8 Psi_t / N |
| gradients | 4 x (Psi_t / N + whole parameters cut by the rank's slice boundaries), from backward to the step | 4 Psi_t / N flat buffer, always |
| reduce buckets | one (every reduction is fp32: build_ds_config), (2 if overlap_comm) x reduce_bucket_size fp32 elements; backward only | reduce_bucket_size x 4 bytes, always |
| gathered parameters | - | up to min(Psi, stage3_max_live_parameters + stage3_prefetch_bucket_size) elements (at the parameters' mean bytes per element) in forward/backward (N > 1; one rank aliases its partition) |

Offload (ZeRO-3 + offload_optimizer/offload_param to cpu) moves master, moments and gradients (twice: the
reduction buffer and the optimizer's gradient buffer) and the parameter partitions to pinned host memory;
the GPU keeps persistent parameters, the buckets, gathered parameters and activations.

Transients on top: autograd's full fp32 gradient of the largest trainable parameter before it is reduced
(the 257152 x 2048 token embedding: 2 GiB), and at the optimizer step (activations gone) a flat fp32 copy of
the gradient partition beside the gradients (ZeRO-2 with N > 1; the fused AdamW adds none).

Rollout phase (engine.rollout_context): under ZeRO-3 every parameter is gathered once, as stored (4 Psi, N > 1);
and because the whole rollout runs inside one torch.autocast, autocast caches a bf16 copy of every
trainable Linear weight it uses (2 Psi_t_linear) until the rollout ends, at any stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ript_ds.memory.activations import BF16, FP32, Activations, ParamInfo

GIB = 2**30


@dataclass(frozen=True)
class Workload:
    """What the estimate depends on besides the model and the DeepSpeed JSON (per rank). Defaults: the
    LIBERO configs in launch/configs (libero_10_full micro-batch, libero_spatial_lora rank)."""

    micro_batch: int = 4  # windows per GPU per micro-step (train.micro_batch_size)
    rows_per_window: int = 2  # forward rows per window: 2 for cfg, 1 for awr, M for fpo
    cameras: int = 3  # camera slots (absent ones are masked but still computed)
    text_tokens: int = 48  # model.tokenizer_max_length
    lora_rank: int = 32
    lora_target: str = "both"  # engine.lora.target
    rollout_envs: int = 8  # observations per batched policy call in rollouts (rollout.num_envs)
    guidance: bool = True  # rollouts run both condition branches in one batch


@dataclass(frozen=True)
class ZeroCfg:
    """The knobs of a DeepSpeed JSON that decide memory (defaults: DeepSpeed's)."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    persistence_threshold: int = 100_000

    @classmethod
    def from_ds_config(cls, cfg: Mapping[str, Any]) -> ZeroCfg:
        zero = cfg.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        if stage not in (2, 3):
            raise ValueError(f"zero_optimization.stage={stage}: the estimator models ZeRO stages 2 and 3")

        def offloaded(key: str) -> bool:
            return zero.get(key, {}).get("device", "none") not in ("none", None)

        return cls(
            stage=stage,
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
            reduce_bucket_size=int(float(zero.get("reduce_bucket_size", cls.reduce_bucket_size))),
            prefetch_bucket_size=int(
                float(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket_size))
            ),
            max_live_parameters=int(float(zero.get("stage3_max_live_parameters", cls.max_live_parameters))),
            persistence_threshold=int(
                float(zero.get("stage3_param_persistence_threshold", cls.persistence_threshold))
            ),
        )

    @property
    def name(self) -> str:
        return f"ZeRO-{self.stage}" + ("+offload" if self.offload_optimizer or self.offload_param else "")


@dataclass(frozen=True)
class ModelState:
    """Bytes one rank holds for the model, by kind; `host` is what offloading puts in CPU memory."""

    params: int  # accelerator
    grads: int  # accelerator, at its largest (backward -> step)
    optimizer: int  # accelerator: fp32 master partition + Adam moments
    buckets: int  # accelerator: gradient reduction buckets (ZeRO-2: during backward; ZeRO-3: always)
    host: int = 0

    @property
    def states(self) -> int:
        """What the test compares with an engine's tensors: params + grads + optimizer."""
        return self.params + self.grads + self.optimizer


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def zero2_gradient_elements(params: Sequence[ParamInfo], world: int) -> list[int]:
    """Elements of ZeRO-2's gradient buffer on each rank: it holds every trainable parameter that overlaps
    the rank's slice of the flattened model whole, so a rank whose boundary cuts the 527 M-element token
    embedding holds all of it (padding for alignment ignored)."""
    sizes = [p.numel for p in params if p.trainable]
    part = _ceil_div(sum(sizes), world)
    per_rank, start = [0] * world, 0
    for n in sizes:
        for rank in range(start // part, (start + n - 1) // part + 1):
            per_rank[rank] += n
        start += n
    return per_rank


def model_state(
    params: Sequence[ParamInfo], zero: ZeroCfg, world: int, rank: int | None = None
) -> ModelState:
    """Per-rank parameter, gradient, optimizer and bucket bytes (see the module table): of `rank`, or of
    the rank that holds the most (None)."""
    trainable = sum(p.numel for p in params if p.trainable)
    part = _ceil_div(trainable, world)  # partitions are padded to equal sizes
    # One bucket per communication dtype; build_ds_config keeps every gradient reduction in fp32
    # (torch_autocast.lower_precision_safe_modules = []), so there is one.
    dtypes = {FP32}
    bucket = zero.reduce_bucket_size if zero.contiguous_gradients else 0
    master_moments = (FP32 + 2 * FP32) * part
    if zero.stage == 2:  # its buffers are fp32 whatever the dtype, doubled with overlap_comm
        weights, host = sum(p.numel * p.storage for p in params), 0  # the whole model, as stored
        buckets = bucket * FP32 * len(dtypes) * (2 if zero.overlap_comm else 1)
    else:
        # Persistent parameters stay whole beside their partition (one rank: the partition is the whole).
        persistent = sum(p.numel * p.storage for p in params if p.numel <= zero.persistence_threshold)
        partitions = sum(p.storage * _ceil_div(p.numel, world) for p in params)
        weights, host = (persistent if world > 1 else 0), 0
        if zero.offload_param:
            host += partitions
        else:
            weights += partitions
        buckets = bucket * sum(dtypes)
    grads = FP32 * part
    if zero.stage == 2 and world > 1:
        per_rank = zero2_gradient_elements(params, world)
        grads = FP32 * (max(per_rank) if rank is None else per_rank[rank])
    if zero.offload_optimizer:
        host += master_moments + grads * (2 if zero.stage == 3 else 1)
        return ModelState(weights, 0, 0, buckets, host)
    return ModelState(weights, grads, master_moments, buckets, host)


@dataclass(frozen=True)
class Estimate:
    """Peak bytes per rank of one configuration, by component (accelerator unless noted)."""

    zero: ZeroCfg
    lora: bool
    checkpointing: bool
    world: int
    state: ModelState
    activations: int  # forward + backward peak of one micro-batch (memory/activations.Activations.peak)
    transient: int  # during backward: gathered ZeRO-3 parameters + the largest parameter's full gradient
    step: int  # at the optimizer step, beyond params + optimizer (+ ZeRO-3's held gradients and buckets)
    step_partition: int  # bytes of one fp32 gradient partition (the flat copy made at the step)
    rollout_gather: int  # rollout phase: ZeRO-3's whole fp32 parameters (beside the partitions)
    rollout_cache: int  # rollout phase: autocast's bf16 copies of the trainable Linear weights
    rollout_working: int  # rollout phase: KV cache and the widest layer of one sampling call

    @property
    def rollout(self) -> int:
        return self.rollout_gather + self.rollout_cache + self.rollout_working

    @property
    def buffers(self) -> int:
        """Reduce buckets plus backward transients (the `buffers` column)."""
        return self.state.buckets + self.transient

    def phases(self) -> dict[str, int]:
        """Peak of each phase: backward (activations alive), optimizer step, rollout."""
        s = self.state
        zero3 = self.zero.stage == 3  # its gradient buffer and buckets live through every phase
        held = s.params + s.optimizer + (s.grads + s.buckets if zero3 else 0)
        return {
            "train": s.params + s.optimizer + s.grads + self.activations + self.buffers,
            "step": held + self.step,
            "rollout": held + self.rollout,
        }

    @property
    def total(self) -> int:
        return max(self.phases().values())

    @property
    def phase(self) -> str:
        peaks = self.phases()
        return max(peaks, key=peaks.get)


def estimate(
    params: Sequence[ParamInfo],
    zero: ZeroCfg,
    world: int,
    acts: Activations,
    rollout_working: int,
    lora: bool,
    checkpointing: bool,
) -> Estimate:
    """Combine model state, activations and phase transients for one configuration."""
    trainable = [p for p in params if p.trainable]
    gathered = full = 0
    if zero.stage == 3 and (world > 1 or zero.offload_param):  # one rank without offload aliases
        sharded = [p for p in params if p.numel > zero.persistence_threshold]
        numel = sum(p.numel for p in sharded)
        full = sum(p.numel * p.storage for p in sharded)  # rollout_context gathers every parameter
        # The live limit counts elements: take them at the mean bytes per element (LoRA's bf16 base: ~2).
        limit = zero.max_live_parameters + zero.prefetch_bucket_size
        gathered = full if numel <= limit else full * limit // numel
    autocast_cache = BF16 * sum(p.numel for p in trainable if p.low_precision and p.used)
    state = model_state(params, zero, world)
    # At the step (measured on CPU with the engine's fused AdamW, which adds no temporaries): a flat
    # fp32 copy of the gradient partition under ZeRO-3 and under ZeRO-1/2 on one rank; ZeRO-1/2 on N > 1
    # ranks hold two partition-sized buffers on every rank, whatever its boundary-cut gradients hold.
    part = FP32 * _ceil_div(sum(p.numel for p in trainable), world)
    if zero.offload_optimizer:
        step = 0
    elif zero.stage == 3 or world == 1:
        step = part
    else:
        step = 2 * part
    if zero.stage == 3 and world > 1:  # after the step ZeRO-3 re-gathers the persistent parameters
        step = max(step, sum(p.numel * p.storage for p in params if p.numel <= zero.persistence_threshold))
    return Estimate(
        zero=zero,
        lora=lora,
        checkpointing=checkpointing,
        world=world,
        state=state,
        activations=acts.peak,
        transient=gathered + FP32 * max(p.numel for p in trainable),
        step=step,
        step_partition=part,
        rollout_gather=full,
        rollout_cache=autocast_cache,
        rollout_working=rollout_working,
    )

"""The policy update of one RIPT iteration: windows -> a global plan -> optimizer steps -> backend calls.

The backend is whatever owns the optimizer: `TorchBackend` here (one process, tests), or the DeepSpeed
engine (engine/deepspeed.py) in training. It is called as `forward(batch, noise, time, cond, repeats)` ->
per-element loss (the backend moves every input to its device; `repeats` branches per window of the batch,
which share one prefix pass: PI0Policy.loss), `backward(loss)` (accumulate, no scaling) and `step()`
(optimizer step now; the caller owns the accumulation boundary).

Weighting (one rule for every objective, rank count and micro-batching): a window's objective l_b is
computed from its flow-matching loss averaged over its valid (executed) action steps and real action
dims, and an optimizer step's loss is the mean over the step's real windows on all ranks,

    L_s = sum over the step's windows b of l_b / N_s,     N_s = the number of those windows,

what one process computing the whole step at once would get, and what a DDP mean over real samples would
be. Each rank's micro-batch loss is its share of L_s times the world size W, because the data-parallel
reduction averages gradients over W: the step's gradient is exactly grad L_s whatever the rank count,
the micro-batching and however the kept groups fall over ranks; padding rows weigh 0. (Weighting windows
by their valid steps instead was measured and rejected: it down-weights the last windows of successful
episodes, the final approach, and cut the held-out gain of the learning check from +0.34 to +0.05;
docs/benchmarks.md.)

The plan (`plan_update`) is a pure function of every rank's window refs (their keys, all-gathered
by the trainer) and a seed shared by all ranks: windows are put in a global order (by key: episode seed,
window index), shuffled per epoch, and cut into optimizer steps of `micro_batch_size x grad_accum_steps x
W` windows. In each step a rank runs its own windows of that step in micro-batches, padded with one
zero-weight window to the step's largest per-rank micro-batch count, so every rank runs the same forward
and backward passes (collectives inside) and every update ends on an optimizer step. (noise, time) draws
are keyed by (seed, epoch, window key): the same on 1 or N ranks.

Objectives (rl/losses.py, DESIGN section 3):
- cfg (classifier-free-guidance RIPT, `guided_loss`): one forward of 2B suffix rows over B prefixes,
  c=positive for the first B and c=none for the last B;
- awr: one forward with no condition, weights exp(A / beta);
- fpo: M draws per window (M B suffix rows over B prefixes); the old losses are computed once, before the
  first epoch, from the policy that collected the rollouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ript_ds.config import GUIDED, RiptCfg, TrainCfg
from ript_ds.model.flow import reduce_loss, sample_noise_time
from ript_ds.model.pi0 import PI0Batch, PI0Policy
from ript_ds.model.processing import Processor
from ript_ds.rl.losses import awr_loss, fpo_loss, guided_loss
from ript_ds.rl.types import Window
from ript_ds.rl.windows import WindowBatch, windows_batch

_FPO_TAG = 1  # seeds FPO's draws, which stay fixed over the epochs (the ratio compares at the same draws)
_PAD_TAG = 2  # seeds the draws of padding rows (their loss is masked to an exact zero)


class UpdateBackend(Protocol):
    device: torch.device  # where the micro-batch's masks and weights go
    world_size: int  # data-parallel ranks whose gradients the backend averages

    def forward(
        self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None, repeats: int = 1
    ) -> Tensor: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> float | None: ...


# Objective-specific means over real windows, reported as train/<key> (same keys on every rank).
EXTRA_KEYS = {
    GUIDED: ("loss_cond", "loss_uncond"),
    "awr": ("awr/mean_weight", "awr/clip_frac"),
    "fpo": ("fpo/ratio", "fpo/clip_frac"),
}


@dataclass(frozen=True, order=True)
class WindowRef:
    """What every rank knows about every window of the update (all-gathered by the trainer)."""

    key: tuple[int, int]  # (episode seed, window index): unique in a run, independent of the rank layout


def update_seed(run_seed: int, iteration: int) -> int:
    """The update's seed: a function of the run seed and the iteration alone, the same on every rank and
    after any resume, so no update RNG state needs checkpointing."""
    return int(np.random.SeedSequence([run_seed, iteration]).generate_state(1)[0])


def window_refs(windows: Sequence[Window], rank: int = 0) -> list[WindowRef]:
    """Refs of this rank's windows; hand-made windows without a key are identified by position."""
    return [WindowRef(w.key if w.key is not None else (rank, i)) for i, w in enumerate(windows)]


@dataclass
class OptimizerStep:
    normalizer: float  # N_s: the step's windows over all ranks
    micro_batches: list[np.ndarray]  # local window indices per micro-batch, -1 = padding


@dataclass
class UpdatePlan:
    steps: list[list[OptimizerStep]]  # [epoch][step]
    reference: list[np.ndarray]  # fpo: micro-batches of the old-loss pass (same count on every rank)
    global_windows: int

    @property
    def micro_steps(self) -> int:
        return sum(len(s.micro_batches) for epoch in self.steps for s in epoch)

    @property
    def optimizer_steps(self) -> int:
        return sum(len(epoch) for epoch in self.steps)


def plan_update(
    shards: Sequence[Sequence[WindowRef]], rank: int, train: TrainCfg, seed: int, loss: str = GUIDED
) -> UpdatePlan:
    """The same global plan on every rank (see the module docstring); `shards[r]` are rank r's refs.
    train: epochs, micro_batch_size, grad_accum_steps; loss: ript.loss (fpo adds the reference pass)."""
    owner = {ref.key: (r, i) for r, shard in enumerate(shards) for i, ref in enumerate(shard)}
    refs = sorted(ref for shard in shards for ref in shard)
    if len(owner) != len(refs):
        raise ValueError("window keys are not unique across ranks; cannot build a layout-free plan")
    world, size = len(shards), train.micro_batch_size
    per_step = size * train.grad_accum_steps * world
    steps = []
    for epoch in range(train.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(refs))
        epoch_steps = []
        for start in range(0, len(refs), per_step):
            chunk = [refs[g] for g in order[start : start + per_step]]
            counts = np.bincount([owner[ref.key][0] for ref in chunk], minlength=world)
            n_micro = max(1, -(-int(counts.max()) // size))
            mine = [owner[ref.key][1] for ref in chunk if owner[ref.key][0] == rank]
            epoch_steps.append(OptimizerStep(float(len(chunk)), _split(mine, size, n_micro)))
        steps.append(epoch_steps)
    n_ref = max(1, max(-(-len(shard) // size) for shard in shards))
    reference = _split(list(range(len(shards[rank]))), size, n_ref) if loss == "fpo" else []
    return UpdatePlan(steps, reference, len(refs))


def _split(indices: list[int], size: int, n: int) -> list[np.ndarray]:
    """n micro-batches of at most `size` indices; empty ones hold one padding slot (-1)."""
    out = [np.array(indices[i * size : (i + 1) * size], dtype=np.int64) for i in range(n)]
    return [mb if len(mb) else np.array([-1]) for mb in out]


@dataclass
class UpdateStats:
    """This rank's shares of additive totals; sum `sums` over ranks before reading the properties."""

    sums: dict[str, float] = field(default_factory=dict)
    optimizer_steps: int = 0
    micro_steps: int = 0
    grad_norm: float = 0.0  # mean over optimizer steps of the global (reduced) norm before clipping

    @property
    def loss(self) -> float:
        """Mean over optimizer steps of the step loss L_s."""
        return self.sums.get("loss", 0.0) / max(self.optimizer_steps, 1)

    @property
    def windows(self) -> float:
        return self.sums.get("windows", 0.0)

    @property
    def extra(self) -> dict[str, float]:
        """Objective-specific means over real windows (awr, fpo); cfg's two terms are loss_cond/uncond."""
        out = {}
        for key in (k for k in self.sums if not k.startswith(("loss", "windows", "count/"))):
            out[key] = self.sums[key] / max(self.sums.get(f"count/{key}", 0.0), 1.0)
        return out

    @property
    def loss_cond(self) -> float:
        return self.sums.get("loss_cond", 0.0) / max(self.optimizer_steps, 1)

    @property
    def loss_uncond(self) -> float:
        return self.sums.get("loss_uncond", 0.0) / max(self.optimizer_steps, 1)


class TorchBackend:
    """Plain PyTorch AdamW with clipping (one process); the caller decides when to step."""

    world_size = 1

    def __init__(self, policy: PI0Policy, lr: float, grad_clip: float = 1.0, weight_decay: float = 0.0):
        self.policy, self.clip = policy, grad_clip
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def forward(
        self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None, repeats: int = 1
    ) -> Tensor:
        dev, cond = self.device, None if cond is None else cond.to(self.device)
        return self.policy(batch.to(dev), noise.to(dev), time.to(dev), cond, repeats=repeats)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


@dataclass
class _MicroBatch:
    index: np.ndarray  # [B] local window index, -1 for padding
    keys: list[tuple[int, int] | None]  # [B] draw keys, None for padding
    inputs: WindowBatch  # on the backend's device

    @property
    def real(self) -> int:
        return int((self.index >= 0).sum())


class _Batcher:
    def __init__(self, processor: Processor, prompts: Mapping[int, str], padding: Window, device):
        self.processor, self.prompts, self.padding, self.device = processor, prompts, padding, device

    def __call__(
        self, windows: Sequence[Window], refs: Sequence[WindowRef], index: np.ndarray
    ) -> _MicroBatch:
        ws = [windows[i] if i >= 0 else self.padding for i in index]
        keys = [refs[i].key if i >= 0 else None for i in index]
        return _MicroBatch(index, keys, windows_batch(self.processor, ws, self.prompts, self.device))


def _draws(arch, keys: Sequence[tuple[int, int] | None], entropy: Sequence[int], m: int = 1):
    """(noise [m * B, H, A], time [m * B]) draw-major (row j * B + b is window b's draw j), each window's
    draws from (entropy, key) alone: independent of batching, padding and sharding over ranks."""
    draws = [
        sample_noise_time(arch, m, np.random.default_rng([*entropy, *(key or (_PAD_TAG, 0))])) for key in keys
    ]
    noise = torch.stack([d[0] for d in draws], dim=1).flatten(0, 1)  # [M, B, H, A] -> [M * B, H, A]
    return noise, torch.stack([d[1] for d in draws], dim=1).flatten()


class _Objective:
    """One micro-batch's loss under ript.loss; the normalizer makes it a share of L_s."""

    def __init__(self, backend: UpdateBackend, arch, ript: RiptCfg, action_dim: int, seed: int):
        self.backend, self.arch, self.ript, self.action_dim, self.seed = backend, arch, ript, action_dim, seed
        self.old: dict[tuple[int, int], Tensor] = {}  # fpo: window key -> [M] rollout-time losses

    def fpo_reference(self, micro_batches: Iterable[_MicroBatch]) -> None:
        """FPO's old losses at the M fixed draws per window, from the parameters before any step."""
        m = self.ript.fpo_samples
        with torch.no_grad():
            for mb in micro_batches:
                losses = self._fpo_losses(mb, m)  # [B, M]
                for b, key in enumerate(mb.keys):
                    if key is not None:
                        self.old[key] = losses[b].detach().float()

    def _fpo_losses(self, mb: _MicroBatch, m: int) -> Tensor:
        noise, time = _draws(self.arch, mb.keys, (self.seed, _FPO_TAG), m)
        per = self.backend.forward(mb.inputs.batch, noise, time, None, repeats=m)  # one prefix per window
        return reduce_loss(per, mb.inputs.step_mask.repeat(m, 1), self.action_dim).view(m, -1).T  # [B, M]

    def __call__(self, mb: _MicroBatch, epoch: int, normalizer: float) -> tuple[Tensor, dict[str, float]]:
        ript, inputs, b = self.ript, mb.inputs, len(mb.index)
        if ript.loss == "fpo":
            new = self._fpo_losses(mb, ript.fpo_samples)
            zeros = torch.zeros(ript.fpo_samples, device=new.device)
            old = torch.stack([self.old[k].to(new.device) if k is not None else zeros for k in mb.keys])
            res = fpo_loss(new, old, inputs.advantage, ript.fpo_clip, inputs.weight, normalizer)
            return res.loss, {"fpo/ratio": float(res.ratio_mean), "fpo/clip_frac": float(res.clip_frac)}
        noise, time = _draws(self.arch, mb.keys, (self.seed, epoch))
        if ript.guided:
            # One forward of 2B suffix rows over B prefixes: c=positive then c=none, same noise and time.
            cond = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)])
            per = self.backend.forward(inputs.batch, noise.repeat(2, 1, 1), time.repeat(2), cond, repeats=2)
            both = reduce_loss(per, inputs.step_mask.repeat(2, 1), self.action_dim)
            res = guided_loss(
                both[:b], both[b:], inputs.advantage, ript.uncond_weight, inputs.weight, normalizer
            )
            return res.loss, {"loss_cond": float(res.cond), "loss_uncond": float(res.uncond)}
        per = self.backend.forward(inputs.batch, noise, time, None)
        losses = reduce_loss(per, inputs.step_mask, self.action_dim)
        res = awr_loss(
            losses, inputs.advantage, ript.awr_beta, ript.awr_max_weight, inputs.weight, normalizer
        )
        return res.loss, {"awr/mean_weight": float(res.mean_weight), "awr/clip_frac": float(res.clip_frac)}


def run_update(
    backend: UpdateBackend,
    arch,
    processor: Processor,
    windows: Sequence[Window],
    prompts: Mapping[int, str],
    ript: RiptCfg,
    train: TrainCfg,
    seed: int,
    plan: UpdatePlan | None = None,
    padding: Window | None = None,
    rank: int = 0,
) -> UpdateStats:
    """Run `plan` (default: the single-process plan of `windows`) over this rank's `windows`.

    ript: the objective and its settings (loss, uncond_weight, awr_*, fpo_*); train: epochs and batching.
    seed: the same on every rank (it shuffles and draws); padding: a shape template for the padding rows
    (default: the first window), needed when this rank has no window of its own. Returns this rank's
    shares of the totals: sum `stats.sums` over ranks before reading its properties.
    """
    refs = window_refs(windows, rank)
    if plan is None:
        plan = plan_update([refs], 0, train, seed, ript.loss)
    padding = padding or (windows[0] if windows else None)
    if padding is None:
        raise ValueError("run_update: no windows and no padding window to keep this rank in step")
    batcher = _Batcher(processor, prompts, padding.as_padding(), backend.device)
    objective = _Objective(backend, arch, ript, processor.action_dim, seed)
    if ript.loss == "fpo":
        # A generator: one micro-batch on the device at a time, not the rank's every window at once.
        objective.fpo_reference(batcher(windows, refs, idx) for idx in plan.reference)
    keys = ("loss", *EXTRA_KEYS[ript.loss])
    counts = {f"count/{k}": 0.0 for k in keys if not k.startswith("loss")}
    stats = UpdateStats(sums={k: 0.0 for k in (*keys, "windows")} | counts)
    norms = []
    for epoch, epoch_steps in enumerate(plan.steps):
        for step in epoch_steps:
            for index in step.micro_batches:
                mb = batcher(windows, refs, index)
                loss, logs = objective(mb, epoch, step.normalizer / backend.world_size)
                backend.backward(loss)
                stats.micro_steps += 1
                _accumulate(stats.sums, float(loss.detach()), logs, mb.real, backend.world_size)
            norm = backend.step()
            norms.append(0.0 if norm is None else norm)
    stats.sums["windows"] = float(len(windows))
    stats.optimizer_steps = plan.optimizer_steps
    stats.grad_norm = float(np.mean(norms)) if norms else 0.0
    return stats


def _accumulate(sums: dict[str, float], loss: float, logs: dict[str, float], real: int, world: int) -> None:
    """Add one micro-batch to the totals: loss terms (normalized x W, see run_update) as this rank's share
    of the step's terms, other logs (means over the micro-batch's real windows) as sums over windows."""
    sums["loss"] += loss / world
    for key, value in logs.items():
        if key.startswith("loss"):
            sums[key] += value / world
        elif real:
            sums[key] += value * real
            sums[f"count/{key}"] += real

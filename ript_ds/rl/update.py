"""The policy update of one RIPT iteration: windows -> E epochs of micro-batches -> backend steps.

The backend is whatever owns the optimizer: `TorchBackend` here (single process, tests, BC), or the
DeepSpeed engine (engine/deepspeed.py) in training. It is called for every micro-batch:
`forward(batch, noise, time, cond)` -> per-element loss, `backward(loss)`, `step()`; `step()` applies
the optimizer at gradient-accumulation boundaries and returns the gradient norm there (else None).

Objectives (rl/losses.py, DESIGN section 3), all at shared (noise, time) draws per window:
- cfg: one forward of 2B rows, c=positive for the first B and c=none for the last B;
- awr: one forward with no condition, weights exp(A / beta);
- fpo: M draws per window; the old losses are computed once, before the first epoch, from the
  policy that collected the rollouts.
Every rank must run the same number of micro-steps (collectives inside backward/step): the caller
passes `num_micro_batches`, and missing micro-batches are filled with zero-weight padding windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from ript_ds.model.pi0 import PI0Batch, PI0Policy, reduce_loss, sample_noise_time
from ript_ds.model.processing import Processor
from ript_ds.rl.losses import awr_loss, cfg_loss, fpo_loss
from ript_ds.rl.types import Window


class UpdateBackend(Protocol):
    def forward(self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None) -> Tensor: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> float | None: ...


@dataclass
class UpdateCfg:
    loss: Literal["cfg", "awr", "fpo"] = "cfg"
    epochs: int = 1
    micro_batch_size: int = 8
    cfg_alpha: float = 0.1
    awr_beta: float = 1.0
    awr_max_weight: float = 20.0
    fpo_clip: float = 0.2
    fpo_samples: int = 4
    action_dim: int = 7  # real action dims (the rest of the model's 32 is padding)


@dataclass
class UpdateStats:
    loss: float = 0.0  # mean over micro-batches with real windows
    loss_cond: float = 0.0  # cfg: conditional flow-matching term
    loss_uncond: float = 0.0  # cfg: unconditional term (before alpha)
    grad_norm: float = 0.0  # mean over optimizer steps
    windows: int = 0  # real windows this rank trained on, per epoch
    micro_steps: int = 0
    optimizer_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)  # objective-specific (ratio, clip fraction)


class TorchBackend:
    """Plain PyTorch AdamW with gradient accumulation and clipping (one process)."""

    def __init__(
        self,
        policy: PI0Policy,
        lr: float,
        grad_accum_steps: int = 1,
        grad_clip: float = 1.0,
        weight_decay: float = 0.0,
    ):
        self.policy, self.accum, self.clip = policy, grad_accum_steps, grad_clip
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self._micro = 0

    def forward(self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None) -> Tensor:
        return self.policy(batch, noise, time, cond)

    def backward(self, loss: Tensor) -> None:
        (loss / self.accum).backward()  # as DeepSpeed: the accumulated gradient is a mean

    def step(self) -> float | None:
        self._micro += 1
        if self._micro % self.accum:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def micro_batches_needed(num_windows: int, micro_batch_size: int) -> int:
    return -(-num_windows // micro_batch_size)


def _repeat(batch: PI0Batch, n: int) -> PI0Batch:
    """n stacked copies along the batch axis (every tensor [B, ...] -> [n B, ...])."""

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.repeat(n, *([1] * (t.ndim - 1)))

    return PI0Batch(*(rep(getattr(batch, f)) for f in batch.__dataclass_fields__))


@dataclass
class _MicroBatch:
    windows: list[Window]  # real windows first, zero-weight padding after
    index: np.ndarray  # [B] position in the update's window list, -1 for padding
    batch: PI0Batch
    step_mask: Tensor  # [B, H] bool
    advantage: Tensor  # [B]
    weight: Tensor  # [B], 0 for padding


class _Batcher:
    def __init__(self, processor: Processor, prompts: Mapping[int, str], padding: Window):
        self.processor, self.prompts, self.padding = processor, prompts, padding

    def __call__(self, windows: Sequence[Window], index: np.ndarray) -> _MicroBatch:
        ws = [windows[i] if i >= 0 else self.padding for i in index]
        batch = self.processor.batch(
            np.stack([w.images for w in ws]),
            np.stack([w.state for w in ws]),
            [self.prompts[w.task_id] for w in ws],
            np.stack([w.actions for w in ws]),
        )
        return _MicroBatch(
            windows=ws,
            index=index,
            batch=batch,
            step_mask=torch.from_numpy(np.stack([w.action_mask for w in ws])),
            advantage=torch.tensor([w.advantage for w in ws], dtype=torch.float32),
            weight=torch.tensor([w.weight for w in ws], dtype=torch.float32),
        )


class FpoReference:
    """FPO's rollout-time losses: M (noise, time) draws per window and their losses under the old policy."""

    def __init__(
        self,
        backend: UpdateBackend,
        arch,
        micro_batches: list[_MicroBatch],
        n: int,
        m: int,
        action_dim: int,
        rng: np.random.Generator,
    ):
        self.m = m
        self.noise, self.time = sample_noise_time(arch, n * m, rng)
        self.noise = self.noise.view(n, m, *self.noise.shape[1:])  # [N, M, H, A]
        self.time = self.time.view(n, m)  # [N, M]
        self.old = torch.zeros(n, m)
        with torch.no_grad():
            for mb in micro_batches:
                noise, time = self.draws(mb.index)
                per = backend.forward(_repeat(mb.batch, m), noise, time, None)
                losses = reduce_loss(per, mb.step_mask.repeat(m, 1), action_dim).view(m, -1).T  # [B, M]
                real = mb.index >= 0
                self.old[mb.index[real]] = losses[torch.from_numpy(real)].float()

    def draws(self, index: np.ndarray) -> tuple[Tensor, Tensor]:
        """[M * B, H, A] noise and [M * B] time, draw-major so row m * B + b is window b's draw m."""
        idx = torch.from_numpy(np.maximum(index, 0))
        noise = self.noise[idx].transpose(0, 1).reshape(-1, *self.noise.shape[2:])
        return noise, self.time[idx].T.reshape(-1)

    def losses(self, index: np.ndarray) -> Tensor:
        return self.old[torch.from_numpy(np.maximum(index, 0))]  # [B, M]; padding rows are masked later


def _window_draws(arch, index: np.ndarray, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(noise, time) per window from (seed, epoch, window index): independent of how windows are
    batched, padded or sharded over ranks, so 1-rank and N-rank updates see the same draws."""
    draws = [sample_noise_time(arch, 1, np.random.default_rng([*key, max(int(i), 0)])) for i in index]
    return torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])


def _micro_loss(
    backend: UpdateBackend, mb: _MicroBatch, cfg: UpdateCfg, arch, draw_key, fpo: FpoReference | None
):
    """Loss of one micro-batch under the configured objective -> (loss, logs)."""
    b = len(mb.index)
    if cfg.loss == "fpo":
        noise, time = fpo.draws(mb.index)
        per = backend.forward(_repeat(mb.batch, fpo.m), noise, time, None)
        new = reduce_loss(per, mb.step_mask.repeat(fpo.m, 1), cfg.action_dim).view(fpo.m, b).T  # [B, M]
        res = fpo_loss(new, fpo.losses(mb.index), mb.advantage, cfg.fpo_clip, mb.weight)
        return res.loss, {"fpo/ratio": float(res.ratio_mean), "fpo/clip_frac": float(res.clip_frac)}
    noise, time = _window_draws(arch, mb.index, draw_key)
    if cfg.loss == "cfg":
        # One forward of 2B rows: c=positive then c=none, at the same noise and time.
        cond = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)])
        per = backend.forward(_repeat(mb.batch, 2), noise.repeat(2, 1, 1), time.repeat(2), cond)
        both = reduce_loss(per, mb.step_mask.repeat(2, 1), cfg.action_dim)
        res = cfg_loss(both[:b], both[b:], mb.advantage, cfg.cfg_alpha, mb.weight)
        return res.loss, {"loss_cond": float(res.cond), "loss_uncond": float(res.uncond)}
    per = backend.forward(mb.batch, noise, time, None)
    losses = reduce_loss(per, mb.step_mask, cfg.action_dim)
    res = awr_loss(losses, mb.advantage, cfg.awr_beta, cfg.awr_max_weight, mb.weight)
    return res.loss, {"awr/mean_weight": float(res.mean_weight), "awr/clip_frac": float(res.clip_frac)}


def run_update(
    backend: UpdateBackend,
    arch,
    processor: Processor,
    windows: Sequence[Window],
    prompts: Mapping[int, str],
    cfg: UpdateCfg,
    rng: np.random.Generator,
    num_micro_batches: int | None = None,
    padding: Window | None = None,
) -> UpdateStats:
    """E epochs over `windows` (this rank's share) in shuffled micro-batches.

    num_micro_batches: micro-batches per epoch, the same on every rank (default: what the windows
    need); missing slots are zero-weight copies of `padding` (default: the first window).
    """
    padding = padding or (windows[0] if windows else None)
    if padding is None:
        raise ValueError("run_update: no windows and no padding window to keep this rank in step")
    batcher = _Batcher(processor, prompts, padding.as_padding())
    n_mb = num_micro_batches or micro_batches_needed(len(windows), cfg.micro_batch_size)
    if n_mb * cfg.micro_batch_size < len(windows):
        raise ValueError(f"{len(windows)} windows do not fit {n_mb} micro-batches of {cfg.micro_batch_size}")
    fpo = None
    if cfg.loss == "fpo":
        plan = _plan(len(windows), n_mb, cfg.micro_batch_size, np.arange)
        fpo = FpoReference(
            backend,
            arch,
            [batcher(windows, i) for i in plan],
            len(windows),
            cfg.fpo_samples,
            cfg.action_dim,
            rng,
        )
    stats, losses, norms, extra = UpdateStats(windows=len(windows)), [], [], {}
    seed = int(rng.integers(2**31))
    for epoch in range(cfg.epochs):
        for index in _plan(len(windows), n_mb, cfg.micro_batch_size, rng.permutation):
            loss, logs = _micro_loss(backend, batcher(windows, index), cfg, arch, (seed, epoch), fpo)
            backend.backward(loss)
            norm = backend.step()
            stats.micro_steps += 1
            if norm is not None:
                norms.append(norm)
            if (index >= 0).any():
                losses.append(float(loss.detach()))
                for k, v in logs.items():
                    extra.setdefault(k, []).append(v)
    stats.optimizer_steps = len(norms)
    stats.grad_norm = float(np.mean(norms)) if norms else 0.0
    stats.loss = float(np.mean(losses)) if losses else 0.0
    means = {k: float(np.mean(v)) for k, v in extra.items()}
    stats.loss_cond, stats.loss_uncond = means.pop("loss_cond", 0.0), means.pop("loss_uncond", 0.0)
    stats.extra = means
    return stats


def _plan(n: int, n_mb: int, size: int, order) -> np.ndarray:
    """[n_mb, size] window indices in `order(n)`, -1 for padding slots (at the end)."""
    slots = np.full(n_mb * size, -1)
    slots[:n] = order(n)
    return slots.reshape(n_mb, size)

"""Flow-matching training draws and reductions shared by the update (rl/update.py), behaviour cloning
(synthetic/bc.py) and the benchmarks: what the network's per-element loss (PI0Policy.loss) is fed with and
reduced by. Kept apart from the network so the model file holds the network alone."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ript_ds.model.arch import PI0Arch


def sample_noise_time(arch: PI0Arch, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Training draws: noise ~ N(0, 1) [n, H, A] and time ~ Beta(1.5, 1) * 0.999 + 0.001 [n] (PI0's).

    From a numpy Generator so the draws are the same on every device and replayable from a seed.
    """
    noise = rng.standard_normal((n, arch.chunk_size, arch.max_action_dim), dtype=np.float32)
    time = (rng.beta(1.5, 1.0, size=n) * 0.999 + 0.001).astype(np.float32)
    return torch.from_numpy(noise), torch.from_numpy(time)


def reduce_loss(per_element: Tensor, step_mask: Tensor | None, action_dim: int) -> Tensor:
    """Mean flow-matching loss per sample over valid chunk steps and the first `action_dim` dims.

    per_element [B, H, A_model], step_mask [B, H] bool (None = all valid) -> [B] =
    sum / (n_valid_steps * action_dim). A sample without valid steps gets 0, not NaN, so padding
    samples can ride along in a micro-batch.
    """
    if step_mask is None:
        step_mask = torch.ones(per_element.shape[:2], dtype=torch.bool, device=per_element.device)
    if per_element.ndim != 3 or step_mask.shape != per_element.shape[:2]:
        raise ValueError(
            f"per_element {tuple(per_element.shape)} and step_mask {tuple(step_mask.shape)} mismatch"
        )
    if not 1 <= action_dim <= per_element.shape[-1]:
        raise ValueError(f"action_dim {action_dim} not in [1, {per_element.shape[-1]}]")
    real = per_element[..., :action_dim]  # [B, H, A]
    # where(), not multiplication: padded positions may hold inf/NaN and 0 * NaN is NaN.
    total = torch.where(step_mask.bool()[..., None], real, torch.zeros_like(real)).sum(dim=(1, 2))
    n_valid = step_mask.bool().sum(dim=1).to(real.dtype)
    return total / (n_valid.clamp(min=1.0) * action_dim)

"""Behaviour cloning of a PI0 policy on recorded episodes: the warm starts of the learning checks.

Demos come in the rollout Episode format (an observation per replanning step, every executed action),
so BC trains through exactly the windows (rl/windows.py), processor and flow-matching loss the RL
update uses. It trains the unconditioned branch only (cond=None): the condition embedding stays at its
zero init, so after BC both CFG branches are the same network, as for a pretrained PI0 at step 0.
Synthetic demos: synthetic/bc.py; LIBERO demos from the scripted demonstrator: libero_bc.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ript_ds.env.base import TaskSpec
from ript_ds.model.flow import reduce_loss, sample_noise_time
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.processing import Processor
from ript_ds.rl.types import Episode
from ript_ds.rl.windows import episode_windows, windows_batch

logger = logging.getLogger(__name__)


def behaviour_clone(
    policy: PI0Policy,
    processor: Processor,
    episodes: Sequence[Episode],
    steps: int,
    micro_batch: int,
    lr: float,
    seed: int,
    tasks: Sequence[TaskSpec],
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW on the flow-matching loss over every window of `episodes`; returns the loss per step.

    Windows are drawn without replacement (reshuffled each pass) from a seeded torch generator;
    noise and time come from model.flow.sample_noise_time (the RL update's sampler) with a numpy
    generator from the same seed. `tasks` maps the episodes' task ids to their instructions.
    """
    chunk = policy.arch.chunk_size
    windows = [w for ep in episodes for w in episode_windows(ep, 0.0, chunk)]
    if not windows:
        raise ValueError("behaviour_clone: the episodes hold no windows")
    prompts = {t.task_id: t.instruction for t in tasks}
    gen = torch.Generator().manual_seed(seed)
    draws = np.random.default_rng([seed, 1])
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    # Linear warm-up over 5% of the steps, then cosine decay to 0: the low-lr end sharpens the
    # end-point precision both warm starts need (the synthetic env's success radius, LIBERO's grasp).
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    arch, device = policy.arch, next(policy.parameters()).device
    policy.train()
    losses, order, cursor = [], torch.empty(0, dtype=torch.long), 0
    start = time.perf_counter()
    for step in range(steps):
        if cursor + micro_batch > len(order):
            order, cursor = torch.randperm(len(windows), generator=gen), 0
        idx = order[cursor : cursor + micro_batch].tolist()
        cursor += micro_batch
        inputs = windows_batch(processor, [windows[i] for i in idx], prompts, device)
        noise, t = sample_noise_time(arch, len(idx), draws)
        per = policy.loss(inputs.batch, noise.to(device), t.to(device))
        loss = reduce_loss(per, inputs.step_mask, processor.action_dim).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info(
                "bc step %d/%d loss %.4f (%.1f s)", step + 1, steps, losses[-1], time.perf_counter() - start
            )
    policy.eval()
    return losses

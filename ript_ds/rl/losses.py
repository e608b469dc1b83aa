"""The update objectives of DESIGN section 3, as pure functions on per-sample losses.

The model returns per-element flow-matching errors [B, H, A_model]; `ript_ds.model.flow.reduce_loss`
turns them into one number per window, and the objectives combine those with advantages.

Normalization (all three objectives): a sample with weight 0 is padding and contributes nothing,
not even a NaN. By default the total is sum_b w_b * l_b divided by the number of real samples
(w_b > 0), i.e. a mean over real windows. Pass `normalizer` to divide by a fixed count instead:
the update (rl/update.py) passes the optimizer step's real windows over all ranks / world size, so a
micro-batch with few real windows is not up-weighted relative to a full one. The diagnostic fields of the
results (means "over real samples") are always means over this micro-batch's real samples. With no real samples the total is an exact zero
that still depends on the inputs, so backward() runs and every rank joins the same collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Bound on |mean(L_old - L_new)| inside exp(): beyond it the PPO clip has long saturated, and an
# unbounded exp() of a diverged loss would give inf * A = NaN. exp(20) ~ 5e8.
_MAX_LOG_RATIO = 20.0


@dataclass
class GuidedLossResult:
    loss: torch.Tensor  # [] total, with grad; equals cond + uncond_weight * uncond
    cond: torch.Tensor  # [] detached, mean over real samples of 1[A > 0] * loss_cond
    uncond: torch.Tensor  # [] detached, mean over real samples of loss_uncond (before its weight)
    frac_positive: torch.Tensor  # [] detached, fraction of real samples with A > 0


@dataclass
class AwrLossResult:
    loss: torch.Tensor  # [] total, with grad
    mean_weight: torch.Tensor  # [] detached, mean AWR weight over real samples
    clip_frac: torch.Tensor  # [] detached, fraction of real samples whose weight hit max_weight


@dataclass
class FpoLossResult:
    loss: torch.Tensor  # [] total, with grad
    ratio_mean: torch.Tensor  # [] detached, mean ratio over real samples
    clip_frac: torch.Tensor  # [] detached, fraction of real samples where the clipped term was active


def _real_mask(ref: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [B], real [B] bool) with weight defaulting to ones."""
    if weight is None:
        weight = torch.ones_like(ref)
    if weight.shape != ref.shape:
        raise ValueError(f"weight {tuple(weight.shape)} must match {tuple(ref.shape)}")
    weight = weight.to(ref.dtype)
    return weight, weight > 0


def _weighted_mean(
    values: torch.Tensor, weight: torch.Tensor, real: torch.Tensor, normalizer: float | None
) -> torch.Tensor:
    """sum_b w_b * v_b / denom over real samples; padding values never reach the sum."""
    contrib = torch.where(real, weight * values, torch.zeros_like(values))  # [B]
    if normalizer is not None:
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        return contrib.sum() / normalizer
    return contrib.sum() / real.sum().clamp(min=1).to(values.dtype)


def guided_loss(
    loss_cond: torch.Tensor,
    loss_uncond: torch.Tensor,
    advantage: torch.Tensor,
    uncond_weight: float = 0.1,
    weight: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> GuidedLossResult:
    """Classifier-free-guidance RIPT (CFGRL, `ript.loss: cfg`):
    L = mean_b w_b * (1[A_b > 0] * loss_cond_b + uncond_weight * loss_uncond_b).

    loss_cond, loss_uncond: [B] per-sample flow-matching losses with c = positive / c = none at the
    same noise and time; advantage: [B]; weight: [B], 0 for padding samples.
    """
    if not loss_cond.shape == loss_uncond.shape == advantage.shape:
        raise ValueError(
            f"shapes differ: loss_cond {tuple(loss_cond.shape)}, loss_uncond {tuple(loss_uncond.shape)}, "
            f"advantage {tuple(advantage.shape)}"
        )
    weight, real = _real_mask(loss_cond, weight)
    positive = (advantage > 0).to(loss_cond.dtype)  # [B]
    # where(), not positive * loss: a non-positive sample's loss_cond may be non-finite and unused.
    cond_terms = torch.where(positive > 0, loss_cond, torch.zeros_like(loss_cond))  # [B]
    cond = _weighted_mean(cond_terms, weight, real, normalizer)
    uncond = _weighted_mean(loss_uncond, weight, real, normalizer)
    n_real = real.sum().clamp(min=1)
    return GuidedLossResult(
        loss=cond + uncond_weight * uncond,
        cond=cond.detach(),
        uncond=uncond.detach(),
        frac_positive=((positive > 0) & real).sum().to(loss_cond.dtype).div(n_real).detach(),
    )


def awr_loss(
    loss: torch.Tensor,
    advantage: torch.Tensor,
    beta: float,
    max_weight: float,
    weight: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> AwrLossResult:
    """Advantage-weighted regression: L = mean_b w_b * min(exp(A_b / beta), max_weight) * loss_b.

    The exponential weights are constants (detached): they select which samples to imitate, they
    are not optimized. loss, advantage, weight: [B].
    """
    if beta <= 0 or max_weight <= 0:
        raise ValueError(f"beta and max_weight must be > 0, got beta={beta}, max_weight={max_weight}")
    if loss.shape != advantage.shape:
        raise ValueError(f"loss {tuple(loss.shape)} and advantage {tuple(advantage.shape)} differ")
    weight, real = _real_mask(loss, weight)
    # Clamp the exponent rather than the result so that a huge A / beta never produces inf.
    log_w = (advantage.detach().to(loss.dtype) / beta).clamp(max=math.log(max_weight))
    awr_w = torch.exp(log_w)  # [B]
    total = _weighted_mean(awr_w * loss, weight, real, normalizer)
    n_real = real.sum().clamp(min=1).to(loss.dtype)
    hit_max = (advantage.detach().to(loss.dtype) / beta) >= math.log(max_weight)
    return AwrLossResult(
        loss=total,
        mean_weight=torch.where(real, awr_w, torch.zeros_like(awr_w)).sum().div(n_real).detach(),
        clip_frac=(hit_max & real).sum().to(loss.dtype).div(n_real).detach(),
    )


def fpo_loss(
    loss_new: torch.Tensor,
    loss_old: torch.Tensor,
    advantage: torch.Tensor,
    clip_eps: float,
    weight: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> FpoLossResult:
    """Flow Policy Optimization (McAllister et al., "Flow Matching Policy Gradients", 2025).

    loss_new, loss_old: [B, M] per-sample flow-matching losses of the current and the rollout-time
    policy at the same M Monte-Carlo (noise, time) draws per window; advantage, weight: [B].
    As in the paper, one ratio per window from the mean over its M draws:
        r_b = exp(mean_m (loss_old_bm - loss_new_bm))
    and the PPO-clip objective L = mean_b w_b * -min(r_b * A_b, clip(r_b, 1 - eps, 1 + eps) * A_b).
    loss_old is treated as a constant.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if loss_new.ndim != 2 or loss_new.shape != loss_old.shape or advantage.shape != loss_new.shape[:1]:
        raise ValueError(
            f"expected loss_new/loss_old [B, M] and advantage [B], got {tuple(loss_new.shape)}, "
            f"{tuple(loss_old.shape)}, {tuple(advantage.shape)}"
        )
    weight, real = _real_mask(advantage.to(loss_new.dtype), weight)
    # Zero padding rows before exp(): where() alone would still send NaN gradients through exp's backward.
    pad = ~real.unsqueeze(1)  # [B, 1]
    new = torch.where(pad, torch.zeros_like(loss_new), loss_new)  # [B, M]
    old = torch.where(pad, torch.zeros_like(loss_old), loss_old.detach())  # [B, M]
    log_ratio = (old - new).mean(dim=1)  # [B]
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # [B]
    adv = advantage.detach().to(loss_new.dtype)  # [B]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)  # [B]
    total = _weighted_mean(-objective, weight, real, normalizer)
    n_real = real.sum().clamp(min=1).to(loss_new.dtype)
    clip_active = (clipped < unclipped) & real
    return FpoLossResult(
        loss=total,
        ratio_mean=torch.where(real, ratio, torch.zeros_like(ratio)).sum().div(n_real).detach(),
        clip_frac=clip_active.sum().to(loss_new.dtype).div(n_real).detach(),
    )

"""LoRA adapters on PI0's Gemma stacks (peft), for engine/deepspeed.py; no DeepSpeed here."""

from __future__ import annotations

import logging
import re

from torch import nn

from ript_ds.config import ConfigError, LoraCfg
from ript_ds.model.pi0 import PI0Policy, unused_parameter_names

logger = logging.getLogger(__name__)


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


def wrap_lora(policy: PI0Policy, lora: LoraCfg) -> nn.Module:
    """peft model around `policy` (adapters injected in place; every base parameter frozen)."""
    from peft import LoraConfig, get_peft_model  # peft only matters with LoRA on

    targets = lora_target_names(policy, lora)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
    )
    model = get_peft_model(policy, config)
    policy.cond_embed.weight.requires_grad_(lora.train_cond_embed)
    logger.info("LoRA: %d modules (%s), rank %d", len(targets), lora.target, lora.rank)
    return model

"""LoRA adapters on PI0's Gemma stacks (peft), for engine/deepspeed.py; no DeepSpeed here."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ript_ds.config import ConfigError, LoraCfg
from ript_ds.model.pi0 import PI0Policy, keeps_fp32, unused_parameter_names

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


def wrap_lora(policy: PI0Policy, lora: LoraCfg, bf16: bool = False) -> nn.Module:
    """peft model around `policy` (adapters injected in place; every base parameter frozen). bf16: the run
    computes under bf16 autocast (model.dtype=bfloat16), so with frozen_dtype=auto the frozen base is
    stored in bf16 where autocast computes in bf16 (store_frozen_bf16)."""
    from peft import LoraConfig, get_peft_model  # peft only matters with LoRA on

    targets = lora_target_names(policy, lora)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
    )
    model = get_peft_model(policy, config)
    policy.cond_embed.weight.requires_grad_(lora.train_cond_embed)
    logger.info("LoRA: %d modules (%s), rank %d", len(targets), lora.target, lora.rank)
    if bf16 and lora.frozen_dtype == "auto":
        saved = store_frozen_bf16(policy)
        logger.info("LoRA: frozen Gemma weights stored in bf16 (%.2f GiB less)", saved / 2**30)
    return model


def store_frozen_bf16(policy: PI0Policy) -> int:
    """Store every frozen fp32 parameter of the modules that bf16 autocast runs in bf16 (those
    set_precision(bfloat16) casts: the Gemma stacks' projections and token embedding) in bf16; returns
    the bytes saved (of this rank's partitions under ZeRO-3). Trainable parameters (adapters, cond_embed)
    and the reference's fp32 modules (model.pi0.keeps_fp32) stay fp32, so the optimizer is unchanged.

    Autocast would round these weights to bf16 before every matmul anyway, so the Gemma projections give
    bit-identical outputs; the residual stream stays fp32 (policy.stream_dtype). What changes: the token
    embedding (no autocast there) is rounded once, and backward keeps no bf16 copy of each frozen weight.
    Call before deepspeed.initialize. ZeRO-3: the partition (param.ds_tensor) is the storage and is cast
    in place; NVMe-offloaded partitions are left fp32 (DeepSpeed's swapper has fixed-dtype buffers)."""
    saved = 0
    for name, module in policy.named_modules():
        if keeps_fp32(name):
            continue
        for param in module.parameters(recurse=False):
            swapped = getattr(param, "nvme_swapper", None) is not None
            if param.requires_grad or param.dtype != torch.float32 or swapped:
                continue
            part = getattr(param, "ds_tensor", None)
            if part is not None:  # ZeRO-3: param.data is empty until gathered; the shard holds the values
                saved += part.numel() * 2
                cast = part.data.to(torch.bfloat16)
                part.data = cast.pin_memory() if part.is_pinned() else cast  # keep offload copies fast
            else:
                saved += param.numel() * 2
            param.data = param.data.to(torch.bfloat16)
    policy.stream_dtype = torch.float32
    return saved

"""What the two unused heads cost in a lerobot-layout export (ckpt/export.lerobot_tensors).

1. Checks the size rule on a real file: save_lerobot on a tiny-width PI0 with the full vocabulary (257152),
   with and without the two heads; the difference must be vocab x (vlm width x embedding bytes + expert
   width x 2) up to header bytes.
2. Applies it to the full-size PI0 (PI0Arch(), built on the meta device: shapes only).

    python tools/bench/lerobot_export_size.py
Prints one JSON line (bytes).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ript_ds.ckpt.export import save_lerobot
from ript_ds.model.arch import GemmaArch, PI0Arch, VisionArch
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.weights import LEROBOT_EXPERT_LM_HEAD, LEROBOT_PALIGEMMA_LM_HEAD, OURS_ONLY


def head_bytes(arch: PI0Arch, embedding_itemsize: int = 4) -> int:
    """PaliGemma's head copies the embedding (its dtype); the expert's is bf16."""
    return arch.vocab_size * (arch.vlm.width * embedding_itemsize + arch.expert.width * 2)


def measured_on_file() -> dict[str, int]:
    arch = PI0Arch(
        vlm=GemmaArch(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=8),
        expert=GemmaArch(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=8),
        vision=VisionArch(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32),
        chunk_size=8,
    )
    with tempfile.TemporaryDirectory() as tmp:
        with_heads = save_lerobot(PI0Policy(arch), Path(tmp) / "lr") / "model.safetensors"
        tensors = load_file(str(with_heads))
        for key in (LEROBOT_PALIGEMMA_LM_HEAD, LEROBOT_EXPERT_LM_HEAD):
            del tensors[key]
        save_file(tensors, str(Path(tmp) / "without.safetensors"), metadata={"format": "pt"})
        sizes = {
            "with_heads": with_heads.stat().st_size,
            "without": (Path(tmp) / "without.safetensors").stat().st_size,
        }
    sizes["difference"] = sizes["with_heads"] - sizes["without"]
    sizes["rule"] = head_bytes(arch)
    return sizes


def full_size() -> dict[str, int]:
    arch = PI0Arch()
    with torch.device("meta"):
        state = PI0Policy(arch).state_dict()
    weights = sum(v.numel() * v.element_size() for k, v in state.items() if k not in OURS_ONLY)
    paligemma, expert = arch.vocab_size * arch.vlm.width * 4, arch.vocab_size * arch.expert.width * 2
    return {
        "weights_fp32": weights,
        "paligemma_head_fp32": paligemma,
        "expert_head_bf16": expert,
        "total": weights + paligemma + expert,
        "alternative_both_fp32": weights + paligemma + expert * 2,
    }


if __name__ == "__main__":
    print(json.dumps({"tiny_width_file": measured_on_file(), "full_size_pi0": full_size()}))

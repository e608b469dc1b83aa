"""Export a checkpoint as a plain PI0 checkpoint: a training checkpoint (DeepSpeedEngine.save) or any
directory ript-ds loads (canonical, lerobot >= 0.4 / <= 0.3, openpi PyTorch).

    python tools/export.py CHECKPOINT --out exported/ [--lerobot DIR] [--merge-lora]
        [--tag TAG] [--base BASE_CKPT] [--arch pi0_arch.json]

Writes model.safetensors (canonical layout, fp32), pi0_arch.json and norm_stats.json (when the checkpoint,
its run or its base checkpoint has statistics); --lerobot also writes the layout lerobot's
PI0Policy.from_pretrained loads strictly (with its two unused heads, ckpt/export.lerobot_tensors).
For a training checkpoint, CHECKPOINT is the tag directory, or the checkpoints folder with --tag or a
`latest` file; --merge-lora folds peft adapters into the base weights (W + B A * alpha/r), and as LoRA
checkpoints hold only the adapters, the base weights come from --base or the run's config.yaml
(model.checkpoint). For a plain checkpoint directory, --arch replaces the sizes it would read or infer.
Prints one JSON line; exits 2 on unusable input (one line on stderr saying what is wrong).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="DeepSpeed tag directory (or checkpoints folder), or a PI0 checkpoint dir",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (canonical layout)")
    parser.add_argument("--lerobot", type=Path, help="also write the lerobot >= 0.4 layout here")
    parser.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the weights")
    parser.add_argument("--tag", help="tag under the checkpoints folder (default: its `latest`)")
    parser.add_argument("--base", type=Path, help="checkpoint the run started from (LoRA base weights)")
    parser.add_argument("--arch", type=Path, help="pi0_arch.json when the checkpoint (or its run) has none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ript_ds.ckpt.export import export_checkpoint

    try:
        result = export_checkpoint(
            args.checkpoint,
            args.out,
            tag=args.tag,
            base=args.base,
            arch_file=args.arch,
            merge=args.merge_lora,
            lerobot_out=args.lerobot,
        )
    except (ValueError, KeyError, OSError) as err:
        print(f"export: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the message
        return 2
    summary = {
        "out": str(result.out),
        "lerobot": None if result.lerobot_out is None else str(result.lerobot_out),
        "layout": result.layout,
        "tag": None if result.tag_dir is None else str(result.tag_dir),
        "lora_merged": result.lora,
        "norm_stats": result.norm_stats,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

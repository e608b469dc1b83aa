"""Describe a PI0 checkpoint: layout, parameter counts, dtypes, LoRA, saved iteration and metrics.

    python tools/inspect_ckpt.py PATH [--json]

PATH: a canonical / lerobot / openpi PyTorch directory (model.safetensors), an openpi JAX checkpoint
(the folder holding params/), or a DeepSpeed training checkpoint (tag directory, or a checkpoints
folder with a `latest` file). Exits 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _lines(info: dict, indent: str = "") -> list[str]:
    out = []
    for key, value in info.items():
        if isinstance(value, dict) and value and key != "dtypes":
            out.append(f"{indent}{key}:")
            out.extend(_lines(value, indent + "  "))
        elif isinstance(value, int) and not isinstance(value, bool) and "parameters" in key:
            out.append(f"{indent}{key}: {value:,}")
        else:
            out.append(f"{indent}{key}: {json.dumps(value, default=str)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ript_ds.ckpt.describe import describe

    try:
        info = describe(args.path)
    except (ValueError, KeyError, OSError) as err:
        print(f"inspect_ckpt: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, default=str) if args.json else "\n".join(_lines(info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Show or write a checkpoint's policy convention (policy.json; ript_ds/model/convention.py).

    python tools/policy_convention.py CKPT_DIR                          # what every ript-ds path applies
    python tools/policy_convention.py CKPT_DIR --openpi-config pi0_libero [--set replan_steps=10 ...] --write

For checkpoints converted without --openpi-config, openpi PyTorch checkpoints and lerobot checkpoints whose
config.json does not tell the whole story. --set takes JSON values (delta_action_mask=[true,false,...],
max_token_len=48); the chunk length is taken from the checkpoint's pi0_arch.json when it has one. Prints the
convention as JSON; exits 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def resolve(args: argparse.Namespace):
    from ript_ds.model.convention import PolicyConvention, load_convention, preset
    from ript_ds.model.weights import CANONICAL_ARCH

    if not args.checkpoint.is_dir():
        raise ValueError(f"checkpoint directory {args.checkpoint} does not exist")
    conv = preset(args.openpi_config) if args.openpi_config else load_convention(args.checkpoint)
    data = (conv or PolicyConvention(image_slots=(), max_token_len=None)).to_dict()
    arch = args.checkpoint / CANONICAL_ARCH
    if args.openpi_config and arch.exists():
        data["action_horizon"] = json.loads(arch.read_text()).get("chunk_size", data["action_horizon"])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} must look like key=value")
        try:
            data[key] = json.loads(value)
        except json.JSONDecodeError:
            data[key] = value  # a bare string, e.g. norm_mode=quantile
    return PolicyConvention.from_dict(data, source="tools/policy_convention.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory")
    parser.add_argument(
        "--openpi-config", help="start from an openpi training config's preset (e.g. pi0_libero)"
    )
    parser.add_argument("--set", action="append", default=[], help="key=value on top (JSON values)")
    parser.add_argument("--write", action="store_true", help="write CKPT_DIR/policy.json")
    args = parser.parse_args(argv)
    try:
        conv = resolve(args)
    except (ValueError, TypeError) as err:  # ConventionError is a ValueError; TypeError: a bad field value
        print(f"policy_convention: {err}", file=sys.stderr)
        return 2
    if args.write:
        conv.save(args.checkpoint)
    print(json.dumps(conv.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

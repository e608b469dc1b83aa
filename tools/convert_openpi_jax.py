"""Convert an openpi JAX PI0 or PI0.5 checkpoint (orbax `params/`) to our canonical layout (and lerobot >= 0.4).

    python tools/convert_openpi_jax.py CHECKPOINT_DIR --out DIR --openpi-config pi0_libero [--lerobot-out DIR]
        [--norm-stats assets/<id>/norm_stats.json] [--chunk-size 50]

--openpi-config names the openpi training config the checkpoint was trained with (pi0_libero,
pi0_libero_low_mem_finetune, pi05_libero, ...): its policy convention (normalisation, delta actions, camera slots,
prompt length, horizon; model/convention.py) is written to OUT/policy.json, which every ript-ds path
applies. Without it no policy.json is written, and the checkpoint behaves like one trained by ript-ds
(absolute actions): right only for checkpoints trained that way.

CHECKPOINT_DIR is the folder that contains `params/` (a released checkpoint, or a training step folder
whose keys end in `/value`). Normalization statistics come from --norm-stats (a norm_stats.json or a
folder holding one) or from CHECKPOINT_DIR/assets/*/norm_stats.json. Sizes are read from the array
shapes, the model type (pi0 / pi0.5) from the leaves (pi0.5's adaptive norms), never from the path; the
chunk size (action horizon) is not stored in the weights (default: the config's, else 50).
Needs the `convert` extra (jax, orbax-checkpoint, tensorstore). Exits 2 on unusable input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path


class ConvertError(ValueError):
    pass


def read_orbax_params(params_dir: Path) -> dict:
    """The flat '/'-joined parameter dict of an orbax PyTree checkpoint, as numpy arrays."""
    try:
        import jax
        import numpy as np
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise ConvertError(
            f"reading openpi JAX checkpoints needs jax and orbax ({err.name} is missing): "
            "pip install -e '.[convert]'"
        ) from None
    from ript_ds.model.openpi_jax import flatten_tree

    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            metadata = ckptr.metadata(str(params_dir.resolve()))
            tree = getattr(metadata, "item_metadata", metadata)  # newer orbax wraps it in StepMetadata
            restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), tree)
            restored = ckptr.restore(
                str(params_dir.resolve()), ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)
            )
    except Exception as err:  # orbax / tensorstore raise many kinds; report one line
        raise ConvertError(f"orbax could not read {params_dir}: {type(err).__name__}: {err}") from None
    return flatten_tree(dict(restored))


def find_params(checkpoint: Path) -> Path:
    if not checkpoint.is_dir():
        raise ConvertError(f"checkpoint directory {checkpoint} does not exist")
    for cand in (checkpoint / "params", checkpoint):
        if (cand / "_METADATA").is_file() or (cand / "manifest.ocdbt").is_file():
            return cand
    raise ConvertError(f"{checkpoint} has no orbax params/ folder; pass the folder that contains params/")


def convert(args: argparse.Namespace) -> dict:
    from ript_ds.ckpt.export import save_lerobot
    from ript_ds.model.normalization import load_norm_stats
    from ript_ds.model.openpi_jax import arch_from_params, normalize_keys, to_canonical_openpi
    from ript_ds.model.pi05 import make_policy
    from ript_ds.model.weights import load_into, save_canonical

    convention = _convention(args.openpi_config)
    params_dir = find_params(args.checkpoint)
    flat = normalize_keys(read_orbax_params(params_dir))
    horizon = args.chunk_size or (convention.action_horizon if convention else None) or 50
    arch = arch_from_params(flat, chunk_size=horizon)
    if convention is not None and convention.model_type != arch.model_type:
        raise ConvertError(
            f"--openpi-config {args.openpi_config} is a {convention.model_type} config, but "
            f"{params_dir} holds a {arch.model_type} model"
        )
    convention = convention.with_horizon(arch.chunk_size) if convention else None
    policy = make_policy(arch)
    load_into(policy, to_canonical_openpi(flat), source=f"openpi JAX checkpoint {params_dir}")
    stats_src = args.norm_stats or args.checkpoint
    if args.norm_stats is not None and args.norm_stats.is_file():
        stats_src = args.norm_stats.parent
    stats = load_norm_stats(stats_src)
    if args.norm_stats is not None and stats is None:
        raise ConvertError(f"--norm-stats {args.norm_stats}: no norm_stats.json found there")
    if convention is not None and stats is not None and stats.mode != convention.norm_mode:
        stats = dataclasses.replace(stats, mode=convention.norm_mode)  # the config decides, not the file
    save_canonical(policy, args.out, stats, convention)
    if args.lerobot_out is not None:
        save_lerobot(policy, args.lerobot_out, stats)
        if convention is not None:  # ours wins over lerobot's config.json there (export.py does the same)
            convention.save(args.lerobot_out)
    return {
        "out": str(args.out),
        "lerobot_out": None if args.lerobot_out is None else str(args.lerobot_out),
        "parameters": sum(p.numel() for p in policy.parameters()),
        "norm_stats": None if stats is None else stats.source,
        "arch": arch.to_dict(),
        "policy": None if convention is None else convention.to_dict(),
    }


def _convention(name: str | None):
    if name is None:
        return None
    from ript_ds.model.convention import ConventionError, preset

    try:
        return preset(name)  # pi0 and pi0.5 presets; pi0-FAST is refused there
    except ConventionError as err:
        raise ConvertError(f"--openpi-config: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="folder containing the orbax params/ folder")
    parser.add_argument("--out", type=Path, required=True, help="output directory (canonical layout)")
    parser.add_argument("--lerobot-out", type=Path, help="also write the lerobot >= 0.4 layout here")
    parser.add_argument("--norm-stats", type=Path, help="norm_stats.json (or a folder holding one)")
    parser.add_argument("--openpi-config", help="openpi training config of the checkpoint, e.g. pi0_libero")
    parser.add_argument(
        "--chunk-size", type=int, help="action horizon (not in the weights; default: config's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = convert(args)
    except (ConvertError, ValueError, KeyError, OSError) as err:
        print(f"convert_openpi_jax: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

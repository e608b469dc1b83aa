"""Train PI0 with RIPT.

    deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config launch/configs/debug.yaml key=value ...
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json --config ...
    srun python launch/train.py ...        python launch/train.py --config launch/configs/demo.yaml

Overrides are `section.key=value` (e.g. train.lr=1e-5 ript.loss=awr); `--help-config` lists every field.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ript_ds.config import ConfigError, ExperimentCfg, describe_config, load_config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="config fields (section.key=value):\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="experiment YAML (launch/configs/*.yaml)")
    parser.add_argument("--deepspeed", help="DeepSpeed engine JSON (ds_configs/*.json); default zero2")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config field with its doc")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def preflight(cfg: ExperimentCfg, ds_config: str | None) -> None:
    """Checks that need the DeepSpeed JSON or the machine, still before any distributed init."""
    import torch

    from ript_ds.engine.ds_json import check_ds_json, load_ds_json

    path, ds = load_ds_json(ds_config or cfg.engine.deepspeed_config)  # --deepspeed wins, as in the trainer
    bf16 = cfg.model.dtype == "bfloat16"
    check_ds_json(path, ds, cfg.train, bf16, cuda_available=torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(describe_config())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        preflight(cfg, args.deepspeed)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from ript_ds.engine.dist import MainRankFilter
    from ript_ds.trainer import Trainer

    handler = logging.StreamHandler()
    handler.addFilter(MainRankFilter())
    logging.basicConfig(level=cfg.log.level, handlers=[handler], format="%(asctime)s %(name)s: %(message)s")
    Trainer(cfg, args.deepspeed).setup().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train PI0 with RIPT.

    deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config launch/configs/debug.yaml key=value ...
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json --config ...
    srun python launch/train.py ...        python launch/train.py --config launch/configs/demo.yaml

Overrides are `section.key=value` (e.g. train.lr=1e-5 ript.loss=awr); `--help-config` lists every field.
`--resume auto|none|PATH` is ckpt.resume (auto: the run's newest complete checkpoint).
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
    parser.add_argument("--resume", help="auto | none | PATH: sets ckpt.resume (default auto)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config field with its doc")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def overrides_with_resume(args: argparse.Namespace) -> list[str]:
    """--resume is ckpt.resume; given both ways with different values, neither wins silently."""
    if args.resume is None:
        return args.overrides
    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("ckpt.resume=")]
    if any(value != args.resume for value in given):
        raise ConfigError(f"--resume {args.resume} conflicts with ckpt.resume={given[0]}; give one of them")
    return [*args.overrides, f"ckpt.resume={args.resume}"]


def preflight(cfg: ExperimentCfg, ds_config: str | None) -> ExperimentCfg:
    """Checks that need the DeepSpeed JSON, the checkpoint's headers, the tokenizer or the machine, still
    before any distributed init. Returns cfg with the --deepspeed file and its ZeRO stage recorded."""
    import torch

    from ript_ds.build import check_model
    from ript_ds.engine.ds_json import (
        check_ds_json,
        check_lora_frozen_bf16,
        load_ds_json,
        with_deepspeed_json,
    )
    from ript_ds.rl.demos import load_demo_pool

    cfg = with_deepspeed_json(cfg, ds_config)  # --deepspeed wins over engine.deepspeed_config
    path, ds = load_ds_json(cfg.engine.deepspeed_config)
    bf16 = cfg.model.dtype == "bfloat16"
    check_ds_json(path, ds, cfg.train, bf16, cuda_available=torch.cuda.is_available())
    check_lora_frozen_bf16(path, ds, cfg.engine.lora, bf16)
    load_demo_pool(cfg, check_model(cfg))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(describe_config())
        return 0
    try:
        cfg = load_config(args.config, overrides_with_resume(args))
        if args.print_config:
            import yaml

            from ript_ds.engine.ds_json import with_deepspeed_json

            print(yaml.safe_dump(with_deepspeed_json(cfg, args.deepspeed).to_dict(), sort_keys=False), end="")
            return 0
        cfg = preflight(cfg, args.deepspeed)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from ript_ds.engine.dist import MainRankFilter
    from ript_ds.trainer import Trainer

    handler = logging.StreamHandler()
    handler.addFilter(MainRankFilter())
    logging.basicConfig(level=cfg.log.level, handlers=[handler], format="%(asctime)s %(name)s: %(message)s")
    Trainer(cfg).setup().run()  # the --deepspeed file is in cfg.engine (config.yaml, resume check)
    return 0


if __name__ == "__main__":
    sys.exit(main())

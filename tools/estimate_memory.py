"""Per-GPU memory of PI0 + RIPT training with DeepSpeed, before you book the GPUs.

    python tools/estimate_memory.py [--ds-config ds_configs/zero3.json ...] [--lora on|off|both] [--model-type pi05]
        [--world-sizes 1,2,4,8,16] [--micro-batch 4] [--checkpointing on|off|both]
        [--gpu-memory 80] [--format md|json]

For every DeepSpeed JSON x full fine-tuning / LoRA x activation checkpointing x world size: parameters,
gradients, optimizer state, activations, buffers (reduce buckets + backward transients) and the rollout
phase, GiB per GPU, and whether the peak fits --gpu-memory. Defaults describe the full-size PI0 (3.24 B
parameters) on LIBERO: 3 camera slots x 256 image tokens + 48 prompt tokens, state + 50 actions, bf16
autocast over fp32 parameters (model.dtype=bfloat16; with LoRA the frozen Gemma weights are stored in bf16,
engine.lora.frozen_dtype=auto), the cfg objective (2 rows per window), 8 guided environments per rank in
rollouts. The model is documented in ript_ds.memory.zero.py and
ript_ds.memory.activations.py and checked against CPU measurements by tools/bench/memory_check.py.
Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ript_ds.memory.zero import Workload

DEFAULT_CONFIGS = ["ds_configs/zero2.json", "ds_configs/zero3.json", "ds_configs/zero3_offload.json"]
ROWS_PER_WINDOW = {"cfg": 2, "awr": 1}  # cfg: both condition branches in one forward; fpo: --fpo-samples
GIB = 2**30


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would add the usage block)
        print(f"estimate_memory: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds-config", action="append", help="DeepSpeed JSON (repeatable; default: the three)")
    p.add_argument(
        "--arch", type=Path, help="pi0_arch.json (or a canonical checkpoint directory) of another PI0 size"
    )
    p.add_argument(
        "--model-type", choices=["pi0", "pi05"], default="pi0", help="full-size PI0 or PI0.5 (without --arch)"
    )
    p.add_argument("--lora", choices=["on", "off", "both"], default="both")
    p.add_argument("--lora-rank", type=_positive(int), default=Workload.lora_rank, help="engine.lora.rank")
    p.add_argument(
        "--lora-target",
        choices=["both", "vlm", "expert"],
        default=Workload.lora_target,
        help="engine.lora.target",
    )
    p.add_argument("--world-sizes", type=_positive_ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--micro-batch", type=_positive(int), default=Workload.micro_batch, help="windows per GPU")
    p.add_argument("--loss", choices=["cfg", "awr", "fpo"], default="cfg", help="rows per window: 2 / 1 / M")
    p.add_argument("--fpo-samples", type=_positive(int), default=4, help="M draws per window (fpo)")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--cameras", type=_positive(int), default=Workload.cameras, help="camera slots per row")
    p.add_argument("--text-tokens", type=_positive(int), default=Workload.text_tokens, help="prompt tokens")
    p.add_argument(
        "--rollout-envs", type=_positive(int), default=Workload.rollout_envs, help="rollout.num_envs per rank"
    )
    p.add_argument("--gpu-memory", type=_positive(float), default=80.0, help="GiB per GPU")
    p.add_argument("--format", choices=["md", "json"], default="md")
    return p.parse_args(argv)


def estimates(arch, ds_configs: dict[str, dict], workload: Workload, lora_modes, ckpt_modes, worlds) -> list:
    """Every combination, as memory/zero.Estimate, in table order."""
    from ript_ds.memory.activations import TokenLayout, activation_memory, parameter_inventory, rollout_memory
    from ript_ds.memory.zero import ZeroCfg, estimate

    seq = TokenLayout(workload.cameras, workload.text_tokens)
    rows = workload.micro_batch * workload.rows_per_window
    rollout = rollout_memory(arch, workload.rollout_envs, seq, workload.guidance)
    out = []
    for path, ds in ds_configs.items():
        zero = ZeroCfg.from_ds_config(ds)
        for lora in lora_modes:
            targets = lora_targets(arch, workload) if lora else []
            params = parameter_inventory(arch, targets, workload.lora_rank if lora else 0)
            cached = sum(p.numel for p in params if p.trainable and p.low_precision and p.used)
            for ckpt in ckpt_modes:
                acts = activation_memory(arch, rows, seq, ckpt, targets, workload.lora_rank, True, cached)
                for world in worlds:
                    out.append((path, estimate(params, zero, world, acts, rollout, lora, ckpt)))
    return out


def lora_targets(arch, workload: Workload) -> list[str]:
    """The engine's own choice of adapted modules (engine/lora.lora_target_names), on a meta model."""
    import torch

    from ript_ds.config import LoraCfg
    from ript_ds.engine.lora import lora_target_names
    from ript_ds.model.pi05 import make_policy

    with torch.device("meta"):
        policy = make_policy(arch)
    return lora_target_names(
        policy, LoraCfg(enabled=True, rank=workload.lora_rank, target=workload.lora_target)
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def markdown(rows: list, gpu_gib: float) -> str:
    """One table per DeepSpeed JSON; configurations over budget are flagged in bold."""
    head = (
        "| LoRA | ckpt | GPUs | params | grads | optim | activ | buffers | rollout | **total** | peak in "
        "| fits | host |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    out, current = [], None
    for path, e in rows:
        if path != current:
            current = path
            out += ["", f"### {e.zero.name} (`{path}`)", "", head]
        s = e.state
        fits = e.total <= gpu_gib * GIB
        total = _gib(e.total) if fits else f"**{_gib(e.total)}**"
        out.append(
            f"| {'yes' if e.lora else 'no'} | {'on' if e.checkpointing else 'off'} | {e.world} "
            f"| {_gib(s.params)} | {_gib(s.grads)} | {_gib(s.optimizer)} | {_gib(e.activations)} "
            f"| {_gib(e.buffers)} | {_gib(e.rollout)} | {total} | {e.phase} | {'yes' if fits else '**NO**'} "
            f"| {_gib(s.host) if s.host else '-'} |"
        )
    return "\n".join(out).strip()


def as_json(rows: list, gpu_gib: float) -> list[dict]:
    out = []
    for path, e in rows:
        s = e.state
        gib = {
            "params": s.params,
            "grads": s.grads,
            "optimizer": s.optimizer,
            "activations": e.activations,
            "buffers": e.buffers,
            "rollout": e.rollout,
            "total": e.total,
            "host": s.host,
        }
        out.append(
            {
                "ds_config": path,
                "zero": e.zero.name,
                "lora": e.lora,
                "checkpointing": e.checkpointing,
                "world_size": e.world,
                "peak_phase": e.phase,
                "fits": e.total <= gpu_gib * GIB,
                "bytes": gib,
                "gib": {k: round(v / GIB, 3) for k, v in gib.items()},
            }
        )
    return out


def header(arch, workload: Workload, lora: bool) -> str:
    from ript_ds.memory.activations import TokenLayout, parameter_inventory

    params = parameter_inventory(arch)
    seq = TokenLayout(workload.cameras, workload.text_tokens)
    n, n_train = sum(p.numel for p in params), sum(p.numel for p in params if p.trainable)
    name = {"pi0": "PI0", "pi05": "PI0.5"}[arch.model_type]
    line = (
        f"{name}: {n / 1e9:.3f} B parameters ({n_train / 1e9:.3f} B train in full fine-tuning); "
        f"micro-batch {workload.micro_batch} windows x {workload.rows_per_window} rows, sequence "
        f"{seq.prefix(arch)} prefix + {seq.suffix(arch)} suffix tokens; rollout {workload.rollout_envs} envs"
        f"{' x 2 guidance branches' if workload.guidance else ''}; GiB per GPU."
    )
    if lora:
        targets = lora_targets(arch, workload)
        adapters = sum(p.numel for p in parameter_inventory(arch, targets, workload.lora_rank) if p.trainable)
        line += (
            f" LoRA rank {workload.lora_rank} on {len(targets)} modules: {adapters / 1e6:.1f} M trainable."
        )
    return line


def _read_arch(path: Path):
    from ript_ds.model.arch import PI0Arch
    from ript_ds.model.weights import CANONICAL_ARCH

    return PI0Arch.from_dict(json.loads((path / CANONICAL_ARCH if path.is_dir() else path).read_text()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ript_ds.config import ConfigError
    from ript_ds.engine.ds_json import load_ds_json
    from ript_ds.memory.zero import ZeroCfg
    from ript_ds.model.arch import PI0Arch

    try:
        configs = {}
        for name in args.ds_config or DEFAULT_CONFIGS:
            _, ds = load_ds_json(name)
            ZeroCfg.from_ds_config(ds)  # refuses stages other than 2 and 3
            configs[name] = ds
        arch = _read_arch(args.arch) if args.arch else PI0Arch(model_type=args.model_type)
    except (ConfigError, ValueError, TypeError, OSError) as err:
        print(f"estimate_memory: {err}", file=sys.stderr)
        return 2
    per_window = args.fpo_samples if args.loss == "fpo" else ROWS_PER_WINDOW[args.loss]
    workload = Workload(
        micro_batch=args.micro_batch,
        rows_per_window=per_window,
        cameras=args.cameras,
        text_tokens=args.text_tokens,
        lora_rank=args.lora_rank,
        lora_target=args.lora_target,
        rollout_envs=args.rollout_envs,
    )
    lora_modes = {"off": [False], "on": [True], "both": [False, True]}[args.lora]
    ckpt_modes = {"off": [False], "on": [True], "both": [True, False]}[args.checkpointing]
    rows = estimates(arch, configs, workload, lora_modes, ckpt_modes, args.world_sizes)
    if args.format == "json":
        print(json.dumps(as_json(rows, args.gpu_memory), indent=1))
    else:
        print(header(arch, workload, True in lora_modes) + "\n\n" + markdown(rows, args.gpu_memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())

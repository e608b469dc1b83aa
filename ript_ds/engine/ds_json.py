"""Pre-flight checks of the DeepSpeed JSON, run by launch/train.py before any process group exists.

engine/deepspeed.py builds the final DeepSpeed config (and checks it again) only after distributed init,
where a bad JSON ends every rank with a traceback. Whatever can be decided from the file and the
experiment config alone is checked here instead, so it ends the launch with one line and exit code 2.
Reading JSON needs no deepspeed import; deepspeed.py stays the only module that imports it. The
signature takes what build_ds_config has (train config, bf16 flag), so it can call the same checks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ript_ds.config import ConfigError, ExperimentCfg, TrainCfg

CHECKOUT = Path(__file__).resolve().parents[2]
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme", None)  # None: DeepSpeed's JSON null, the same as "none"


def resolve_ds_path(path: str | Path) -> Path:
    """A path as given, else relative to the checkout (so ds_configs/... works from any cwd)."""
    path = Path(path)
    if not path.exists() and not path.is_absolute():
        path = CHECKOUT / path
    if not path.exists():
        raise ConfigError(f"engine.deepspeed_config: {path} does not exist")
    return path


def load_ds_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(resolved path, parsed JSON object); a missing or malformed file is a ConfigError."""
    path = resolve_ds_path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return path, data


def zero_stage(ds: Mapping[str, Any]) -> int:
    """The ZeRO stage of a checked JSON (0 when it names none)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def with_deepspeed_json(cfg: ExperimentCfg, flag: str | None) -> ExperimentCfg:
    """cfg with the --deepspeed file (when given) as engine.deepspeed_config and that JSON's ZeRO stage in
    engine.zero_stage, so config.yaml and the resume check see which engine ran. A zero_stage already set
    (a config file, an override) must agree with the JSON."""
    path = flag or cfg.engine.deepspeed_config
    resolved, ds = load_ds_json(path)
    check_zero_section(resolved, ds)
    stage = zero_stage(ds)
    if cfg.engine.zero_stage not in (None, stage):
        raise ConfigError(
            f"engine.zero_stage={cfg.engine.zero_stage} disagrees with {resolved} (stage {stage}); leave "
            "engine.zero_stage unset, it is recorded from the DeepSpeed JSON"
        )
    return dataclasses.replace(
        cfg, engine=dataclasses.replace(cfg.engine, deepspeed_config=str(path), zero_stage=stage)
    )


def check_zero_section(path: Path, ds: Mapping[str, Any]) -> None:
    """zero_optimization values that DeepSpeed would reject only after distributed init, with a traceback."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise ConfigError(f"{path}: zero_optimization must be a JSON object, got {zero!r}")
    stage = zero.get("stage", 0)
    if type(stage) is not int or stage not in ZERO_STAGES:  # bool and float are refused too
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r} must be one of 0, 1, 2, 3 (an integer)")
    if stage == 1 and zero.get("overlap_comm"):
        # The update owns the accumulation boundary (managed_gradient_accumulation=false), which DeepSpeed
        # supports with overlap_comm only where gradients are partitioned (stage >= 2).
        raise ConfigError(f"{path}: zero_optimization.overlap_comm=true needs stage 2 or 3; remove it")
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key)
        if offload is None:
            continue
        if not isinstance(offload, Mapping):
            raise ConfigError(f"{path}: zero_optimization.{key} must be a JSON object, got {offload!r}")
        device = offload.get("device", "none")
        if device not in OFFLOAD_DEVICES:
            raise ConfigError(
                f"{path}: zero_optimization.{key}.device={device!r} must be one of none, cpu, nvme"
            )


def offloads_optimizer(ds: Mapping[str, Any]) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def check_ds_json(
    path: Path, ds: Mapping[str, Any], train: TrainCfg, bf16: bool, cuda_available: bool
) -> None:
    """Raise ConfigError (one line) for a JSON that DeepSpeed or engine/deepspeed.py would refuse.

    bf16: model.dtype == "bfloat16". train_batch_size is left to build_ds_config (it needs the world size).
    """
    check_zero_section(path, ds)
    fp16 = ds.get("fp16")
    if isinstance(fp16, Mapping) and fp16.get("enabled") is True and not cuda_available:
        raise ConfigError(
            f"{path}: fp16.enabled=true needs a CUDA GPU and torch.cuda.is_available() is false here; "
            "remove the fp16 section (training runs in fp32, or bf16 autocast with model.dtype=bfloat16)"
        )
    for section in ("optimizer", "scheduler", "fp16"):
        if section in ds:
            raise ConfigError(
                f"{path}: remove the {section!r} section; the optimizer and LR schedule come from the "
                "training config (engine.*, train.lr), and fp16 is not supported (use model.dtype=bfloat16)"
            )
    if offloads_optimizer(ds) and ds.get("zero_force_ds_cpu_optimizer") is True:
        # The engine hands DeepSpeed a client optimizer: DeepSpeedCPUAdam when its JIT build works, else
        # torch AdamW on the CPU partitions, which this flag makes DeepSpeed refuse after init.
        raise ConfigError(
            f"{path}: zero_optimization.offload_optimizer with zero_force_ds_cpu_optimizer=true refuses "
            "the client torch AdamW that ript-ds falls back to; remove zero_force_ds_cpu_optimizer"
        )
    if (ds.get("bf16") or {}).get("enabled") is True:
        raise ConfigError(
            f"{path}: bf16.enabled casts every parameter (PI0's norms and projections included) to bf16; "
            "set model.dtype=bfloat16 instead, which runs the forward under torch_autocast"
        )
    autocast = (ds.get("torch_autocast") or {}).get("enabled", "auto")
    if autocast not in ("auto", bf16):
        dtype = "bfloat16" if bf16 else "float32"
        raise ConfigError(
            f"{path}: torch_autocast.enabled={autocast!r} disagrees with model.dtype={dtype}; use 'auto'"
        )
    owned = {
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", train.micro_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", train.grad_accum_steps),
        "gradient_clipping": ("train.grad_clip", train.grad_clip),
    }
    for key, (name, value) in owned.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: {key}={ds[key]!r} disagrees with {name}={value}; use 'auto'")


def check_lora_frozen_bf16(path: Path | str, ds: Mapping[str, Any], lora, bf16: bool) -> None:
    """A LoRA run under bf16 stores its frozen base in bf16 (engine.lora.frozen_dtype=auto): mixed fp32 /
    bf16 parameters, which two ZeRO++ options do not take (use_all_reduce_for_fetch_params gathers one dtype
    per bucket; hpZ keeps an fp32 secondary copy, so nothing would be saved). One line naming the fix."""
    if not (lora.enabled and bf16 and lora.frozen_dtype == "auto"):
        return
    zero = ds.get("zero_optimization") or {}
    clashes = [
        key
        for key, on in (
            ("use_all_reduce_for_fetch_params", bool(zero.get("use_all_reduce_for_fetch_params"))),
            ("zero_hpz_partition_size", int(zero.get("zero_hpz_partition_size", 1) or 1) > 1),
        )
        if on
    ]
    if clashes:
        raise ConfigError(
            f"{path}: zero_optimization.{clashes[0]} does not work with LoRA's bf16 frozen base "
            "(engine.lora.frozen_dtype=auto under model.dtype=bfloat16); remove it or set "
            "engine.lora.frozen_dtype=float32"
        )

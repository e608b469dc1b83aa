"""Export training checkpoints as plain PI0 checkpoints, write the lerobot layout, and describe checkpoints.

- `export_training_checkpoint`: a DeepSpeed tag written by DeepSpeedEngine.save -> canonical
  model.safetensors + pi0_arch.json (+ norm_stats.json), optionally LoRA merged (W + B A * alpha/r) and
  optionally the lerobot >= 0.4 layout. Reading the DeepSpeed files is engine/consolidate.py's job.
- `save_lerobot`: lerobot >= 0.4 names (weights.from_canonical), normalization in a lerobot processor
  file (`policy_preprocessor_step_0_normalizer_processor.safetensors`) and our norm_stats.json (exact mode
  and eps; our loader prefers it), plus pi0_arch.json so sizes need no guessing when reloading.
- `describe`: what tools/inspect_ckpt.py prints, for canonical / lerobot / openpi PyTorch / openpi JAX
  directories and DeepSpeed checkpoints.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from torch import Tensor

from ript_ds.model import weights as w
from ript_ds.model.arch import PI0Arch
from ript_ds.model.normalization import STAT_NAMES, NormStats, load_norm_stats
from ript_ds.model.pi0 import PI0Policy

log = logging.getLogger(__name__)

LEROBOT = "lerobot>=0.4"
LEROBOT_NORM_FILE = "policy_preprocessor_step_0_normalizer_processor.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"


class ExportError(ValueError):
    """Input that cannot be exported / described as asked; the message says what to do."""


# ------------------------------------------------------------------------------------------ lerobot
def save_lerobot(policy: PI0Policy, directory: str | Path, norm_stats: NormStats | None = None) -> Path:
    """The lerobot >= 0.4 layout of `policy` (reloadable by weights.load_checkpoint)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in policy.state_dict().items():
        if key in w.OURS_ONLY:
            if value.abs().max().item() != 0:
                log.warning("lerobot layout has no %s; the trained condition embedding is dropped", key)
            continue
        tensors[w.from_canonical(key, LEROBOT)] = value.detach().cpu().contiguous()
    save_file(tensors, str(directory / w.CANONICAL_WEIGHTS), metadata={"format": "pt"})
    (directory / w.CANONICAL_ARCH).write_text(json.dumps(policy.arch.to_dict(), indent=2))
    arch = policy.arch
    config = {
        "type": "pi0",
        "chunk_size": arch.chunk_size,
        "n_action_steps": arch.chunk_size,
        "max_state_dim": arch.max_state_dim,
        "max_action_dim": arch.max_action_dim,
        "num_inference_steps": arch.num_inference_steps,
        "min_period": arch.min_period,
        "max_period": arch.max_period,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if norm_stats is not None:
        flat = {}
        for feature, name in ((norm_stats.state, "observation.state"), (norm_stats.actions, "action")):
            for stat in STAT_NAMES:
                value = getattr(feature, stat)
                if value is not None:
                    flat[f"{name}.{stat}"] = np.asarray(value, dtype=np.float32)
        save_numpy(flat, str(directory / LEROBOT_NORM_FILE))
        norm_stats.save(directory)
    return directory


# ------------------------------------------------------------------------------------------ export
@dataclass
class ExportResult:
    out: Path
    tag_dir: Path
    arch: PI0Arch
    lora: dict[str, Any] | None
    norm_stats: bool
    client_state: dict[str, Any] = field(default_factory=dict)
    lerobot_out: Path | None = None


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """A tag directory itself, or a checkpoints root with `tag` or a `latest` file naming one."""
    from ript_ds.engine.consolidate import model_states_file

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint directory {path} does not exist")
    if tag is not None:
        path = path / tag
    elif model_states_file(path) is None and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir() or model_states_file(path) is None:
        raise ExportError(
            f"{path} is not a DeepSpeed checkpoint tag (no mp_rank_00_model_states.pt); pass the tag "
            "directory (e.g. run/checkpoints/iter_000100) or the checkpoints folder with --tag"
        )
    return path


def _run_dirs(tag_dir: Path) -> list[Path]:
    """Where run-level files (config.yaml, norm_stats.json, pi0_arch.json) may be: tag, its parents."""
    dirs = [tag_dir, tag_dir.parent]
    if tag_dir.parent.name == "checkpoints":
        dirs.append(tag_dir.parent.parent)
    return dirs


def _run_config_checkpoint(tag_dir: Path) -> Path | None:
    for d in _run_dirs(tag_dir):
        cfg = d / "config.yaml"
        if cfg.exists():
            model = (yaml.safe_load(cfg.read_text()) or {}).get("model") or {}
            if model.get("checkpoint"):
                return Path(model["checkpoint"])
    return None


def lora_scaling(adapter_config: Mapping[str, Any], module: str) -> float:
    """alpha / r for `module` (peft's rank_pattern / alpha_pattern and rsLoRA included)."""
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    for pattern, value in (adapter_config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            r = value
    for pattern, value in (adapter_config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return alpha / (r**0.5) if adapter_config.get("use_rslora") else alpha / r


def split_peft_state(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """peft names -> (canonical plain tensors, {module: (lora_A, lora_B)})."""
    plain: dict[str, Tensor] = {}
    a_b: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        k = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", k)
        if m:
            a_b.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        plain[k.replace(".base_layer.", ".")] = value
    incomplete = sorted(m for m, d in a_b.items() if set(d) != {"A", "B"})
    if incomplete:
        raise ExportError(f"LoRA modules without both lora_A and lora_B: {incomplete[:5]}")
    return plain, {m: (d["A"], d["B"]) for m, d in a_b.items()}


def merge_lora(
    base: Mapping[str, Tensor], adapters: Mapping[str, tuple[Tensor, Tensor]], adapter_config: Mapping
) -> dict[str, Tensor]:
    """W + (B @ A) * scaling for every adapted module; float32 maths."""
    out = dict(base)
    for module, (a, b) in adapters.items():
        key = f"{module}.weight"
        if key not in out:
            raise ExportError(f"LoRA adapter for {module} but the base weights have no {key}")
        delta = (b.float() @ a.float()) * lora_scaling(adapter_config, module)
        out[key] = out[key].float() + delta
    return out


def _read_adapter_config(tag_dir: Path) -> dict[str, Any]:
    cfg = tag_dir / ADAPTER_DIR / "adapter_config.json"
    if not cfg.exists():
        raise ExportError(f"{tag_dir} holds LoRA weights but no {ADAPTER_DIR}/adapter_config.json (r, alpha)")
    return json.loads(cfg.read_text())


def _resolve_arch(
    tag_dir: Path, arch_file: Path | None, base_dir: Path | None, state: Mapping[str, Tensor]
) -> PI0Arch:
    candidates = [arch_file] if arch_file else []
    candidates += [d / w.CANONICAL_ARCH for d in _run_dirs(tag_dir)]
    if base_dir is not None:
        candidates.append(base_dir / w.CANONICAL_ARCH)
    for cand in candidates:
        if cand is not None and cand.exists():
            return PI0Arch.from_dict(json.loads(cand.read_text()))
    if arch_file is not None:
        raise ExportError(f"--arch {arch_file} does not exist")
    try:
        return w.infer_arch(state, **(w._reference_overrides(base_dir) if base_dir else {}))
    except w.CheckpointError as err:
        raise ExportError(f"{err}; pass --arch pi0_arch.json (the model's PI0Arch)") from None


def export_training_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    tag: str | None = None,
    base: str | Path | None = None,
    arch_file: str | Path | None = None,
    merge: bool = False,
    lerobot_out: str | Path | None = None,
) -> ExportResult:
    """DeepSpeed checkpoint -> canonical directory `out` (and the lerobot layout at `lerobot_out`).

    base: the checkpoint the run started from (default: model.checkpoint of the run's config.yaml);
    needed for LoRA runs, whose DeepSpeed checkpoints hold only the adapters.
    """
    from ript_ds.engine.consolidate import client_state, fp32_state_dict

    tag_dir = resolve_tag_dir(path, tag)
    raw, states = fp32_state_dict(tag_dir)
    plain, adapters = split_peft_state(raw)
    base_dir = Path(base) if base else None
    if base_dir is not None and not base_dir.is_dir():
        raise ExportError(f"base checkpoint {base_dir} does not exist (--base)")
    if base_dir is None and (cfg_base := _run_config_checkpoint(tag_dir)) is not None and cfg_base.is_dir():
        base_dir = cfg_base  # from the run's config.yaml: arch, norm stats and (LoRA) frozen weights
    if adapters and not merge:
        raise ExportError(
            f"{tag_dir} is a LoRA checkpoint: pass --merge-lora to fold the adapters into the base weights "
            f"(or use {tag_dir / ADAPTER_DIR} with peft directly)"
        )
    state: dict[str, Tensor] = {}
    base_stats = None
    if base_dir is not None:
        base_state, _ = w.to_canonical(w.read_safetensors(base_dir / w.CANONICAL_WEIGHTS))
        state.update({k: v.float() for k, v in base_state.items()})
        base_stats = load_norm_stats(base_dir)
    elif adapters:
        raise ExportError(
            "LoRA checkpoints hold only the adapters: pass --base with the checkpoint the run started from"
        )
    state.update(plain)
    lora_info = None
    if adapters:
        adapter_config = _read_adapter_config(tag_dir)
        state = merge_lora(state, adapters, adapter_config)
        lora_info = {
            "r": adapter_config["r"],
            "alpha": adapter_config["lora_alpha"],
            "modules": len(adapters),
        }
    arch = _resolve_arch(tag_dir, Path(arch_file) if arch_file else None, base_dir, state)
    policy = PI0Policy(arch)
    try:
        w.load_into(policy, state, source=f"DeepSpeed checkpoint {tag_dir}")
    except w.CheckpointError as err:
        raise ExportError(str(err)) from None
    stats = next((s for d in _run_dirs(tag_dir) if (s := _stats_or_none(d)) is not None), None) or base_stats
    w.save_canonical(policy, out, stats)
    result = ExportResult(
        out=Path(out),
        tag_dir=tag_dir,
        arch=arch,
        lora=lora_info,
        norm_stats=stats is not None,
        client_state=_jsonable(client_state(states)),
    )
    if lerobot_out is not None:
        result.lerobot_out = save_lerobot(policy, lerobot_out, stats)
    return result


def _stats_or_none(directory: Path) -> NormStats | None:
    try:
        return load_norm_stats(directory)
    except ValueError:
        return None


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


# ------------------------------------------------------------------------------------------ describe
def _count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return int(sum(int(np.prod(s)) for s in shapes.values()))


def _describe_safetensors(directory: Path) -> dict[str, Any]:
    path = directory / w.CANONICAL_WEIGHTS
    index = path.with_name(path.name + ".index.json")
    files = [path] if path.exists() else []
    if not files and index.exists():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    for file in files:
        with safe_open(str(file), framework="np") as f:
            for key in f.keys():  # noqa: SIM118
                sl = f.get_slice(key)
                shapes[key] = tuple(sl.get_shape())
                dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + _count({key: shapes[key]})
    layout = w.detect_layout(list(shapes))
    info: dict[str, Any] = {
        "kind": "pi0 weights",
        "layout": layout,
        "parameters": _count(shapes),
        "tensors": len(shapes),
        "dtypes": dtypes,
    }
    if (directory / w.CANONICAL_ARCH).exists():
        info["arch"] = json.loads((directory / w.CANONICAL_ARCH).read_text())
    stats = _stats_or_none(directory)
    info["norm_stats"] = None if stats is None else {"mode": stats.mode, "source": stats.source}
    return info


def _describe_openpi(params_dir: Path) -> dict[str, Any]:
    meta = json.loads((params_dir / "_METADATA").read_text())["tree_metadata"]
    shapes = {}
    for entry in meta.values():
        key = "/".join(str(k["key"]) for k in entry["key_metadata"])
        shapes[key] = tuple(entry["value_metadata"].get("write_shape") or ())
    train_layout = any(k.endswith("/value") for k in shapes)
    return {
        "kind": "openpi JAX (orbax)",
        "layout": "openpi-jax (training, /value)" if train_layout else "openpi-jax (released)",
        "parameters": _count(shapes),
        "tensors": len(shapes),
        "convert": "python tools/convert_openpi_jax.py " + str(params_dir.parent),
    }


def _describe_deepspeed(tag_dir: Path) -> dict[str, Any]:
    from ript_ds.engine.consolidate import client_state, fp32_state_dict, zero_stage

    state, states = fp32_state_dict(tag_dir)
    lora = [k for k in state if ".lora_A" in k]
    info: dict[str, Any] = {
        "kind": "DeepSpeed training checkpoint",
        "layout": f"deepspeed (ZeRO-{zero_stage(states)})",
        "tag": tag_dir.name,
        "global_steps": states.get("global_steps"),
        "parameters_saved": _count({k: tuple(v.shape) for k, v in state.items()}),
        "dtypes": {"float32": _count({k: tuple(v.shape) for k, v in state.items()})},
    }
    shapes = states.get("param_shapes")
    if shapes:  # trainable parameters as ZeRO saw them (list of {name: shape} groups)
        groups = shapes if isinstance(shapes, list) else [shapes]
        info["parameters_trainable"] = sum(_count({n: tuple(s) for n, s in g.items()}) for g in groups)
    frozen = states.get("frozen_param_shapes")
    if frozen:
        info["parameters_frozen"] = _count({n: tuple(s) for n, s in frozen.items()})
    if lora:
        cfg_file = tag_dir / ADAPTER_DIR / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        targets = sorted({k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in lora})
        info["lora"] = {
            "rank": cfg.get("r", int(state[lora[0]].shape[0])),
            "alpha": cfg.get("lora_alpha"),
            "modules": len(lora),
            "targets": targets,
        }
    else:
        info["lora"] = None
    cs = client_state(states)
    if cs:
        info["client_state"] = _jsonable(cs)
    return info


def describe(path: str | Path) -> dict[str, Any]:
    """Layout, parameter counts, dtypes, LoRA and saved training state of any checkpoint we know."""
    from ript_ds.engine.consolidate import model_states_file

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if path.is_dir() and model_states_file(path) is not None:
        return _describe_deepspeed(path)
    if path.is_dir() and (path / "latest").is_file():
        return _describe_deepspeed(resolve_tag_dir(path))
    for params in (path / "params", path):
        if (params / "_METADATA").is_file():
            return _describe_openpi(params)
    if (path / w.CANONICAL_WEIGHTS).exists() or (path / (w.CANONICAL_WEIGHTS + ".index.json")).exists():
        return _describe_safetensors(path)
    raise ExportError(
        f"{path}: no model.safetensors, openpi params/ or DeepSpeed checkpoint files; nothing to describe"
    )

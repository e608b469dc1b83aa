"""`tools/inspect_ckpt.py`: layout, parameter counts, dtypes, LoRA and saved training state of any checkpoint
directory we know (canonical / lerobot / openpi PyTorch safetensors, openpi JAX orbax, DeepSpeed tags)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ript_ds.ckpt.export import ADAPTER_DIR, ExportError, resolve_tag_dir, stats_or_none, to_jsonable
from ript_ds.model import weights as w
from ript_ds.model.openpi_jax import model_type_of, normalize_keys


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
    canonical, _ = w.to_canonical({k: np.empty(0) for k in shapes}, layout)  # names only
    model_type = w.detect_model_type(list(canonical))
    info: dict[str, Any] = {
        "kind": f"{model_type} weights",
        "model_type": model_type,
        "layout": layout,
        "parameters": _count(shapes),
        "tensors": len(shapes),
        "dtypes": dtypes,
    }
    if (directory / w.CANONICAL_ARCH).exists():
        info["arch"] = json.loads((directory / w.CANONICAL_ARCH).read_text())
    stats = stats_or_none(directory)
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
        "model_type": model_type_of(normalize_keys(dict.fromkeys(shapes, np.empty(0)))),
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
        info["client_state"] = to_jsonable(cs)
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

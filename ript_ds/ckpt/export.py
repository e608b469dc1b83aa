"""Export training checkpoints as plain PI0 checkpoints, write the lerobot layout, and describe checkpoints.

- `export_training_checkpoint`: a DeepSpeed tag written by DeepSpeedEngine.save -> canonical
  model.safetensors + pi0_arch.json (+ norm_stats.json), optionally LoRA merged (W + B A * alpha/r) and
  optionally the lerobot >= 0.4 layout. Reading the DeepSpeed files is engine/consolidate.py's job.
- `export_checkpoint` (what tools/export.py calls): that, or a canonical / lerobot / openpi PyTorch
  directory (anything weights.load_checkpoint reads) -> the same outputs.
- `save_lerobot`: lerobot >= 0.4 names (weights.from_canonical) plus the two unused heads lerobot loads
  strictly, normalization in a lerobot processor file
  (`policy_preprocessor_step_0_normalizer_processor.safetensors`) and our norm_stats.json (exact mode and
  eps; our loader prefers it), plus pi0_arch.json so sizes need no guessing when reloading.
- `describe`: what tools/inspect_ckpt.py prints, for canonical / lerobot / openpi PyTorch / openpi JAX
  directories and DeepSpeed checkpoints.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from torch import Tensor

from ript_ds.model import weights as w
from ript_ds.model.arch import PI0Arch
from ript_ds.model.convention import POLICY_FILE, ConventionError, PolicyConvention, load_convention
from ript_ds.model.normalization import STAT_NAMES, NormStats, load_norm_stats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.pi05 import make_policy
from ript_ds.model.processing import TOKENIZER_FILES

log = logging.getLogger(__name__)

LEROBOT = "lerobot>=0.4"
LEROBOT_NORM_FILE = "policy_preprocessor_step_0_normalizer_processor.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"


class ExportError(ValueError):
    """Input that cannot be exported / described as asked; the message says what to do."""


# ------------------------------------------------------------------------------------------ lerobot
def lerobot_tensors(policy: PI0Policy) -> dict[str, Tensor]:
    """Every tensor lerobot 0.6.1's PI0Policy has, under its names: `from_pretrained` loads strictly, and
    its model builds two heads PI0 never uses, so both are written (weights.to_canonical drops exactly them):

    - PaliGemma's lm_head: an exact copy of the token embedding, in its dtype. The reference ties the
      two, and lerobot's `_fix_pytorch_state_dict_keys` copies this head over the embedding unless the
      embedding comes later in the file's storage order (safetensors stores by dtype, then name): a bf16
      head is stored last and replaced lerobot's embedding (measured: actions off by 1.2e-3), so only
      the embedding's own bits are safe. A copy, because safetensors refuses tensors that share memory.
    - the expert's lm_head: zeros, (vocab, expert width), bfloat16. PI0 has no value for it (our model
      never allocates the expert's vocabulary; openpi's has none); zeros say so, and bf16 is the narrowest
      dtype lerobot itself keeps weights in (strict loading checks names and shapes; copy_ casts).
    """
    tensors = {}
    for key, value in policy.state_dict().items():
        if key in w.OURS_ONLY:
            if value.abs().max().item() != 0:
                log.warning("lerobot layout has no %s; the trained condition embedding is dropped", key)
            continue
        tensors[w.from_canonical(key, LEROBOT)] = value.detach().cpu().contiguous()
    embedding = tensors[w.from_canonical("model.vlm.language_model.embed_tokens.weight", LEROBOT)]
    tensors[w.LEROBOT_PALIGEMMA_LM_HEAD] = embedding.clone()
    arch = policy.arch
    tensors[w.LEROBOT_EXPERT_LM_HEAD] = torch.zeros(arch.vocab_size, arch.expert.width, dtype=torch.bfloat16)
    return tensors


def save_lerobot(policy: PI0Policy, directory: str | Path, norm_stats: NormStats | None = None) -> Path:
    """The lerobot >= 0.4 layout of `policy`, which lerobot 0.6.1's `PI0Policy.from_pretrained` loads
    with no missing or unexpected key (lerobot_tensors: how the two unused heads are written) and
    weights.load_checkpoint reads back. config.json carries the sizes lerobot's PI0Config takes. A PI0.5
    is written the same way under lerobot's PI05Policy names (`time_mlp_*`, the expert's `...dense.*`;
    the key set equals lerobot 0.6.1's, checked against the pi05_lerobot_tiny_a fixture) with type "pi05".

    The heads' cost for the full-size PI0 (PI0Arch(): vocab 257152, widths 2048 / 1024), on 12.95 GB of
    fp32 weights: +2.107 GB (PaliGemma head, fp32) +0.527 GB (expert head, bf16) = 15.59 GB (+20%;
    lerobot's own fp32 save is 16.11 GB); saving holds the embedding's copy (2.1 GB) in memory once.
    Measured by tools/bench/lerobot_export_size.py (docs/benchmarks.md, "lerobot-layout export: the
    unused heads")."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lerobot_tensors(policy), str(directory / w.CANONICAL_WEIGHTS), metadata={"format": "pt"})
    (directory / w.CANONICAL_ARCH).write_text(json.dumps(policy.arch.to_dict(), indent=2))
    arch = policy.arch
    config = {
        "type": arch.model_type,  # lerobot's PI0Config or PI05Config
        "chunk_size": arch.chunk_size,
        "n_action_steps": arch.chunk_size,
        "max_state_dim": arch.max_state_dim,
        "max_action_dim": arch.max_action_dim,
        "num_inference_steps": arch.num_inference_steps,
        "min_period": arch.min_period,
        "max_period": arch.max_period,
        # lerobot sizes SigLIP's position table from this; its default (224) fits the full-size PI0 only.
        "image_resolution": [arch.vision.image_size, arch.vision.image_size],
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
    tag_dir: Path | None  # the DeepSpeed tag exported; None for a plain checkpoint directory
    arch: PI0Arch
    lora: dict[str, Any] | None
    norm_stats: bool
    client_state: dict[str, Any] = field(default_factory=dict)
    lerobot_out: Path | None = None
    layout: str = "deepspeed"  # the input's layout (weights.LAYOUTS names for plain checkpoints)


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
    policy = make_policy(arch)
    try:
        w.load_into(policy, state, source=f"DeepSpeed checkpoint {tag_dir}")
    except w.CheckpointError as err:
        raise ExportError(str(err)) from None
    stats = next((s for d in _run_dirs(tag_dir) if (s := stats_or_none(d)) is not None), None) or base_stats
    # The run's own policy.json (the trainer writes what its rollouts applied), else its base's (older runs).
    convention = _run_convention(tag_dir, base_dir)
    w.save_canonical(policy, out, stats, convention)
    copy_tokenizer([*_run_dirs(tag_dir), *([base_dir] if base_dir else [])], out)
    result = ExportResult(
        out=Path(out),
        tag_dir=tag_dir,
        arch=arch,
        lora=lora_info,
        norm_stats=stats is not None,
        client_state=to_jsonable(client_state(states)),
    )
    if lerobot_out is not None:
        result.lerobot_out = save_lerobot(policy, lerobot_out, stats)
        if convention is not None:
            convention.save(result.lerobot_out)
        copy_tokenizer([Path(out)], result.lerobot_out)
    return result


def _run_convention(tag_dir: Path, base_dir: Path | None) -> PolicyConvention | None:
    """The run's policy.json beside its checkpoints, else the base checkpoint's convention (any layout)."""
    own = [d for d in _run_dirs(tag_dir) if (d / POLICY_FILE).is_file()]
    try:
        if own:
            return load_convention(own[0])
        return load_convention(base_dir) if base_dir is not None else None
    except ConventionError as err:
        raise ExportError(str(err)) from None


def copy_tokenizer(dirs: list[Path], out: str | Path) -> Path | None:
    """The first tokenizer file found in `dirs` into `out`, so the export is served / evaluated without
    --tokenizer; None when none has one (then the user passes it)."""
    for d in dirs:
        for name in TOKENIZER_FILES:
            src = d / name
            if src.is_file():
                target = Path(out) / name
                if not target.exists() or not target.samefile(src):
                    shutil.copyfile(src, target)
                return target
    return None


def stats_or_none(directory: Path) -> NormStats | None:
    try:
        return load_norm_stats(directory)
    except ValueError:
        return None


def to_jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


def export_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    tag: str | None = None,
    base: str | Path | None = None,
    arch_file: str | Path | None = None,
    merge: bool = False,
    lerobot_out: str | Path | None = None,
) -> ExportResult:
    """Any loadable checkpoint directory -> canonical `out` (and the lerobot layout at `lerobot_out`): a
    DeepSpeed training checkpoint (export_training_checkpoint; `tag`, `base` and `merge` are its options)
    or a canonical / lerobot / openpi PyTorch directory (weights.load_checkpoint: its norm stats and
    arch are kept; `arch_file` replaces the arch it would read or infer)."""
    from ript_ds.engine.consolidate import model_states_file

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint directory {path} does not exist")
    if tag is not None or model_states_file(path) is not None or (path / "latest").is_file():
        return export_training_checkpoint(
            path, out, tag=tag, base=base, arch_file=arch_file, merge=merge, lerobot_out=lerobot_out
        )
    weights = path / w.CANONICAL_WEIGHTS
    if not (weights.exists() or weights.with_name(weights.name + ".index.json").exists()):
        if (path / "params" / "_METADATA").is_file():
            raise ExportError(
                f"{path} is an openpi JAX checkpoint: convert it with tools/convert_openpi_jax.py"
            )
        raise ExportError(
            f"{path}: nothing to export; expected a DeepSpeed training checkpoint (a tag directory, or a "
            f"checkpoints folder with `latest` or --tag) or a PI0 checkpoint directory ({w.CANONICAL_WEIGHTS})"
        )
    if base is not None:
        raise ExportError(f"--base is for LoRA training checkpoints; {path} is a plain PI0 checkpoint")
    for target in (out, lerobot_out):
        if target is not None and Path(target).resolve() == path.resolve():
            raise ExportError(f"the output directory {target} is the input checkpoint; choose another")
    return _export_plain(path, Path(out), Path(arch_file) if arch_file else None, lerobot_out)


def _export_plain(
    path: Path, out: Path, arch_file: Path | None, lerobot_out: str | Path | None
) -> ExportResult:
    try:
        arch = PI0Arch.from_dict(json.loads(arch_file.read_text())) if arch_file else None
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise ExportError(f"--arch {arch_file} is no readable PI0 architecture: {err}") from None
    try:
        loaded = w.load_checkpoint(path, arch)
    except w.CheckpointError as err:
        raise ExportError(str(err)) from None
    convention = load_convention(path)  # policy.json, or a lerobot config.json: kept with the weights
    w.save_canonical(loaded.policy, out, loaded.norm_stats, convention)
    copy_tokenizer([path], out)
    result = ExportResult(
        out=out,
        tag_dir=None,
        arch=loaded.policy.arch,
        lora=None,
        norm_stats=loaded.norm_stats is not None,
        layout=loaded.layout,
    )
    if lerobot_out is not None:
        result.lerobot_out = save_lerobot(loaded.policy, lerobot_out, loaded.norm_stats)
        if convention is not None:
            convention.save(result.lerobot_out)
        copy_tokenizer([path], result.lerobot_out)
    return result

"""PI0 checkpoint layouts -> our canonical key names, strictly, plus our own canonical save format.

Layouts (detected from the keys, mapped by explicit prefix rules, never by fuzzy renaming):
- canonical: transformers' PI0ForConditionalGeneration names (`model.vlm.*`, `model.dit.*`,
  `embed_action_time.*`, `action_out_proj.*`) plus our `cond_embed.weight`; written by `save_canonical`.
- lerobot >= 0.4: `model.paligemma_with_expert.paligemma.model.language_model.*`, ...
- lerobot <= 0.3: `model.paligemma_with_expert.paligemma.language_model.model.*`, normalization
  buffers inside the weights file.
- openpi PyTorch: the lerobot >= 0.4 names without the leading `model.`.
Each layout holds PI0 (`state_proj`, `action_time_mlp_in/out`) or PI0.5 (`time_mlp_in/out`, the expert's
adaptive norms `...input_layernorm.dense.*`, no state_proj; model/pi05.py): the same prefix rules map both,
and the model type is read from the mapped keys (detect_model_type), never from a file name.
The references' two `lm_head` weights (and an expert token embedding, where one was saved) are unused by
PI0 and dropped by their exact names, per layout (unused_keys; an automatic renaming would map PaliGemma's
lm_head onto the input embeddings). Any other key that maps nowhere, and any expected key that is absent,
is an error naming them (check_state, shared with the ZeRO-3 engine). Files are checked
from their headers first (read_header: a truncated or corrupt download is one error), and
inspect_checkpoint runs every check from the headers alone, before distributed init.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ript_ds.model.arch import GemmaArch, PI0Arch, VisionArch
from ript_ds.model.convention import PolicyConvention
from ript_ds.model.normalization import WEIGHTS_FILE, NormStats, load_norm_stats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.pi05 import make_policy

log = logging.getLogger(__name__)

CANONICAL_WEIGHTS = WEIGHTS_FILE
CANONICAL_ARCH = "pi0_arch.json"
OURS_ONLY = ("cond_embed.weight",)  # absent from reference checkpoints; zero-initialised

_LEROBOT_NEW = "model.paligemma_with_expert.paligemma.model."
_LEROBOT_OLD = "model.paligemma_with_expert.paligemma."

# (source prefix, canonical prefix); first match wins, so longer prefixes come first.
_PROJECTIONS = {
    "action_in_proj.": "embed_action_time.action_in_proj.",
    "state_proj.": "embed_action_time.state_proj.",
    "action_time_mlp_in.": "embed_action_time.action_time_mlp_in.",
    "action_time_mlp_out.": "embed_action_time.action_time_mlp_out.",
    "time_mlp_in.": "embed_action_time.time_mlp_in.",  # PI0.5's time MLP (PI0 has action_time_mlp_*)
    "time_mlp_out.": "embed_action_time.time_mlp_out.",
    "action_out_proj.": "action_out_proj.",
}


def _rules(root: str, paligemma: str, old_lm: bool) -> list[tuple[str, str]]:
    lm = f"{paligemma}language_model.model." if old_lm else f"{paligemma}language_model."
    rules = [
        # transformers 5.x has no `vision_model` level inside PaliGemma's vision tower.
        (f"{paligemma}vision_tower.vision_model.", "model.vlm.vision_tower."),
        (f"{paligemma}multi_modal_projector.", "model.vlm.multi_modal_projector."),
        (lm, "model.vlm.language_model."),
        (f"{root}paligemma_with_expert.gemma_expert.model.", "model.dit."),
    ]
    return rules + [(root + src, dst) for src, dst in _PROJECTIONS.items()]


def unused_keys(root: str, paligemma_lm_head: str) -> tuple[str, str, str]:
    """The keys of a reference layout that PI0 never uses: PaliGemma's lm_head (tied to the token
    embedding in the reference), the expert's lm_head, and the expert's token embedding (lerobot and
    openpi set it to None; older exports may hold it). Exact names, so nothing else is dropped silently."""
    expert = f"{root}paligemma_with_expert.gemma_expert."
    return (
        f"{root}paligemma_with_expert.{paligemma_lm_head}",
        f"{expert}lm_head.weight",
        f"{expert}model.embed_tokens.weight",
    )


# The two heads lerobot >= 0.4 builds and loads strictly (ckpt/export.save_lerobot writes them).
LEROBOT_PALIGEMMA_LM_HEAD, LEROBOT_EXPERT_LM_HEAD, _ = unused_keys("model.", "paligemma.lm_head.weight")


def _exactly(keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(rf"^{re.escape(k)}$" for k in keys)


LAYOUTS: dict[str, tuple[str, list[tuple[str, str]], tuple[str, ...]]] = {
    # name: (signature prefix, rules, dropped key patterns)
    "lerobot>=0.4": (
        _LEROBOT_NEW + "language_model.",
        _rules("model.", _LEROBOT_NEW, old_lm=False),
        _exactly(unused_keys("model.", "paligemma.lm_head.weight")),
    ),
    "lerobot<=0.3": (
        _LEROBOT_OLD + "language_model.model.",
        _rules("model.", _LEROBOT_OLD, old_lm=True),
        # transformers < 4.52 kept PaliGemma's lm_head inside its language_model (a GemmaForCausalLM).
        (
            *_exactly(unused_keys("model.", "paligemma.language_model.lm_head.weight")),
            r"^(normalize_inputs|normalize_targets|unnormalize_outputs)\.",
        ),
    ),
    "openpi-pytorch": (
        "paligemma_with_expert.paligemma.model.language_model.",
        _rules("", "paligemma_with_expert.paligemma.model.", old_lm=False),
        _exactly(unused_keys("", "paligemma.lm_head.weight")),
    ),
    "canonical": ("model.vlm.language_model.", [], ()),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what and how to fix it."""


def _name_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown}{' ...' if len(keys) > limit else ''} ({len(keys)} in all)"


def detect_layout(keys: list[str]) -> str:
    for name, (signature, _, _) in LAYOUTS.items():
        if any(k.startswith(signature) for k in keys):
            return name
    raise CheckpointError(
        f"unrecognised PI0 checkpoint layout; first keys: {_name_keys(keys, 5)}. Expected lerobot (>=0.4 or "
        "<=0.3), openpi PyTorch or ript-ds canonical keys; convert openpi JAX checkpoints with "
        "tools/convert_openpi_jax.py"
    )


# Present only in PI0.5: the expert's final adaptive norm (model/pi05.AdaptiveNorm).
PI05_SIGNATURE = "model.dit.norm.dense.weight"


def detect_model_type(canonical_keys: Sequence[str]) -> str:
    """The model type of canonical keys: pi05 when they hold the expert's adaptive norms, else pi0."""
    return "pi05" if PI05_SIGNATURE in canonical_keys else "pi0"


def to_canonical(state: Mapping[str, Tensor], layout: str | None = None) -> tuple[dict[str, Tensor], str]:
    """Rename a reference state dict to canonical keys; drops only the known-unused keys."""
    layout = layout or detect_layout(list(state))
    _, rules, dropped = LAYOUTS[layout]
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if any(re.search(p, key) for p in dropped):
            continue
        target = (
            key
            if layout == "canonical"
            else next((dst + key[len(src) :] for src, dst in rules if key.startswith(src)), None)
        )
        if target is None:
            unmapped.append(key)
        else:
            out[target] = value
    if unmapped:
        raise CheckpointError(f"{layout} checkpoint has keys that map to nothing: {_name_keys(unmapped)}")
    return out, layout


def from_canonical(key: str, layout: str) -> str:
    """The name a canonical key has in `layout` (the first rule that produces it)."""
    for src, dst in LAYOUTS[layout][1]:
        if key.startswith(dst):
            return src + key[len(dst) :]
    return key


def check_state(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    source: str,
    layout: str = "canonical",
) -> None:
    """The one strict check of every loader (load_into, inspect_checkpoint, the ZeRO-3 engine): canonical
    key -> shape of the model vs the checkpoint. Every expected key but OURS_ONLY must be present, nothing
    else may be, shapes must be equal (a broadcastable one too). Keys are named as the checkpoint spells
    them (layout names), so users can find them in their file."""
    missing = [from_canonical(k, layout) for k in expected if k not in found and k not in OURS_ONLY]
    unexpected = [from_canonical(k, layout) for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_name_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_name_keys(unexpected)}")
        raise CheckpointError(f"{source} does not match the PI0 architecture; " + "; ".join(parts))
    bad = [
        f"{from_canonical(k, layout)} {tuple(shape)} vs {tuple(expected[k])}"
        for k, shape in found.items()
        if tuple(shape) != tuple(expected[k])
    ]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch (checkpoint vs model): {_name_keys(bad)}")


def load_into(policy: PI0Policy, state: Mapping[str, Tensor], source: str, layout: str = "canonical") -> None:
    """Strict load of canonical tensors (check_state), then a copy into the policy."""
    expected = policy.state_dict()
    check_state(
        {k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in state.items()}, source, layout
    )
    with torch.no_grad():
        for key, target in expected.items():
            if key in state:
                target.copy_(state[key].to(target.dtype))


# Bytes per element of the safetensors dtypes, to check a header's offsets against its shapes.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2}
_DTYPE_BYTES |= {"BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def weight_files(path: Path) -> list[Path]:
    """The file `path`, or the shards its `<name>.index.json` names."""
    index = path.with_name(path.name + ".index.json")
    if path.exists() or not index.exists():
        if not path.exists():
            raise CheckpointError(
                f"no weights file {path} (nor {index.name}); is this a PI0 checkpoint directory?"
            )
        return [path]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path.parent / f for f in weight_map.values()})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index} is not a safetensors index (JSON with a weight_map)") from None


def read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking that the file is whole. Reads the header
    only (kilobytes), so a corrupt or truncated download is one clear error before any process starts."""
    if not file.is_file():
        raise CheckpointError(f"weights file {file} does not exist")
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        raw = f.read(length) if 2 <= length <= size - 8 else b""
    not_safetensors = f"{file} is not a safetensors file"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{not_safetensors} (no valid header); re-download or re-export it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_safetensors} (its header is no JSON object)")
    shapes, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            itemsize = _DTYPE_BYTES.get(info["dtype"])
            ok = 0 <= begin <= stop and (itemsize is None or stop - begin == math.prod(shape) * itemsize)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{not_safetensors} (bad header entry for {name!r}); re-download it")
        shapes[name], end = shape, max(end, stop)
    if 8 + length + end > size:
        raise CheckpointError(
            f"{file} is truncated ({size} bytes, its header describes {8 + length + end}); "
            "re-download or re-export it"
        )
    return shapes


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """One file, or a sharded set described by `<name>.index.json`; headers are checked first."""
    out: dict[str, Tensor] = {}
    for file in weight_files(path):
        read_header(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is no dict)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: {err}") from None
    return out


def infer_arch(state: Mapping[str, Tensor], vision_heads: int | None = None, **overrides) -> PI0Arch:
    """Sizes from canonical tensor shapes. PI0 uses one KV head, so head_dim = k_proj rows.

    SigLIP's head count is not visible in any shape: it is 16 for so400m (width 1152); other widths
    need `vision_heads`.
    """

    def gemma(prefix: str) -> GemmaArch:
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(rf"{prefix}layers\.(\d+)\.", k)))
        attn = f"{prefix}layers.0.self_attn."
        head_dim = state[attn + "k_proj.weight"].shape[0]
        return GemmaArch(
            width=state[attn + "q_proj.weight"].shape[1],
            depth=depth,
            mlp_dim=state[f"{prefix}layers.0.mlp.gate_proj.weight"].shape[0],
            num_heads=state[attn + "q_proj.weight"].shape[0] // head_dim,
            num_kv_heads=1,
            head_dim=head_dim,
        )

    vt = "model.vlm.vision_tower."
    width, _, patch, _ = state[vt + "embeddings.patch_embedding.weight"].shape
    tokens = state[vt + "embeddings.position_embedding.weight"].shape[0]
    if vision_heads is None and width != 1152:
        raise CheckpointError(
            f"SigLIP width {width} is not so400m: pass the vision head count (e.g. an arch JSON) to load it"
        )
    vision = VisionArch(
        width=width,
        depth=1 + max(int(m.group(1)) for k in state if (m := re.match(rf"{vt}encoder\.layers\.(\d+)\.", k))),
        mlp_dim=state[vt + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_heads=vision_heads or 16,
        patch_size=patch,
        image_size=round(tokens**0.5) * patch,
    )
    action_in = state["embed_action_time.action_in_proj.weight"]
    model_type = detect_model_type(list(state))
    # PI0.5 has no state projection: its max_state_dim is only the processor's padding (the default).
    state_dims = {}
    if model_type == "pi0":
        state_dims["max_state_dim"] = state["embed_action_time.state_proj.weight"].shape[1]
    return PI0Arch(
        vlm=gemma("model.vlm.language_model."),
        expert=gemma("model.dit."),
        vision=vision,
        vocab_size=state["model.vlm.language_model.embed_tokens.weight"].shape[0],
        max_action_dim=action_in.shape[1],
        model_type=model_type,
        **state_dims,
        **overrides,
    )


def load_weights_file(policy: PI0Policy, path: str | Path) -> str:
    """Load one weights file (or sharded set) of any supported layout into `policy`; returns the layout."""
    state, layout = to_canonical(read_safetensors(Path(path)))
    load_into(policy, state, source=f"{layout} weights {path}", layout=layout)
    return layout


@dataclass
class LoadedCheckpoint:
    policy: PI0Policy
    norm_stats: NormStats | None
    layout: str


def _reference_overrides(directory: Path) -> dict:
    """chunk size / steps from a lerobot config.json, when there is one."""
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        return {}
    return {k: cfg[k] for k in ("chunk_size", "num_inference_steps") if isinstance(cfg.get(k), int)}


def checkpoint_arch(directory: Path, state: Mapping[str, Tensor], **overrides) -> PI0Arch:
    """The checkpoint's pi0_arch.json when there is one, else sizes inferred from its canonical tensors
    (meta tensors will do) plus a lerobot config.json's chunk size / steps; `overrides` (the run config's
    num_inference_steps) win over both."""
    arch_file = directory / CANONICAL_ARCH
    if arch_file.exists():
        try:
            arch = PI0Arch.from_dict(json.loads(arch_file.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise CheckpointError(f"{arch_file} is not a PI0 architecture: {err}") from None
    else:
        try:
            arch = infer_arch(state, **_reference_overrides(directory))
        except (KeyError, ValueError) as err:  # a tensor the sizes are read from is absent
            raise CheckpointError(
                f"cannot infer the PI0 architecture of {directory} ({type(err).__name__}: {err}); "
                f"check the weights or add a {CANONICAL_ARCH}"
            ) from None
    return dataclasses.replace(arch, **overrides)


def inspect_checkpoint(directory: str | Path, **overrides) -> PI0Arch:
    """What load_checkpoint would build, from the safetensors headers alone (no tensor is read): the files
    are whole, the keys map, the arch is known and every key and shape matches it. Cheap enough to run
    before distributed init; returns the arch (with `overrides` applied)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(directory / CANONICAL_WEIGHTS):
        shapes |= read_header(file)
    state, layout = to_canonical({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    arch = checkpoint_arch(directory, state, **overrides)
    with torch.device("meta"):  # the architecture's key and shape table, without allocating it
        expected = make_policy(arch).state_dict()
    check_state(
        {k: v.shape for k, v in expected.items()},
        {k: v.shape for k, v in state.items()},
        f"{layout} checkpoint {directory}",
        layout,
    )
    return arch


def load_checkpoint(directory: str | Path, arch: PI0Arch | None = None, **overrides) -> LoadedCheckpoint:
    """Load any supported layout from a directory: weights, architecture and normalization statistics.
    `overrides` replace arch fields (the run config's num_inference_steps)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    raw = read_safetensors(directory / CANONICAL_WEIGHTS)
    state, layout = to_canonical(raw)
    arch = dataclasses.replace(arch, **overrides) if arch else checkpoint_arch(directory, state, **overrides)
    policy = make_policy(arch)
    load_into(policy, state, source=f"{layout} checkpoint {directory}", layout=layout)
    stats = load_norm_stats(directory, raw)
    log.info(
        "loaded %s (%s layout) from %s; normalization stats: %s",
        arch.model_type,
        layout,
        directory,
        stats is not None,
    )
    return LoadedCheckpoint(policy=policy, norm_stats=stats, layout=layout)


def save_canonical(
    policy: PI0Policy,
    directory: str | Path,
    norm_stats: NormStats | None = None,
    convention: PolicyConvention | None = None,
) -> Path:
    """Our layout: model.safetensors (canonical keys, contiguous) + pi0_arch.json + norm_stats.json, and
    policy.json when the checkpoint has a policy convention (model/convention.py)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(tensors, str(directory / CANONICAL_WEIGHTS), metadata={"format": "pt", "layout": "ript-ds"})
    (directory / CANONICAL_ARCH).write_text(json.dumps(policy.arch.to_dict(), indent=2))
    if norm_stats is not None:
        norm_stats.save(directory)
    if convention is not None:
        convention.save(directory)
    return directory


def missing_convention_hint(directory: str | Path) -> str | None:
    """The warning for a checkpoint with no policy convention whose weights are not in our layout (an openpi
    PyTorch directory, a lerobot one without its config.json): it runs with absolute actions and the env's
    cameras in order, which is wrong for openpi's LIBERO checkpoints (pi0_libero is delta). None for
    ript-ds checkpoints (their runs trained them that way). Reads the safetensors headers only."""
    directory = Path(directory)
    try:
        keys = [k for f in weight_files(directory / CANONICAL_WEIGHTS) for k in read_header(f)]
        if detect_layout(keys) == "canonical":
            return None
    except CheckpointError:
        return None  # the loader reports unreadable weights itself
    return (
        f"{directory} has no policy.json: its actions are taken as absolute and its cameras in the env's order. "
        "If it is an openpi checkpoint, record its training config's transforms: python "
        f"tools/policy_convention.py {directory} --openpi-config pi0_libero --write (or its own config)"
    )

"""The policy convention: everything around the network that decides what a checkpoint's actions mean.

The network can equal the reference and the policy still fail (the field's "0% after conversion"): the
checkpoint was trained with a particular normalisation, action frame, camera order, prompt format and
horizon. These live in `policy.json` beside the weights and are applied in one place, the Processor
(model/processing.py), which every path uses: rollouts, training windows, evaluation, export and the
policy server.

Fields (openpi names in brackets, openpi src/openpi/training/config.py and policies/libero_policy.py):
- model_type: "pi0" or "pi05" [Pi0Config.pi05];
- norm_mode: "mean_std" (pi0: (x - mean) / (std + 1e-6)) or "quantile" (pi0.5 / FAST: [q01, q99] -> [-1, 1])
  [DataConfig.use_quantile_norm];
- delta_action_mask: per env action dim, True where the model's action is relative to the observation state
  [extra_delta_transform: DeltaActions / AbsoluteActions with make_bool_mask(6, -1)]; empty = absolute;
- image_slots: the model's camera slots in order, each fed from an env camera ("image", "wrist_image") or
  zeros with mask False (None) [LiberoInputs: base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb]; empty: the
  env's cameras in their order;
- prompt_format: "openpi" = BOS + prompt.strip() with "_" and newlines -> spaces + "\\n", no lowercasing
  [TokenizePrompt / PaligemmaTokenizer];
- action_horizon [Pi0Config.action_horizon], replan_steps (actions executed per chunk, the LIBERO
  client's replan_steps), max_token_len [Pi0Config.max_token_len];
- state_dim / action_dim: the env's real dims (LIBERO 8 / 7), zero-padded to the model's 32;
- discrete_state_input: the normalised, unpadded state as 256 bins in a "Task: ..., State: ...;\\nAction: "
  prompt [Pi0Config.discrete_state_input; lerobot pi05 always], built by the Processor (model/processing.py
  state_prompt); pi0.5 only, since pi0 would see the state twice (as its state token too).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

POLICY_FILE = "policy.json"
LIBERO_SLOTS: tuple[tuple[str, str | None], ...] = (
    ("base_0_rgb", "image"),
    ("left_wrist_0_rgb", "wrist_image"),
    ("right_wrist_0_rgb", None),  # openpi LIBERO: zeros, mask False
)
ENV_CAMERAS = ("image", "wrist_image")  # the order of Observation.images of our LIBERO env


class ConventionError(ValueError):
    """An unusable or unsupported convention (one line, names what to change)."""


@dataclass(frozen=True)
class PolicyConvention:
    model_type: str = "pi0"
    norm_mode: str = "mean_std"
    delta_action_mask: tuple[bool, ...] = ()  # empty: actions are absolute
    image_slots: tuple[tuple[str, str | None], ...] = LIBERO_SLOTS
    prompt_format: str = "openpi"
    action_horizon: int | None = None  # None: the model's chunk size
    replan_steps: int = 5
    max_token_len: int | None = 48  # None: the run's model.tokenizer_max_length
    state_dim: int = 8
    action_dim: int = 7
    discrete_state_input: bool = False
    preset: str | None = None  # the openpi config it came from, if any
    source: str = field(default="default", compare=False)  # where it was read (for messages)

    def __post_init__(self) -> None:
        checks = [
            (self.model_type in ("pi0", "pi05"), f"model_type {self.model_type!r}: pi0 or pi05"),
            (
                self.norm_mode in ("mean_std", "quantile"),
                f"norm_mode {self.norm_mode!r}: mean_std or quantile",
            ),
            (self.prompt_format == "openpi", f"prompt_format {self.prompt_format!r}: only 'openpi'"),
            (
                len(self.delta_action_mask) in (0, self.action_dim),
                "delta_action_mask needs one entry per action dim",
            ),
            (
                self.replan_steps >= 1 and (self.max_token_len or 2) >= 2,
                "replan_steps >= 1, max_token_len >= 2",
            ),
            (
                not self.image_slots or any(s is not None for _, s in self.image_slots),
                "image_slots feed no camera",
            ),
            (
                all(s in (None, *ENV_CAMERAS) for _, s in self.image_slots),
                f"image_slots sources: {ENV_CAMERAS} or null",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConventionError(f"policy convention ({self.source}): {message}")

    def check_supported(self) -> None:
        """Raise ConventionError for what the Processor cannot apply (a recorded convention may hold it)."""
        if self.discrete_state_input and self.model_type != "pi05":
            raise ConventionError(
                f"policy convention ({self.source}): discrete_state_input with model_type "
                f"{self.model_type!r} is not supported (pi05 only: pi0 also feeds the state as a token)"
            )

    # ------------------------------------------------------------------ the action frame
    def _mask(self, dims: int) -> np.ndarray:
        mask = np.zeros(dims, dtype=bool)
        mask[: len(self.delta_action_mask)] = self.delta_action_mask[:dims]
        return mask

    def to_model_frame(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Env actions [..., H, A] -> the model's frame: minus the observation state [..., S] on the masked
        dims (openpi DeltaActions), before normalisation. Absolute conventions return `actions`."""
        if not self.delta_action_mask:
            return actions
        dims = actions.shape[-1]
        offset = np.where(self._mask(dims), state[..., :dims], 0.0)
        return (actions - offset[..., None, :]).astype(actions.dtype)

    def to_env_frame(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Unnormalised model actions [..., H, A] -> env actions: plus the state on the masked dims
        (openpi AbsoluteActions; pass the state as the model saw it, normalised and back)."""
        if not self.delta_action_mask:
            return actions
        dims = actions.shape[-1]
        offset = np.where(self._mask(dims), state[..., :dims], 0.0)
        return actions + offset[..., None, :]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("source")
        out["delta_action_mask"] = list(self.delta_action_mask)
        out["image_slots"] = [list(s) for s in self.image_slots]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict") -> PolicyConvention:
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConventionError(
                f"{source}: unknown policy convention keys {unknown}; valid: {sorted(known)}"
            )
        values = dict(data)
        if "delta_action_mask" in values:
            values["delta_action_mask"] = tuple(bool(x) for x in values["delta_action_mask"])
        if "image_slots" in values:
            values["image_slots"] = tuple(
                (str(n), None if s is None else str(s)) for n, s in values["image_slots"]
            )
        return cls(**values, source=source)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / POLICY_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def with_horizon(self, chunk_size: int) -> PolicyConvention:
        return replace(self, action_horizon=chunk_size)


def _openpi_presets() -> dict[str, PolicyConvention]:
    delta = (True,) * 6 + (False,)  # make_bool_mask(6, -1): arm dims relative, gripper absolute
    pi0 = PolicyConvention(delta_action_mask=delta, action_horizon=50, max_token_len=48)
    pi05 = PolicyConvention(model_type="pi05", norm_mode="quantile", action_horizon=10, max_token_len=200)
    return {
        "pi0_libero": replace(pi0, preset="pi0_libero"),
        "pi0_libero_low_mem_finetune": replace(pi0, preset="pi0_libero_low_mem_finetune"),  # LoRA, same data
        "pi05_libero": replace(pi05, preset="pi05_libero"),
    }


PRESETS = _openpi_presets()
UNSUPPORTED = {
    "pi0_fast_libero": "pi0-FAST (autoregressive action tokens) is not a flow-matching PI0",
    "pi0_fast_libero_low_mem_finetune": "pi0-FAST (autoregressive action tokens) is not a flow-matching PI0",
}


def preset(name: str) -> PolicyConvention:
    """The convention of an openpi training config users hold (openpi training/config.py)."""
    if name in UNSUPPORTED:
        raise ConventionError(f"openpi config {name!r} is out of scope: {UNSUPPORTED[name]}")
    if name not in PRESETS:
        raise ConventionError(f"unknown openpi config {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], source=f"openpi config {name}")


def load_convention(directory: str | Path) -> PolicyConvention | None:
    """policy.json, else lerobot's own config.json (type, normalisation, horizon, token length); None when
    the checkpoint records nothing (a plain ript-ds checkpoint: the processor's defaults apply)."""
    directory = Path(directory)
    path = directory / POLICY_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConventionError(f"{path} is not valid JSON: {err}") from None
        return PolicyConvention.from_dict(data, source=str(path))
    config = directory / "config.json"
    if config.exists():
        return _from_lerobot_config(config)
    return None


def _from_lerobot_config(path: Path) -> PolicyConvention | None:
    """lerobot >= 0.4 PI0Config / PI05Config fields; None for a config.json that is not lerobot's. Where a
    field is absent, lerobot's own class default applies (what lerobot itself would run), never ours."""
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConventionError(f"{path} is not valid JSON: {err}") from None
    kind = cfg.get("type")
    if kind not in ("pi0", "pi05"):
        return None
    where = f"{path} (lerobot)"
    if cfg.get("use_proprioceptive_memory"):  # lerobot MEM: the state through a projection, not the prompt
        raise ConventionError(f"{where}: use_proprioceptive_memory is not supported")
    horizon = int(cfg.get("chunk_size", 50))
    replan = int(cfg.get("n_action_steps", horizon))  # lerobot's defaults are equal (50, 50)
    if replan > horizon:  # lerobot's own __post_init__ refuses it too
        raise ConventionError(f"{where}: n_action_steps {replan} > chunk_size {horizon}")
    action_dim = _feature_dim(cfg.get("output_features"), "action", 7)
    limit = cfg.get("tokenizer_max_length", 48 if kind == "pi0" else 200)
    return PolicyConvention(
        model_type=kind,
        norm_mode=_lerobot_norm_mode(cfg, kind, where),
        delta_action_mask=_lerobot_delta_mask(cfg, action_dim),
        image_slots=_lerobot_slots(cfg),
        action_horizon=horizon,
        replan_steps=replan,
        max_token_len=int(limit),
        state_dim=_feature_dim(cfg.get("input_features"), "observation.state", 8),
        action_dim=action_dim,
        discrete_state_input=kind == "pi05",  # Pi05PrepareStateTokenizerProcessorStep: always, without MEM
        source=where,
    )


_LEROBOT_MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantile"}


def _lerobot_norm_mode(cfg: dict[str, Any], kind: str, where: str) -> str:
    """normalization_mapping, else PI0Config's MEAN_STD / PI05Config's QUANTILES. lerobot's LIBERO pi0.5
    recipe overrides it to MEAN_STD, so it is read, never assumed; one mode must serve state and actions."""
    default = "MEAN_STD" if kind == "pi0" else "QUANTILES"
    modes = cfg.get("normalization_mapping") or {}
    state, action = (str(modes.get(k, default)).upper() for k in ("STATE", "ACTION"))
    if state != action:
        raise ConventionError(f"{where}: normalization_mapping STATE {state} != ACTION {action}")
    if state not in _LEROBOT_MODES:
        raise ConventionError(
            f"{where}: normalization_mapping {state} is not supported (MEAN_STD, QUANTILES)"
        )
    return _LEROBOT_MODES[state]


def _lerobot_delta_mask(cfg: dict[str, Any], action_dim: int) -> tuple[bool, ...]:
    """use_relative_actions (lerobot >= 0.5, RelativeActionsProcessorStep._build_mask): every action dim
    relative to the state except those whose name contains a relative_exclude_joints entry."""
    if not cfg.get("use_relative_actions"):
        return ()
    excluded = [str(j).lower() for j in cfg.get("relative_exclude_joints", ["gripper"]) if j]
    names = cfg.get("action_feature_names")
    if not excluded or names is None:
        return (True,) * action_dim
    mask = [not any(e in str(n).lower() for e in excluded) for n in names[:action_dim]]
    return tuple(mask + [True] * (action_dim - len(mask)))


def _lerobot_slots(cfg: dict[str, Any]) -> tuple[tuple[str, str | None], ...]:
    """lerobot's PI0/PI05 feed the image features found in the batch (in config order), then every other
    one, `empty_camera_<i>` included (validate_features adds `empty_cameras` of them), as -1 pixels with
    mask False (_preprocess_images). Here a feature named like an env camera takes it, the rest take the
    remaining env cameras in order, and features left over are masked slots, never dropped."""
    prefix = "observation.images."
    features = cfg.get("input_features") or {}
    names = [
        k.removeprefix(prefix)
        for k, f in features.items()
        if (f.get("type") == "VISUAL" if isinstance(f, dict) and "type" in f else k.startswith(prefix))
    ]
    empty = [f"empty_camera_{i}" for i in range(int(cfg.get("empty_cameras", 0)))]
    names += [e for e in empty if e not in names]  # lerobot <= 0.4 also saved them in input_features
    if all(n.startswith("empty_camera_") for n in names):
        # no real camera recorded: the env's cameras in their order, then the empty ones
        names = [*ENV_CAMERAS, *names] if names else []
    free = [c for c in ENV_CAMERAS if c not in names]
    sources: dict[str, str | None] = {}
    for name in names:
        if name.startswith("empty_camera_"):
            sources[name] = None
        elif name in ENV_CAMERAS:
            sources[name] = name
        else:
            sources[name] = free.pop(0) if free else None
    fed = [(n, s) for n, s in sources.items() if s is not None]
    return tuple(fed + [(n, s) for n, s in sources.items() if s is None])  # present first, as lerobot


def _feature_dim(features: dict[str, Any] | None, key: str, default: int) -> int:
    shape = ((features or {}).get(key) or {}).get("shape")
    return int(shape[-1]) if shape else default

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
- discrete_state_input: the state as 256 bins in a "Task: ..., State: ...;\\nAction: " prompt [Pi0Config.
  discrete_state_input; lerobot pi05 always]: recorded (lerobot pi05 config.json) and refused where a
  convention is applied (check_supported: the Processor, the trainer's checks, the server), since that prompt
  is not built yet and the actions would be silently wrong (openpi pi05_libero: off).
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
        """Raise ConventionError for what the Processor cannot apply yet (a recorded convention may hold it)."""
        if self.discrete_state_input:
            raise ConventionError(
                f"policy convention ({self.source}): discrete_state_input (the state as text in the prompt, "
                "as lerobot's pi05 does) is not supported yet"
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
    """lerobot >= 0.4 PI0Config / PI05Config fields; None for a config.json that is not lerobot's."""
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConventionError(f"{path} is not valid JSON: {err}") from None
    kind = cfg.get("type")
    if kind not in ("pi0", "pi05"):
        return None
    modes = cfg.get("normalization_mapping") or {}
    state_mode = str(modes.get("STATE", "MEAN_STD")).upper()
    if state_mode not in ("MEAN_STD", "QUANTILES", "QUANTILE"):
        raise ConventionError(f"{path}: normalization_mapping STATE {state_mode!r} is not supported")
    # lerobot feeds its image features in config order, then `empty_cameras` masked slots.
    images = [k for k in (cfg.get("input_features") or {}) if k.startswith("observation.images.")]
    slots = [(name, ENV_CAMERAS[i]) for i, name in enumerate(images[: len(ENV_CAMERAS)])]
    slots += [(f"empty_camera_{i}", None) for i in range(int(cfg.get("empty_cameras", 0)))] if slots else []
    limit = cfg.get("tokenizer_max_length")
    return PolicyConvention(
        model_type=kind,
        norm_mode="mean_std" if state_mode == "MEAN_STD" else "quantile",
        image_slots=tuple(slots),
        action_horizon=int(cfg.get("chunk_size", 50)),
        replan_steps=int(cfg.get("n_action_steps", 5)),
        max_token_len=None if limit is None else int(limit),
        discrete_state_input=kind == "pi05",  # lerobot's pi05 prompt always carries the state bins
        source=f"{path} (lerobot)",
    )

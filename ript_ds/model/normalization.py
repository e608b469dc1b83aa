"""Normalization statistics for state and actions, read from wherever a PI0 checkpoint keeps them.

Sources:
- ours: `norm_stats.json` beside the weights (written by NormStats.save);
- openpi: `assets/<asset_id>/norm_stats.json` = {"norm_stats": {"state": {mean, std, q01, q99}, "actions": ...}};
- lerobot >= 0.4: `policy_preprocessor*.safetensors` processor state (`observation.state.mean`, `action.std`...);
- lerobot <= 0.3: buffers inside the weights file (`normalize_inputs.buffer_observation_state.mean`...).

Modes: `mean_std` (pi0) maps x -> (x - mean) / (std + eps); `quantile` (pi0-FAST / pi0.5) maps
[q01, q99] -> [-1, 1]. eps follows the source: openpi 1e-6, lerobot 1e-8.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import safe_open

NORM_FILE = "norm_stats.json"
WEIGHTS_FILE = "model.safetensors"  # every layout's weights file (model/weights.py CANONICAL_WEIGHTS)
_BUFFER_PREFIX = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")  # lerobot <= 0.3
Mode = Literal["mean_std", "quantile"]
STAT_NAMES = ("mean", "std", "q01", "q99")


@dataclass(eq=False)
class FeatureStats:
    mean: np.ndarray | None = None  # [D]
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureStats):
            return NotImplemented
        pairs = [(getattr(self, k), getattr(other, k)) for k in STAT_NAMES]
        return all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in pairs
        )

    def to_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in STAT_NAMES if getattr(self, k) is not None}

    @classmethod
    def from_dict(cls, d: Mapping) -> FeatureStats:
        return cls(**{k: np.asarray(d[k], dtype=np.float64) for k in STAT_NAMES if d.get(k) is not None})


@dataclass
class NormStats:
    state: FeatureStats
    actions: FeatureStats
    mode: Mode = "mean_std"
    eps: float = 1e-6
    source: str = field(default="ript-ds", compare=False)

    def _check(self, feat: FeatureStats, name: str) -> None:
        need = ("mean", "std") if self.mode == "mean_std" else ("q01", "q99")
        absent = [k for k in need if getattr(feat, k) is None]
        if absent:
            raise ValueError(
                f"normalization mode {self.mode!r} needs {name} {absent}; stats from {self.source}"
            )

    def normalize(self, x: np.ndarray, feature: Literal["state", "actions"]) -> np.ndarray:
        """x [..., D] with D <= stats dim (real dims only); returns float32."""
        f = getattr(self, feature)
        self._check(f, feature)
        d = x.shape[-1]
        if self.mode == "mean_std":
            y = (x - f.mean[:d]) / (f.std[:d] + self.eps)
        else:
            y = (x - f.q01[:d]) / (f.q99[:d] - f.q01[:d] + self.eps) * 2.0 - 1.0
        return y.astype(np.float32)

    def unnormalize(self, y: np.ndarray, feature: Literal["state", "actions"]) -> np.ndarray:
        f = getattr(self, feature)
        self._check(f, feature)
        d = y.shape[-1]
        if self.mode == "mean_std":
            x = y * (f.std[:d] + self.eps) + f.mean[:d]
        else:
            x = (y + 1.0) / 2.0 * (f.q99[:d] - f.q01[:d] + self.eps) + f.q01[:d]
        return x.astype(np.float32)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / NORM_FILE
        payload = {
            "mode": self.mode,
            "eps": self.eps,
            "norm_stats": {"state": self.state.to_dict(), "actions": self.actions.to_dict()},
        }
        path.write_text(json.dumps(payload, indent=2))
        return path

    @classmethod
    def identity(cls, state_dim: int, action_dim: int) -> NormStats:
        """mean 0 / std 1: for tests, synthetic environments and models trained on raw units."""
        return cls(
            state=FeatureStats(mean=np.zeros(state_dim), std=np.ones(state_dim)),
            actions=FeatureStats(mean=np.zeros(action_dim), std=np.ones(action_dim)),
            eps=0.0,
        )


def _from_openpi_json(path: Path, mode: Mode | None) -> NormStats:
    payload = json.loads(path.read_text())
    stats = payload.get("norm_stats", payload)
    missing = [k for k in ("state", "actions") if k not in stats]
    if missing:
        raise ValueError(
            f"{path}: norm stats lack {missing}; expected {{'norm_stats': {{'state': ..., 'actions': ...}}}}"
        )
    return NormStats(
        state=FeatureStats.from_dict(stats["state"]),
        actions=FeatureStats.from_dict(stats["actions"]),
        mode=mode or payload.get("mode", "mean_std"),
        eps=float(payload.get("eps", 1e-6)),
        source=str(path),
    )


def _from_flat(
    flat: Mapping[str, np.ndarray], state_key: str, action_key: str, source: str, mode: Mode | None
):
    def feat(prefix: str) -> FeatureStats:
        return FeatureStats(**{s: flat[f"{prefix}.{s}"] for s in STAT_NAMES if f"{prefix}.{s}" in flat})

    state, actions = feat(state_key), feat(action_key)
    if state.mean is None and state.q01 is None:
        return None
    return NormStats(state=state, actions=actions, mode=mode or "mean_std", eps=1e-8, source=source)


def _read_flat(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}  # noqa: SIM118


def _weights_buffers(directory: Path) -> dict[str, Any]:
    """The lerobot <= 0.3 `normalize_*` buffers of the directory's weights file (or its shards), read
    alone: a header look-up, not the whole file."""
    path = directory / WEIGHTS_FILE
    index = path.with_name(path.name + ".index.json")
    if path.exists():
        files = [path]
    elif index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / f for k, f in weight_map.items() if k.startswith(_BUFFER_PREFIX)})
    else:
        return {}
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:  # torch tensors, as a caller's `weights`
            out |= {k: f.get_tensor(k) for k in f.keys() if k.startswith(_BUFFER_PREFIX)}  # noqa: SIM118
    return out


def load_norm_stats(
    directory: str | Path, weights: Mapping | None = None, mode: Mode | None = None
) -> NormStats | None:
    """Find statistics for a checkpoint directory in any supported place; None when there are none.

    The one route for the trainer, eval and export: `weights` (the checkpoint's raw tensors, when the
    caller has read them anyway) only saves reading the lerobot <= 0.3 buffers from the file again."""
    directory = Path(directory)
    if (directory / NORM_FILE).exists():
        return _from_openpi_json(directory / NORM_FILE, mode)
    # openpi asset ids may contain a slash (assets/physical-intelligence/libero/norm_stats.json).
    openpi = sorted((directory / "assets").glob("**/norm_stats.json"))
    if len(openpi) > 1:
        names = [str(p.parent.relative_to(directory)) for p in openpi]
        raise ValueError(f"{directory}: several openpi norm stats {names}; keep the one for your robot")
    if openpi:
        return _from_openpi_json(openpi[0], mode)
    for proc in sorted(directory.glob("policy_preprocessor*normalizer*.safetensors")):
        found = _from_flat(_read_flat(proc), "observation.state", "action", str(proc), mode)
        if found is not None:
            return found
    if weights is None:
        weights = _weights_buffers(directory)
    if any(k.startswith("normalize_inputs.") for k in weights):
        flat = {k: v.detach().double().numpy() for k, v in weights.items() if k.startswith(_BUFFER_PREFIX)}
        state = {f"s.{s}": flat[f"normalize_inputs.buffer_observation_state.{s}"] for s in ("mean", "std")}
        action = {f"a.{s}": flat[f"normalize_targets.buffer_action.{s}"] for s in ("mean", "std")}
        return _from_flat({**state, **action}, "s", "a", f"{directory} (lerobot<=0.3 buffers)", mode)
    return None

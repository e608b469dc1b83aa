"""PI0 architecture numbers, independent of any checkpoint layout.

The default is the real PI0: PaliGemma 3B (SigLIP so400m/14 at 224 px + Gemma 2B) and a Gemma 300M
action expert. Tests build tiny variants; checkpoints store their own `PI0Arch` as JSON so sizes always
come from the checkpoint, never from a variant table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import PI0Config


@dataclass(frozen=True)
class GemmaArch:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionArch:
    """SigLIP vision tower."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


GEMMA_2B = GemmaArch(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaArch(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)


MODEL_TYPES = ("pi0", "pi05")


@dataclass(frozen=True)
class PI0Arch:
    """Sizes of a PI0-family network. model_type "pi05" is PI0.5 (model/pi05.py): the same stacks, time
    through adaptive norms of the expert, no state token (its max_state_dim is then unused)."""

    vlm: GemmaArch = GEMMA_2B
    expert: GemmaArch = GEMMA_300M
    vision: VisionArch = field(default_factory=VisionArch)
    vocab_size: int = 257152
    chunk_size: int = 50  # actions predicted per chunk (H)
    max_state_dim: int = 32  # state is zero-padded to this
    max_action_dim: int = 32  # actions are zero-padded to this
    num_inference_steps: int = 10
    min_period: float = 4e-3  # sinusoidal time embedding
    max_period: float = 4.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    model_type: str = "pi0"  # absent from older pi0_arch.json files, which are all pi0

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"PI0Arch: model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        # VLM and expert q/k/v are concatenated along the sequence in every joint layer.
        for name in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self.vlm, name) != getattr(self.expert, name):
                raise ValueError(
                    f"PI0Arch: vlm.{name}={getattr(self.vlm, name)} != expert.{name}="
                    f"{getattr(self.expert, name)}; the joint attention needs them equal"
                )
        if self.expert.width % 2:
            raise ValueError(f"PI0Arch: expert.width={self.expert.width} must be even (time embedding)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PI0Arch:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PI0Arch: unknown keys {unknown}; valid keys are {sorted(known)}")
        for key, typ in (("vlm", GemmaArch), ("expert", GemmaArch), ("vision", VisionArch)):
            if key in d and isinstance(d[key], dict):
                d[key] = typ(**d[key])
        return cls(**d)

    @classmethod
    def tiny(cls, chunk_size: int = 8, image_size: int = 32, model_type: str = "pi0") -> PI0Arch:
        """A few-hundred-thousand-parameter PI0 (or PI0.5) for tests, the demo and CPU learning checks."""
        return cls(
            model_type=model_type,
            vlm=GemmaArch(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
            expert=GemmaArch(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
            vision=VisionArch(
                width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=image_size
            ),
            vocab_size=512,
            chunk_size=chunk_size,
        )

    def to_hf_config(self) -> PI0Config:
        """transformers' PI0Config with these sizes (the action expert's vocabulary is dropped later)."""
        gemma_common = {
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
        }
        vlm = {
            "text_config": {
                "model_type": "gemma",
                "hidden_size": self.vlm.width,
                "num_hidden_layers": self.vlm.depth,
                "intermediate_size": self.vlm.mlp_dim,
                "num_attention_heads": self.vlm.num_heads,
                "num_key_value_heads": self.vlm.num_kv_heads,
                "head_dim": self.vlm.head_dim,
                "vocab_size": self.vocab_size,
                **gemma_common,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": self.vision.width,
                "intermediate_size": self.vision.mlp_dim,
                "num_hidden_layers": self.vision.depth,
                "num_attention_heads": self.vision.num_heads,
                "patch_size": self.vision.patch_size,
                "image_size": self.vision.image_size,
                "hidden_act": "gelu_pytorch_tanh",
                "layer_norm_eps": 1e-6,
                "attention_dropout": 0.0,
                "vision_use_head": False,
            },
            "projection_dim": self.vlm.width,
            "image_token_id": self.vocab_size,
        }
        dit = {
            "hidden_size": self.expert.width,
            "num_hidden_layers": self.expert.depth,
            "intermediate_size": self.expert.mlp_dim,
            "num_attention_heads": self.expert.num_heads,
            "num_key_value_heads": self.expert.num_kv_heads,
            "head_dim": self.expert.head_dim,
            **gemma_common,
        }
        return PI0Config(
            vlm_config=vlm,
            dit_config=dit,
            chunk_size=self.chunk_size,
            max_state_dim=self.max_state_dim,
            max_action_dim=self.max_action_dim,
            num_inference_steps=self.num_inference_steps,
            min_period=self.min_period,
            max_period=self.max_period,
        )


def reduced_pi0_arch(
    *,
    vlm_width: int,
    expert_width: int,
    depth: int,
    head_dim: int,
    vision_width: int,
    patch_size: int,
    image_size: int,
    vocab_size: int,
    chunk_size: int,
    state_dim: int,
    action_dim: int,
    num_inference_steps: int,
) -> PI0Arch:
    """A CPU-sized PI0 for the learning checks: 4 query heads over 1 KV head, MLPs twice the width,
    a 2-layer, 2-head vision tower."""

    def gemma(width: int) -> GemmaArch:
        return GemmaArch(
            width=width, depth=depth, mlp_dim=2 * width, num_heads=4, num_kv_heads=1, head_dim=head_dim
        )

    vision = VisionArch(
        width=vision_width,
        depth=2,
        mlp_dim=2 * vision_width,
        num_heads=2,
        patch_size=patch_size,
        image_size=image_size,
    )
    return PI0Arch(
        vlm=gemma(vlm_width),
        expert=gemma(expert_width),
        vision=vision,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        max_state_dim=state_dim,
        max_action_dim=action_dim,
        num_inference_steps=num_inference_steps,
    )


def arch_from_reference_json(d: dict[str, Any]) -> PI0Arch:
    """PI0Arch from a reference fixture's arch.json (lerobot style: vlm / expert / vision sections)."""
    missing = [k for k in ("vlm", "expert", "vision", "chunk_size") if k not in d]
    if missing:
        raise ValueError(f"arch.json lacks {missing}; it needs vlm, expert, vision and chunk_size sections")

    def gemma(s: dict[str, Any]) -> GemmaArch:
        return GemmaArch(
            width=s["width"],
            depth=s["depth"],
            mlp_dim=s["mlp_dim"],
            num_heads=s["num_heads"],
            num_kv_heads=s["num_kv_heads"],
            head_dim=s["head_dim"],
        )

    v = d["vision"]
    return PI0Arch(
        vlm=gemma(d["vlm"]),
        expert=gemma(d["expert"]),
        vision=VisionArch(
            width=v["hidden_size"],
            depth=v["num_hidden_layers"],
            mlp_dim=v["intermediate_size"],
            num_heads=v["num_attention_heads"],
            patch_size=v["patch_size"],
            image_size=v["image_size"],
        ),
        vocab_size=d.get("vocab_size", d["vlm"].get("vocab_size", 257152)),
        chunk_size=d["chunk_size"],
        max_state_dim=d.get("max_state_dim", 32),
        max_action_dim=d.get("max_action_dim", 32),
        num_inference_steps=d.get("num_inference_steps", 10),
        min_period=d.get("min_period", 4e-3),
        max_period=d.get("max_period", 4.0),
        rms_norm_eps=d["vlm"].get("rms_norm_eps", 1e-6),
        rope_theta=d["vlm"].get("rope_theta", 10000.0),
        model_type=_reference_model_type(d),
    )


def _reference_model_type(d: dict[str, Any]) -> str:
    """lerobot fixtures name it `policy_type`; the expert's `use_adarms` marks pi0.5 too; else pi0."""
    named = d.get("policy_type", d.get("model_type"))
    if named is not None:
        if named not in MODEL_TYPES:
            raise ValueError(f"arch.json: policy type {named!r} is not one of {MODEL_TYPES}")
        return named
    return "pi05" if d["expert"].get("use_adarms") else "pi0"

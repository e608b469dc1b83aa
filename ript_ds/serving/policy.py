"""A checkpoint as a policy with openpi's inference contract: what the policy server serves.

    policy = load_policy("runs/x/export")            # or a converted openpi / lerobot checkpoint
    out = policy.infer({"observation/image": img, "observation/wrist_image": wrist,
                        "observation/state": state, "prompt": "put the bowl on the plate"})
    out["actions"]                                    # [H, 7] float64, env units, openpi's LIBERO frame

The observation dict is the one openpi's LIBERO client (examples/libero/main.py) sends: uint8 HxWx3
images already rotated 180 degrees (any size: resized with pad to the model's resolution, as openpi's
ResizeImages does), the 8-dim state, the prompt. Everything between that dict and the env actions is the
checkpoint's policy convention (model/convention.py) applied by the Processor, the same code the trainer's
rollouts and windows use. Requests are validated one by one (`prepare`) and may then run as one batch
(`run`): the server micro-batches concurrent clients that way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript_ds.model.convention import ConventionError, PolicyConvention, load_convention
from ript_ds.model.normalization import load_norm_stats
from ript_ds.model.pi0 import PI0Policy, precision
from ript_ds.model.processing import TOKENIZER_FILES, Processor, PromptTokenizer
from ript_ds.model.weights import CheckpointError, load_checkpoint, missing_convention_hint

log = logging.getLogger(__name__)

IMAGE_KEYS = ("observation/image", "observation/wrist_image")  # -> env cameras "image", "wrist_image"
STATE_KEY, PROMPT_KEY = "observation/state", "prompt"
DEFAULT_TOKEN_LIMIT = 48  # openpi pi0's max_token_len, for checkpoints whose convention does not say


class PolicyInputError(ValueError):
    """A request the policy cannot take: one line naming the key and what was expected."""


class PolicyLoadError(ValueError):
    """A checkpoint directory that cannot be served as it is (one line: what is missing, how to fix)."""


@dataclass
class Prepared:
    """One validated request, in model-resolution env cameras and raw state."""

    images: np.ndarray  # [N_cam, S, S, 3] uint8
    state: np.ndarray  # [state_dim] float64
    prompt: str
    noise: np.ndarray | None  # [H, A_max] float32 or None (drawn)


@dataclass
class Policy:
    """PI0 + its processor on one device; `infer` for one observation, `prepare` + `run` for a batch."""

    model: PI0Policy
    processor: Processor
    device: torch.device
    dtype: str = "float32"
    # CFG weight w, as training rollouts and launch/eval.py sample (their default 1.0: the positive
    # condition alone); None: the plain model. A checkpoint never trained with guidance is the same either
    # way (its two condition rows are equal), a cfg-trained one is only right with the weight it was evaluated at.
    guidance: float | None = 1.0
    num_steps: int | None = None  # denoising steps; None: the checkpoint's
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # sent to clients on connect

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    @property
    def horizon(self) -> int:
        return self.model.arch.chunk_size

    def infer(self, obs: dict, noise: np.ndarray | None = None) -> dict:
        """openpi's Policy.infer: one observation dict -> {"actions": [H, 7], "policy_timing": {...}}."""
        return self.run([self.prepare(obs, noise)])[0]

    # ------------------------------------------------------------------ validation
    def prepare(self, obs: Any, noise: np.ndarray | None = None) -> Prepared:
        """Check one request and bring its images to the model's resolution; PolicyInputError if bad."""
        if not isinstance(obs, dict):
            raise PolicyInputError(f"the observation must be a dict, got {type(obs).__name__}")
        expected = (*IMAGE_KEYS, STATE_KEY, PROMPT_KEY)
        missing = [k for k in expected if k not in obs]
        if missing:
            raise PolicyInputError(
                f"observation lacks {missing}; openpi's LIBERO client sends {list(expected)}"
            )
        size = self.model.arch.vision.image_size
        images = np.stack([_image(obs[k], k, size) for k in IMAGE_KEYS])
        prompt = obs[PROMPT_KEY]
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", errors="replace")
        if not isinstance(prompt, str):
            raise PolicyInputError(f"{PROMPT_KEY} must be a string, got {type(prompt).__name__}")
        state = self._state(obs[STATE_KEY])
        try:  # with the state: a discrete_state_input policy writes it into the prompt (lerobot pi05)
            self.processor.tokenize(prompt, state)
        except ValueError as err:  # over the checkpoint's token limit
            raise PolicyInputError(f"{PROMPT_KEY}: {err}") from None
        return Prepared(images, state, prompt, self._noise(noise))

    def _state(self, value: Any) -> np.ndarray:
        state = np.asarray(value)
        conv, stats = self.processor.convention, self.processor.norm_stats.state
        dim = conv.state_dim if conv else len(stats.mean if stats.mean is not None else stats.q01)
        if state.ndim != 1 or state.shape[0] < 1 or state.dtype.kind not in "fiu":
            raise PolicyInputError(
                f"{STATE_KEY} must be a 1-d numeric array, got {state.dtype} {state.shape}"
            )
        if state.shape[0] != dim or state.shape[0] > self.model.arch.max_state_dim:
            raise PolicyInputError(f"{STATE_KEY} has {state.shape[0]} dims, this policy takes {dim}")
        if not np.isfinite(state).all():
            raise PolicyInputError(f"{STATE_KEY} holds non-finite values")
        return state.astype(np.float64)

    def _noise(self, noise: np.ndarray | None) -> np.ndarray | None:
        if noise is None:
            return None
        arch = self.model.arch
        noise = np.asarray(noise)
        if noise.shape != (arch.chunk_size, arch.max_action_dim) or noise.dtype.kind != "f":
            raise PolicyInputError(
                f"noise must be float [{arch.chunk_size}, {arch.max_action_dim}], got {noise.dtype} {noise.shape}"
            )
        return noise.astype(np.float32)

    # ------------------------------------------------------------------ inference
    def run(self, requests: list[Prepared]) -> list[dict]:
        """One batched forward for validated requests; results in request order."""
        start = time.perf_counter()
        arch = self.model.arch
        images = np.stack([r.images for r in requests])
        states = np.stack([r.state for r in requests])
        batch = self.processor.batch(images, states, [r.prompt for r in requests], device=self.device)
        noise = np.stack(
            [
                r.noise
                if r.noise is not None
                else self._rng.standard_normal((arch.chunk_size, arch.max_action_dim))
                for r in requests
            ]
        ).astype(np.float32)
        with torch.no_grad(), precision(self.device, self.dtype):
            out = self.model.sample_actions(
                batch, torch.from_numpy(noise).to(self.device), self.num_steps, self.guidance
            )
        actions = self.processor.decode_actions(out, states).astype(np.float64)  # [B, H, 7]
        ms = (time.perf_counter() - start) * 1e3
        return [
            {"actions": a, "policy_timing": {"infer_ms": ms, "batch_size": len(requests)}} for a in actions
        ]


def _image(value: Any, key: str, size: int) -> np.ndarray:
    from ript_ds.env.libero import resize_with_pad  # openpi's PIL resize-with-pad

    image = np.asarray(value)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise PolicyInputError(f"{key} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return resize_with_pad(np.ascontiguousarray(image), size, size)


def load_policy(
    checkpoint_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    device: str | torch.device | None = None,
    *,
    dtype: str = "float32",
    guidance: float | None = 1.0,
    num_steps: int | None = None,
) -> Policy:
    """A canonical / converted openpi / lerobot / openpi-PyTorch checkpoint directory as a Policy.

    tokenizer_path: where the checkpoint holds no tokenizer.model / tokenizer.json. device: default the
    first GPU when there is one. guidance: the CFG weight w (default 1.0, what training rollouts and
    launch/eval.py use; None: the plain model). Raises PolicyLoadError (one line) on a checkpoint that cannot be served."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise PolicyLoadError(f"checkpoint directory {directory} does not exist")
    try:
        convention = load_convention(directory)
        if convention is not None:
            convention.check_supported()
    except ConventionError as err:
        raise PolicyLoadError(str(err)) from None
    try:
        loaded = load_checkpoint(directory)
    except CheckpointError as err:
        raise PolicyLoadError(f"{directory}: {err}") from None
    if convention is not None and convention.model_type != loaded.policy.arch.model_type:
        raise PolicyLoadError(
            f"{convention.source} describes a {convention.model_type} policy but {directory} holds "
            f"{loaded.policy.arch.model_type} weights"
        )
    stats = load_norm_stats(directory, mode=None if convention is None else convention.norm_mode)
    if stats is None:
        raise PolicyLoadError(
            f"{directory} has no normalization statistics (norm_stats.json); a policy needs them"
        )
    limit = (convention.max_token_len if convention else None) or DEFAULT_TOKEN_LIMIT
    tokenizer = PromptTokenizer(_tokenizer(directory, tokenizer_path), limit)
    if tokenizer.vocab_size > loaded.policy.arch.vocab_size:
        raise PolicyLoadError(f"tokenizer {tokenizer.path} has more pieces than the model has embeddings")
    arch = loaded.policy.arch
    if convention is None and (hint := missing_convention_hint(directory)):
        log.warning(hint)
    conv = convention or PolicyConvention(image_slots=(), max_token_len=None, source="defaults")
    processor = Processor(
        tokenizer, stats, conv.action_dim, arch.max_state_dim, arch.max_action_dim, convention=convention
    )
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    metadata = {
        "policy": conv.to_dict(),
        "action_horizon": arch.chunk_size,
        "guidance": guidance,
        "server": "ript-ds",
    }
    return Policy(loaded.policy.to(dev).eval(), processor, dev, dtype, guidance, num_steps, metadata=metadata)


def _tokenizer(directory: Path, explicit: str | Path | None) -> Path:
    if explicit is not None:
        if not Path(explicit).exists():
            raise PolicyLoadError(f"tokenizer {explicit} does not exist")
        return Path(explicit)
    found = [directory / f for f in TOKENIZER_FILES if (directory / f).exists()]
    if not found:
        raise PolicyLoadError(
            f"{directory} holds no {' or '.join(TOKENIZER_FILES)}: pass tokenizer_path (--tokenizer)"
        )
    return found[0]

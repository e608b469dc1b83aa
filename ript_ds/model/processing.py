"""Environment observations <-> PI0 tensors: tokenizer, image and state normalization, action decoding.

Nothing here is model code (STYLE: config, model and pre/post-processing live apart). The tokenizer is
PaliGemma's SentencePiece model (or a tokenizer.json) read from a local path; nothing is ever fetched.
Prompt convention (openpi PaligemmaTokenizer.tokenize): BOS + prompt with '_' and newlines turned to spaces
+ '\\n', right-padded; with the state in the prompt (pi0.5 `discrete_state_input`, what lerobot's pi05 always
does) BOS + "Task: <prompt>, State: <256-way bins>;\\nAction: " (state_prompt).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ript_ds.model.convention import ENV_CAMERAS, PolicyConvention
from ript_ds.model.normalization import NormStats
from ript_ds.model.pi0 import PI0Batch

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
STATE_BIN_EDGES = np.linspace(-1.0, 1.0, 256 + 1)[:-1]  # the 256 left edges of openpi's / lerobot's bins


def clean_prompt(prompt: str) -> str:
    """openpi and lerobot alike: strip, '_' and newlines to spaces, no lowercasing."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def state_bins(state: np.ndarray) -> np.ndarray:
    """Normalised state [..., S] -> int bins: np.digitize on the 256 left edges of [-1, 1], minus one, so
    values below -1 give -1 and values of 1 or more give 255 (no clipping, as openpi and lerobot)."""
    return np.digitize(state, bins=STATE_BIN_EDGES) - 1


def state_prompt(prompt: str, state: np.ndarray) -> str:
    """The pi0.5 discrete-state prompt of lerobot's Pi05PrepareStateTokenizerProcessorStep (= openpi's
    PaligemmaTokenizer.tokenize with a state). state [S]: normalised and unpadded (lerobot <= 0.4.4 padded
    it to 32 dims first, lerobot >= 0.5 and openpi do not)."""
    bins = " ".join(map(str, state_bins(state)))
    return f"Task: {clean_prompt(prompt)}, State: {bins};\nAction: "


class PromptTokenizer:
    """PaliGemma-style prompt tokenizer over a SentencePiece model or a tokenizers JSON file."""

    def __init__(self, path: str | Path, max_length: int = 48):
        path = Path(path)
        if path.is_dir():
            found = [path / f for f in TOKENIZER_FILES if (path / f).exists()]
            if not found:
                raise FileNotFoundError(
                    f"no {' or '.join(TOKENIZER_FILES)} in {path}; point tokenizer_path at one"
                )
            path = found[0]
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path, self.max_length = path, max_length
        if path.suffix == ".model":
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._encode = lambda text: sp.encode(text)
            self.bos_id, self.vocab_size = sp.bos_id(), sp.get_piece_size()
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            bos = tok.token_to_id("<bos>")
            if bos is None:
                raise ValueError(f"{path} has no <bos> token; PI0 prompts start with BOS")
            self.bos_id, self.vocab_size = bos, tok.get_vocab_size()

    def encode(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> tokens [L] int64, mask [L] bool (L = max_length), right-padded with 0. state [S] (normalised):
        the discrete-state prompt, BOS + the whole text with no separate "\\n" (openpi and lerobot's default
        special tokens add BOS, no EOS). Over-long prompts are refused, not cut as openpi / lerobot do."""
        if state is None:
            ids = [self.bos_id, *self._encode(clean_prompt(prompt)), *self._encode("\n")]
        else:
            ids = [self.bos_id, *self._encode(state_prompt(prompt, state))]
        if len(ids) > self.max_length:
            raise ValueError(
                f"prompt {prompt!r} is {len(ids)} tokens, over tokenizer max_length={self.max_length}; raise it"
            )
        tokens = np.zeros(self.max_length, dtype=np.int64)
        tokens[: len(ids)] = ids
        return tokens, np.arange(self.max_length) < len(ids)


def build_tiny_tokenizer(directory: str | Path, texts: Sequence[str], vocab_size: int = 256) -> Path:
    """Train a small SentencePiece model on `texts` (tests, demo). Deterministic; takes well under 1 s."""
    import io

    import sentencepiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([t.replace("_", " ") for t in texts] * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="word",  # whole words: short prompts from a tiny corpus
        character_coverage=1.0,
        hard_vocab_limit=False,
        bos_id=2,
        eos_id=1,
        pad_id=0,
        unk_id=3,
        user_defined_symbols=["\n"],
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path = directory / "tokenizer.model"
    # Every rank builds it into the same run directory: a private file renamed into place, so a peer
    # loading it never reads a half-written one (rename is atomic within a directory).
    # (mkstemp, not the pid: ranks on different nodes of a shared file system may share a pid)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer.model.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a tokenizer is readable like its checkpoint
    os.replace(tmp, path)
    return path


@dataclass
class Processor:
    """Observations -> PI0Batch and PI0 actions -> environment actions."""

    tokenizer: PromptTokenizer
    norm_stats: NormStats
    action_dim: int  # real action dims the environment takes (7 for LIBERO)
    max_state_dim: int = 32
    max_action_dim: int = 32
    camera_slots: int | None = None  # pad with masked, zero images up to this many cameras
    # the checkpoint's policy.json (model/convention.py): action frame, camera slots; None = absolute
    # actions and the env's cameras in their order (a checkpoint trained by ript-ds without one)
    convention: PolicyConvention | None = None

    def __post_init__(self) -> None:
        if self.convention is not None:
            self.convention.check_supported()
        self._prompt_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def state_in_prompt(self) -> bool:
        return self.convention is not None and self.convention.discrete_state_input

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One prompt's tokens, the one path of rollouts, training windows, eval and the server (batch
        calls it). state [S]: the raw observation state, needed when the convention writes it into the
        prompt (discrete_state_input); ignored otherwise."""
        if not self.state_in_prompt:
            if prompt not in self._prompt_cache:  # a rollout asks for the same few prompts every step
                self._prompt_cache[prompt] = self.tokenizer.encode(prompt)
            return self._prompt_cache[prompt]
        if state is None:
            raise ValueError(
                f"this policy writes the observation state into its prompt (discrete_state_input, "
                f"{self.convention.source}): tokenize(prompt, state)"
            )
        # float32 first, as lerobot's tensors: a rollout's float64 state and the float32 copy its training
        # window stores must give the same bins, or the update would score another prompt than the rollout's
        raw = np.asarray(state, dtype=np.float32)[None]
        return self.tokenizer.encode(prompt, self.norm_stats.normalize(raw, "state")[0])

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Before a run: every prompt fits the token limit whatever state is written into it (a
        discrete-state prompt's length depends on the state, and a rollout hours in must not be the first
        to find out). Tries each bin value in every dim (-1 .. 255); ValueError names the prompt."""
        if not self.state_in_prompt:
            for prompt in prompts:
                self.tokenize(prompt)
            return
        dims = self.convention.state_dim
        values = np.concatenate([[-1.5], (np.arange(256) + 0.5) / 128.0 - 1.0])  # one per bin, normalised
        for prompt in prompts:
            for value in values:
                self.tokenizer.encode(prompt, np.full(dims, value, dtype=np.float32))

    def batch(
        self,
        images: np.ndarray,
        states: np.ndarray,
        prompts: Sequence[str],
        actions: np.ndarray | None = None,
        *,
        device: torch.device | str,
    ) -> PI0Batch:
        """images [B, N, H, W, 3] uint8, states [B, D_s] raw, actions [B, H, D_a] raw -> normalized batch
        on `device` (the caller names it: the policy's, or the engine's in training)."""
        images, slot_masks = self._slots(images)
        b, n = images.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 1, 4, 2, 3)
        pixels = pixels.to(torch.float32) / 255.0 * 2.0 - 1.0  # [B, N, 3, H, W] in [-1, 1]
        masks = torch.from_numpy(np.broadcast_to(slot_masks, (b, n)).copy())
        if self.camera_slots is not None and self.camera_slots > n:
            extra = self.camera_slots - n
            pixels = torch.cat([pixels, torch.zeros(b, extra, *pixels.shape[2:])], dim=1)
            masks = torch.cat([masks, torch.zeros(b, extra, dtype=torch.bool)], dim=1)
        toks = [self.tokenize(p, s) for p, s in zip(prompts, states, strict=True)]
        state = _pad(self.norm_stats.normalize(states, "state"), self.max_state_dim)
        acts = None
        if actions is not None:  # executed env actions -> the model's frame (delta?), then normalised
            framed = actions if self.convention is None else self.convention.to_model_frame(actions, states)
            acts = torch.from_numpy(_pad(self.norm_stats.normalize(framed, "actions"), self.max_action_dim))
        return PI0Batch(
            images=pixels,
            image_masks=masks,
            tokens=torch.from_numpy(np.stack([t for t, _ in toks])),
            token_masks=torch.from_numpy(np.stack([m for _, m in toks])),
            state=torch.from_numpy(state),
            actions=acts,
        ).to(device)

    def decode_actions(self, actions: torch.Tensor, states: np.ndarray | None = None) -> np.ndarray:
        """[B, H, A] normalized, padded -> [B, H, action_dim] in environment units (float32). states [B, S]:
        the raw observation states, needed when the convention's actions are relative to them."""
        real = actions[..., : self.action_dim].detach().float().cpu().numpy()
        out = self.norm_stats.unnormalize(real, "actions")
        if self.convention is None or not self.convention.delta_action_mask:
            return out
        if states is None:
            raise ValueError("decode_actions: this policy's actions are relative to the state; pass states")
        # openpi's AbsoluteActions adds the state the model saw: normalised (float32) and back.
        seen = self.norm_stats.unnormalize(self.norm_stats.normalize(states, "state"), "state")
        return self.convention.to_env_frame(out, seen).astype(np.float32)

    def _slots(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Env cameras [B, N_env, ...] -> the convention's slots (zeros, mask False where a slot has no
        camera) and their masks [N_slots]; without a convention the env's cameras as they come."""
        if self.convention is None or not self.convention.image_slots:
            return images, np.ones(images.shape[1], dtype=bool)
        out, masks = [], []
        for _, source in self.convention.image_slots:
            if source is None:
                out.append(np.zeros_like(images[:, 0]))
            else:
                index = ENV_CAMERAS.index(source)
                if index >= images.shape[1]:
                    raise ValueError(
                        f"camera slot {source!r} needs {index + 1} cameras, got {images.shape[1]}"
                    )
                out.append(images[:, index])
            masks.append(source is not None)
        return np.stack(out, axis=1), np.array(masks)


def _pad(x: np.ndarray, dim: int) -> np.ndarray:
    if x.shape[-1] > dim:
        raise ValueError(f"vector of {x.shape[-1]} dims does not fit the model's {dim}")
    out = np.zeros((*x.shape[:-1], dim), dtype=np.float32)
    out[..., : x.shape[-1]] = x
    return out

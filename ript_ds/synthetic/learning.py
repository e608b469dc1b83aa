"""The synthetic learning check shared by the test, the benchmark and `make demo`.

1. Warm start: a tiny PI0 behaviour-cloned on imperfect scripted demos (synthetic/bc.py), saved as a
   canonical checkpoint with its tokenizer and normalization statistics.
2. RIPT from that checkpoint through the real trainer (DeepSpeed engine), evaluated on held-out init
   states every few iterations (eval/success_rate; iteration 0 is the warm start itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ript_ds.model.weights import save_canonical
from ript_ds.synthetic.bc import SyntheticSetup, warm_start

log = logging.getLogger(__name__)


@dataclass
class WarmStart:
    checkpoint: Path  # canonical PI0 checkpoint (weights, arch, norm stats, and the tokenizer.model BC used)
    setup: SyntheticSetup


def prepare_warm_start(
    directory: str | Path, seed: int = 0, setup: SyntheticSetup | None = None
) -> WarmStart:
    """Behaviour-clone and save; reuses a previous result in `directory` for the same seed."""
    setup = setup or SyntheticSetup()
    ckpt = Path(directory) / f"bc_seed{seed}"
    if not (ckpt / "model.safetensors").exists() or not (ckpt / "tokenizer.model").exists():
        # The tokenizer is written into the checkpoint directory, where the trainer and eval look for it.
        policy, processor, _, losses = warm_start(seed, setup, tokenizer_dir=ckpt)
        log.info("warm start: BC loss %.4f -> %.4f", losses[0], losses[-1])
        save_canonical(policy, ckpt, processor.norm_stats)
    return WarmStart(ckpt, setup)


def ript_overrides(warm: WarmStart, iterations: int, loss: str = "cfg", eval_every: int = 2) -> list[str]:
    """Config overrides (on top of launch/configs/demo.yaml's defaults) for RIPT from the warm start."""
    s = warm.setup
    return [
        f"model.checkpoint={warm.checkpoint}",  # its tokenizer.model is found there
        f"model.tokenizer_max_length={s.max_prompt_tokens}",
        "env.kind=synthetic",
        "env.suite=synthetic",
        f"env.task_ids={','.join(str(i) for i in range(s.n_tasks))}",
        f"env.synthetic_init_states={s.num_init_states}",
        f"env.num_eval_init_states={s.heldout_init_states}",
        f"env.max_steps={s.max_steps}",
        f"env.difficulty={s.difficulty}",
        f"rollout.replan_every={s.replan_every}",
        "rollout.in_process=true",  # numpy envs: worker processes would only add IPC (env/inline.py)
        f"ript.loss={loss}",
        f"train.iterations={iterations}",
        f"train.eval_every={eval_every}",
    ]


def set_threads(n: int = 1) -> None:
    """Tiny models on a shared 2-core machine run fastest on one thread (measured in synthetic/bc.py)."""
    torch.set_num_threads(n)

"""`make demo`: the model demo on the built-in default (tiny PI0 on CPU), until training lands here.

Builds a tiny PI0 with a tokenizer made in code, turns an observation into a batch, samples a chunk
with and without guidance, saves and reloads the canonical checkpoint, and checks parity with the
lerobot reference fixture when ../shared/fixtures is present.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ript_ds.model.arch import PI0Arch
from ript_ds.model.normalization import NormStats
from ript_ds.model.pi0 import PI0Policy, count_parameters
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.model.weights import load_checkpoint, save_canonical

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix="ript_demo_"))
    arch = PI0Arch.tiny(chunk_size=50, image_size=224)
    policy = PI0Policy(arch).eval()
    log.info("tiny PI0: %d parameters (the real one has 3.24 B)", count_parameters(policy))
    tok = PromptTokenizer(build_tiny_tokenizer(out / "tokenizer", [PROMPT]), max_length=48)
    proc = Processor(tok, NormStats.identity(8, 7), action_dim=7, camera_slots=3)
    images = np.random.default_rng(0).integers(0, 255, (1, 2, 224, 224, 3), dtype=np.uint8)
    batch = proc.batch(images, np.zeros((1, 8), np.float32), [PROMPT])
    noise = torch.randn(1, arch.chunk_size, arch.max_action_dim)
    actions = proc.decode_actions(policy.sample_actions(batch, noise))
    log.info("sampled a %s chunk of env actions; first: %s", actions.shape[1:], np.round(actions[0, 0], 3))
    guided = policy.sample_actions(batch, noise, guidance=1.5)
    log.info(
        "guidance w=1.5 with the zero condition embedding changes nothing: %s",
        torch.equal(guided, policy.sample_actions(batch, noise)),
    )
    ckpt = save_canonical(policy, out / "checkpoint", proc.norm_stats)
    reloaded = load_checkpoint(ckpt).policy.eval()
    log.info(
        "checkpoint round trip exact: %s",
        torch.equal(reloaded.sample_actions(batch, noise), policy.sample_actions(batch, noise)),
    )
    fixture = ROOT.parent / "shared" / "fixtures" / "pi0_lerobot_tiny_a"
    if fixture.exists():
        res = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "parity_check.py"), "--fixture", str(fixture)],
            capture_output=True,
            text=True,
        )
        log.info("parity with lerobot's PI0 (%s): %s", fixture.name, res.stdout.strip() or res.stderr.strip())
        if res.returncode != 0:
            return res.returncode
    log.info("outputs: tokenizer and checkpoint in %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

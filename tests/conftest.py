"""Shared test helpers: tiny PI0 models, the reference fixtures, a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ript_ds.model.arch import PI0Arch
from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.pi0 import PI0Batch, PI0Policy
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# CI and developers have the golden data at ../shared/fixtures beside the checkout.
FIXTURES = Path(os.environ.get("RIPT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
LEROBOT_FIXTURE = FIXTURES / "pi0_lerobot_tiny_a"
OPENPI_FIXTURE = FIXTURES / "pi0_openpi_jax_tiny"


def randomize(policy: PI0Policy, seed: int = 0) -> PI0Policy:
    """Non-degenerate values everywhere (norm weights and biases included), like the fixtures do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(policy.named_parameters()):
            if name == "cond_embed.weight":
                continue
            scale = 0.2 if p.ndim == 1 else 1.0 / max(p.shape[-1], 1) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return policy


def tiny_policy(seed: int = 0, **arch_kwargs) -> PI0Policy:
    torch.manual_seed(seed)
    return randomize(PI0Policy(PI0Arch.tiny(**arch_kwargs)), seed)


def random_batch(arch: PI0Arch, b: int = 3, cams: int = 2, text: int = 7, seed: int = 1) -> PI0Batch:
    g = torch.Generator().manual_seed(seed)
    size = arch.vision.image_size
    lengths = torch.tensor([text - i % 3 for i in range(b)])
    return PI0Batch(
        images=torch.rand(b, cams, 3, size, size, generator=g) * 2 - 1,
        image_masks=torch.ones(b, cams, dtype=torch.bool),
        tokens=torch.randint(1, arch.vocab_size, (b, text), generator=g),
        token_masks=torch.arange(text)[None] < lengths[:, None],
        state=torch.randn(b, arch.max_state_dim, generator=g),
        actions=torch.randn(b, arch.chunk_size, arch.max_action_dim, generator=g),
    )


def load_script(relative: str):
    """Import a CLI script of the repo (tools/*.py, launch/*.py) as a module, to call its main()."""
    import importlib.util

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"reference fixture {path} is missing; set RIPT_FIXTURES to the shared fixtures folder")
    return path


def run_single_rank_worker(script: str | Path, out: Path, timeout: float = 600) -> None:
    """Run a test file as a script (its worker: one real DeepSpeed rank on the CPU) writing into `out`,
    outside any launcher's rank variables; fails the test with the worker's last output."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


def synthetic_processor(directory: Path, tasks) -> Processor:
    """A Processor for the synthetic env's tasks: a tiny tokenizer of their prompts built in `directory`,
    the env's state statistics (positions in [0, 1]) and raw actions."""
    tok = PromptTokenizer(build_tiny_tokenizer(directory, [t.instruction for t in tasks]))
    stats = NormStats(
        state=FeatureStats(mean=np.full(8, 0.5), std=np.full(8, 0.3)),
        actions=FeatureStats(mean=np.zeros(7), std=np.ones(7)),
    )
    return Processor(tokenizer=tok, norm_stats=stats, action_dim=7)

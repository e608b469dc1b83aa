"""Shared test helpers: tiny PI0 models, the reference fixtures, a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ript_ds.model.arch import PI0Arch
from ript_ds.model.pi0 import PI0Batch, PI0Policy

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

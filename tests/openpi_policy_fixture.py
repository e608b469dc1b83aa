"""Shared access to ../shared/fixtures/openpi_policy_tiny_a (openpi's LIBERO policy chain on tiny models) for
tests/test_policy_openpi.py, test_policy_openpi_pi05.py and test_serving.py: its arrays, prompts, the
observation dicts openpi's client sends, and the conversion a user runs on its orbax checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import FIXTURES, ROOT, require
from safetensors.numpy import load_file

FIXTURE = FIXTURES / "openpi_policy_tiny_a"
TOKENIZER = FIXTURE / "tokenizer.model"
SCENES = ("scene_0_mug", "scene_1_drawer", "scene_2_block", "scene_3_basket")
CAMS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
OBS_KEYS = ("observation/image", "observation/wrist_image", "observation/state")


def load_io() -> dict[str, np.ndarray]:
    return load_file(str(require(FIXTURE) / "policy_io.safetensors"))


def load_prompts() -> dict[str, str]:
    return json.loads((require(FIXTURE) / "meta.json").read_text())["inputs"]["prompts"]


def observation(io: dict[str, np.ndarray], prompts: dict[str, str], scene: str) -> dict:
    """The dict openpi's LIBERO client sends for one scene."""
    return {k: io[f"obs/{scene}/{k}"] for k in OBS_KEYS} | {"prompt": prompts[scene]}


def convert(checkpoint: str, out: Path, openpi_config: str, *extra: str) -> dict:
    """tools/convert_openpi_jax.py on one of the fixture's orbax checkpoints, as a user runs it; its summary."""
    cmd = [
        sys.executable,
        "tools/convert_openpi_jax.py",
        str(require(FIXTURE) / checkpoint),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [*cmd, "--openpi-config", openpi_config, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)

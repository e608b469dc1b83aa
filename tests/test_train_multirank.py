"""The user's entry point with 2 real ranks on CPU: torchrun and deepspeed launchers, ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


def launch(cmd: list[str], out) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"),
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
    }
    args = [
        "launch/train.py",
        "--deepspeed",
        "ds_configs/zero3.json",
        "--config",
        "launch/configs/debug.yaml",
        f"output_dir={out}",
        "train.iterations=2",
        "train.eval_every=2",
        "log.level=DEBUG",
    ]
    return subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_rank_training_writes_metrics(tmp_path, launcher):
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    else:
        cmd = [
            str(ROOT / ".venv" / "bin" / "deepspeed") if (ROOT / ".venv").exists() else "deepspeed",
            "--num_gpus",
            "2",
        ]
    result = launch(cmd, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[1]["rollout/episodes"] > 0 and "sampler/groups_sampled" in rows[1]
    # Each rank rolled out its share: the episode count is a multiple of 2 ranks x K=4 rollouts.
    assert rows[1]["rollout/episodes"] % 8 == 0
    assert (tmp_path / "debug" / "checkpoints" / "latest").exists()
    assert "sampler state diverged" not in result.stderr


def test_two_rank_zero3_checkpoint_resumes_on_one_rank(tmp_path):
    result = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONWARNINGS": "ignore",
    }
    args = [
        sys.executable,
        "launch/train.py",
        "--deepspeed",
        "ds_configs/zero3.json",
        "--config",
        "launch/configs/debug.yaml",
        f"output_dir={tmp_path}",
        "train.iterations=3",
        "train.eval_every=2",
    ]
    one = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "written by 2 ranks, this job has 1" in one.stderr and "resumed from" in one.stderr
    rows = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert (tmp_path / "debug" / "checkpoints" / "iter_000003" / "COMPLETE").exists()

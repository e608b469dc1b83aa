"""The user's entry point with 2 real ranks on CPU: torchrun and deepspeed launchers, ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


def launch(cmd: list[str], out, *extra: str) -> subprocess.CompletedProcess:
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
        *extra,
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
    # 3 tasks x 3 held-out init states: 9 eval contexts, 5 on rank 0 and 4 on rank 1
    result = launch(cmd, tmp_path, "env.num_eval_init_states=3")
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "debug"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The periodic eval: every held-out context once, gathered from both ranks, in its own folder (not
    # launch/eval.py's <run>/eval/<tag>)
    assert rows[0]["eval/episodes"] == rows[2]["eval/episodes"] == 9
    heldout = json.loads((run / "eval" / "heldout" / "iter_000002" / "results.json").read_text())
    assert len(heldout["episode_records"]) == 9 and not (run / "eval" / "iter_000002").exists()
    assert {(r["task_id"], r["init_state_idx"]) for r in heldout["episode_records"]} == {
        (t, i) for t in range(3) for i in range(47, 50)
    }
    # launch/eval.py's episodes of those states: reset seed 7 + init state (not 7 + position)
    assert all(r["seed"] == 7 + r["init_state_idx"] for r in heldout["episode_records"])
    _export_serves(run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[1]["rollout/episodes"] > 0 and "sampler/groups_sampled" in rows[1]
    # Each rank rolled out its share: the episode count is a multiple of 2 ranks x K=4 rollouts.
    assert rows[1]["rollout/episodes"] % 8 == 0
    assert (tmp_path / "debug" / "checkpoints" / "latest").exists()
    assert "sampler state diverged" not in result.stderr


def _export_serves(run) -> None:
    """The run's own policy files (policy.json, norm_stats.json, tokenizer) travel into an export, which
    then serves with no other input (the run started from no checkpoint: there is no base to read)."""
    from ript_ds.ckpt.export import export_checkpoint
    from ript_ds.env.synthetic import synthetic_tasks
    from ript_ds.serving import load_policy

    assert {"policy.json", "norm_stats.json", "tokenizer.model"} <= {p.name for p in run.iterdir()}
    out = run / "export"
    export_checkpoint(run / "checkpoints", out)
    policy = load_policy(out, device="cpu")
    assert policy.metadata["policy"]["replan_steps"] == 16 and policy.metadata["action_horizon"] == 16
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    obs = {"observation/image": image, "observation/wrist_image": image, "observation/state": np.zeros(8)}
    prompt = synthetic_tasks(3)[0].instruction  # a word the run's tiny tokenizer knows
    assert policy.infer(obs | {"prompt": prompt})["actions"].shape == (16, 7)


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

"""The short version of `make bench-libero`: RIPT on real LIBERO through the user's entry point.

From the committed BC warm start (tests/fixtures/libero_goal8_bc, README there) one RIPT iteration runs
through `torchrun launch/train.py` (DeepSpeed ZeRO-2, 2 LIBERO env worker processes): rollouts of the
real task, the smart sampler keeping a mixed group, an update. The test checks that the update ran on
the kept episodes' replanning windows and changed the policy, and that the trained checkpoint exports
with the warm start's normalization statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import load_file

pytestmark = [pytest.mark.libero, pytest.mark.slow]

WARM_START = ROOT / "tests" / "fixtures" / "libero_goal8_bc"


def test_one_ript_iteration_on_real_libero_updates_the_bc_policy(tmp_path):
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    train = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "launch/train.py",
        "--deepspeed", "ds_configs/zero2.json", "--config", "launch/configs/libero_goal_bc_cpu.yaml",
        f"model.checkpoint={WARM_START}", f"output_dir={tmp_path}", "run_name=ript",
        "train.iterations=1", "train.eval_every=0", "ript.groups_per_iteration=1", "ckpt.every=1",
    ]  # fmt: skip
    result = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "ript" / "metrics.jsonl").read_text().splitlines()]
    it = next(r for r in rows if r.get("iteration") == 1)
    # A kept group has successes and failures: the BC policy succeeds sometimes, not always.
    assert it["sampler/groups_kept"] >= 1, it
    assert 0.0 < it["rollout/success_rate"] < 1.0, it
    assert np.isfinite(it["train/loss"]) and it["train/grad_norm"] > 0, it
    # Windows of the kept group's episodes, one per replanning step (every 5 executed actions).
    kept_episodes = it["sampler/groups_kept"] * 4
    assert kept_episodes <= it["train/windows"] <= it["rollout/env_steps"] / 5 + it["rollout/episodes"], it

    export = tmp_path / "export"
    cmd = [sys.executable, "tools/export.py", str(tmp_path / "ript" / "checkpoints"), "--out", str(export)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before = load_file(WARM_START / "model.safetensors")
    after = load_file(export / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"
    # The export serves with the run's own processing: the warm start's statistics, not defaults.
    assert json.loads((export / "norm_stats.json").read_text()) == json.loads(
        (WARM_START / "norm_stats.json").read_text()
    )

"""Exact kill -9 resume with 2 real ranks (torchrun), ZeRO-2 and ZeRO-3: the resumed run reproduces the
uninterrupted one metric for metric, as tests/test_resume.py checks on one rank. Per-rank state (RNG
files, the update's seed) must come back per rank: a run that resumed every rank from rank 0's state
would train on other draws and drift from the reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_resume import metrics

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def command(out: Path, stage: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "launch" / "train.py"),
        "--deepspeed",
        f"ds_configs/{stage}.json",
        "--config",
        "launch/configs/debug.yaml",
        f"output_dir={out}",
        "train.iterations=3",
        "train.eval_every=0",
        "ckpt.every=1",
        "rollout.in_process=true",
        *extra,
    ]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"),
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
    }


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_rank_kill_9_and_resume_is_exact(tmp_path, stage):
    straight = subprocess.run(
        command(tmp_path / "a", stage), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-4000:]
    reference = metrics(tmp_path / "a" / "debug")
    assert [r["iteration"] for r in reference] == [1, 2, 3]
    assert any(r.get("train/skipped") == 0.0 for r in reference[1:]), "no update after the kill point"

    run = tmp_path / "b" / "debug"
    # A session of its own, so kill -9 reaches torchrun's agent and both rank processes at once.
    proc = subprocess.Popen(
        command(tmp_path / "b", stage),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not (run / "checkpoints" / "iter_000001" / "COMPLETE").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint of iteration 1"
            time.sleep(0.05)
        time.sleep(0.5)  # into iteration 2
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (run / "checkpoints" / "iter_000003").exists()
    resumed = subprocess.run(
        command(tmp_path / "b", stage, "ckpt.resume=auto"),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    assert metrics(run) == reference

"""Fault tolerance end to end: kill -9 + --resume auto reproduces an uninterrupted run metric for metric;
SIGUSR1 saves and exits with the requeue code; partial checkpoints are skipped; config changes refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from ript_ds.ckpt.manager import COMPLETE, LATEST, CheckpointManager, check_config
from ript_ds.ckpt.signals import PREEMPTED_EXIT_CODE
from ript_ds.config import ConfigError, load_config

pytestmark = pytest.mark.slow
TRAIN = str(ROOT / "launch" / "train.py")
DEBUG = str(ROOT / "launch" / "configs" / "debug.yaml")
# Timing and memory differ between runs by nature; everything else must be identical.
VOLATILE = ("time/", "rollout/env_steps_per_s", "mem/")


def args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        TRAIN,
        "--config",
        DEBUG,
        f"output_dir={out}",
        "train.iterations=4",
        "train.eval_every=2",
        "ckpt.every=1",
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"), "PYTHONWARNINGS": "ignore"}


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training ended early: {proc.stdout.read() if proc.stdout else ''}"
        assert time.monotonic() < deadline, "timed out waiting for training progress"
        time.sleep(0.05)


def test_kill_9_and_resume_is_exact(tmp_path):
    straight = subprocess.run(args(tmp_path / "a"), env=env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = metrics(tmp_path / "a" / "debug")
    assert [r["iteration"] for r in reference] == [0, 1, 2, 3, 4]  # 0: the starting policy's evaluation

    run = tmp_path / "b" / "debug"
    proc = subprocess.Popen(
        args(tmp_path / "b"), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # Iteration 2 saved (its COMPLETE marker is the last thing written), then into iteration 3.
        wait_for(lambda: (run / "checkpoints" / "iter_000002" / COMPLETE).exists(), proc)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run / "checkpoints" / "iter_000004").exists()
    resumed = subprocess.run(
        args(tmp_path / "b", "ckpt.resume=auto"), env=env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert metrics(run) == reference


@pytest.mark.parametrize("every", [0, 1])
def test_sigusr1_saves_and_exits_with_requeue_code(tmp_path, every):
    """ckpt.every=1: the signal lands after (or during the sampling right after) a periodic save of the
    state it would save; that checkpoint must stay complete (once, a second save of the same tag listed
    the first's marker among its files, so it read as corrupt and the requeued job went back one save)."""
    run = tmp_path / "debug"
    proc = subprocess.Popen(
        args(tmp_path, "train.iterations=50", f"ckpt.every={every}"),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Rows: iteration 0 (the starting policy's evaluation), then iteration 1.
        wait_for(
            lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2,
            proc,
        )
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "preempted: " in err and f"exiting with code {PREEMPTED_EXIT_CODE}" in err
    latest = (run / "checkpoints" / LATEST).read_text().strip()
    manager = CheckpointManager(run, keep_last=2, rank=0, world_size=1, barrier=lambda _: None)
    assert manager.is_complete(run / "checkpoints" / latest), (
        run / "checkpoints" / latest / COMPLETE
    ).read_text()
    saved_iteration = json.loads((run / "checkpoints" / latest / COMPLETE).read_text())["iteration"]
    assert saved_iteration >= 1
    # The requeued job continues from there, not from an earlier save.
    cont = subprocess.run(
        args(tmp_path, f"train.iterations={saved_iteration + 1}", f"ckpt.every={every}"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cont.returncode == 0, cont.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / latest} at iteration {saved_iteration}" in cont.stderr
    assert [r["iteration"] for r in metrics(run)][-1] == saved_iteration + 1


def test_partial_and_corrupt_checkpoints_are_skipped(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1, barrier=lambda _: None)
    for it, sizes in ((1, b"x" * 10), (2, b"y" * 10)):
        d = manager.root / f"iter_{it:06d}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(sizes)
        (d / COMPLETE).write_text(json.dumps({"iteration": it, "metrics": {}, "files": {"model.pt": 10}}))
    (manager.root / LATEST).write_text("iter_000002")
    assert manager.resolve("auto") == manager.root / "iter_000002"
    (manager.root / "iter_000002" / "model.pt").write_bytes(b"truncated")  # corrupt: size differs
    (manager.root / "iter_000003").mkdir()  # partial: killed before COMPLETE
    assert manager.resolve("auto") == manager.root / "iter_000001"
    assert "partial or corrupt" in caplog.text
    assert manager.resolve("none") is None
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        manager.resolve(str(manager.root / "iter_000003"))


def test_changed_config_is_refused_unless_allowed():
    a = load_config(DEBUG).to_dict()
    b = load_config(DEBUG, ["train.lr=0.5", "ript.loss=awr", "train.iterations=99"]).to_dict()
    with pytest.raises(ConfigError) as err:
        check_config(a, b, allow=False)
    assert "train.lr: 0.001 -> 0.5" in str(err.value) and "ript.loss: 'cfg' -> 'awr'" in str(err.value)
    assert "iterations" not in str(err.value)  # extending a run is not a change
    check_config(a, b, allow=True)


def test_a_checkpoint_from_before_a_key_existed_resumes():
    """Keys added by a later version (here engine.lora.frozen_dtype, rollout.pipeline_groups) are absent from
    an older checkpoint's config: at their default they are no change, set otherwise they are."""
    old = load_config(DEBUG).to_dict()
    del old["engine"]["lora"]["frozen_dtype"], old["rollout"]["pipeline_groups"]
    check_config(old, load_config(DEBUG).to_dict(), allow=False)
    changed = load_config(DEBUG, ["engine.lora.frozen_dtype=float32"]).to_dict()
    with pytest.raises(ConfigError, match=re.escape("engine.lora.frozen_dtype: 'auto' -> 'float32'")):
        check_config(old, changed, allow=False)


def test_unset_replan_every_resumes_with_the_runs_own(tmp_path):
    """rollout.replan_every unset means "the checkpoint's replan_steps" for a new run, but the resumed run's
    own value on resume (a run saved with an explicit or the old default 5 is not refused)."""
    first = subprocess.run(
        args(tmp_path, "train.iterations=1", "rollout.replan_every=8"),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    again = args(tmp_path, "train.iterations=2", "rollout.replan_every=null")
    second = subprocess.run(again, env=env(), capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "keeping the resumed run's 8" in second.stderr
    saved = (tmp_path / "debug" / "config.yaml").read_text()
    assert (
        "replan_every: 8" in saved
        and json.loads((tmp_path / "debug" / "policy.json").read_text())["replan_steps"] == 8
    )

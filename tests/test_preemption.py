"""Preemption as SLURM delivers it, on 2 real CPU ranks: the sbatch script under deepspeed, and torchrun
with USR1 sent to every process of its tree (as slurmstepd signals a whole job step).

Each run must write a complete checkpoint, end every rank, leave the launcher alive to report the ranks'
exit code, and do so within seconds of the signal although a sampling round is still running.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import ROOT
from test_resume import wait_for

from ript_ds.ckpt.manager import COMPLETE, LATEST
from ript_ds.ckpt.signals import PREEMPTED_EXIT_CODE

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
# Episodes of up to 400 steps make a sampling round last 4-25 s on 2 cores; the signal comes as
# iteration 2 starts sampling, so the old safe point (the round's end) waited that long.
OVERRIDES = ["train.iterations=50", "ckpt.every=0", "train.eval_every=0", "env.max_steps=400"]
SAFE_POINT_S = 2.0  # signal -> checkpoint saved, within a round of env steps: measured 0.05-0.17 s
SIGNAL_TO_EXIT_S = 90  # generous; measured 11-16 s (deepspeed), 6 s (torchrun) on 2 loaded cores


def environment(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"  # a fake scontrol first on PATH, then the venv's deepspeed
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "2",
        "DS_CONFIG": "ds_configs/zero2.json",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"),
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
        "WANDB_MODE": "offline",
    }


def in_second_iteration(run: Path):
    """True once iteration 1 is logged: iteration 2's sampling is under way."""
    metrics = run / "metrics.jsonl"
    return lambda: metrics.exists() and metrics.read_text().count("\n") >= 1


LAUNCHERS = ("single_node.sbatch", "bin/deepspeed", "deepspeed.launcher", "torch.distributed.run")


def process_tree(pid: int) -> dict[psutil.Process, str]:
    """The process and all its descendants (torchrun's ranks run in sessions of their own), with
    their command lines, read now: they cannot be read once the processes are gone."""
    tree = {}
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree[p] = " ".join(p.cmdline())
    return tree


def ranks(tree: dict[psutil.Process, str]) -> list[psutil.Process]:
    """The trainer processes: launch/train.py run by a launcher, not the launchers themselves."""
    return [p for p, c in tree.items() if "launch/train.py" in c and not any(x in c for x in LAUNCHERS)]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def logged_at(log: str, text: str) -> datetime.datetime:
    """When rank 0 logged the first line holding `text` (the launch/train.py log format)."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def check_checkpoint(run: Path, log: str) -> None:
    assert "preempted: saved iteration" in log, log[-3000:]
    # Saved at the next round of env steps, not at the end of the sampling round (tens of seconds).
    waited = logged_at(log, "preempted: saved iteration") - logged_at(log, "received SIGUSR1")
    assert waited.total_seconds() < SAFE_POINT_S, waited
    tag = (run / "checkpoints" / LATEST).read_text().strip()
    marker = json.loads((run / "checkpoints" / tag / COMPLETE).read_text())
    assert marker["iteration"] >= 1 and marker["world_size"] == 2
    assert all((run / "checkpoints" / tag / f).stat().st_size == size for f, size in marker["files"].items())


@dataclass
class Outcome:
    code: int  # the launcher's exit code
    seconds: float  # from the signal to the launcher's exit
    log: str  # the launcher's stdout and stderr (every rank's log lines too)
    ranks: list[str]  # command lines of the trainer processes that were running
    survivors: list[str]  # command lines of the processes still alive after the launcher's exit


def run_and_preempt(
    cmd: list[str], env: dict, run: Path, log_path: Path, signal_tree: bool, **popen
) -> Outcome:
    """Start `cmd`, wait for iteration 2, send USR1 (to `cmd` or to its whole tree), wait for the end."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    tree: dict[psutil.Process, str] = {}
    try:
        wait_for(in_second_iteration(run), proc, timeout=900)
        tree = process_tree(proc.pid)
        start = time.monotonic()
        for p in list(tree) if signal_tree else list(tree)[:1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=300)
        seconds = time.monotonic() - start
        time.sleep(2.0)  # orphans are reparented and reaped by now; anything alive was left behind
        survivors = alive(list(tree))
    finally:
        for p in alive([*tree, *(process_tree(proc.pid) if proc.poll() is None else {})]):
            p.kill()  # whatever happened, nothing outlives the test
    print(f"{' '.join(cmd[:4])}: signal to exit {seconds:.1f} s")
    return Outcome(
        code, seconds, log_path.read_text(), [tree[p] for p in ranks(tree)], [tree[p] for p in survivors]
    )


def test_single_node_sbatch_saves_requeues_and_ends_every_rank(tmp_path):
    out = tmp_path / "runs"
    cmd = [
        "bash",
        "launch/slurm/single_node.sbatch",
        "launch/configs/debug.yaml",
        f"output_dir={out}",
        *OVERRIDES,
    ]
    result = run_and_preempt(
        cmd, environment(tmp_path), out / "debug", tmp_path / "log.txt", signal_tree=False
    )
    assert len(result.ranks) == 2, result.ranks
    assert result.code == PREEMPTED_EXIT_CODE, result.log[-3000:]
    check_checkpoint(out / "debug", result.log)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert result.survivors == []
    assert result.seconds < SIGNAL_TO_EXIT_S


def test_torchrun_survives_a_signal_to_its_whole_tree(tmp_path):
    """srun's --signal reaches every process of the step: the launcher (started with USR1 ignored, as
    the sbatch scripts do) and the env workers must survive it, the ranks must save and exit."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launch/train.py"]
    cmd += [
        "--deepspeed",
        "ds_configs/zero2.json",
        "--config",
        "launch/configs/debug.yaml",
        f"output_dir={out}",
    ]
    result = run_and_preempt(
        [*cmd, *OVERRIDES],
        environment(tmp_path),
        out / "debug",
        tmp_path / "log.txt",
        signal_tree=True,
        preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
    )
    assert len(result.ranks) == 2, result.ranks
    # torchrun reports a worker's non-zero exit as its own failure (1), naming the rank's code.
    assert result.code == 1 and f"exitcode  : {PREEMPTED_EXIT_CODE}" in result.log, result.log[-3000:]
    check_checkpoint(out / "debug", result.log)
    assert "worker crashed" not in result.log  # the env workers ignored the signal
    assert result.survivors == []
    assert result.seconds < SIGNAL_TO_EXIT_S

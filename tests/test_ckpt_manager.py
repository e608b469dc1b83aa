"""Checkpoint manager rules, in-process: which config changes a resume accepts, which checkpoints
retention keeps, and which RNG streams a checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ript_ds.ckpt import manager
from ript_ds.ckpt.manager import COMPLETE, CheckpointManager, check_config, config_hash
from ript_ds.config import ConfigError, ExperimentCfg, load_config


@pytest.mark.parametrize(
    "override",
    [
        "rollout.num_envs=7",
        "rollout.step_timeout_s=30",
        "rollout.videos_per_iteration=3",
        "train.collective_timeout_s=99",
        "log.level=DEBUG",
        "log.wandb_project=other",
        "ckpt.keep_last=5",
        "train.iterations=20",
    ],
)
def test_harmless_changes_resume_without_permission(override):
    saved = ExperimentCfg().to_dict()
    current = load_config(None, [override]).to_dict()
    check_config(saved, current, allow=False)
    assert config_hash(saved) == config_hash(current)


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=1e-4",
        "engine.deepspeed_config=ds_configs/zero3.json",
        "ript.loss=awr",
    ],
)
def test_changes_of_what_is_computed_are_refused(override):
    saved = ExperimentCfg().to_dict()
    current = load_config(None, [override]).to_dict()
    with pytest.raises(ConfigError, match="allow_config_change"):
        check_config(saved, current, allow=False)


def _fake_checkpoint(root: Path, iteration: int, metrics: dict[str, float]) -> None:
    directory = root / "checkpoints" / manager.tag_for(iteration)
    directory.mkdir(parents=True)
    (directory / COMPLETE).write_text(json.dumps({"iteration": iteration, "metrics": metrics, "files": {}}))


def _kept_after_retention(tmp_path: Path, metrics: list[dict[str, float]], keep_last: int) -> list[str]:
    for i, m in enumerate(metrics, start=1):
        _fake_checkpoint(tmp_path, i, m)
    mgr = CheckpointManager(tmp_path, keep_last, rank=0, world_size=1, barrier=lambda name: None)
    mgr._retain()
    return mgr.complete_tags()


def test_best_checkpoint_is_ranked_by_eval_success_only(tmp_path):
    # Noised rollout success (0.9 at iteration 1) must not beat a held-out evaluation (0.5 at 2).
    metrics = [
        {"rollout/success_rate": 0.9},
        {"rollout/success_rate": 0.1, "eval/success_rate": 0.5},
        {"rollout/success_rate": 0.2, "eval/success_rate": 0.4},
        {"rollout/success_rate": 0.3},
    ]
    assert _kept_after_retention(tmp_path, metrics, keep_last=1) == ["iter_000002", "iter_000004"]


def test_without_evaluation_only_the_last_are_kept(tmp_path):
    metrics = [{"rollout/success_rate": r} for r in (0.9, 0.1, 0.2, 0.3)]
    assert _kept_after_retention(tmp_path, metrics, keep_last=2) == ["iter_000003", "iter_000004"]


def test_cuda_rng_of_every_device_is_saved_and_restored(monkeypatch):
    devices = [torch.ByteTensor([1, 2, 3]), torch.ByteTensor([4, 5, 6])]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    state = json.loads(json.dumps(manager.rng_state()))  # it travels as JSON (rng_rank{r}.json)
    manager.set_rng_state(state)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], devices, strict=True))


def test_rng_state_saved_without_cuda_still_loads_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = manager.rng_state()
    expected = torch.rand(3)
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    manager.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected) and restored == []


def test_a_checkpoint_without_a_recorded_stage_resumes_under_the_launcher():
    saved = ExperimentCfg().to_dict()  # engine.zero_stage None: started without launch/train.py
    check_config(saved, load_config(None, ["engine.zero_stage=2"]).to_dict(), allow=False)
    with pytest.raises(ConfigError, match=r"engine\.zero_stage: 2 -> 3"):
        check_config(
            load_config(None, ["engine.zero_stage=2"]).to_dict(),
            saved | {"engine": {**saved["engine"], "zero_stage": 3}},
            allow=False,
        )


class _FilesEngine:
    """engine.save's part of a checkpoint: one file per rank whose size depends on the state."""

    def save(self, root: Path, tag: str, client_state: dict) -> None:
        (root / tag).mkdir(parents=True, exist_ok=True)
        (root / tag / "model.pt").write_text("w" * (100 + client_state["ript_state"]["iteration"]))


def test_saving_a_tag_again_leaves_it_complete_and_held(tmp_path):
    """A second save of one state (a preemption right after its periodic save, or a run started again
    over an earlier run's tags) must leave a complete checkpoint: once, the second marker listed the
    first among its files and the tag read as corrupt, so the resume silently went back one save."""
    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1, barrier=lambda name: None)
    state = manager.TrainState(iteration=3, episode_cursor=0, sampler={}, config={})
    for metrics in ({"eval/success_rate": 0.5}, {}):
        path = mgr.save(_FilesEngine(), state, metrics, rng={})
        assert mgr.is_complete(path) and mgr.resolve("auto") == path
    assert COMPLETE not in json.loads((path / COMPLETE).read_text())["files"]
    assert mgr.holds(3) and not mgr.holds(2)
    # a marker of the earlier version, listing its predecessor's size, still reads as complete
    marker = json.loads((path / COMPLETE).read_text())
    (path / COMPLETE).write_text(json.dumps(marker | {"files": marker["files"] | {COMPLETE: 1}}))
    assert mgr.is_complete(path)
    (path / "model.pt").write_text("cut")
    assert not mgr.is_complete(path)

"""Metric sinks: metrics.jsonl, TensorBoard event files read back, episode videos in an offline wandb run."""

from __future__ import annotations

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ript_ds.eval.video import write_videos
from ript_ds.metrics import TENSORBOARD_DIR, MetricsWriter, read_metrics
from ript_ds.rl.types import Context, Episode


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    writer.log(1, {"train/loss": 0.5, "rollout/episodes": 16})
    writer.log(2, {"train/loss": 0.25, "rollout/episodes": 8})
    writer.close()
    scalars = _scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 0.5), (2, 0.25)]
    assert scalars["rollout/episodes"] == [(1, 16.0), (2, 8.0)]
    assert [row["train/loss"] for row in read_metrics(tmp_path)] == [0.5, 0.25]


def test_tensorboard_off_or_other_rank_writes_no_events(tmp_path):
    MetricsWriter(tmp_path / "off", enabled=True).log(1, {"train/loss": 1.0})
    MetricsWriter(tmp_path / "rank1", enabled=False, tensorboard=True).log(1, {"train/loss": 1.0})
    assert not (tmp_path / "off" / TENSORBOARD_DIR).exists()
    assert not (tmp_path / "rank1").exists()


def test_resume_purges_tensorboard_events_after_the_checkpoint(tmp_path):
    first = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    for it, loss in [(1, 1.0), (2, 2.0), (3, 3.0)]:
        first.log(it, {"train/loss": loss})
    first.close()
    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    resumed.truncate_after(1)  # the checkpoint was iteration 1; 2 and 3 are redone
    resumed.log(2, {"train/loss": 20.0})
    resumed.close()
    assert _scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 20.0)]
    assert [row["iteration"] for row in read_metrics(tmp_path)] == [1, 2]


def _episode(success: bool) -> Episode:
    images = np.random.default_rng(0).integers(0, 255, (3, 2, 8, 8, 3), dtype=np.uint8)
    return Episode(
        context=Context(0, 1),
        seed=5,
        images=images,
        states=np.zeros((3, 8), np.float32),
        actions=np.zeros((12, 7), np.float32),
        replan_steps=np.array([0, 5, 10]),
        success=success,
        length=12,
    )


def test_videos_go_to_an_offline_wandb_run(tmp_path, monkeypatch):
    import wandb  # noqa: F401  (a dependency: a broken install fails, never skips)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    paths = write_videos([_episode(True), _episode(False)], tmp_path / "videos", prefix="it00000_")
    writer = MetricsWriter(tmp_path, enabled=True, wandb_cfg={"project": "ript-ds-test", "mode": "offline"})
    writer.log_videos(1, paths)
    writer.log(1, {"train/loss": 0.5})
    writer.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = sorted(p.name for p in (run / "files" / "media" / "videos").rglob("*.mp4"))
    assert len(media) == 2 and all(name.endswith(".mp4") for name in media)


def test_videos_without_wandb_are_a_no_op(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.log_videos(1, [tmp_path / "missing.mp4"])  # must not touch the path or import wandb
    assert not (tmp_path / "wandb").exists()

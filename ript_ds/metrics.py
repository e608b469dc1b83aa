"""Metric sinks: metrics.jsonl always (one JSON object per iteration), wandb when asked and installed,
TensorBoard event files under <run_dir>/tensorboard when asked (log.tensorboard).

(DESIGN calls this module logging.py; it is metrics.py so it can never shadow the standard library's
`logging` for a script run from inside the package.) Only the main rank writes: construct with
`enabled=is_main()`; every method is then a no-op elsewhere, so call sites need no rank branches.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
VIDEO_KEY = "rollout/videos"


class MetricsWriter:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        wandb_cfg: dict[str, Any] | None = None,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tensorboard_dir = Path(run_dir) / TENSORBOARD_DIR if enabled and tensorboard else None
        self._tb = None  # SummaryWriter, opened at the first log so a resume can set its purge step
        self._purge_step: int | None = None
        self._wandb = None
        if enabled and wandb_cfg is not None:
            self._wandb = _start_wandb(run_dir, wandb_cfg)

    @property
    def wandb_run_id(self) -> str | None:
        return None if self._wandb is None else self._wandb.id

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=iteration)
        if self.tensorboard_dir is not None:
            self._write_tensorboard(iteration, metrics)

    def log_videos(self, iteration: int, paths: list[Path]) -> None:
        """Episode mp4s already on disk, to wandb (as wandb.Video) when it is active."""
        if self._wandb is None or not paths:
            return
        import wandb

        videos = [wandb.Video(str(p), format="mp4", caption=Path(p).stem) for p in paths]
        self._wandb.log({VIDEO_KEY: videos}, step=iteration)

    def _write_tensorboard(self, iteration: int, metrics: dict[str, float]) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of iterations after the checkpoint a resumed run restarts from.
            self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self._tb.add_scalar(key, value, iteration)
        self._tb.flush()  # once per iteration: a live TensorBoard sees every iteration as it ends

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop rows newer than the checkpoint, so the file never shows an iteration twice."""
        self._purge_step = iteration + 1
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r)["iteration"] <= iteration]
        self.path.write_text("".join(r + "\n" for r in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def _start_wandb(run_dir: Path, cfg: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        log.warning("log.wandb is on but wandb is not installed; metrics go to %s only", METRICS_FILE)
        return None
    return wandb.init(dir=str(run_dir), resume="allow", **cfg)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

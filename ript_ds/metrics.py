"""Metric sinks: metrics.jsonl always (one JSON object per iteration), wandb when asked and installed.

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


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
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

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop rows newer than the checkpoint, so the file never shows an iteration twice."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r)["iteration"] <= iteration]
        self.path.write_text("".join(r + "\n" for r in keep))

    def close(self) -> None:
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

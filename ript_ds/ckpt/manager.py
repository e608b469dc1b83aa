"""Training checkpoints that survive kill -9 and preemption, and resume exactly.

Layout under `<run_dir>/checkpoints/`:

    iter_000004/                 DeepSpeed's native files (module, optimizer, LR state per rank)
        rng_rank{r}.json         python / numpy / torch RNG of rank r (and CUDA's, every device)
        COMPLETE                 written last by rank 0, after every rank finished: {iteration,
                                 metrics, files: {relative path: size}}
    latest                       the newest complete tag; replaced atomically after COMPLETE

A tag without COMPLETE (killed while writing) or whose files no longer match COMPLETE's sizes is
skipped with a warning, and the previous complete one is used. Retention keeps the newest `keep_last`
complete tags plus the best by held-out `eval/success_rate`; checkpoints saved without an evaluation
are not ranked (rollout success is measured under exploration noise on other contexts every time),
so a run that never evaluates keeps the last `keep_last` only.
The client state (iteration, sampler state, episode-seed cursor, config and its hash, wandb run
id) travels inside DeepSpeed's checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript_ds.config import ConfigError, ExperimentCfg, migrate_renamed

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
# Keys that may change between a run and its resume without affecting what is computed: where output
# goes, how long to wait for a stalled worker or rank, how many env slots step the episodes (an episode's
# reset seed and policy noise come from its own seed, not from its slot: rl/rollout.py), and whether the
# synthetic envs step in-process or in workers (the same numpy code). Not the engine (deepspeed_config,
# zero_stage): another ZeRO stage cannot load the saved optimizer partitions.
RESUMABLE_CHANGES = (
    "train.iterations",
    "train.collective_timeout_s",
    "ckpt.",
    "log.",
    "run_name",
    "output_dir",
    "rollout.num_envs",
    "rollout.in_process",
    "rollout.step_timeout_s",
    "rollout.pipeline_groups",  # how env groups take turns: the same episodes (rl/rollout.py)
    "rollout.videos_per_iteration",
)

# Filled in by launch/train.py: a checkpoint of a run started otherwise (or before it was recorded)
# holds None, which says nothing about the stage it ran with.
RECORDED_AT_LAUNCH = ("engine.zero_stage",)


@dataclass
class TrainState:
    iteration: int
    episode_cursor: int
    sampler: dict[str, Any]
    config: dict[str, Any]
    wandb_run_id: str | None = None

    def to_client_state(self) -> dict[str, Any]:
        return {"ript_state": self.__dict__ | {"config_hash": config_hash(self.config)}}

    @classmethod
    def from_client_state(cls, client: dict[str, Any]) -> TrainState:
        state = dict(client["ript_state"])
        state.pop("config_hash", None)
        # Checkpoints before the update's seed was derived from (seed, iteration) held one rank's RNG.
        state.pop("update_rng", None)
        return cls(**state)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(config: dict[str, Any]) -> str:
    relevant = {k: v for k, v in flatten(config).items() if not k.startswith(RESUMABLE_CHANGES)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_config(saved: dict[str, Any], current: dict[str, Any], allow: bool) -> None:
    """Resuming with a changed config is an error listing the keys, unless explicitly allowed."""
    a, b = flatten(migrate_renamed(saved)), flatten(current)
    # A key the saved config lacks was added by a later ript-ds: the run trained with its default, so
    # only a non-default value now is a change (a checkpoint from before the key resumes as it was).
    defaults = flatten(ExperimentCfg().to_dict())
    a |= {k: defaults[k] for k in b if k not in a and k in defaults}
    changed = sorted(
        k
        for k in set(a) | set(b)
        if a.get(k) != b.get(k)
        and not k.startswith(RESUMABLE_CHANGES)
        and not (k in RECORDED_AT_LAUNCH and a.get(k) is None)
    )
    if not changed:
        return
    detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:10])
    if allow:
        log.warning("resuming with a changed config (ckpt.allow_config_change): %s", detail)
        return
    raise ConfigError(
        f"the checkpoint was trained with a different config ({detail}); "
        "resume with the same config or set ckpt.allow_config_change=true"
    )


def _b64(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch CPU RNG, plus every CUDA device's when there is CUDA
    (dropout and any sampling on the GPU draw from those)."""
    state = {"pickle_b64": _b64((random.getstate(), np.random.get_state(), torch.get_rng_state()))}
    if torch.cuda.is_available():
        state["cuda_pickle_b64"] = _b64(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state(); a state saved without CUDA (a CPU run, an older checkpoint) leaves the CUDA
    generators as they are."""
    py, np_state, torch_state = pickle.loads(base64.b64decode(state["pickle_b64"]))
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)
    if "cuda_pickle_b64" in state and torch.cuda.is_available():
        cuda = pickle.loads(base64.b64decode(state["cuda_pickle_b64"]))
        if len(cuda) != torch.cuda.device_count():
            log.warning("RNG state of %d CUDA devices restored on %d", len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:06d}"


class CheckpointManager:
    """Owns `<run_dir>/checkpoints`. Methods marked "call on every rank" contain collectives."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int, world_size: int, barrier):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.world_size, self.barrier = keep_last, rank, world_size, barrier
        # The checkpoint this process last wrote or resumed from: the state it holds is still the
        # process's own until the next update (the same on every rank, so a decision on it is collective).
        self.held: Path | None = None

    # ------------------------------------------------------------------ saving
    def save(self, engine, state: TrainState, metrics: dict[str, float], rng: dict | None = None) -> Path:
        """Engine state + client state + per-rank RNG (`rng`, default: now), then COMPLETE and `latest`.
        Call on every rank."""
        tag = tag_for(state.iteration)
        directory = self.root / tag
        if self.rank == 0:  # a tag written again (over an earlier run's) is partial until its new marker
            (directory / COMPLETE).unlink(missing_ok=True)
        engine.save(self.root, tag, state.to_client_state())  # contains a barrier
        (directory / f"rng_rank{self.rank}.json").write_text(json.dumps(rng or rng_state()))
        self.barrier("checkpoint-written")
        if self.rank == 0:
            files = {
                str(p.relative_to(directory)): p.stat().st_size
                for p in sorted(directory.rglob("*"))
                if p.is_file() and p.name != COMPLETE
            }
            marker = {
                "iteration": state.iteration,
                "metrics": metrics,
                "files": files,
                "world_size": self.world_size,
            }
            _atomic_write(directory / COMPLETE, json.dumps(marker, indent=1))
            _atomic_write(self.root / LATEST, tag)
            self._retain()
        self.barrier("checkpoint-complete")
        self.held = directory
        log.info("saved checkpoint %s", directory)
        return directory

    def holds(self, iteration: int) -> bool:
        """This process wrote or resumed from this run's checkpoint of `iteration` (so saving that state
        again would only rewrite it: a preemption right after a periodic save)."""
        return self.held == self.root / tag_for(iteration)

    def point_latest_at(self, iteration: int) -> None:
        """`latest` names `iteration`'s checkpoint (rank 0 writes): after a resume from an older one."""
        if self.rank == 0:
            _atomic_write(self.root / LATEST, tag_for(iteration))

    def _retain(self) -> None:
        complete = self.complete_tags()
        scored = [t for t in complete if _score(self.root / t) is not None]
        best = max(scored, key=lambda t: _score(self.root / t), default=None)
        for tag in complete[: -self.keep_last]:
            if tag != best:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        for partial in set(self.all_tags()) - set(complete):  # leftovers of killed saves
            if partial < (complete[-1] if complete else ""):
                shutil.rmtree(self.root / partial, ignore_errors=True)

    # ------------------------------------------------------------------ finding
    def all_tags(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("iter_"))

    def complete_tags(self) -> list[str]:
        return [t for t in self.all_tags() if self.is_complete(self.root / t)]

    def is_complete(self, directory: Path) -> bool:
        marker = directory / COMPLETE
        if not marker.exists():
            return False
        try:
            files = json.loads(marker.read_text())["files"]
        except (json.JSONDecodeError, KeyError):
            return False
        # Markers before 2026-12-03 may list a previous marker of the same tag (a second save of one
        # state): the marker cannot vouch for its own size, so that entry is not checked.
        return all(
            (directory / f).exists() and (directory / f).stat().st_size == size
            for f, size in files.items()
            if f != COMPLETE
        )

    def resolve(self, resume: str) -> Path | None:
        """`auto` (newest complete checkpoint of this run, or None), `none`, or a checkpoint directory."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not self.is_complete(path):
                raise ConfigError(
                    f"ckpt.resume={resume}: not a complete checkpoint directory (no valid {COMPLETE})"
                )
            return path
        latest = self.root / LATEST
        if latest.exists():
            tag = latest.read_text().strip()
            if self.is_complete(self.root / tag):
                return self.root / tag
            log.warning("checkpoint %s named by `latest` is partial or corrupt; using an earlier one", tag)
        complete = self.complete_tags()
        if self.all_tags() and complete and complete[-1] != self.all_tags()[-1]:
            log.warning("skipping partial checkpoints after %s", complete[-1])
        return self.root / complete[-1] if complete else None

    def load(self, engine, path: Path) -> TrainState:
        """Restore engine, client state and this rank's RNG. Call on every rank."""
        saved_world = json.loads((path / COMPLETE).read_text()).get("world_size", self.world_size)
        if saved_world == self.world_size:
            client = engine.load(path.parent, path.name)
        else:
            log.warning(
                "%s was written by %d ranks, this job has %d: loading consolidated weights; the optimizer "
                "state starts fresh",
                path,
                saved_world,
                self.world_size,
            )
            from ript_ds.engine.consolidate import client_state, fp32_state_dict

            read: dict = {}  # the engine reads the weights only once it accepts the resume

            def weights():
                read["weights"], read["states"] = fp32_state_dict(path)
                return read["weights"]

            engine.load_consolidated(weights)
            client = client_state(read["states"])
        rng_file = path / f"rng_rank{self.rank}.json"
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()))
        else:
            log.warning("%s has no RNG state for rank %d (world size changed?)", path, self.rank)
        self.held = path
        return TrainState.from_client_state(client)


def _score(directory: Path) -> float | None:
    """Held-out success of a checkpoint, None when it was saved without an evaluation."""
    return json.loads((directory / COMPLETE).read_text()).get("metrics", {}).get("eval/success_rate")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)

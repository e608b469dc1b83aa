"""Demonstrations kept in every RIPT update (`ript.demos`): an anchor against self-imitation narrowing.

RIPT's update imitates the policy's own successful rollouts. On real LIBERO that narrows a small flow
policy within ~8 iterations: the flow-matching loss on each iteration's fresh rollouts falls 10x, the
samples lose their spread and success falls (docs/benchmarks.md, "RIPT on real LIBERO"). Mixing a fixed
set of demonstrations into every update keeps the policy near the demonstrated action distribution while
the rollouts move it towards what succeeds, the BC term of DAPG / SFT-mixed RL recipes.

Demos are episodes in the rollout format (Episode: an observation per replanning step, every executed
action, in env units), stored by `save_episodes`. Only successful, uncrashed episodes are kept. Their
windows join the rollout windows with advantage +1 (a success; under `ript.loss: cfg` they train both
branches), loss weight `ript.demo_weight`, and keys (2^62 + demo index, window index) that no rollout
has (its seed is run seed x 10^7 + episode index), so the update's plan, sharding and (noise, time)
draws treat them as any other window.
Which demo windows an update uses is a function of the update seed alone: the same on any rank layout
and after a resume.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ript_ds.config import ConfigError, ExperimentCfg
from ript_ds.env.base import ACTION_DIM, STATE_DIM
from ript_ds.model.arch import PI0Arch
from ript_ds.rl.types import Context, Episode, Window
from ript_ds.rl.windows import episode_windows

DEMO_ADVANTAGE = 1.0  # RLOO's largest advantage with 0/1 rewards: a success among failures
_DEMO_TAG = 3  # seeds the per-update draw of demo windows (update.py uses 1 and 2)
# First key of demo windows: above every rollout seed, and >= 0 as numpy seeds (the update's draws) need.
DEMO_KEY_BASE = 1 << 62
_FIELDS = ("images", "states", "actions", "replan_steps", "meta")


def save_episodes(episodes: Iterable[Episode], path: str | Path) -> None:
    """Episodes as one .npz (images are most of it: ~1 MB per 100-step episode at 64 px, two cameras)."""
    arrays = {}
    for i, ep in enumerate(episodes):
        arrays |= {
            f"{i}/images": ep.images,
            f"{i}/states": ep.states,
            f"{i}/actions": ep.actions,
            f"{i}/replan_steps": ep.replan_steps,
            f"{i}/meta": np.array([ep.context.task_id, ep.context.init_state_idx, ep.seed, ep.success]),
        }
    np.savez(path, **arrays)


def load_episodes(path: str | Path) -> list[Episode]:
    """The episodes of a `save_episodes` file; ValueError (one line) for anything else."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz of episodes ({type(err).__name__})") from None
    with data:
        names = {k.split("/")[0] for k in data.files}
        if not data.files or any(f"{i}/{f}" not in data.files for i in range(len(names)) for f in _FIELDS):
            raise ValueError(f"{path} does not hold episodes written by ript_ds.rl.demos.save_episodes")
        out = []
        for i in range(len(names)):
            task_id, state, seed, success = (int(v) for v in data[f"{i}/meta"])
            actions = data[f"{i}/actions"]
            out.append(
                Episode(
                    context=Context(task_id, state),
                    seed=seed,
                    images=data[f"{i}/images"],
                    states=data[f"{i}/states"],
                    actions=actions,
                    replan_steps=data[f"{i}/replan_steps"],
                    success=bool(success),
                    length=len(actions),
                )
            )
    return out


@dataclass
class DemoPool:
    """Every window of the successful demos, ready to join an update."""

    windows: list[Window]
    episodes: int  # successful demos the windows come from

    @classmethod
    def from_episodes(cls, episodes: Sequence[Episode], chunk_size: int, weight: float) -> DemoPool:
        kept = [ep for ep in episodes if ep.success and not ep.crashed]
        windows = []
        for i, ep in enumerate(kept):
            for w in episode_windows(ep, DEMO_ADVANTAGE, chunk_size):
                windows.append(replace(w, weight=weight, key=(DEMO_KEY_BASE + i, w.key[1])))
        return cls(windows, len(kept))

    @classmethod
    def load(
        cls,
        path: str | Path,
        chunk_size: int,
        weight: float,
        task_ids: Sequence[int],
        image_size: int,
        action_dim: int,
        state_dim: int,
    ) -> DemoPool:
        """The pool of a demos file, checked against the run: ValueError (one line) naming the mismatch."""
        pool = cls.from_episodes(load_episodes(path), chunk_size, weight)
        if not pool.windows:
            raise ValueError(f"{path} holds no successful demo with an executed action")
        w = pool.windows[0]
        tasks = sorted({w.task_id for w in pool.windows} - set(task_ids))
        checks = [
            (not tasks, f"demos of tasks {tasks} that env.task_ids {list(task_ids)} does not train"),
            (
                w.images.shape[1:3] == (image_size, image_size),
                f"images of {w.images.shape[1]}x{w.images.shape[2]} px; the policy takes {image_size} px",
            ),
            (w.state.shape == (state_dim,), f"states of dim {w.state.shape[0]}; the env's are {state_dim}"),
            (
                w.actions.shape[1] == action_dim,
                f"actions of dim {w.actions.shape[1]}; the env's are {action_dim}",
            ),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"{path} holds {what}")
        return pool

    def size(self, n: int | None) -> int:
        """Demo windows an update with ript.demo_windows = n uses, over all ranks."""
        return len(self.windows) if n is None else min(n, len(self.windows))

    def draw(self, n: int | None, seed: int, rank: int = 0, world_size: int = 1) -> list[Window]:
        """This rank's share of `n` demo windows (None or more than the pool: all of them) drawn without
        replacement by `seed`: ranks take every world_size-th window of one global draw."""
        order = np.random.default_rng([seed, _DEMO_TAG]).permutation(len(self.windows))[: self.size(n)]
        return [self.windows[i] for i in sorted(order[rank::world_size].tolist())]


def load_demo_pool(cfg: ExperimentCfg, arch: PI0Arch) -> DemoPool | None:
    """ript.demos as a DemoPool checked against the run (tasks, image size, action and state dims), or
    None without demos. Raises ConfigError (one line)."""
    if cfg.ript.demos is None:
        return None
    path = Path(cfg.ript.demos)
    try:
        stat = path.stat()
        return _load_pool(
            path, stat.st_mtime_ns, stat.st_size, arch.chunk_size, cfg.ript.demo_weight,
            tuple(cfg.env.task_ids), arch.vision.image_size,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        raise ConfigError(f"ript.demos: {err}; record demos with ript_ds.rl.demos.save_episodes") from None


@functools.lru_cache(maxsize=1)
def _load_pool(path, mtime_ns, size, chunk_size, weight, task_ids, image_size) -> DemoPool:
    """One read per process of an unchanged file: launch/train.py checks the demos before any rank
    starts and the trainer then uses the same pool (an .npz of ~100 MB for the LIBERO bench)."""
    return DemoPool.load(path, chunk_size, weight, task_ids, image_size, ACTION_DIM, STATE_DIM)

"""Worker for tests/test_trainer_matrix.py: one Trainer per matrix cell, one after another, in one launch.

    python tests/matrix_worker.py OUT [CELL ...] [key=value ...]                  # 1 rank
    python -m torch.distributed.run --nproc_per_node 2 tests/matrix_worker.py OUT ...   # 2 ranks

CELL names restrict the run to those cells; key=value overrides go on top of every cell's config
(both for debugging one cell by hand; the test passes neither).

A cell is (ZeRO config, config overrides): ZeRO {0, 2, 3} x objective {cfg, awr, fpo}, LoRA on ZeRO-2/3,
gradient accumulation, the cosine schedule, demos in the update (ript.demos), and PI0.5 with cfg (ZeRO-2)
and fpo (ZeRO-3). Every cell runs ITERATIONS trainer iterations of the
debug config at matrix sizes, in-process synthetic envs, with its own run directory; process start-up
and DeepSpeed's import are paid once per launch, not per cell. The global batch is the same in both
launches: 1 rank trains micro-batches of 2 x MICRO windows, 2 ranks MICRO each.

Each rank writes OUT/world<W>_rank<r>.json after every cell (so a later crash keeps what ran):
{"world", "rank", "order", "cells": {name: {"status": ok|error, "iterations": [metrics dict as
iterate() returned it on this rank, ...], "keys": [sorted metric names per iteration], "error",
"traceback", "wall_s", "setup_s"}}, "stopped": null or why the remaining cells did not run}.
A failing cell is recorded and the next one runs, unless the failure may have left the process group
unusable (a collective timed out, or the ranks failed differently): then the launch stops there.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from ript_ds.config import load_config
from ript_ds.engine import dist
from ript_ds.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"
ITERATIONS = 2
MICRO = 4  # windows per micro-batch on each of 2 ranks; 1 rank takes 2 x MICRO
TIMEOUT_S = 120.0  # collectives; generous because 4 agents share 2 cores, still bounds a hang
SIDE_TIMEOUT_S = 60.0  # the per-cell outcome exchange (see _agree)
# Matrix settings on top of debug.yaml, pinned here so that tuning debug.yaml does not change which
# groups the matrix keeps. Measured with them: every cell updates in both iterations, on 1 of the 2
# groups (one of 2 ranks trains on padding only) or on both (both ranks train, on different window
# counts); ZeRO-0/2 mostly the first, ZeRO-3 (zero.Init starts from another random policy) both.
# One sampling round: the sampler rounds each round's draw up to a multiple of the world size, so
# only the first round draws the same contexts on 1 and 2 ranks, which the 1-vs-2-rank comparison
# needs. fpo with 2 (noise, time) draws instead of 4: half the forwards.
COMMON = [
    "train.seed=2",
    "env.difficulty=0.0",
    "env.max_steps=200",
    "model.chunk_size=16",
    "rollout.replan_every=16",
    "rollout.noise_scale=6.0",
    "rollout.in_process=true",
    "rollout.num_envs=8",
    "ript.rollouts_per_context=4",
    "ript.groups_per_iteration=2",
    "ript.max_sampling_rounds=1",
    "ript.fpo_samples=2",
    f"train.iterations={ITERATIONS}",
    "train.eval_every=0",
    "ckpt.every=0",
    "ckpt.resume=none",
    f"train.collective_timeout_s={TIMEOUT_S}",
    "log.level=WARNING",
]


@dataclass(frozen=True)
class Cell:
    name: str
    ds_config: str  # file in ds_configs/
    overrides: tuple[str, ...] = ()


def cells() -> list[Cell]:
    """The matrix, cfg cells first: a cell whose failure leaves the process group unusable ends the
    2-rank launch, so the objectives most likely to do that (awr, fpo) run last."""
    stages = (0, 2, 3)
    out = [Cell(f"z{stage}_cfg", f"zero{stage}.json", ("ript.loss=cfg",)) for stage in stages]
    out += [
        Cell("z2_lora", "zero2.json", ("engine.lora.enabled=true", "engine.lora.rank=4")),
        Cell("z3_lora", "zero3.json", ("engine.lora.enabled=true", "engine.lora.rank=4")),
        Cell("z2_accum2", "zero2.json", ("train.grad_accum_steps=2",)),
        # with demos in the update (ript.demos, a subset drawn per update; the file is written by run_cell):
        # one cell for both, as a separate one would add ~1 min to each launch
        Cell(
            "z2_cosine_demos",
            "zero2.json",
            ("engine.lr_schedule=cosine", "ript.demo_windows=5", "ript.demo_weight=0.5"),
        ),
    ]
    out += [
        Cell(f"z{stage}_{loss}", f"zero{stage}.json", (f"ript.loss={loss}",))
        for loss in ("awr", "fpo")
        for stage in stages
    ]
    # PI0.5 (adaptive-norm action expert, action-only suffix) through the same trainer, engine and update
    pi05 = "model.arch=tiny_pi05"
    out += [
        Cell("z2_pi05_cfg", "zero2.json", ("ript.loss=cfg", pi05)),
        Cell("z3_pi05_fpo", "zero3.json", ("ript.loss=fpo", pi05)),
    ]
    return out


def _transport_failure(err: BaseException) -> bool:
    """Did the error come from a collective that failed or timed out (the group may be unusable)?

    A CollectiveError raised on every rank after a successful exchange (e.g. "ranks hold different
    keys") leaves the group healthy; one wrapping a backend error, or a raw backend error, does not."""
    text = str(err).lower()
    if isinstance(err, dist.CollectiveError):
        return "failed on rank" in text
    return "dist" in type(err).__name__.lower() or "gloo" in text or "timed out" in text


def write_demos(path: Path) -> Path:
    """Scripted-expert demos of the debug tasks at the matrix's sizes (every rank writes the same file)."""
    from ript_ds.env.synthetic import synthetic_tasks
    from ript_ds.rl.demos import save_episodes
    from ript_ds.synthetic.bc import collect_demos

    cfg = load_config(DEBUG, COMMON)
    tasks = synthetic_tasks(3, cfg.env.synthetic_init_states, cfg.env.max_steps)
    # An observation every 4 steps: ~4 windows per demo, so the 5 of an update are a subset of the pool.
    kwargs = {"image_size": cfg.model.image_size, "difficulty": 0.0}
    demos = collect_demos(tasks, 0.0, 1, seed=4, replan_every=4, env_kwargs=kwargs)
    save_episodes(demos, path)
    return path


def run_cell(cell: Cell, out: Path, extra: list[str]) -> dict:
    """Build, iterate and close one cell's Trainer (call on every rank); errors are recorded, not raised."""
    world = dist.world_size()
    overrides = [
        *COMMON,
        f"output_dir={out / f'world{world}'}",
        f"run_name={cell.name}",
        f"train.micro_batch_size={MICRO * 2 // world}",
        *cell.overrides,
        *extra,
    ]
    if any(o.startswith("ript.demo") for o in cell.overrides):
        overrides.append(f"ript.demos={write_demos(out / f'demos_world{world}_rank{dist.rank()}.npz')}")
    record: dict = {"status": "error", "iterations": [], "keys": [], "error": None, "transport": False}
    start = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(load_config(DEBUG, overrides), str(ROOT / "ds_configs" / cell.ds_config))
        trainer.setup()
        record["setup_s"] = time.perf_counter() - start
        for _ in range(ITERATIONS):
            metrics = trainer.iterate()
            record["iterations"].append(metrics)
            record["keys"].append(sorted(metrics))
        record["status"] = "ok"
    except Exception as err:  # the matrix reports every cell's outcome; the traceback goes to the JSON
        record["error"] = f"{type(err).__name__}: {err}"[:3000]
        record["traceback"] = traceback.format_exc()[-8000:]
        record["transport"] = _transport_failure(err)
    finally:
        if trainer is not None:
            trainer.close()
    record["wall_s"] = time.perf_counter() - start
    return record


def _agree(record: dict, side) -> str | None:
    """Exchange cell outcomes over a side group (call on every rank); why to stop, or None to go on.

    Ranks that finished a cell, or failed it at the same collective, arrive here within seconds. A rank
    that failed alone (e.g. an IndexError on the rank that kept no group) leaves its peers blocked in a
    collective, possibly one of DeepSpeed's groups, which need not honour train.collective_timeout_s:
    the exchange then times out after SIDE_TIMEOUT_S and this rank stops, which closes its connections
    and so fails the peers' collective too."""
    if side is None:
        return None
    mine = {"status": record["status"], "error": record["error"], "transport": record["transport"]}
    everyone: list = [None] * dist.world_size()
    try:
        tdist.all_gather_object(everyone, mine, group=side)
    except Exception as err:  # a peer is stuck or gone: nothing more can run in step with it
        return f"the ranks' outcomes could not be exchanged ({type(err).__name__}): a rank is stuck or gone"
    statuses = {r["status"] for r in everyone}
    if statuses == {"ok"}:
        return None
    if any(r["transport"] for r in everyone):
        return "a collective failed or timed out: the process group may be unusable"
    if statuses != {"error"} or len({r["error"].split(":")[0] for r in everyone}) != 1:
        return (
            f"ranks ended the cell differently ({[r['status'] for r in everyone]}): they may be out of step"
        )
    return None


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, only = Path(args[0]), {a for a in args[1:] if "=" not in a}
    extra = [a for a in args[1:] if "=" in a]
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the errors
    torch.set_num_threads(1)  # the tiny model runs fastest on one thread of the 2 busy cores
    dist.init_distributed(TIMEOUT_S)
    side = None
    if dist.world_size() > 1:
        side = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SIDE_TIMEOUT_S))
    report: dict = {
        "world": dist.world_size(),
        "rank": dist.rank(),
        "order": [],
        "cells": {},
        "stopped": None,
    }
    path = out / f"world{dist.world_size()}_rank{dist.rank()}.json"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for cell in cells():
        if only and cell.name not in only:
            continue
        report["order"].append(cell.name)
        report["cells"][cell.name] = record = run_cell(cell, out, extra)
        report["total_s"] = time.perf_counter() - start
        path.write_text(json.dumps(report, default=float, indent=1))  # before the exchange, which may fail
        stop = _agree(record, side)
        if stop:
            report["stopped"] = f"after {cell.name}: {stop}"
            path.write_text(json.dumps(report, default=float, indent=1))
            # Not a normal exit: tearing down a process group with a peer stuck in it can block.
            # Exit code 0, so torchrun lets the other ranks finish writing their reports.
            logging.shutdown()
            os._exit(0)


if __name__ == "__main__":
    main()

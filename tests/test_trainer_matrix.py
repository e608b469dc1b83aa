"""The trainer across its configuration matrix, on 1 and 2 real ranks (tests/matrix_worker.py).

ZeRO {0, 2, 3} x objective {cfg, awr, fpo}, LoRA on ZeRO-2 and ZeRO-3, gradient accumulation, the
cosine schedule with demos in the update: every cell completes on every rank, reports the same metric
names on every rank, and 1 rank with micro-batches of 2m windows matches 2 ranks with m (the same global batch): sampling
statistics exactly, train/loss and train/grad_norm to fp32 round-off. Both launches run at once (3
processes on 2 cores); each builds its cells one after another, so start-up is paid once per launch.
The per-cell wall times are in every failure message and in <tmp>/matrix_summary.json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from matrix_worker import cells

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

WORKER = str(ROOT / "tests" / "matrix_worker.py")
NAMES = [c.name for c in cells()]
TOLERANCE = 1e-5  # fp32: the 2-rank update reduces the same sums in another order
VOLATILE = ("time/", "mem/", "rollout/env_steps_per_s")  # timing and memory differ by nature
# Must agree exactly: the same contexts and episode seeds on 1 and 2 ranks give the same rollouts.
EXACT = ("rollout/", "sampler/", "train/skipped")
# Every other train/ metric is the same update at the same global batch, so agrees to TOLERANCE;
# only the micro-step count may differ (how a rank's share is cut into micro-batches).
UNCOMPARED = ("train/micro_steps",)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"),
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    """{world: [rank 0 report, rank 1 report, ...]} from both launches, plus the summary table."""
    out = tmp_path_factory.mktemp("matrix")
    launches = {
        1: [sys.executable, WORKER, str(out)],
        2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", WORKER, str(out)],
    }
    logs = {w: out / f"log_world{w}.txt" for w in launches}
    procs = {}
    for world, cmd in launches.items():
        with logs[world].open("w") as log:  # files, not pipes: a full pipe would stall a worker
            procs[world] = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1200  # both launches together; collective timeouts end a hang sooner
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reports: dict = {
        "logs": {w: path.read_text() for w, path in logs.items()},
        "codes": {w: p.returncode for w, p in procs.items()},
    }
    for world in launches:
        paths = [out / f"world{world}_rank{r}.json" for r in range(world)]
        reports[world] = [json.loads(p.read_text()) if p.exists() else None for p in paths]
    reports["table"] = _table(reports)
    (out / "matrix_summary.json").write_text(json.dumps(_summary(reports), indent=1))
    print(reports["table"])
    return reports


def _record(reports: dict, world: int, rank: int, cell: str) -> dict | None:
    report = reports[world][rank]
    return None if report is None else report["cells"].get(cell)


def _status(record: dict | None) -> str:
    if record is None:
        return "not run"
    if record["status"] == "ok":
        return "ok"
    return record["error"].splitlines()[0][:110]


def _table(reports: dict) -> str:
    """cell | 1-rank s | 2-rank s (slowest rank) | outcome per launch."""
    lines = [f"{'cell':<11} {'1 rank':>7} {'2 ranks':>7}  outcome (1 rank | 2 ranks, rank 0)"]
    for cell in NAMES:
        one, two = _record(reports, 1, 0, cell), [_record(reports, 2, r, cell) for r in range(2)]
        t1 = f"{one['wall_s']:.1f}" if one else "-"
        t2 = f"{max(r['wall_s'] for r in two):.1f}" if all(two) else "-"
        lines.append(f"{cell:<11} {t1:>7} {t2:>7}  {_status(one)} | {_status(two[0])}")
    for world in (1, 2):
        totals = [r.get("total_s", math.nan) for r in reports[world] if r]
        stopped = [r["stopped"] for r in reports[world] if r and r["stopped"]]
        lines.append(
            f"{world}-rank launch: exit {reports['codes'][world]}, {max(totals, default=math.nan):.0f} s"
        )
        lines += [f"  stopped {s}" for s in stopped[:1]]
    return "\n".join(lines)


def _summary(reports: dict) -> dict:
    return {
        "table": reports["table"].splitlines(),
        "cells": {
            cell: {
                f"world{w}_rank{r}": {
                    k: v for k, v in (_record(reports, w, r, cell) or {}).items() if k != "iterations"
                }
                for w in (1, 2)
                for r in range(w)
            }
            for cell in NAMES
        },
    }


def _fail(matrix: dict, problems: list[str]) -> None:
    if problems:
        pytest.fail("\n".join(problems) + "\n\n" + matrix["table"], pytrace=False)


def test_every_cell_completes_on_every_rank(matrix):
    problems = []
    for world in (1, 2):
        for rank, report in enumerate(matrix[world]):
            if report is None:
                problems.append(
                    f"{world}-rank launch, rank {rank}: no report\n{matrix['logs'][world][-3000:]}"
                )
                continue
            for cell in NAMES:
                record = report["cells"].get(cell)
                if record is None:
                    problems.append(f"{cell} [{world} ranks, rank {rank}]: not run ({report['stopped']})")
                elif record["status"] != "ok":
                    problems.append(f"{cell} [{world} ranks, rank {rank}]: {record['traceback'][-1500:]}")
    _fail(matrix, problems)


def test_every_rank_reports_the_same_metric_names(matrix):
    problems = []
    for cell in NAMES:
        keys = {
            (w, r): rec["keys"]
            for w in (1, 2)
            for r in range(w)
            if (rec := _record(matrix, w, r, cell)) and rec["status"] == "ok"
        }
        for w in (1, 2):
            here = [k for (world, _), k in keys.items() if world == w]
            if any(k != here[0] for k in here):
                problems.append(f"{cell} [{w} ranks]: ranks report different metric names")
        if (1, 0) in keys and (2, 0) in keys and keys[1, 0] != keys[2, 0]:
            diff = [sorted(set(a) ^ set(b)) for a, b in zip(keys[1, 0], keys[2, 0], strict=False)]
            problems.append(f"{cell}: 1 rank and 2 ranks report different metric names: {diff}")
    _fail(matrix, problems)


def _stable(iterations: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in iterations]


def _compare(cell: str, one: list[dict], two: list[dict]) -> list[str]:
    problems = []
    for it, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        for key in sorted(set(a) & set(b)):
            if key.startswith(VOLATILE) or key in UNCOMPARED:
                continue
            if key.startswith(EXACT):
                if a[key] != b[key]:
                    problems.append(f"{cell} it {it}: {key} 1 rank {a[key]} != 2 ranks {b[key]}")
            elif key.startswith("train/") and not abs(a[key] - b[key]) <= TOLERANCE:
                problems.append(f"{cell} it {it}: {key} 1 rank {a[key]:.7g} vs 2 ranks {b[key]:.7g}")
    return problems


def test_one_rank_matches_two_ranks_at_the_same_global_batch(matrix):
    problems = []
    for cell in NAMES:
        one, two = _record(matrix, 1, 0, cell), [_record(matrix, 2, r, cell) for r in range(2)]
        if not (one and all(two)) or "error" in {one["status"], two[0]["status"], two[1]["status"]}:
            continue  # reported by test_every_cell_completes_on_every_rank
        if _stable(two[0]["iterations"]) != _stable(two[1]["iterations"]):
            problems.append(f"{cell}: the 2 ranks returned different reduced metrics")
        problems += _compare(cell, one["iterations"], two[0]["iterations"])
        if all(it.get("train/skipped") for it in one["iterations"]):
            problems.append(f"{cell}: no iteration updated (no mixed group): retune the matrix sizes")
    _fail(matrix, problems)


def test_cosine_schedule_decays_and_accumulation_counts_optimizer_steps(matrix):
    problems = []
    for world in (1, 2):
        cosine, accum = _record(matrix, world, 0, "z2_cosine_demos"), _record(matrix, world, 0, "z2_accum2")
        if cosine is None or cosine["status"] != "ok":
            problems.append(f"z2_cosine_demos [{world} ranks]: did not complete")
        else:
            lrs = [it.get("train/lr") for it in cosine["iterations"]]  # None: that iteration skipped
            if None in lrs or not lrs[1] < lrs[0]:
                problems.append(
                    f"z2_cosine_demos [{world} ranks]: train/lr per iteration {lrs} does not decrease"
                )
            # ript.demo_windows=5 of a larger pool in every update (the 1-vs-2-rank test compares the rest)
            demos = [it.get("train/demo_windows") for it in cosine["iterations"]]
            if demos != [5.0] * len(demos):
                problems.append(
                    f"z2_cosine_demos [{world} ranks]: train/demo_windows {demos}, expected 5 each"
                )
        if accum is None or accum["status"] != "ok":
            problems.append(f"z2_accum2 [{world} ranks]: did not complete")
            continue
        for it, m in enumerate(accum["iterations"], start=1):
            if m.get("train/skipped"):
                continue
            steps, micro = m.get("train/optimizer_steps"), m.get("train/micro_steps")
            if steps is None:
                problems.append(f"z2_accum2 [{world} ranks] it {it}: no train/optimizer_steps metric")
            elif not 1 <= steps <= (math.ceil(micro / 2) if micro is not None else steps):
                problems.append(
                    f"z2_accum2 [{world} ranks] it {it}: {steps} optimizer steps for {micro} micro"
                )
    _fail(matrix, problems)

"""launch/eval.py, ript_ds/eval/ (stats, runner) and tools/plot_metrics.py.

Wilson intervals below were computed by hand (z = 1.96):
  0/50:  center = (z^2/100) / (1 + z^2/50) = 0.035674, half the same   -> [0, 0.0713]
  25/50: 1.96 / 1.076829 * sqrt(0.005 + z^2/10000) = 0.133556         -> [0.3664, 0.6336]
  50/50: mirror image of 0/50                                           -> [0.9287, 1]
  1/3:   center 0.426928, half 0.365425                                 -> [0.0615, 0.7924]
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_policy

from ript_ds.eval.stats import EpisodeRecord, aggregate, markdown_table, select_video_indices, wilson_interval
from ript_ds.model.weights import save_canonical


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_cli = _load(ROOT / "launch" / "eval.py", "ript_eval_cli")
plot_cli = _load(ROOT / "tools" / "plot_metrics.py", "ript_plot_metrics")


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(0, 50, 0.0, 0.0713), (25, 50, 0.3664, 0.6336), (50, 50, 0.9287, 1.0), (1, 3, 0.0615, 0.7924)],
)
def test_wilson_interval_hand_computed(successes: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4)  # hand values use z = 1.96, the code 1.959964
    assert hi == pytest.approx(high, abs=1e-4)  # hand values use z = 1.96, the code 1.959964


def test_wilson_interval_edge_cases() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


def _rec(index: int, task: int, success: bool, suite: str = "s") -> EpisodeRecord:
    return EpisodeRecord(index, suite, task, index, 7 + index, success, 10)


def test_aggregate_per_task_suite_and_mean() -> None:
    # task 0: 3/4, task 1: 1/2 (suite a); task 0 of suite b: 0/2; records in scrambled order
    records = [_rec(i, 0, s, "a") for i, s in enumerate([True, True, False, True])]
    records += [_rec(4, 1, True, "a"), _rec(5, 1, False, "a"), _rec(6, 0, False, "b"), _rec(7, 0, False, "b")]
    summary = aggregate(records[::-1], {("a", 0): {"instruction": "pick"}})
    rows = {(r["suite"], r["task_id"]): r for r in summary["tasks"]}
    assert (rows["a", 0]["successes"], rows["a", 0]["episodes"], rows["a", 0]["rate"]) == (3, 4, 0.75)
    assert rows["a", 0]["instruction"] == "pick"
    assert rows["a", 1]["rate"] == 0.5
    assert summary["suites"]["a"]["successes"] == 4 and summary["suites"]["a"]["episodes"] == 6
    assert summary["suites"]["a"]["rate"] == pytest.approx(4 / 6)
    assert summary["suites"]["a"]["mean_task_rate"] == pytest.approx(0.625)
    assert summary["suites"]["b"]["rate"] == 0.0
    assert summary["mean"] == pytest.approx(0.3125)  # mean of the suites' mean task rates
    assert summary["suites"]["a"]["ci95"] == pytest.approx(list(wilson_interval(4, 6)))


def test_markdown_table_rows() -> None:
    summary = aggregate(
        [_rec(0, 0, True), _rec(1, 0, False), _rec(2, 1, False)], {("s", 0): {"instruction": "a|b"}}
    )
    text = markdown_table(summary, "T")
    lines = text.splitlines()
    assert lines[0] == "# T"
    assert "| s | 0 | a/b | 1 | 2 | 50.0 | [9.5, 90.5] |" in lines  # Wilson 1/2: 0.5 -+ 0.4055
    assert "| s | 1 |  | 0 | 1 | 0.0 | [0.0, 79.3] |" in lines  # Wilson 0/1: z^2/(1+z^2) = 0.7934
    assert any(line.startswith("| s | 2 | 1 | 3 | 33.3 |") for line in lines)
    assert "**Mean success rate: 25.0%**" in text


def test_select_video_indices_mixes_outcomes() -> None:
    records = [_rec(0, 0, True), _rec(1, 0, True), _rec(2, 0, False), _rec(3, 0, True), _rec(4, 0, False)]
    assert select_video_indices(records, 2) == [0, 2]
    assert select_video_indices(records, 3) == [0, 2, 4]  # failure, success, failure
    assert select_video_indices(records, 10) == [0, 1, 2, 3, 4]
    assert select_video_indices(records, 0) == []


E2E_ARGS = ["--suite", "synthetic", "--tasks", "0,2", "--episodes-per-task", "3", "--max-steps", "6"]


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, out) of a 1-rank evaluation: 2 tasks x 3 episodes, 2 envs, 2 videos."""
    tmp = tmp_path_factory.mktemp("eval")
    ckpt = save_canonical(tiny_policy(), tmp / "ckpt")
    out = tmp / "out"
    argv = ["--checkpoint", str(ckpt), *E2E_ARGS, "--num-envs", "2", "--out", str(out), "--videos", "2"]
    assert eval_cli.main(argv) == 0
    return ckpt, out


def test_eval_end_to_end_synthetic(single_rank: tuple[Path, Path]) -> None:
    _, out = single_rank
    results = json.loads((out / "results.json").read_text())
    assert [(t["task_id"], t["episodes"]) for t in results["tasks"]] == [(0, 3), (2, 3)]
    assert results["suites"]["synthetic"]["episodes"] == 6
    assert results["protocol"]["episodes_per_task"] == 3 and results["protocol"]["seed"] == 7
    episodes = results["episode_records"]
    assert [(e["task_id"], e["init_state_idx"], e["seed"]) for e in episodes] == [
        (t, i, 7 + i) for t in (0, 2) for i in range(3)
    ]
    assert all(e["length"] <= 6 and e["failure_reason"] is None for e in episodes)
    successes = sum(e["success"] for e in episodes)
    assert results["suites"]["synthetic"]["successes"] == successes
    assert "| synthetic | 2 |" in (out / "results.md").read_text()
    assert len(list((out / "videos").glob("*.mp4"))) == 2


def test_eval_first_init_state_runs_the_same_episodes_of_later_states(
    single_rank: tuple[Path, Path], tmp_path: Path
) -> None:
    """--first-init-state S: episode i of the protocol for i = S .., identical to the full run's."""
    ckpt, single_out = single_rank
    argv = ["--checkpoint", str(ckpt), *E2E_ARGS[:4], "--max-steps", "6", "--episodes-per-task", "2"]
    assert eval_cli.main([*argv, "--first-init-state", "1", "--num-envs", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    full = json.loads((single_out / "results.json").read_text())["episode_records"]
    keys = ("task_id", "init_state_idx", "seed", "success", "length")
    got = [tuple(e[k] for k in keys) for e in results["episode_records"]]
    assert got == [tuple(e[k] for k in keys) for e in full if e["init_state_idx"] >= 1]
    assert results["protocol"]["first_init_state"] == 1
    assert eval_cli.main([*argv, "--first-init-state", "-1"]) == 2
    # --seed: other episodes of the same states (more episodes per held-out state), recorded as such
    assert (
        eval_cli.main([*argv, "--first-init-state", "1", "--seed", "100", "--out", str(tmp_path / "s")]) == 0
    )
    reseeded = json.loads((tmp_path / "s" / "results.json").read_text())
    assert [(e["init_state_idx"], e["seed"]) for e in reseeded["episode_records"]] == [
        (i, 100 + i) for _ in range(2) for i in (1, 2)
    ]
    assert reseeded["protocol"]["seed"] == 100 and "100 + i" in reseeded["protocol"]["description"]
    assert eval_cli.main([*argv, "--seed", "-1"]) == 2


def test_eval_first_init_state_past_the_tasks_states_is_refused() -> None:
    from ript_ds.env.base import TaskSpec
    from ript_ds.eval.checkpoint import EvalError, check_init_states

    tasks = [
        TaskSpec(suite="libero_goal", task_id=8, name="t", instruction="i", max_steps=9, num_init_states=50)
    ]
    check_init_states(tasks, 25, 25)  # states 25-49: exactly the last ones
    with pytest.raises(EvalError, match=r"fewer than 51 init states .* or --first-init-state"):
        check_init_states(tasks, 25, 26)


@pytest.mark.multirank
def test_eval_two_ranks_match_one_rank(single_rank: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, single_out = single_rank
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launch/eval.py"]
    cmd += ["--checkpoint", str(ckpt), *E2E_ARGS, "--num-envs", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "results.json").read_text())
    one = json.loads((single_out / "results.json").read_text())
    assert two["protocol"]["ranks"] == 2
    assert two["episode_records"] == one["episode_records"]  # same episodes, whatever the sharding
    assert two["tasks"] == one["tasks"]


def test_eval_bad_input_exits_2(tmp_path: Path) -> None:
    ckpt = save_canonical(tiny_policy(), tmp_path / "ckpt")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "eval.py"), "--checkpoint", str(ckpt), "--suite", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown suite" in proc.stderr
    assert eval_cli.main(["--checkpoint", str(tmp_path / "missing"), "--suite", "synthetic"]) == 2
    assert eval_cli.main(["--checkpoint", str(tmp_path), "--suite", "synthetic"]) == 2  # not a checkpoint
    assert eval_cli.main(["--checkpoint", str(ckpt), "--suite", "synthetic", "--tasks", "0,9"]) == 2
    assert eval_cli.main(["--checkpoint", str(ckpt), "--suite", "synthetic", "--guidance", "x"]) == 2


def test_plot_metrics_writes_png(tmp_path: Path) -> None:
    rows = [
        {"iteration": 1, "rollout/success_rate": 0.2, "train/loss": 1.0},
        {"iteration": 2, "rollout/success_rate": 0.5, "eval/success_rate": 0.4, "sampler/efficiency": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plot.png"
    assert plot_cli.main([str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert plot_cli.main([str(tmp_path / "missing")]) == 2


@pytest.mark.libero
def test_eval_real_libero_one_episode(tmp_path: Path) -> None:
    import libero  # noqa: F401  (the libero extra: a broken install fails, never skips)

    from ript_ds.model.normalization import NormStats

    ckpt = save_canonical(tiny_policy(), tmp_path / "ckpt", NormStats.identity(8, 7))
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(ckpt),
        "--suite",
        "libero_spatial",
        "--tasks",
        "0",
        "--episodes-per-task",
        "1",
    ]
    argv += ["--num-envs", "1", "--max-steps", "10", "--camera-size", "64", "--out", str(out)]
    assert eval_cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    (episode,) = results["episode_records"]
    assert episode["failure_reason"] is None and episode["length"] <= 10
    assert results["suites"]["libero_spatial"]["episodes"] == 1


def test_trainer_heldout_requests_are_the_protocols_episodes_of_those_states():
    """The trainer's periodic held-out eval (context_requests with protocol=True) runs exactly the episodes
    launch/eval.py --first-init-state runs: same init states, same reset seeds, for every task."""
    from ript_ds.env.synthetic import synthetic_tasks
    from ript_ds.eval.runner import context_requests, protocol_requests
    from ript_ds.rl.types import Context

    tasks = synthetic_tasks(2, 50)
    contexts = [Context(t.task_id, i) for t in tasks for i in range(45, 50)]
    trainer = context_requests(contexts, tasks, protocol=True)
    protocol = protocol_requests(tasks, 5, first=45)
    assert [(r.context, r.seed) for r in trainer] == [(r.context, r.seed) for r in protocol]
    assert [r.seed for r in context_requests(contexts, tasks)] == list(range(7, 17))  # by position

"""Evaluate a PI0 checkpoint with the standard LIBERO protocol (DESIGN section 5).

    python launch/eval.py --checkpoint runs/demo/checkpoints/latest_export --suite libero_spatial
    torchrun --nproc_per_node 4 launch/eval.py --checkpoint runs/x/checkpoints --suite libero_10 --videos 6

Protocol: for every task, episodes i = 0 .. N-1 (default N = 50) start from the task's fixed init
state i and reset with seed 7 + i (applied right before that episode's own reset), 10 settle steps,
replanning every 5 actions, the suite's episode cap. Episodes are split over ranks by index and the
results all-gathered, so the numbers do not depend on the number of ranks or envs.

--checkpoint: a canonical / lerobot / openpi-pytorch checkpoint directory, or a DeepSpeed training
checkpoint (a tag directory, or a run's checkpoints folder with a `latest` file), which is first
exported to a temporary directory (LoRA adapters merged into the base weights).

Writes <out>/results.json (per task, per suite, mean, protocol, every episode), <out>/results.md and
<out>/videos/*.mp4. Default <out>: <run>/eval/<tag> for training checkpoints, else <checkpoint>/eval.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90", "synthetic")
SUITE_ALIASES = {s.removeprefix("libero_"): s for s in SUITES if s.startswith("libero_")}
SYNTHETIC_TASKS = 3  # --suite synthetic: tasks 0..2 (red, green, blue)

log = logging.getLogger("ript_ds.eval")


class EvalError(ValueError):
    """Bad input: reported as one line on stderr, exit status 2."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (see above)")
    p.add_argument("--suite", required=True, help=f"one of {', '.join(SUITES)} (libero_ prefix optional)")
    p.add_argument("--tasks", default="all", help="comma-separated task ids (default: every task)")
    p.add_argument("--episodes-per-task", type=int, default=50, help="episodes per task (default 50)")
    p.add_argument("--num-envs", type=int, default=2, help="env worker processes per rank")
    p.add_argument("--guidance", default="1.0", help="CFG weight w, or 'none' for the plain model")
    p.add_argument("--tokenizer", help="PaliGemma tokenizer; default: a tiny one built from the prompts")
    p.add_argument("--camera-size", type=int, default=256, help="LIBERO render size before resize-with-pad")
    p.add_argument("--max-steps", type=int, help="override the suite's episode cap (tests, debugging)")
    p.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="precision (model.pi0.precision); auto: the training run's model.dtype, else float32",
    )
    p.add_argument("--step-timeout", type=float, default=120.0, help="seconds before a silent env is failed")
    p.add_argument("--out", help="output directory (default: see above)")
    p.add_argument("--videos", type=int, default=0, help="mp4s to write, failures and successes alternating")
    p.add_argument("--tag", help="with a checkpoints folder: the tag to evaluate (default: latest)")
    p.add_argument("--base", help="training checkpoints: the run's starting checkpoint (default: its config)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ inputs
def resolve_suite(name: str) -> str:
    suite = SUITE_ALIASES.get(name, name)
    if suite not in SUITES:
        raise EvalError(f"unknown suite {name!r}; valid: {', '.join(SUITES)}")
    return suite


def suite_task_count(suite: str) -> int:
    if suite == "synthetic":
        return SYNTHETIC_TASKS
    from ript_ds.env import libero

    return len(libero.suite_tasks(suite))


def parse_tasks(spec: str, n_tasks: int, suite: str) -> list[int]:
    if spec.strip().lower() in ("", "all"):
        return list(range(n_tasks))
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"--tasks must be comma-separated integers or 'all', got {spec!r}") from None
    bad = [i for i in ids if not 0 <= i < n_tasks]
    if bad or not ids:
        raise EvalError(f"--tasks {spec!r}: {suite} has tasks 0..{n_tasks - 1}")
    if len(set(ids)) != len(ids):
        raise EvalError(f"--tasks {spec!r} repeats a task")
    return ids


def parse_guidance(text: str) -> float | None:
    if text.strip().lower() in ("none", "null", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise EvalError(f"--guidance must be a number or 'none', got {text!r}") from None


def check_args(args: argparse.Namespace) -> None:
    if args.episodes_per_task < 1:
        raise EvalError("--episodes-per-task must be >= 1")
    if args.num_envs < 1:
        raise EvalError("--num-envs must be >= 1")
    if args.videos < 0:
        raise EvalError("--videos must be >= 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise EvalError("--max-steps must be >= 1")
    if args.camera_size < 8:
        raise EvalError("--camera-size must be >= 8")
    if not Path(args.checkpoint).is_dir():
        raise EvalError(f"checkpoint directory {args.checkpoint} does not exist")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise EvalError(f"tokenizer {args.tokenizer} does not exist")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise EvalError("--num-inference-steps must be >= 1")
    from ript_ds.model.weights import CANONICAL_WEIGHTS, CheckpointError, inspect_checkpoint

    weights = Path(args.checkpoint) / CANONICAL_WEIGHTS
    if weights.exists() or weights.with_name(weights.name + ".index.json").exists():
        try:  # headers only: a corrupt or truncated file fails here, before any process group
            inspect_checkpoint(args.checkpoint)
        except CheckpointError as err:
            raise EvalError(f"--checkpoint: {err}") from None


def resolve_checkpoint(
    path: Path, tag: str | None, scratch: Path, base: str | None = None
) -> tuple[Path, Path | None]:
    """-> (a loadable checkpoint directory, the training tag directory it was exported from or None)."""
    from ript_ds.model.weights import CANONICAL_WEIGHTS

    if tag is None and (path / CANONICAL_WEIGHTS).exists():
        return path, None
    from ript_ds.ckpt.export import ExportError, export_training_checkpoint, resolve_tag_dir

    try:
        tag_dir = resolve_tag_dir(path, tag)
    except ExportError:
        raise EvalError(
            f"{path} is neither a PI0 checkpoint ({CANONICAL_WEIGHTS}) nor a DeepSpeed training checkpoint "
            "(a tag directory, or a checkpoints folder with `latest`)"
        ) from None
    out = scratch / "exported"
    try:
        result = export_training_checkpoint(tag_dir, out, base=base, merge=True)
    except ExportError as err:
        raise EvalError(f"exporting {tag_dir}: {err}") from None
    log.info("exported training checkpoint %s to %s (lora: %s)", tag_dir, out, result.lora)
    return out, tag_dir


def resolve_dtype(requested: str, tag_dir: Path | None) -> str:
    """--dtype auto evaluates a training checkpoint with the precision its rollouts used (its run's
    config.yaml beside checkpoints/), so eval and training rollouts see the same numerics."""
    if requested != "auto":
        return requested
    under_run = tag_dir is not None and tag_dir.parent.name == "checkpoints"
    config = tag_dir.parent.parent / "config.yaml" if under_run else None
    if config is not None and config.exists():
        import yaml

        return (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("dtype", "float32")
    return "float32"


def default_out(checkpoint: Path, tag_dir: Path | None) -> Path:
    if tag_dir is None:
        return checkpoint / "eval"
    if tag_dir.parent.name == "checkpoints":
        return tag_dir.parent.parent / "eval" / tag_dir.name
    return tag_dir / "eval"


def build_cfg(args: argparse.Namespace, suite: str, task_ids: list[int], checkpoint: Path, scratch: Path):
    from ript_ds.config import ExperimentCfg

    cfg = ExperimentCfg(output_dir=str(scratch), run_name="eval")  # run_dir holds the tiny tokenizer
    cfg.model = replace(cfg.model, checkpoint=str(checkpoint), tokenizer_path=args.tokenizer)
    if args.num_inference_steps is not None:
        cfg.model = replace(cfg.model, num_inference_steps=args.num_inference_steps)
    cfg.env = replace(
        cfg.env,
        kind="synthetic" if suite == "synthetic" else "libero",
        suite=suite,
        task_ids=task_ids,
        camera_size=args.camera_size,
        max_steps=args.max_steps,
        synthetic_init_states=max(50, args.episodes_per_task),
    )
    cfg.rollout = replace(cfg.rollout, num_envs=args.num_envs, step_timeout_s=args.step_timeout)
    return cfg.validate()


# ------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict:
    import torch

    from ript_ds import evaluation as ev
    from ript_ds.build import build_components
    from ript_ds.config import ConfigError
    from ript_ds.engine import dist
    from ript_ds.env.pool import EnvPool
    from ript_ds.progress import episode_bar
    from ript_ds.rl.rollout import RolloutRequest, collect, make_pi0_policy_fn
    from ript_ds.rl.types import Context
    from ript_ds.rl.video import write_episode_video

    check_args(args)
    suite = resolve_suite(args.suite)
    guidance = parse_guidance(args.guidance)
    try:
        n_tasks = suite_task_count(suite)
    except (ImportError, ValueError) as err:
        raise EvalError(f"suite {suite}: {type(err).__name__}: {err}") from None
    task_ids = parse_tasks(args.tasks, n_tasks, suite)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi:
        dist.init_distributed(backend="gloo")  # results travel as objects; the policy stays per rank
    rank, world = dist.rank(), dist.world_size()
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")

    with tempfile.TemporaryDirectory(prefix=f"ript_eval_r{rank}_") as tmp:
        scratch = Path(tmp)
        checkpoint, tag_dir = resolve_checkpoint(Path(args.checkpoint), args.tag, scratch, args.base)
        out = Path(args.out) if args.out else default_out(Path(args.checkpoint), tag_dir)
        try:
            comp = build_components(build_cfg(args, suite, task_ids, checkpoint, scratch))
        except ConfigError as err:
            raise EvalError(str(err)) from None
        too_few = [t.task_id for t in comp.tasks if t.num_init_states < args.episodes_per_task]
        if too_few:
            raise EvalError(
                f"tasks {too_few} have fewer than {args.episodes_per_task} init states "
                f"({min(t.num_init_states for t in comp.tasks)})"
            )
        policy = comp.policy.to(device).eval()
        dtype = resolve_dtype(args.dtype, tag_dir)
        requests = [
            RolloutRequest(Context(t.task_id, i), t, ev.EVAL_SEED + i)
            for t in comp.tasks
            for i in range(args.episodes_per_task)
        ]
        mine = list(range(len(requests)))[rank::world]
        log.info(
            "eval %s tasks %s: %d episodes (%d on each of %d ranks), %d envs per rank, guidance %s, %s",
            suite,
            task_ids,
            len(requests),
            len(mine),
            world,
            args.num_envs,
            guidance,
            device,
        )
        policy_fn = make_pi0_policy_fn(policy, comp.processor, guidance=guidance, device=device, dtype=dtype)
        start = time.perf_counter()
        bar = episode_bar(len(mine), dist.is_main(), desc="eval")
        with (
            EnvPool(comp.env_factory, args.num_envs, timeout_s=args.step_timeout) as pool,
            bar as on_progress,
        ):
            episodes = collect(policy_fn, pool, [requests[i] for i in mine], on_progress=on_progress).episodes
        seconds = time.perf_counter() - start
        records = [
            ev.EpisodeRecord(
                i,
                suite,
                ep.context.task_id,
                ep.context.init_state_idx,
                ep.seed,
                bool(ep.success),
                int(ep.length),
                ep.failure_reason,
            )
            for i, ep in zip(mine, episodes, strict=True)
        ]
        gathered = dist.all_gather_object((records, seconds), op="eval results")
        all_records = [r for rank_records, _ in gathered for r in rank_records]
        video_dir = out / "videos"
        chosen = set(ev.select_video_indices(all_records, args.videos))  # the same on every rank
        for i, ep in zip(mine, episodes, strict=True):
            if i in chosen and ep.images.shape[0] > 0:
                outcome = "success" if ep.success else "failure"
                name = f"task{ep.context.task_id}_init{ep.context.init_state_idx}_seed{ep.seed}_{outcome}.mp4"
                write_episode_video(ep, video_dir / name)
        info = {(suite, t.task_id): {"name": t.name, "instruction": t.instruction} for t in comp.tasks}
        summary = ev.aggregate(all_records, info)
        summary["protocol"] = {
            "description": (
                "DESIGN section 5: per task, episode i starts from the task's fixed init state i and resets "
                f"with seed {ev.EVAL_SEED} + i right before its own reset; 10 settle steps; replan every "
                "5 actions; episodes split over ranks by index"
            ),
            "suite": suite,
            "task_ids": task_ids,
            "episodes_per_task": args.episodes_per_task,
            "seed": ev.EVAL_SEED,
            "max_steps": {t.task_id: t.max_steps for t in comp.tasks},
            "guidance": guidance,
            "dtype": dtype,
            "num_inference_steps": policy.arch.num_inference_steps,  # what sampled: build.arch_overrides
            "camera_size": args.camera_size if suite != "synthetic" else None,
            "ranks": world,
            "num_envs_per_rank": args.num_envs,
        }
        summary["checkpoint"] = str(Path(args.checkpoint).resolve())
        summary["exported_from"] = str(tag_dir) if tag_dir else None
        summary["rollout_seconds"] = max(s for _, s in gathered)
        summary["episode_records"] = ev.record_dicts(all_records)
        if dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(summary, indent=2))
            title = f"{suite} evaluation of {(tag_dir or Path(args.checkpoint)).name}"
            (out / "results.md").write_text(ev.markdown_table(summary, title))
            log.info("mean success %.3f over %d episodes -> %s", summary["mean"], len(all_records), out)
        dist.barrier("eval done")
    if multi:
        dist.destroy()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from ript_ds.engine.dist import MainRankFilter

    handler = logging.StreamHandler()
    handler.addFilter(MainRankFilter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(asctime)s %(name)s: %(message)s")
    try:
        run(args)
    except EvalError as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

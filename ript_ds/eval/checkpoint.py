"""Evaluate a checkpoint directory with the standard LIBERO protocol (DESIGN section 5): launch/eval.py.

A checkpoint is a canonical / lerobot / openpi-pytorch directory, or a DeepSpeed training checkpoint (a
tag directory, or a run's checkpoints folder with a `latest` file), which is first exported to a
temporary directory (LoRA adapters merged into the base weights). The episodes go through
eval/runner.py, the evaluator the trainer's periodic eval uses too.

Writes <out>/results.json (per task, per suite, mean, protocol, every episode), <out>/results.md and
<out>/videos/*.mp4. Default <out>: <run>/eval/<tag> for training checkpoints, else <checkpoint>/eval.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ript_ds.eval.runner import RollOut

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90", "synthetic")
SUITE_ALIASES = {s.removeprefix("libero_"): s for s in SUITES if s.startswith("libero_")}
SYNTHETIC_TASKS = 3  # --suite synthetic: tasks 0..2 (red, green, blue)
PROTOCOL = (
    "DESIGN section 5: per task, episode i starts from the task's fixed init state i and resets with seed "
    "{seed} + i right before its own reset; 10 settle steps; replan every 5 actions (or the checkpoint's "
    "replan_steps); episodes split over "
    "ranks by index"
)

log = logging.getLogger("ript_ds.eval")


class EvalError(ValueError):
    """Bad input: reported as one line on stderr, exit status 2."""


@dataclass(frozen=True)
class EvalOptions:
    """What launch/eval.py's flags say (see its --help)."""

    checkpoint: str | None  # exactly one of checkpoint and policy_server
    suite: str
    policy_server: str | None = None  # HOST:PORT of an openpi-protocol server to evaluate instead
    image_size: int = 224  # with policy_server: the resolution sent (openpi's client: 224)
    tasks: str = "all"  # comma-separated task ids or "all"
    episodes_per_task: int = 50
    first_init_state: int = 0  # episodes i = first .. first + episodes_per_task - 1 (held-out states)
    seed: int = (
        7  # episode i resets with seed + i: the protocol's 7; another gives new episodes of the same states
    )
    num_envs: int = 2
    guidance: float | None = 1.0  # CFG weight w; None: the plain (unconditioned) model
    tokenizer: str | None = None
    camera_size: int = 256
    max_steps: int | None = None
    num_inference_steps: int | None = None
    replan_steps: int | None = None  # None: the checkpoint's policy convention (a server's metadata), else 5
    dtype: str = "auto"  # auto | float32 | bfloat16
    step_timeout: float = 120.0
    out: str | None = None
    videos: int = 0
    tag: str | None = None
    base: str | None = None


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

    try:
        return len(libero.suite_tasks(suite))
    except (ImportError, ValueError) as err:
        raise EvalError(f"suite {suite}: {type(err).__name__}: {err}") from None


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
        value = float(text)
    except ValueError:
        raise EvalError(f"--guidance must be a number or 'none', got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise EvalError(f"--guidance {text} must be a finite number >= 0, or 'none'")
    return value


def check_options(opts: EvalOptions) -> None:
    """Every input error before any process group or env starts."""
    if (opts.checkpoint is None) == (opts.policy_server is None):
        raise EvalError("give --checkpoint DIR or --policy-server HOST:PORT (exactly one)")
    if opts.policy_server is not None:
        from ript_ds.serving.client import parse_address

        try:
            parse_address(opts.policy_server)
        except ValueError as err:
            raise EvalError(f"--policy-server: {err}") from None
    checks = [
        (opts.episodes_per_task < 1, "--episodes-per-task must be >= 1"),
        (opts.first_init_state < 0, "--first-init-state must be >= 0"),
        (opts.seed < 0, "--seed must be >= 0"),
        (opts.image_size < 8, "--image-size must be >= 8"),
        (opts.num_envs < 1, "--num-envs must be >= 1"),
        (opts.videos < 0, "--videos must be >= 0"),
        (opts.max_steps is not None and opts.max_steps < 1, "--max-steps must be >= 1"),
        (opts.replan_steps is not None and opts.replan_steps < 1, "--replan-steps must be >= 1"),
        (opts.camera_size < 8, "--camera-size must be >= 8"),
        (
            opts.checkpoint and not Path(opts.checkpoint).is_dir(),
            f"checkpoint directory {opts.checkpoint} does not exist",
        ),
        (
            opts.tokenizer is not None and not Path(opts.tokenizer).exists(),
            f"tokenizer {opts.tokenizer} does not exist",
        ),
        (
            opts.num_inference_steps is not None and opts.num_inference_steps < 1,
            "--num-inference-steps must be >= 1",
        ),
        (
            opts.dtype not in ("auto", "float32", "bfloat16"),
            f"--dtype {opts.dtype!r}: auto, float32 or bfloat16",
        ),
    ]
    for bad, message in checks:
        if bad:
            raise EvalError(message)
    from ript_ds.model.weights import CANONICAL_WEIGHTS, CheckpointError, inspect_checkpoint

    weights = Path(opts.checkpoint or "") / CANONICAL_WEIGHTS
    if (opts.checkpoint and weights.exists()) or weights.with_name(weights.name + ".index.json").exists():
        try:  # headers only: a corrupt or truncated file fails here, before any process group
            inspect_checkpoint(opts.checkpoint)
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


def build_cfg(opts: EvalOptions, suite: str, task_ids: list[int], checkpoint: Path | None, scratch: Path):
    from ript_ds.config import ExperimentCfg

    cfg = ExperimentCfg(output_dir=str(scratch), run_name="eval")  # run_dir holds the tiny tokenizer
    checkpoint = None if checkpoint is None else str(checkpoint)
    cfg.model = replace(cfg.model, checkpoint=checkpoint, tokenizer_path=opts.tokenizer)
    if opts.num_inference_steps is not None:
        cfg.model = replace(cfg.model, num_inference_steps=opts.num_inference_steps)
    cfg.env = replace(
        cfg.env,
        kind="synthetic" if suite == "synthetic" else "libero",
        suite=suite,
        task_ids=task_ids,
        camera_size=opts.camera_size,
        max_steps=opts.max_steps,
        synthetic_init_states=max(50, opts.first_init_state + opts.episodes_per_task),
    )
    cfg.rollout = replace(
        cfg.rollout,
        num_envs=opts.num_envs,
        step_timeout_s=opts.step_timeout,
        replan_every=opts.replan_steps,
    )
    return cfg.validate()


# ------------------------------------------------------------------------------------------ run
def evaluate_checkpoint(opts: EvalOptions) -> dict[str, Any]:
    """The protocol on `opts.checkpoint`, split over the launcher's ranks; returns the summary."""
    from ript_ds.engine import dist

    check_options(opts)
    suite = resolve_suite(opts.suite)
    task_ids = parse_tasks(opts.tasks, suite_task_count(suite), suite)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi:
        dist.init_distributed(backend="gloo")  # results travel as objects; the policy stays per rank
    try:
        with tempfile.TemporaryDirectory(prefix=f"ript_eval_r{dist.rank()}_") as tmp:
            run = _evaluate if opts.policy_server is None else _evaluate_server
            summary = run(opts, suite, task_ids, Path(tmp))
            dist.barrier("eval done")
    finally:
        if multi:
            dist.destroy()
    return summary


def _evaluate(opts: EvalOptions, suite: str, task_ids: list[int], scratch: Path) -> dict[str, Any]:
    import torch

    from ript_ds.build import build_components
    from ript_ds.config import ConfigError
    from ript_ds.engine import dist
    from ript_ds.eval import runner

    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    checkpoint, tag_dir = resolve_checkpoint(Path(opts.checkpoint), opts.tag, scratch, opts.base)
    out = Path(opts.out) if opts.out else default_out(Path(opts.checkpoint), tag_dir)
    try:
        comp = build_components(build_cfg(opts, suite, task_ids, checkpoint, scratch))
    except ConfigError as err:
        raise EvalError(str(err)) from None
    check_init_states(comp.tasks, opts.episodes_per_task, opts.first_init_state)
    policy = comp.policy.to(device).eval()
    dtype = resolve_dtype(opts.dtype, tag_dir)
    requests = runner.protocol_requests(comp.tasks, opts.episodes_per_task, opts.seed, opts.first_init_state)
    setting = f"{dist.world_size()} ranks x {opts.num_envs} envs, guidance {opts.guidance}, {dtype}"
    # the device comes last: tools/gpu_smoke.py reads it from this line
    log.info("eval %s tasks %s: %d episodes, %s, %s", suite, task_ids, len(requests), setting, device)
    roll_out = _roll_out(policy, comp, opts, device, dtype)
    result = runner.run_episodes(roll_out, requests, suite, comp.tasks)
    runner.write_videos(result, out / "videos", opts.videos)
    result.summary["protocol"] = _protocol(opts, suite, task_ids, comp.tasks) | {
        "guidance": opts.guidance,
        "dtype": dtype,
        "num_inference_steps": policy.arch.num_inference_steps,  # what sampled: build.arch_overrides
        "replan_steps": comp.replan_every,
    }
    result.summary["policy"] = {"kind": "checkpoint", "checkpoint": str(Path(opts.checkpoint).resolve())}
    result.summary["checkpoint"] = str(Path(opts.checkpoint).resolve())
    result.summary["exported_from"] = str(tag_dir) if tag_dir else None
    runner.write_results(result, out, f"{suite} evaluation of {(tag_dir or Path(opts.checkpoint)).name}")
    return result.summary


def check_init_states(tasks, episodes_per_task: int, first: int = 0) -> None:
    """Episode i starts from init state i: a task needs init states up to first + episodes_per_task."""
    need = first + episodes_per_task
    too_few = [t.task_id for t in tasks if t.num_init_states < need]
    if too_few:
        hint = "lower --episodes-per-task" + (" or --first-init-state" if first else "")
        raise EvalError(
            f"tasks {too_few} have fewer than {need} init states "
            f"({min(t.num_init_states for t in tasks)}); {hint}"
        )


def _protocol(opts: EvalOptions, suite: str, task_ids: list[int], tasks) -> dict[str, Any]:
    from ript_ds.engine import dist

    return {
        "description": PROTOCOL.format(seed=opts.seed),
        "suite": suite,
        "task_ids": task_ids,
        "episodes_per_task": opts.episodes_per_task,
        "first_init_state": opts.first_init_state,
        "seed": opts.seed,
        "max_steps": {t.task_id: t.max_steps for t in tasks},
        "camera_size": opts.camera_size if suite != "synthetic" else None,
        "ranks": dist.world_size(),
        "num_envs_per_rank": opts.num_envs,
    }


def _evaluate_server(opts: EvalOptions, suite: str, task_ids: list[int], scratch: Path) -> dict[str, Any]:
    """The same protocol with the actions of an openpi-protocol server (ours or openpi's serve_policy.py)."""
    from ript_ds.build import build_env_factory, build_tasks
    from ript_ds.config import ConfigError
    from ript_ds.env.pool import EnvPool
    from ript_ds.eval import runner
    from ript_ds.eval.remote import remote_policy_fn
    from ript_ds.rl.rollout import collect
    from ript_ds.serving.client import RemotePolicy, ServerError, parse_address

    if suite == "synthetic":
        raise EvalError(
            "--policy-server evaluates LIBERO suites (a server's policy expects LIBERO observations)"
        )
    cfg = build_cfg(opts, suite, task_ids, None, scratch)
    try:
        tasks, factory = build_tasks(cfg), build_env_factory(cfg, image_size=opts.image_size)
    except ConfigError as err:
        raise EvalError(str(err)) from None
    check_init_states(tasks, opts.episodes_per_task, opts.first_init_state)
    host, port = parse_address(opts.policy_server)
    clients: list[RemotePolicy] = []
    try:
        clients += [RemotePolicy(host, port) for _ in range(opts.num_envs)]
        replan = server_replan_steps(opts.replan_steps, clients[0].metadata)
        policy_fn = remote_policy_fn(clients, replan)

        def roll_out(requests):
            with EnvPool(factory, opts.num_envs, timeout_s=opts.step_timeout) as pool:
                return collect(policy_fn, pool, requests, replan).episodes

        result = runner.run_episodes(
            roll_out,
            runner.protocol_requests(tasks, opts.episodes_per_task, opts.seed, opts.first_init_state),
            suite,
            tasks,
        )
    except ServerError as err:  # unreachable, not a policy server, or it failed a request mid-run
        raise EvalError(str(err)) from None
    finally:
        for client in clients:
            client.close()
    out = Path(opts.out) if opts.out else Path("eval_server") / f"{host}_{port}"
    runner.write_videos(result, out / "videos", opts.videos)
    result.summary["protocol"] = _protocol(opts, suite, task_ids, tasks) | {
        "image_size": opts.image_size,
        "replan_steps": replan,
    }
    result.summary["policy"] = {
        "kind": "policy_server",
        "address": f"{host}:{port}",
        "metadata": clients[0].metadata,
    }
    result.summary["checkpoint"] = None
    runner.write_results(result, out, f"{suite} evaluation of the policy server at {host}:{port}")
    return result.summary


def server_replan_steps(replan_steps: int | None, metadata: dict) -> int:
    """--replan-steps, else the convention a ript-ds server sends in its metadata, else openpi's client's 5."""
    from ript_ds.build import DEFAULT_REPLAN_STEPS

    if replan_steps is not None:
        return replan_steps
    served = (metadata.get("policy") or {}).get("replan_steps") if isinstance(metadata, dict) else None
    return served if isinstance(served, int) and served >= 1 else DEFAULT_REPLAN_STEPS


def _roll_out(policy, comp, opts: EvalOptions, device, dtype: str) -> RollOut:
    """Episodes on `opts.num_envs` env worker processes, with a progress bar on rank 0."""
    from ript_ds.engine import dist
    from ript_ds.env.pool import EnvPool
    from ript_ds.progress import episode_bar
    from ript_ds.rl.rollout import collect, make_pi0_policy_fn

    policy_fn = make_pi0_policy_fn(policy, comp.processor, guidance=opts.guidance, device=device, dtype=dtype)

    def roll_out(requests):
        bar = episode_bar(len(requests), dist.is_main(), desc="eval")
        with (
            EnvPool(comp.env_factory, opts.num_envs, timeout_s=opts.step_timeout) as pool,
            bar as on_progress,
        ):
            return collect(policy_fn, pool, requests, comp.replan_every, on_progress=on_progress).episodes

    return roll_out

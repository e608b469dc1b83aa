"""RIPT on real LIBERO on this CPU (`make bench-libero`): scripted demonstrator -> BC warm start -> RIPT.

1. The scripted demonstrator's success over the task's 50 fixed init states (noise 0 and the demo noise).
2. Demos from the 25 training init states, a tiny PI0 behaviour-cloned on them (ript_ds/libero_bc.py).
3. launch/eval.py's protocol on the 25 held-out init states (25-49) for the BC checkpoint.
4. RIPT through launch/train.py (torchrun, 1 rank, DeepSpeed ZeRO-2, 2 env worker processes) with
   launch/configs/libero_goal_bc_cpu.yaml and, with --demo-windows N > 0, N windows of the BC demos in
   every update (ript.demos); the trainer's periodic held-out eval (launch/eval.py's episodes of the
   held-out states) gives the curve.
5. With demos, the control: the same updates (config, lr, demo draws) on the demo windows alone, no
   rollouts, from the same warm start: what the demos add by themselves, without RL.
6. launch/eval.py again on the last checkpoint (and the control's); a table, the curve (PNG) and the
   commands go to docs/benchmarks.md. Every stage reuses its result in --out when it exists.

    python tools/bench/libero_ript.py --iterations 12 --demo-windows 320 --seeds 7,107,207,307
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from report import BENCHMARKS, write_section

from ript_ds.build import build_components
from ript_ds.config import load_config
from ript_ds.eval.stats import wilson_interval
from ript_ds.libero_bc import (
    LiberoSetup,
    collect_demos,
    demonstrator_success,
    train_warm_start,
)
from ript_ds.model.weights import save_canonical
from ript_ds.rl.demos import load_demo_pool, load_episodes, save_episodes
from ript_ds.rl.update import TorchBackend, run_update, update_seed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launch/configs/libero_goal_bc_cpu.yaml"
log = logging.getLogger("libero_ript")


def cached_json(path: Path, make) -> dict:
    if not path.exists():
        path.write_text(json.dumps(make(), indent=1))
    return json.loads(path.read_text())


def demonstrator(setup: LiberoSetup, out: Path) -> dict:
    def measure() -> dict:
        rows = {}
        for noise in sorted({0.0, setup.demo_noise}):
            start = time.perf_counter()
            ok, steps = demonstrator_success(setup, noise)
            rows[str(noise)] = {"success": ok, "steps": steps, "seconds": time.perf_counter() - start}
        return rows

    return cached_json(out / "demonstrator.json", measure)


def warm_start(setup: LiberoSetup, out: Path) -> dict:
    ckpt, demos_path = out / "bc", out / "demos.npz"

    def build() -> dict:
        # Collection time is cached beside the demos: a rerun that only retrains BC reports it too.
        collected = cached_json(out / "demos_seconds.json", lambda: collect(demos_path))
        demos = load_episodes(demos_path)
        start = time.perf_counter()
        warm = train_warm_start(ckpt, setup, demos)
        return {
            "demos": warm.demos,
            "demo_success": warm.demo_success,
            "demo_steps": int(sum(ep.length for ep in demos)),
            "demo_seconds": collected["seconds"],
            "bc_seconds": time.perf_counter() - start,
            "bc_loss": [warm.bc_losses[0], warm.bc_losses[-1]],
        }

    def collect(path: Path) -> dict:
        start = time.perf_counter()
        save_episodes(collect_demos(setup), path)
        return {"seconds": time.perf_counter() - start}

    return cached_json(out / "warm_start.json", build)


PROTOCOL_SEED = 7  # launch/eval.py's default: the trainer's held-out eval runs these same episodes


def eval_args(setup: LiberoSetup, checkpoint: Path, out: Path, seed: int = PROTOCOL_SEED) -> list[str]:
    first = setup.heldout_states(setup.task())[0]
    return [
        sys.executable, "launch/eval.py", "--checkpoint", str(checkpoint), "--suite", setup.suite,
        "--tasks", str(setup.task_id), "--first-init-state", str(first), "--seed", str(seed),
        "--episodes-per-task", str(setup.heldout_init_states), "--camera-size", str(setup.camera_size),
        "--max-steps", str(setup.max_steps), "--num-envs", str(setup.workers), "--out", str(out),
        "--videos", "4",
    ]  # fmt: skip


def seed_out(out: Path, seed: int) -> Path:
    return out if seed == PROTOCOL_SEED else out.with_name(f"{out.name}_seed{seed}")


def run(cmd: list[str]) -> float:
    log.info("$ %s", " ".join(cmd))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:  # its own error is above; a traceback of this script would add nothing
        sys.exit(f"libero_ript: exit code {done.returncode} from: {' '.join(cmd)}")
    return time.perf_counter() - start


def evaluate(setup: LiberoSetup, checkpoint: Path, out: Path, seeds: list[int]) -> dict:
    """launch/eval.py on the held-out states once per reset-seed base (each: one episode per state), pooled:
    rate, Wilson interval and episodes over all of them, plus each base's rate."""
    rates, k, n = [], 0, 0
    for seed in seeds:
        path = seed_out(out, seed)
        if not (path / "results.json").exists():
            run(eval_args(setup, checkpoint, path, seed))
        overall = json.loads((path / "results.json").read_text())["overall"]
        rates.append(overall["rate"])
        k, n = k + overall["successes"], n + overall["episodes"]
    return {"rate": k / n, "ci95": list(wilson_interval(k, n)), "episodes": n, "per_seed": rates}


def run_overrides(setup: LiberoSetup, out: Path, iterations: int, demo_windows: int, extra: list[str]):
    """The RIPT run's config overrides (also the control's): the warm start, sizes, the demos."""
    demos = [f"ript.demos={out / 'demos.npz'}", f"ript.demo_windows={demo_windows}"] if demo_windows else []
    return [
        f"model.checkpoint={out / 'bc'}", f"output_dir={out}", "run_name=ript",
        f"train.iterations={iterations}", f"env.num_eval_init_states={setup.heldout_init_states}",
        f"env.max_steps={setup.max_steps}", f"env.camera_size={setup.camera_size}", *demos, *extra,
    ]  # fmt: skip


def train_args(overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "launch/train.py",
        "--deepspeed", "ds_configs/zero2.json", "--config", str(CONFIG.relative_to(ROOT)), *overrides,
    ]  # fmt: skip


def demo_only_control(overrides: list[str], ckpt: Path) -> dict:
    """The RIPT run's updates without its rollouts: from the same warm start, the same config and the same
    per-iteration demo draws (update seeds), through the same run_update, on the demo windows alone. AdamW
    in this process (TorchBackend) stands in for the engine's, at the same lr, clipping and weight decay."""
    if (ckpt / "control.json").exists():
        return json.loads((ckpt / "control.json").read_text())
    cfg = load_config(CONFIG, overrides)
    comp = build_components(cfg)
    pool = load_demo_pool(cfg, comp.policy.arch)
    t = cfg.train
    backend = TorchBackend(comp.policy, lr=t.lr, grad_clip=t.grad_clip, weight_decay=t.weight_decay)
    comp.policy.train()
    losses = []
    for it in range(1, t.iterations + 1):  # the trainer's update of iteration `it` uses update_seed(seed, it)
        seed = update_seed(t.seed, it)
        windows = pool.draw(cfg.ript.demo_windows, seed)
        stats = run_update(
            backend, comp.policy.arch, comp.processor, windows, comp.prompts, cfg.ript, t, seed
        )
        losses.append(stats.loss)
    comp.policy.eval()
    save_canonical(comp.policy, ckpt, comp.processor.norm_stats)
    shutil.copyfile(Path(comp.processor.tokenizer.path), ckpt / Path(comp.processor.tokenizer.path).name)
    result = {"iterations": t.iterations, "demo_windows": pool.size(cfg.ript.demo_windows), "loss": losses}
    (ckpt / "control.json").write_text(json.dumps(result, indent=1))
    return result


def curve_table(rows: list[dict]) -> str:
    lines = [
        "| iteration | held-out success [95% CI] | rollout success | kept / sampled groups | dropped all-success / all-fail | train/loss | rollout + update s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ev = ""
        if "eval/success_rate" in r:
            ev = f"{r['eval/success_rate']:.2f} [{r['eval/ci95_low']:.2f}, {r['eval/ci95_high']:.2f}]"
        if "rollout/success_rate" not in r and not ev:
            continue
        lines.append(
            f"| {r['iteration']} | {ev} | {r.get('rollout/success_rate', float('nan')):.2f} "
            f"| {r.get('sampler/groups_kept', 0):.0f} / {r.get('sampler/groups_sampled', 0):.0f} "
            f"| {r.get('sampler/dropped_all_success', 0):.0f} / {r.get('sampler/dropped_all_fail', 0):.0f} "
            f"| {r.get('train/loss', float('nan')):.3f} "
            f"| {r.get('time/rollout_s', float('nan')):.0f} + {r.get('time/update_s', float('nan')):.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], bc: dict, final: dict, path: Path, control: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bar(ax, x, rate, low, high, **kw) -> None:
        err = [
            [r - lo for r, lo in zip(rate, low, strict=True)],
            [h - r for r, h in zip(rate, high, strict=True)],
        ]
        ax.errorbar(x, rate, yerr=err, capsize=3, **kw)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ev = [r for r in rows if "eval/success_rate" in r]
    if ev:
        cols = ("iteration", "eval/success_rate", "eval/ci95_low", "eval/ci95_high")
        bar(ax, *([r[c] for r in ev] for c in cols), marker="o", label="held-out (trainer eval, 25 episodes)")
    ro = [(r["iteration"], r["rollout/success_rate"]) for r in rows if "rollout/success_rate" in r]
    if ro:
        ax.plot(*zip(*ro, strict=True), alpha=0.6, label="training rollouts (training init states)")
    last = max((r["iteration"] for r in rows), default=0)
    pooled = f"launch/eval.py, {bc['episodes']} episodes"
    points = [(0, bc, f"{pooled}: BC"), (last, final, f"{pooled}: after RIPT")]
    if control is not None:  # beside the RIPT point, not on it
        points.append((last + 0.3, control, f"{pooled}: demo-only control"))
    for x, res, name in points:
        bar(ax, [x], [res["rate"]], [res["ci95"][0]], [res["ci95"][1]], fmt="s", label=name)
    ax.set(xlabel="RIPT iteration", ylabel="success rate", ylim=(0, 1), title="libero_goal 8, tiny PI0, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def rate_line(name: str, res: dict) -> str:
    lo, hi = res["ci95"]
    per_seed = ", ".join(f"{r:.2f}" for r in res["per_seed"])
    return f"| {name} | {res['rate']:.2f} [{lo:.2f}, {hi:.2f}] | {res['episodes']} | {per_seed} |"


def demonstrator_table(demo: dict) -> str:
    lines = [
        "| demonstrator noise | success, 50 init states [95% CI] | mean steps | s |",
        "|---|---|---|---|",
    ]
    for noise, r in demo.items():
        k, n = sum(r["success"]), len(r["success"])
        lo, hi = wilson_interval(k, n)
        steps = sum(r["steps"]) / n
        lines.append(f"| {noise} | {k / n:.2f} [{lo:.2f}, {hi:.2f}] | {steps:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def report(
    setup, demo: dict, warm: dict, bc: dict, final: dict, rows: list[dict], train_s: float, cmds, control
) -> str:
    last = rows[-1]["iteration"] if rows else 0
    control_row = ""
    if control is not None:
        name = (
            f"control: {control['iterations']} updates on {control['demo_windows']} demo windows, no rollouts"
        )
        control_row = "\n" + rate_line(name, control)
    states = setup.train_states(setup.task())
    train_states = f"{states[0]}-{states[-1]}"
    parts = [
        demonstrator_table(demo),
        f"Demos: {warm['demos']} from init states {train_states} at noise {setup.demo_noise} "
        f"({warm['demo_success']:.2f} successful; only those are cloned), {warm['demo_seconds']:.0f} s. "
        f"BC: {setup.bc_steps} steps, loss {warm['bc_loss'][0]:.3f} -> {warm['bc_loss'][1]:.3f}, "
        f"{warm['bc_seconds']:.0f} s.",
        "| policy (launch/eval.py, held-out init states) | success, all episodes [95% CI] | episodes "
        "| per reset-seed base |\n|---|---|---|---|\n"
        + rate_line("BC warm start", bc)
        + "\n"
        + rate_line(f"after RIPT ({last} iterations)", final)
        + control_row,
        f"RIPT wall time {train_s / 60:.0f} min. Per iteration (eval = the trainer's held-out eval):",
        curve_table(rows),
        "![RIPT on LIBERO](libero_ript.png)",
        "Commands:\n\n" + "\n".join(f"    {c}" for c in cmds),
    ]
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument(
        "--demo-windows", type=int, default=320, help="BC demo windows in every update (ript.demos); 0 = none"
    )
    p.add_argument(
        "--seeds",
        default="7,107,207,307",
        help="launch/eval.py --seed bases for the held-out evaluations (7: the trainer's episodes); pooled",
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "libero_ript")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra launch/train.py overrides, e.g. train.lr=1e-4")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    setup = LiberoSetup()
    args.out.mkdir(parents=True, exist_ok=True)
    demo = demonstrator(setup, args.out)
    warm = warm_start(setup, args.out)
    seeds = [int(x) for x in args.seeds.split(",")]
    checkpoints = {"bc": args.out / "bc", "final": args.out / "ript" / "checkpoints"}
    bc = evaluate(setup, checkpoints["bc"], args.out / "eval_bc", seeds)
    overrides = run_overrides(setup, args.out, args.iterations, args.demo_windows, args.overrides)
    control = None
    if args.demo_windows:
        info = demo_only_control(overrides, args.out / "control")
        checkpoints["control"] = args.out / "control"
        control = info | evaluate(setup, checkpoints["control"], args.out / "eval_control", seeds)
    train = train_args(overrides)
    metrics = args.out / "ript" / "metrics.jsonl"
    # Cached on its end, not on metrics.jsonl (written from iteration 0): an interrupted run resumes.
    train_s = cached_json(args.out / "train_seconds.json", lambda: {"seconds": run(train)})["seconds"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    final = evaluate(setup, checkpoints["final"], args.out / "eval_final", seeds)
    cmds = [" ".join(train)]
    for name, ckpt in checkpoints.items():
        cmds += [" ".join(eval_args(setup, ckpt, seed_out(args.out / f"eval_{name}", s), s)) for s in seeds]
    cmds = [c.replace(sys.executable, "python").replace(str(ROOT) + "/", "") for c in cmds]
    body = report(setup, demo, warm, bc, final, rows, train_s, cmds, control)
    print(body)
    if not args.no_write:
        plot(rows, bc, final, BENCHMARKS.parent / "libero_ript.png", control)
        write_section("libero_ript", "RIPT on real LIBERO (CPU, tiny PI0 from scripted demos)", body)


if __name__ == "__main__":
    main()

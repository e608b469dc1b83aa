"""Rollout throughput: EnvPool + tiny PI0 against raw LIBERO stepping and a one-env-at-a-time loop.

For every (LP_NUM_THREADS, workers) configuration one pool runs two `collect()` passes of one episode
per worker, each episode capped at `--steps` env steps:

- raw: a policy_fn that returns zero actions (no model), chunks of `replan_every` per pool round trip
  -- the limit the pool can reach with this rendering;
- pool: the tiny PI0 (batched, one call per replanning step for all workers), same chunks.

Timing excludes env creation and reset+settle: it starts at the first policy call of a pass, which
`collect()` makes only after every slot's reset reply has arrived, and ends when `collect()` returns
(every step of the pass lies in between). The sequential baseline (b) is one LiberoEnv in the driver
process (llvmpipe with its default threads), one unbatched policy call per replanning step, over the
same number of episodes and steps as the pool rows; its resets are excluded too.

Defaults are sized for a CPU: camera 128 px (render), model image 64 px, 2 denoising steps, a real
LIBERO task (libero_spatial 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np
import psutil
import torch
from report import write_section

from ript_ds.env.base import Observation
from ript_ds.env.libero import CAMERAS, LiberoEnv, configure_rendering, get_task
from ript_ds.env.pool import EnvFactory, EnvPool
from ript_ds.model.arch import PI0Arch
from ript_ds.model.normalization import NormStats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.rollout import NoiseKey, RolloutRequest, collect, make_pi0_policy_fn
from ript_ds.rl.types import Context


def tiny_policy(image_size: int, seed: int = 0) -> PI0Policy:
    """As tests/conftest.tiny_policy: a tiny PI0 with non-degenerate random weights."""
    torch.manual_seed(seed)
    return randomized(PI0Policy(PI0Arch.tiny(image_size=image_size)), seed)


def randomized(policy: PI0Policy, seed: int = 0) -> PI0Policy:
    """Non-degenerate random weights everywhere but the condition embedding, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(policy.named_parameters()):
            if name != "cond_embed.weight":
                scale = 0.2 if p.ndim == 1 else 1.0 / max(p.shape[-1], 1) ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return policy.eval()


class Timed:
    """Wraps a policy_fn: total seconds inside it, and when it was first called."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls, self.first = fn, 0.0, 0, None

    def __call__(self, observations, tasks, keys):
        start = time.perf_counter()
        if self.first is None:
            self.first = start
        out = self.fn(observations, tasks, keys)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@dataclasses.dataclass
class Pass:
    steps: int
    seconds: float  # first policy call -> end of collect (no creation, no reset)
    policy_s: float  # inside policy_fn

    @property
    def rate(self) -> float:
        return self.steps / self.seconds


def run_pass(policy_fn, pool: EnvPool, task, args, seed: int) -> Pass:
    timed = Timed(policy_fn)
    requests = [RolloutRequest(Context(task.task_id, i), task, seed + i) for i in range(pool.num_workers)]
    result = collect(timed, pool, requests, replan_every=args.replan_every)
    end = time.perf_counter()
    if result.stats.failures:
        raise RuntimeError(f"{result.stats.failures} episodes failed: {result.episodes}")
    return Pass(result.stats.env_steps, end - timed.first, timed.seconds)


def zero_policy(observations, tasks, keys) -> np.ndarray:
    actions = np.zeros((len(keys), 8, 7), np.float32)
    actions[..., 6] = -1.0  # gripper open, like LIBERO's settle action
    return actions


def bench_pool(lp_threads: str, workers: int, pi0_fn, task, args) -> dict:
    saved = os.environ.get("LP_NUM_THREADS")
    os.environ["LP_NUM_THREADS"] = lp_threads  # spawned workers inherit the driver's environment
    env_kwargs = {"camera_size": args.camera_size, "model_image_size": args.image_size, "settle_steps": 2}
    factory = EnvFactory("libero", env_kwargs)
    try:
        start = time.perf_counter()
        with EnvPool(factory, num_workers=workers, timeout_s=300) as pool:
            raw = run_pass(zero_policy, pool, task, args, seed=100)  # the first pass also creates the envs
            setup = time.perf_counter() - start - raw.seconds
            procs = [psutil.Process(pid) for pid in pool.pids()]
            rss = [p.memory_info().rss / 2**30 for p in procs]
            threads = [p.num_threads() for p in procs]  # shows the LP_NUM_THREADS the renderer got
            rollout = run_pass(pi0_fn, pool, task, args, seed=200)
    finally:
        if saved is None:
            os.environ.pop("LP_NUM_THREADS", None)
        else:
            os.environ["LP_NUM_THREADS"] = saved
    row = {
        "lp": lp_threads,
        "workers": workers,
        "raw": raw,
        "pool": rollout,
        "rss": rss,
        "setup": setup,
        "threads": threads,
    }
    print(
        f"LP_NUM_THREADS={row['lp']} workers={workers}: raw {raw.rate:.2f} steps/s, pool {rollout.rate:.2f} "
        f"steps/s (policy {rollout.policy_s:.2f} s of {rollout.seconds:.2f} s), RSS {rss}, threads {threads}, setup {setup:.1f} s",
        flush=True,
    )
    return row


def bench_sequential(pi0_fn, task, args, episodes: int) -> dict:
    """(b): one env in this process, one unbatched policy call per replanning step, episode after episode."""
    env = LiberoEnv(task, camera_size=args.camera_size, model_image_size=args.image_size, settle_steps=2)
    steps, seconds, policy_s, env_s = 0, 0.0, 0.0, 0.0
    for e in range(episodes):
        obs = env.reset(e, seed=300 + e)
        done, replan = False, 0
        start = time.perf_counter()
        while not done:
            t0 = time.perf_counter()
            key = NoiseKey(300 + e, Context(task.task_id, e), replan)
            chunk = pi0_fn([obs], [task], [key])[0][: args.replan_every]
            t1 = time.perf_counter()
            policy_s += t1 - t0
            for i, action in enumerate(chunk):
                # Rendered only where the policy looks next, as the pool does (env/pool.run_actions).
                result = env.step(action, observe=i == len(chunk) - 1)
                steps += 1
                obs, done = result.obs, result.done
                if done:
                    break
            env_s += time.perf_counter() - t1
            replan += 1
        seconds += time.perf_counter() - start

    # One env step split into physics (the MuJoCo substeps) and rendering (both cameras).
    full, physics, render = [], [], []
    env.reset(0, seed=400)  # a hard reset: it rebuilds the sim, so look it up afterwards
    inner = env.libero_env.env  # the robosuite env inside LIBERO's OffScreenRenderEnv
    sim, substeps = inner.sim, int(inner.control_timestep / inner.model_timestep)
    for _ in range(args.breakdown_steps):
        t0 = time.perf_counter()
        env.step(zero_policy([None], None, [None])[0, 0])
        t1 = time.perf_counter()
        for _ in range(substeps):
            sim.forward()
            sim.step()
        t2 = time.perf_counter()
        for cam in CAMERAS:
            sim.render(width=args.camera_size, height=args.camera_size, camera_name=cam)
        t3 = time.perf_counter()
        full.append(t1 - t0)
        physics.append(t2 - t1)
        render.append(t3 - t2)
    env.close()
    med = statistics.median
    return {
        "steps": steps,
        "seconds": seconds,
        "policy_s": policy_s,
        "env_s": env_s,
        "full": med(full),
        "physics": med(physics),
        "render": med(render),
        "substeps": substeps,
        "rss": psutil.Process().memory_info().rss / 2**30,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--task-id", type=int, default=0)
    parser.add_argument("--camera-size", type=int, default=128, help="render resolution (openpi uses 256)")
    parser.add_argument("--image-size", type=int, default=64, help="model image size (real PI0: 224)")
    parser.add_argument("--steps", type=int, default=25, help="env steps per episode (= per worker per pass)")
    parser.add_argument("--replan-every", type=int, default=5)
    parser.add_argument("--denoise-steps", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--main-workers", type=int, default=None, help="pool size of the headline (default: cores)"
    )
    parser.add_argument("--breakdown-steps", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    args.main_workers = args.main_workers or min(os.cpu_count() or 1, max(args.workers))
    if args.main_workers not in args.workers:
        args.workers = sorted({*args.workers, args.main_workers})
    return args


def report(args: argparse.Namespace, task, backend: str, rows: list[dict], seq: dict, lp_default: str) -> str:
    """The markdown section: the table of passes, the headline and one env step's breakdown."""
    main_workers = args.main_workers
    seq_rate = seq["steps"] / seq["seconds"]
    at_main = {r["lp"]: r for r in rows if r["workers"] == main_workers}
    best_lp = "1"  # the candidate per-worker default; the LP_NUM_THREADS=cores rows are the alternative
    head = at_main[best_lp]
    lines = [
        f"Task {args.suite} {args.task_id} ({task.instruction!r}), MUJOCO_GL={backend} (llvmpipe, no GPU); "
        f"camera {args.camera_size} px x {len(CAMERAS)} cameras, model images {args.image_size} px "
        f"(CPU-sized defaults; openpi uses 256 / 224); tiny PI0 (tests' `PI0Arch.tiny`), "
        f"{args.denoise_steps} denoising steps, 1 torch thread, chunk of {args.replan_every} actions per pool "
        f"round trip; {args.steps} env steps per worker per pass (one episode each). Times exclude env creation "
        "and reset+settle (2 settle steps instead of 10, to shorten the untimed part). Absolute rates depend on "
        "machine load; each ratio compares passes of the same run.",
        "",
        "| LP_NUM_THREADS | workers | (a) raw steps/s | pool + tiny PI0 steps/s | pool / raw | policy share "
        "| RSS per worker (GiB) | threads per worker | creation + reset (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        raw, pool = r["raw"], r["pool"]
        rss = ", ".join(f"{x:.2f}" for x in r["rss"])
        lines.append(
            f"| {r['lp']} | {r['workers']} | {raw.rate:.2f} | {pool.rate:.2f} | {pool.rate / raw.rate:.2f} "
            f"| {pool.policy_s / pool.seconds:.1%} | {rss} | {max(r['threads'])} | {r['setup']:.1f} |"
        )
    lines += [
        f"| {lp_default} | (b) 1 env in the driver, unbatched policy | - | {seq_rate:.2f} | - "
        f"| {seq['policy_s'] / seq['seconds']:.1%} | {seq['rss']:.2f} (driver incl. model) | - | - |",
        "",
        f"**Headline ({main_workers} workers, LP_NUM_THREADS={best_lp}): pool {head['pool'].rate:.2f} steps/s = "
        f"{head['pool'].rate / head['raw'].rate:.2f}x of raw stepping (target >= 0.9x) and "
        f"{head['pool'].rate / seq_rate:.2f}x of the one-env-at-a-time loop (target >= 1x).**",
        "",
        f"One env step ({args.camera_size} px, in-process, LP_NUM_THREADS {lp_default}), median of {args.breakdown_steps}: "
        f"full LiberoEnv.step {seq['full'] * 1e3:.0f} ms; physics ({seq['substeps']} MuJoCo substeps) "
        f"{seq['physics'] * 1e3:.0f} ms; rendering both cameras {seq['render'] * 1e3:.0f} ms; the rest "
        f"(controller, observables, image adapter) ~{max(0.0, seq['full'] - seq['physics'] - seq['render']) * 1e3:.0f} ms. "
        f"Policy (tiny PI0, batch of {main_workers}): {head['pool'].policy_s / head['pool'].seconds:.1%} of "
        f"the pool pass; in (b) the batch-1 calls took {seq['policy_s']:.2f} s of {seq['seconds']:.2f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    main_workers = args.main_workers
    backend = configure_rendering()  # probe once here; workers inherit MUJOCO_GL
    # One torch thread: the tiny model gains nothing from more, and OpenMP's spin-waiting threads stall
    # (seconds per call, measured) when other processes hold the cores.
    torch.set_num_threads(1)
    task = dataclasses.replace(get_task(args.suite, args.task_id), max_steps=args.steps)
    policy = tiny_policy(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok = PromptTokenizer(build_tiny_tokenizer(tmp, [task.instruction]), max_length=32)
    proc = Processor(tok, NormStats.identity(8, 7), action_dim=7)
    pi0 = make_pi0_policy_fn(policy, proc, device="cpu", num_steps=args.denoise_steps, guidance=None)

    def pi0_fn(observations, tasks, keys):
        return pi0(observations, tasks, keys) * 0.05  # small, finite arm motions

    dummy = Observation(np.zeros((len(CAMERAS), args.image_size, args.image_size, 3), np.uint8), np.zeros(8))
    for n in sorted({1, *args.workers}):  # warm torch up for every batch size used
        pi0_fn([dummy] * n, [task] * n, [NoiseKey(0, Context(task.task_id, 0), 0)] * n)
    # llvmpipe's own default is one render thread per core; set explicitly so a worker default can't hide it.
    lp_default = str(os.cpu_count() or 1)
    rows = [bench_pool(lp, n, pi0_fn, task, args) for lp in ("1", lp_default) for n in args.workers]
    seq = bench_sequential(pi0_fn, task, args, episodes=main_workers)
    print(f"sequential: {seq}", flush=True)

    body = report(args, task, backend, rows, seq, lp_default)
    print(body)
    if not args.no_write:
        write_section(
            "rollout_throughput", "Rollout throughput: EnvPool vs raw LIBERO vs one env at a time", body
        )


if __name__ == "__main__":
    main()

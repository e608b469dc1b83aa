"""In-process synthetic envs (rollout.in_process, env/inline.py) vs env worker processes (env/pool.py):
one rollout phase of the behaviour-cloned tiny PI0, 200 episodes, the same requests, after a warm-up.

    python tools/bench/inline_pool.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from report import write_section

from ript_ds.env.inline import InlinePool
from ript_ds.env.pool import EnvFactory, EnvPool
from ript_ds.model.weights import load_checkpoint
from ript_ds.rl.rollout import RolloutRequest, collect, make_pi0_policy_fn
from ript_ds.rl.types import Context
from ript_ds.synthetic.bc import build_synthetic_setup
from ript_ds.synthetic.learning import prepare_warm_start

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    torch.set_num_threads(1)
    warm = prepare_warm_start(ROOT / "runs" / "learning_curve" / "warm_start", seed=0)
    setup = warm.setup
    _, processor, tasks = build_synthetic_setup(0, setup)  # the same processor and tasks as BC's
    policy = load_checkpoint(warm.checkpoint).policy
    fn = make_pi0_policy_fn(policy.eval(), processor, device="cpu")
    requests = [RolloutRequest(Context(0, s), tasks[0], 11 + s) for s in range(200)]
    factory = EnvFactory("synthetic", setup.env_kwargs())
    rows = ["| slots | in-process s | worker processes s | processes / in-process |", "|---|---|---|---|"]
    for n in (4, 16):
        seconds = []
        for cls in (InlinePool, EnvPool):
            pool = cls(factory, n)
            collect(fn, pool, requests[:n])  # warm-up: worker spawn and env construction
            start = time.perf_counter()
            collect(fn, pool, requests)
            seconds.append(time.perf_counter() - start)
            pool.close()
        rows.append(f"| {n} | {seconds[0]:.2f} | {seconds[1]:.2f} | {seconds[1] / seconds[0]:.2f}x |")
    body = "\n".join(rows)
    print(body)
    write_section(
        "inline_pool",
        "In-process synthetic envs vs worker processes",
        "One rollout phase of the behaviour-cloned tiny PI0 (200 synthetic episodes, one torch thread).\n\n"
        + body
        + "\n\nWorker processes buy crash isolation and parallel rendering, which LIBERO needs; the numpy env "
        "steps in microseconds, so they only add IPC, and 16 of them oversubscribe 2 cores.",
    )


if __name__ == "__main__":
    main()

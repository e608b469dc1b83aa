"""`make demo`: the main job on the built-in default, end to end on a CPU machine.

1. warm start: a tiny PI0 behaviour-cloned on imperfect scripted demos of the synthetic env;
2. RIPT from it with launch/configs/demo.yaml through the real DeepSpeed engine (2 ranks via torchrun
   when the machine has 2 cores), checkpointing as it goes;
3. a short evaluation of the trained checkpoint on one real LIBERO task, with a video (the tiny
   synthetic-trained model does not solve LIBERO: this shows the protocol and the plumbing);
4. the metrics plot; then it prints where everything is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("demo")


def run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    }
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs", help="output directory (the run is OUT/demo)")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--ranks", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--skip-libero", action="store_true", help="no LIBERO evaluation (no renderer)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ript_ds.synthetic.learning import prepare_warm_start, ript_overrides, set_threads

    set_threads(1)
    out = Path(args.out).resolve()
    run_dir = out / "demo"
    warm = prepare_warm_start(out / "warm_start", seed=0)
    train = [sys.executable, "launch/train.py"]
    if args.ranks > 1:
        train = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(args.ranks),
            "launch/train.py",
        ]
    overrides = ript_overrides(warm, args.iterations, eval_every=5)
    run(
        [
            *train,
            "--deepspeed",
            "ds_configs/zero2.json",
            "--config",
            "launch/configs/demo.yaml",
            f"output_dir={out}",
            *overrides,
        ]
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["iteration"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
    rollout = [round(r["rollout/success_rate"], 2) for r in rows if "rollout/success_rate" in r]
    log.info("held-out success by iteration: %s", ", ".join(f"{i}: {s:.2f}" for i, s in curve))
    log.info("rollout success per iteration: %s", rollout)
    run([sys.executable, "tools/plot_metrics.py", str(run_dir), "--out", str(run_dir / "metrics.png")])
    if not args.skip_libero:
        run(
            [
                sys.executable,
                "launch/eval.py",
                "--checkpoint",
                str(run_dir / "checkpoints"),
                "--suite",
                "libero_spatial",
                "--tasks",
                "0",
                "--episodes-per-task",
                "1",
                "--max-steps",
                "40",
                "--camera-size",
                "128",
                "--num-envs",
                "1",
                "--videos",
                "1",
                "--out",
                str(run_dir / "eval_libero"),
            ]
        )
    log.info("done. run directory: %s", run_dir)
    log.info("  metrics:     %s", run_dir / "metrics.jsonl")
    log.info("  plot:        %s", run_dir / "metrics.png")
    log.info("  checkpoints: %s", run_dir / "checkpoints")
    if not args.skip_libero:
        log.info("  LIBERO eval: %s (results.md, videos/)", run_dir / "eval_libero")
    return 0


if __name__ == "__main__":
    sys.exit(main())

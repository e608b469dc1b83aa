"""Evaluate a PI0 checkpoint with the standard LIBERO protocol (DESIGN section 5).

    python launch/eval.py --checkpoint runs/demo/checkpoints/latest_export --suite libero_spatial
    python launch/eval.py --policy-server 127.0.0.1:8000 --suite libero_spatial --episodes-per-task 5
    torchrun --nproc_per_node 4 launch/eval.py --checkpoint runs/x/checkpoints --suite libero_10 --videos 6

Protocol: for every task, episodes i = 0 .. N-1 (default N = 50) start from the task's fixed init
state i and reset with seed 7 + i (applied right before that episode's own reset; --first-init-state S:
i = S .. S + N - 1, e.g. a run's held-out states), 10 settle steps,
replanning every 5 actions (the checkpoint's policy.json replan_steps, or --replan-steps), the suite's
episode cap. Episodes are split over ranks by index and the
results all-gathered, so the numbers do not depend on the number of ranks or envs.

--checkpoint: a canonical / lerobot / openpi-pytorch checkpoint directory, or a DeepSpeed training
checkpoint (a tag directory, or a run's checkpoints folder with a `latest` file), which is first
exported to a temporary directory (LoRA adapters merged into the base weights).
--policy-server HOST:PORT instead evaluates any openpi-protocol server (launch/serve.py, or openpi's own
scripts/serve_policy.py) with the same protocol, sending openpi's LIBERO client observation dict; results.json
records which policy ran ("policy").

Writes <out>/results.json (per task, per suite, mean, protocol, every episode), <out>/results.md and
<out>/videos/*.mp4. Default <out>: <run>/eval/<tag> for training checkpoints, else <checkpoint>/eval
(a policy server: eval_server/<host>_<port>). The evaluation itself is ript_ds/eval/ (the trainer's periodic eval runs through it too).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from ript_ds.eval.checkpoint import SUITES, EvalError, EvalOptions, evaluate_checkpoint, parse_guidance


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (see above)")
    p.add_argument(
        "--policy-server", help="HOST:PORT of an openpi-protocol policy server, instead of --checkpoint"
    )
    p.add_argument(
        "--image-size", type=int, default=224, help="--policy-server: image size sent (openpi: 224)"
    )
    p.add_argument("--suite", required=True, help=f"one of {', '.join(SUITES)} (libero_ prefix optional)")
    p.add_argument("--tasks", default="all", help="comma-separated task ids (default: every task)")
    p.add_argument("--episodes-per-task", type=int, default=50, help="episodes per task (default 50)")
    p.add_argument(
        "--first-init-state",
        type=int,
        default=0,
        help="episodes start at this init state (held-out states: a run's env.num_eval_init_states last ones)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=7,
        help="episode i resets with seed + i (default 7, the protocol's; another: new episodes of the same states)",
    )
    p.add_argument("--num-envs", type=int, default=2, help="env worker processes per rank")
    p.add_argument("--guidance", default="1.0", help="CFG weight w, or 'none' for the plain model")
    p.add_argument("--tokenizer", help="PaliGemma tokenizer; default: a tiny one built from the prompts")
    p.add_argument("--camera-size", type=int, default=256, help="LIBERO render size before resize-with-pad")
    p.add_argument("--max-steps", type=int, help="override the suite's episode cap (tests, debugging)")
    p.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument(
        "--replan-steps",
        type=int,
        help="actions executed per chunk (default: the checkpoint's policy.json replan_steps, else 5)",
    )
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


def options(args: argparse.Namespace) -> EvalOptions:
    values = {f.name: getattr(args, f.name) for f in fields(EvalOptions)}
    return EvalOptions(**(values | {"guidance": parse_guidance(args.guidance)}))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from ript_ds.engine.dist import MainRankFilter

    handler = logging.StreamHandler()
    handler.addFilter(MainRankFilter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(asctime)s %(name)s: %(message)s")
    try:
        evaluate_checkpoint(options(args))
    except EvalError as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one evaluator: the trainer's periodic eval, launch/eval.py and the policy server all go through it.

- stats.py: per-episode records, Wilson intervals, per-task / per-suite aggregation, markdown tables
  (pure functions, unit-tested by hand);
- runner.py: which episodes make an evaluation (the LIBERO protocol, or a trainer's held-out contexts),
  their split over ranks, the gather, results.json / results.md and videos;
- checkpoint.py: a checkpoint directory (canonical, lerobot, openpi PyTorch or a DeepSpeed training
  checkpoint) -> policy, envs and the runner: what launch/eval.py calls;
- video.py: episode mp4s.
"""

"""Bad input to `launch/train.py`: one line on stderr naming the problem, exit code 2, no traceback,
before any distributed initialisation (these run in-process in milliseconds)."""

from __future__ import annotations

import pytest
from conftest import load_script

train_cli = load_script("launch/train.py")

CASES = [
    (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'lr'?"),
    (["ript.rollouts_per_context=1"], "RLOO needs K >= 2"),
    (["train.lr=abc"], "train.lr must be float, got 'abc'"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["model.dtype=float16"], "model.dtype='float16' is not one of ['float32', 'bfloat16']"),
    (
        ["env.kind=libero", "env.suite=libero_spatail"],
        "is not a LIBERO suite; did you mean 'libero_spatial'?",
    ),
    (["env.task_ids=-1"], "env.task_ids [-1] must be >= 0"),
    (["model.checkpoint=/nonexistent/pi0"], "model.checkpoint=/nonexistent/pi0 does not exist"),
    (
        ["model.tokenizer_path=/nonexistent/tok.model"],
        "model.tokenizer_path=/nonexistent/tok.model does not exist",
    ),
    (
        ["ckpt.resume=/nonexistent/ckpt"],
        "ckpt.resume=/nonexistent/ckpt is neither auto, none nor a checkpoint",
    ),
    (["engine.lora.enabled=true", "engine.lora.modules=[]"], "LoRA would wrap nothing"),
    (["rollout.guidance=-1"], "rollout.guidance=-1.0 must be >= 0"),
    (["rollout.num_envs=0"], "rollout.num_envs must be >= 1"),
    (["env.difficulty=2"], "env.difficulty must be in [0, 1]"),
    (["engine.lora.target=decoder"], "engine.lora.target='decoder' is not one of"),
    (["ript.max_sampling_rounds=0"], "ript.max_sampling_rounds must be >= 1"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    (["lr"], "override 'lr' must look like section.key=value"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
]


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err

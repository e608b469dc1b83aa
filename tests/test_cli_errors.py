"""Bad input to `launch/train.py`: one line on stderr naming the problem, exit code 2, no traceback,
before any distributed initialisation (these run in-process in milliseconds)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ROOT, load_script

from ript_ds.config import load_config
from ript_ds.engine.ds_json import check_ds_json, load_ds_json

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
    (
        ["env.kind=libero", "env.suite=libero_spatial", "env.task_ids=[3,12]"],
        "env.task_ids [12] out of range: libero_spatial has tasks 0..9",
    ),
    (
        ["env.kind=libero", "env.suite=libero_90", "env.task_ids=90"],
        "env.task_ids [90] out of range: libero_90 has tasks 0..89",
    ),
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


def _assert_one_line(err: str, message: str) -> None:
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_tensorboard_is_a_config_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what find_spec sees for a missing package
    assert train_cli.main(["log.tensorboard=true"]) == 2
    _assert_one_line(
        capsys.readouterr().err, "log.tensorboard=true needs the tensorboard package: pip install"
    )


OFFLOAD = {"stage": 3, "offload_optimizer": {"device": "cpu"}}
DS_CASES = [
    (
        {"fp16": {"enabled": True}},
        "fp16.enabled=true needs a CUDA GPU and torch.cuda.is_available() is false",
    ),
    ({"fp16": {"enabled": False}}, "remove the 'fp16' section"),
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    (
        {"zero_optimization": OFFLOAD, "zero_force_ds_cpu_optimizer": True},
        "offload_optimizer with zero_force_ds_cpu_optimizer=true refuses the client torch AdamW",
    ),
    ({"bf16": {"enabled": True}}, "set model.dtype=bfloat16 instead"),
    ({"train_micro_batch_size_per_gpu": 3}, "disagrees with train.micro_batch_size=8; use 'auto'"),
    ({"torch_autocast": {"enabled": True}}, "disagrees with model.dtype=float32"),
    ("{not json", "is not valid JSON"),
]


@pytest.mark.parametrize(("ds", "message"), DS_CASES)
def test_bad_deepspeed_json_fails_before_distributed_init(ds, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU machine of the fp16 case
    path = tmp_path / "ds.json"
    path.write_text(ds if isinstance(ds, str) else json.dumps(ds))
    assert train_cli.main(["--deepspeed", str(path), f"output_dir={tmp_path}"]) == 2
    _assert_one_line(capsys.readouterr().err, message)
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "run").exists()  # the trainer never started


def test_missing_deepspeed_json(tmp_path, capsys):
    assert train_cli.main(["engine.deepspeed_config=/nonexistent/ds.json"]) == 2
    _assert_one_line(capsys.readouterr().err, "engine.deepspeed_config: /nonexistent/ds.json does not exist")


@pytest.mark.parametrize("name", ["zero0.json", "zero2.json", "zero3.json", "zero3_offload.json"])
@pytest.mark.parametrize("cuda", [False, True])
def test_shipped_deepspeed_jsons_pass(name, cuda, tmp_path, monkeypatch):
    cfg = load_config()
    monkeypatch.chdir(tmp_path)
    path, ds = load_ds_json(f"ds_configs/{name}")  # relative to the checkout, from any cwd
    assert path == ROOT / "ds_configs" / name
    check_ds_json(path, ds, cfg.train, bf16=True, cuda_available=cuda)


def test_fp16_on_a_gpu_machine_is_refused_as_unsupported(tmp_path):
    cfg = load_config()
    with pytest.raises(ValueError, match="remove the 'fp16' section"):
        check_ds_json(tmp_path, {"fp16": {"enabled": True}}, cfg.train, bf16=False, cuda_available=True)

"""Bad input to `launch/train.py`: one line on stderr naming the problem, exit code 2, no traceback,
before any distributed initialisation (these run in-process in milliseconds)."""

from __future__ import annotations

import json
import sys
from typing import ClassVar

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


@pytest.mark.parametrize(
    "zero",
    [{"stage": 3, "zero_hpz_partition_size": 2}, {"stage": 3, "use_all_reduce_for_fetch_params": True}],
)
def test_zero_plus_plus_options_that_need_one_dtype_refuse_the_bf16_lora_base(zero, tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    lora = ["engine.lora.enabled=true", "model.dtype=bfloat16", f"output_dir={tmp_path}"]
    assert train_cli.main(["--deepspeed", str(path), *lora]) == 2
    _assert_one_line(capsys.readouterr().err, "does not work with LoRA's bf16 frozen base")
    assert not torch.distributed.is_initialized()


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


# ------------------------------------------------------------------------------------------ issue 11
# Every test below goes through train_cli.main; the trainer is replaced by a recorder so a check that
# is missing shows as exit code 0 (the "trainer" ran) instead of starting a real run in this process.
class _RecordingTrainer:
    calls: ClassVar[list[tuple]] = []

    def __init__(self, cfg, *args, **kwargs):
        _RecordingTrainer.calls.append((cfg, args, kwargs))

    def setup(self):
        return self

    def run(self):
        return None


@pytest.fixture
def trainer_calls(monkeypatch):
    import ript_ds.trainer

    _RecordingTrainer.calls = []
    monkeypatch.setattr(ript_ds.trainer, "Trainer", _RecordingTrainer)
    return _RecordingTrainer.calls


def _tiny_checkpoint(directory, vocab_size: int | None = None, tokenizer_words: int = 0):
    from dataclasses import replace

    from conftest import tiny_policy

    from ript_ds.model.arch import PI0Arch
    from ript_ds.model.pi0 import PI0Policy
    from ript_ds.model.processing import build_tiny_tokenizer
    from ript_ds.model.weights import save_canonical

    arch = PI0Arch.tiny() if vocab_size is None else replace(PI0Arch.tiny(), vocab_size=vocab_size)
    policy = tiny_policy() if vocab_size is None else PI0Policy(arch)
    save_canonical(policy, directory)
    if tokenizer_words:
        build_tiny_tokenizer(directory, [" ".join(f"word{i}" for i in range(tokenizer_words))])
    return directory


def test_deepspeed_flag_is_folded_into_the_config(trainer_calls, tmp_path):
    assert train_cli.main(["--deepspeed", "ds_configs/zero3.json", f"output_dir={tmp_path}"]) == 0
    ((cfg, args, kwargs),) = trainer_calls
    assert cfg.engine.deepspeed_config == "ds_configs/zero3.json" and cfg.engine.zero_stage == 3
    assert not args and not kwargs  # nothing beside cfg: config.yaml and the resume check see it all


def test_zero_stage_must_agree_with_the_json(trainer_calls, capsys):
    assert train_cli.main(["--deepspeed", "ds_configs/zero3.json", "engine.zero_stage=2"]) == 2
    _assert_one_line(capsys.readouterr().err, "engine.zero_stage=2 disagrees with")


@pytest.mark.parametrize(
    ("zero", "message"),
    [
        ({"stage": 7}, "zero_optimization.stage=7 must be one of 0, 1, 2, 3"),
        ({"stage": "3"}, "zero_optimization.stage='3' must be one of 0, 1, 2, 3"),
        ({"stage": True}, "zero_optimization.stage=True must be one of 0, 1, 2, 3"),
        (3, "zero_optimization must be a JSON object"),
        ({"stage": 3, "offload_optimizer": {"device": "gpu"}}, "offload_optimizer.device='gpu' must be"),
        ({"stage": 3, "offload_param": "cpu"}, "offload_param must be a JSON object"),
        ({"stage": 1, "overlap_comm": True}, "overlap_comm=true needs stage 2 or 3"),
    ],
)
def test_invalid_zero_values_are_config_errors(zero, message, trainer_calls, tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    assert train_cli.main(["--deepspeed", str(path)]) == 2
    _assert_one_line(capsys.readouterr().err, message)
    assert not trainer_calls


def test_resume_flag(trainer_calls, tmp_path, capsys):
    assert train_cli.main(["--resume", "none", f"output_dir={tmp_path}"]) == 0
    assert trainer_calls[-1][0].ckpt.resume == "none"
    assert train_cli.main(["--resume", "none", "ckpt.resume=none"]) == 0  # the same value twice is fine
    assert train_cli.main(["--resume", "none", "ckpt.resume=auto"]) == 2
    _assert_one_line(capsys.readouterr().err, "--resume none conflicts with ckpt.resume=auto")
    assert train_cli.main(["--resume", "/nonexistent/ckpt"]) == 2
    _assert_one_line(capsys.readouterr().err, "ckpt.resume=/nonexistent/ckpt is neither auto")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_weights_file_is_one_line(damage, trainer_calls, tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"this is not a safetensors file at all")
    else:
        weights.write_bytes(data[:9] + b"#" + data[10:])  # the header is no JSON
    assert train_cli.main([f"model.checkpoint={ckpt}", f"output_dir={tmp_path}"]) == 2
    _assert_one_line(capsys.readouterr().err, f"{weights}")
    assert not trainer_calls
    eval_cli = load_script("launch/eval.py")
    assert eval_cli.main(["--checkpoint", str(ckpt), "--suite", "synthetic", "--out", str(tmp_path)]) == 2
    _assert_one_line(capsys.readouterr().err, f"{weights}")


def test_checkpoint_keys_are_checked_before_distributed_init(trainer_calls, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    del state["action_out_proj.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    assert train_cli.main([f"model.checkpoint={ckpt}", f"output_dir={tmp_path}"]) == 2
    _assert_one_line(capsys.readouterr().err, "missing keys: action_out_proj.weight (1 in all)")
    assert not trainer_calls


def test_real_size_model_needs_a_tokenizer(trainer_calls, tmp_path, capsys):
    assert train_cli.main(["model.arch=pi0", f"output_dir={tmp_path}"]) == 2
    _assert_one_line(capsys.readouterr().err, "set model.tokenizer_path")
    big = _tiny_checkpoint(tmp_path / "big", vocab_size=1000)  # more rows than any built-in tiny model
    assert train_cli.main([f"model.checkpoint={big}", f"output_dir={tmp_path}"]) == 2
    _assert_one_line(capsys.readouterr().err, f"model.checkpoint={big} holds no tokenizer.model")
    assert not trainer_calls
    assert train_cli.main([f"model.checkpoint={_tiny_checkpoint(tmp_path / 'tiny')}"]) == 0  # tiny: built in


def test_tokenizer_must_fit_the_embedding(trainer_calls, tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt", vocab_size=64, tokenizer_words=100)  # ~100 pieces > 64 rows
    assert train_cli.main([f"model.checkpoint={ckpt}", f"output_dir={tmp_path}"]) == 2
    _assert_one_line(capsys.readouterr().err, "has 64 token embeddings")
    tok = ckpt / "tokenizer.model"
    other = _tiny_checkpoint(tmp_path / "other", vocab_size=64)
    assert train_cli.main([f"model.checkpoint={other}", f"model.tokenizer_path={tok}"]) == 2
    _assert_one_line(capsys.readouterr().err, "has 64 token embeddings")
    assert not trainer_calls


def test_ambiguous_norm_stats_are_found_before_distributed_init(trainer_calls, tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    for robot in ("a", "b"):
        (ckpt / "assets" / robot).mkdir(parents=True)
        (ckpt / "assets" / robot / "norm_stats.json").write_text("{}")
    assert train_cli.main([f"model.checkpoint={ckpt}", f"output_dir={tmp_path}"]) == 2
    _assert_one_line(capsys.readouterr().err, "several openpi norm stats")
    assert not trainer_calls

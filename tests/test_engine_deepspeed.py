"""DeepSpeed engine and distributed helpers: unit checks in-process, real 2-rank runs on CPU (gloo).

The multi-rank checks launch tests/ds_worker.py a few times (1 rank under plain python, 2 ranks under
torchrun) and compare the JSON each rank writes; one launch runs several engines to pay start-up once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ript_ds.config import ConfigError, TrainCfg
from ript_ds.engine import deepspeed as ds  # plainly: a broken DeepSpeed install fails, never skips
from ript_ds.engine import dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ds_worker.py"
TOL = 1e-5


# ---------------------------------------------------------------------------------------- in-process
def test_collectives_are_no_ops_without_a_group():
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(5) == 5
    assert dist.all_reduce_mean({"b": 2, "a": 1.5}) == {"a": 1.5, "b": 2.0}
    assert dist.all_reduce_sum({"x": 3}) == {"x": 3.0}
    dist.barrier()


def test_main_rank_filter(monkeypatch):
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    monkeypatch.setenv("RANK", "1")
    assert not dist.MainRankFilter().filter(record)
    record.all_ranks = True
    assert dist.MainRankFilter().filter(record)
    monkeypatch.setenv("RANK", "0")
    assert dist.MainRankFilter().filter(logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None))


def test_slurm_node_list():
    assert dist.first_slurm_host("gpu[003-005,010],cpu1") == "gpu003"
    assert dist.first_slurm_host("node17") == "node17"
    assert dist.first_slurm_host("a-b[7,9]") == "a-b7"


def test_slurm_env_is_translated(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # records the original so the translation below is undone afterwards
        monkeypatch.delenv(key)
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[2-3]"}
    for key, value in {**env, "SLURM_JOB_ID": "1234"}.items():
        monkeypatch.setenv(key, value)
    dist._export_slurm_env()
    assert (dist.rank(), dist.world_size(), dist.local_rank()) == (3, 8, 1)
    assert os.environ["MASTER_ADDR"] == "n2" and os.environ["MASTER_PORT"] == "21234"


def test_ds_config_is_filled_in_one_place(tmp_path):
    train = TrainCfg(micro_batch_size=3, grad_accum_steps=2, grad_clip=0.5)
    cfg = ds.build_ds_config(ROOT / "ds_configs" / "zero3.json", train, world_size=4, bf16=True)
    assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_clipping"] == 0.5
    autocast = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}  # fp32 reductions
    assert cfg["torch_autocast"] == autocast and "bf16" not in cfg
    assert cfg["managed_gradient_accumulation"] is False  # rl/update.py owns the boundary
    assert cfg["zero_optimization"]["stage"] == 3
    offload = ds.build_ds_config(ROOT / "ds_configs" / "zero3_offload.json", train, 1, bf16=False)
    assert offload["zero_force_ds_cpu_optimizer"] is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="gradient_clipping"):
        ds.build_ds_config(bad, train, 1, bf16=False)
    bad.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="torch_autocast"):
        ds.build_ds_config(bad, train, 1, bf16=True)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        ds.build_ds_config(bad, train, 1, bf16=False)
    # train_batch_size needs the world size, so only build_ds_config can check it
    bad.write_text(json.dumps({"train_batch_size": 6}))
    assert ds.build_ds_config(bad, train, 1, bf16=False)["train_batch_size"] == 6
    with pytest.raises(ConfigError, match=r"train_batch_size=6 .*\(12\)"):
        ds.build_ds_config(bad, train, 2, bf16=False)
    # the checks are ds_json's, overrides included: the same one-line message as the CLI pre-flight
    offload = {
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": True,
    }
    with pytest.raises(ConfigError, match="refuses the client torch AdamW"):
        ds.build_ds_config(ROOT / "ds_configs" / "zero2.json", train, 1, bf16=False, overrides=offload)


def test_lora_targets_skip_unused_modules():
    from conftest import tiny_policy

    from ript_ds.config import LoraCfg
    from ript_ds.engine.lora import lora_target_names

    policy = tiny_policy()
    both = lora_target_names(policy, LoraCfg(enabled=True))
    expert = lora_target_names(policy, LoraCfg(enabled=True, target="expert", modules=["q_proj", "v_proj"]))
    assert all(n.startswith("model.dit.") for n in expert) and len(expert) == 4
    last = f"model.vlm.language_model.layers.{policy.arch.vlm.depth - 1}."
    assert f"{last}self_attn.k_proj" in both and f"{last}self_attn.q_proj" not in both
    assert f"{last}mlp.up_proj" not in both and "model.dit.layers.0.mlp.down_proj" in both


# ---------------------------------------------------------------------------------------- multi-rank
def _launch(out: Path, job: str, ranks: int, timeout: float = 240) -> tuple[int, str, float]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # private JIT cache
    # CPU + gloo even on a GPU machine: two ranks cannot share one GPU under nccl.
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    if ranks == 1:  # plain python: world 1, the engine makes its own 1-rank group
        cmd = [sys.executable, str(WORKER), str(out), job]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd += [str(WORKER), str(out), job]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _results(out: Path, job: str, ranks: int) -> list[dict]:
    return [json.loads((out / f"{job}_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds")
    res = {}
    for job, ranks in (("train1", 1), ("train2", 2)):
        rc, log, _ = _launch(out, job, ranks)
        assert rc == 0, f"{job} failed:\n{log[-6000:]}"
        res[job] = _results(out, job, ranks)
    res["out"] = out
    return res


def _close(a: list[float], b: list[float], tol: float = TOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.multirank
def test_one_rank_equals_two_ranks(runs):
    one, two = runs["train1"][0], runs["train2"][0]
    assert _close(one["z2"], two["z2"]), (one["z2"], two["z2"])
    assert _close(one["z2_norms"], two["z2_norms"], 1e-4)
    assert _close(one["z2_sample"], two["z2_sample"], 1e-4)
    assert two["ds_config"]["train_batch_size"] == 4 and two["ds_config"]["gradient_clipping"] == 1.0
    assert one["ds_config"]["train_batch_size"] == 4
    assert one["ds_config"]["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.multirank
def test_training_rollouts_and_eval_share_one_precision(runs):
    p = runs["train1"][0]["precision"]
    assert p["dtype"] == "bfloat16" and p["same_as_eval"], p
    assert p["fp32_differs"] > 0  # the check can fail: fp32 sampling gives other actions


@pytest.mark.multirank
def test_stage0_matches_zero2_and_reports_the_norm(runs):
    for job in ("train1", "train2"):
        r = runs[job][0]
        assert _close(r["z0"], r["z2"]), (r["z0"], r["z2"])  # 2 ranks: gradients still averaged
        assert _close(r["z0_norms"], r["z2_norms"], 1e-4), (r["z0_norms"], r["z2_norms"])
        assert r["z0_backward_allreduce"] is False  # step() reduces (equal to ZeRO-2 above on 2 ranks)
        assert r["z0_step4"] == r["z0_step4_resumed"]


@pytest.mark.multirank
def test_gradient_accumulation_matches_one_big_batch(runs):
    one = runs["train1"][0]
    assert _close(one["accum"], one["z2"]), (one["accum"], one["z2"])
    assert _close(one["accum_norms"], one["z2_norms"], 1e-4)  # two backwards, then one step


@pytest.mark.multirank
def test_zero3_partitions_and_matches_zero2(runs):
    for r in runs["train2"]:
        local, total = r["z3_partition"]
        assert 0.45 <= local / total <= 0.55, (local, total)
        assert _close(r["z2"], r["z3"]), (r["z2"], r["z3"])
        assert _close(r["z2"], r["z3_from_checkpoint"]), (r["z2"], r["z3_from_checkpoint"])
        assert _close(r["z2_sample"], r["z3_sample"], 1e-4)


@pytest.mark.multirank
def test_rollout_context_gathers_once_and_releases(runs):
    for r in runs["train2"]:
        assert r["z3_gathered_in_rollout"]  # still whole after two sample_actions calls
        assert r["z3_released_after"]


@pytest.mark.multirank
def test_gradient_checkpointing_keeps_losses(runs):
    for r in runs["train2"]:
        assert _close(r["z3"], r["z3_gc"])


@pytest.mark.multirank
def test_save_load_resumes_exactly(runs):
    r = runs["train2"][0]
    assert r["client_state"] == {"step": 3, "note": "hi"}
    assert r["z3_step4"] == r["z3_step4_resumed"]


@pytest.mark.multirank
def test_lora_trains_only_adapters(runs):
    r = runs["train2"][0]
    trainable = set(r["lora_trainable"])
    assert trainable and all("lora_" in n or n.endswith("cond_embed.weight") for n in trainable)
    assert set(r["lora_changed"]) <= trainable
    assert any("lora_B" in n for n in r["lora_changed"])
    assert abs(r["lora_loss"][0] - r["z2"][0]) <= TOL  # adapters start as the identity
    adapter = runs["out"] / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "cond_embed.pt").exists()
    assert r["lora_step4"] == r["lora_step4_resumed"]
    assert (runs["out"] / "ckpt_lora" / "s3" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.multirank
@pytest.mark.slow
def test_zero3_offload_matches(runs, tmp_path):
    """First run JIT-builds DeepSpeedCPUAdam (~90 s on 2 cores); without a compiler it falls back."""
    rc, log, _ = _launch(tmp_path, "offload", 1, timeout=600)
    assert rc == 0, log[-6000:]
    (r,) = _results(tmp_path, "offload", 1)
    assert _close(r["losses"], runs["train1"][0]["z2"]), (r["losses"], runs["train1"][0]["z2"])
    assert _close(r["sample"], runs["train1"][0]["z2_sample"], 1e-4) and r["gathered"]


@pytest.mark.multirank
@pytest.mark.parametrize(
    ("job", "timeout", "expect"),
    [("die", 20, "another rank died"), ("hang", 10, "failed to pass monitoredBarrier")],
)
def test_lost_rank_fails_fast_with_a_message(tmp_path, job, timeout, expect):
    rc, log, elapsed = _launch(tmp_path, job, 2, timeout=180)
    assert rc != 0, log[-3000:]
    assert "CollectiveError" in log and expect in log, log[-3000:]
    # start-up (imports, engine) plus at most one collective timeout, never a hang
    assert elapsed < timeout + 60, elapsed

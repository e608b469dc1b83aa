"""tools/estimate_memory.py: its memory model against a real DeepSpeed engine and measured activations on a
small PI0 (CPU; ZeRO-2 and ZeRO-3, full and LoRA, one and two ranks), its parameter counts against peft,
its full-size numbers, and its CLI.

The measurement helpers live in tools/bench/memory_check.py, which also measures ZeRO-3 + offload (it
needs DeepSpeedCPUAdam) and writes the docs/benchmarks.md section."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script

from ript_ds.memory.activations import activation_memory, parameter_inventory
from ript_ds.memory.zero import GIB, Workload, ZeroCfg, model_state
from ript_ds.model.arch import PI0Arch
from ript_ds.model.pi0 import PI0Policy, count_parameters, unused_parameter_names

bench = load_script("tools/bench/memory_check.py")
cli = load_script("tools/estimate_memory.py")
STATE_KINDS = ("params", "grads", "optimizer", "states", "buckets")


def _close(est: float, measured: float, tol: float) -> bool:
    return measured > 0 and abs(est / measured - 1) <= tol


# ---------------------------------------------------------------------------------------- parameters
def test_full_size_parameter_inventory():
    arch = PI0Arch()
    with torch.device("meta"):
        policy = PI0Policy(arch)
    params = parameter_inventory(arch)
    assert sum(p.numel for p in params) == count_parameters(policy) == 3_238_050_576
    unused = sum(policy.get_parameter(n).numel() for n in unused_parameter_names(arch))
    assert sum(p.numel for p in params if p.trainable) == count_parameters(policy) - unused
    embedding = [p for p in params if p.name == "model.vlm.language_model.embed_tokens.weight"]
    assert embedding[0].numel == 257152 * 2048 and not embedding[0].low_precision
    assert max(p.numel for p in params) == embedding[0].numel


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    arch = bench.small_arch()
    policy = PI0Policy(arch)
    targets = bench.lora_targets(policy, 4)
    model = get_peft_model(policy, LoraConfig(r=4, target_modules=targets))
    policy.cond_embed.weight.requires_grad_(True)
    peft_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = parameter_inventory(arch, targets, 4)
    assert sum(p.numel for p in params if p.trainable) == peft_trainable
    assert sum(p.numel for p in params) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- model state
@pytest.fixture(scope="module")
def one_rank():
    return {r["case"]: r for r in bench.compare_states(bench.measure_model_states(1), 1)}


@pytest.mark.parametrize(("config", "lora"), bench.ENGINE_CASES)
def test_model_state_matches_engine_one_rank(one_rank, config, lora):
    r = one_rank[f"{config} {'LoRA' if lora else 'full'} x1"]
    for kind in STATE_KINDS:
        assert _close(r["est"][kind], r["measured"][kind], 0.10), (kind, r)
    _, cpu_step, measured_step = r["step"]
    assert _close(cpu_step, measured_step, 0.10), r
    assert _close(*r["rollout_params"], 0.02), r


@pytest.mark.multirank
@pytest.mark.slow  # ~25 s: two ranks start torch, transformers and deepspeed
def test_model_state_matches_engine_two_ranks():
    results = bench.compare_states(bench.measure_model_states(2), 2)
    assert len(results) == 2 * len(bench.ENGINE_CASES)  # every case on both ranks
    for r in results:
        for kind in STATE_KINDS:
            assert _close(r["est"][kind], r["measured"][kind], 0.10), (kind, r)
        _, cpu_step, measured_step = r["step"]
        assert _close(cpu_step, measured_step, 0.10), r
        assert _close(*r["rollout_params"], 0.02), r
        if r["case"].startswith("zero3"):  # the rollout gathers every parameter whole beside the partitions
            assert r["rollout_params"][1] > 1.5 * r["measured"]["params"], r
    grads = {r["case"]: r["measured"]["grads"] for r in results}
    # ZeRO-2 keeps the parameters cut by a rank's slice whole: the ranks' gradient buffers differ
    assert grads["zero2.json full x2 rank 0"] != grads["zero2.json full x2 rank 1"]


# ---------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("lora_rank", [0, bench.LORA_RANK])
def test_activation_model_matches_measured_allocations(lora_rank):
    for checkpointing, r in bench.measure_activations(bench.small_arch(), 4, lora_rank).items():
        assert _close(r["est_saved"], r["saved"], 0.05), (checkpointing, r)
        assert _close(r["est_peak"], r["peak"], 0.15), (checkpointing, r)


def test_checkpointing_keeps_only_layer_inputs():
    arch = PI0Arch()
    on, off = (activation_memory(arch, 8, checkpointing=c) for c in (True, False))
    per_layer_inputs = 8 * 4 * (816 * 2048 + 51 * 1024)  # fp32 prefix + suffix streams
    assert on.saved < 0.1 * off.saved
    assert on.saved > arch.vlm.depth * per_layer_inputs
    assert on.recompute > 0 and off.recompute == 0
    # bf16 copies of the ~2.2 B Gemma Linear weights kept for backward (SigLIP and the projections run fp32)
    assert off.weight_copies > 2 * 2.1e9


# ---------------------------------------------------------------------------------------- full size
def _rows(argv: list[str], capsys) -> list[dict]:
    assert cli.main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_full_size_estimates(capsys):
    rows = _rows(["--world-sizes", "1,8", "--lora", "off", "--checkpointing", "on"], capsys)
    by = {(r["zero"], r["world_size"]): r for r in rows}
    psi = 3_238_050_576
    z2, z3 = by[("ZeRO-2", 1)]["bytes"], by[("ZeRO-3", 8)]["bytes"]
    assert z2["params"] == 4 * psi  # fp32 parameters: bf16 is autocast, not bf16 storage
    assert z2["optimizer"] == 12 * 3_128_994_576  # master + 2 moments of the trainable parameters
    assert 4 * psi / 8 < z3["params"] < 1.01 * 4 * psi / 8
    assert z3["total"] < 0.5 * z2["total"]
    assert by[("ZeRO-3", 8)]["peak_phase"] == "rollout"  # the one-time full gather
    offload = by[("ZeRO-3+offload", 8)]["bytes"]
    assert offload["optimizer"] == offload["grads"] == 0 and offload["host"] > 0
    fits = {(r["zero"], r["world_size"]): r["fits"] for r in rows}
    assert fits[("ZeRO-2", 1)] and fits[("ZeRO-3", 8)] and fits[("ZeRO-3+offload", 1)]
    # one GPU, ZeRO-3: 60 GiB of fp32 states, then the step's flat gradient copy (fused AdamW: no temporary)
    assert fits[("ZeRO-3", 1)] and by[("ZeRO-3", 1)]["peak_phase"] == "step"
    tight = _rows(["--world-sizes", "1", "--lora", "off", "--gpu-memory", "40"], capsys)
    assert not any(r["fits"] for r in tight if r["zero"] != "ZeRO-3+offload")


def test_json_output_is_clean_in_a_fresh_process():
    # deepspeed (imported for the LoRA targets) logs to stdout on import; the JSON must stay parseable
    cmd = [
        sys.executable,
        "tools/estimate_memory.py",
        "--lora",
        "on",
        "--world-sizes",
        "8",
        "--format",
        "json",
    ]
    proc = subprocess.run(
        [*cmd, "--ds-config", "ds_configs/zero3.json"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["zero"], r["lora"], r["world_size"]) for r in rows] == [("ZeRO-3", True, 8)] * 2


def test_markdown_flags_what_does_not_fit(capsys):
    argv = ["--ds-config", "ds_configs/zero2.json", "--world-sizes", "1", "--checkpointing", "off"]
    assert cli.main([*argv, "--lora", "off", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "### ZeRO-2 (`ds_configs/zero2.json`)" in out and "3.238 B parameters" in out
    assert "| **NO** |" in out  # full fine-tuning without checkpointing on one 80 GiB GPU


def test_zero_cfg_reads_the_json(tmp_path):
    zero = ZeroCfg.from_ds_config(json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text()))
    assert zero.stage == 3 and zero.offload_optimizer and zero.offload_param
    assert zero.reduce_bucket_size == 200_000_000 and zero.persistence_threshold == 100_000
    params = parameter_inventory(bench.small_arch())
    assert model_state(params, zero, 2).host > model_state(params, zero, 4).host
    assert model_state(params, ZeroCfg(stage=2), 4).params == 4 * sum(p.numel for p in params)
    assert GIB == 2**30


# ---------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--world-sizes", "0"], "expected integers >= 1"),
        (["--world-sizes", "a,b"], "expected comma-separated integers"),
        (["--micro-batch", "-2"], "must be > 0"),
        (["--gpu-memory", "lots"], "expected a number"),
        (["--format", "xml"], "invalid choice: 'xml'"),
        (["--ds-config", "/nonexistent/zero9.json"], "/nonexistent/zero9.json does not exist"),
        (["--ds-config", "STAGE1"], "zero_optimization.stage=1: the estimator models ZeRO stages 2 and 3"),
        (["--ds-config", "BADJSON"], "is not valid JSON"),
        (["--arch", "BADARCH"], "PI0Arch: unknown keys ['widht']"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys):
    files = {
        "STAGE1": json.dumps({"zero_optimization": {"stage": 1}}),
        "BADJSON": "{",
        "BADARCH": json.dumps({"widht": 3}),
    }
    for key, text in files.items():
        if key in argv:
            path = tmp_path / f"{key}.json"
            path.write_text(text)
            argv = [str(path) if a == key else a for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("estimate_memory: ")


def test_default_lora_rank_follows_the_lora_config():
    import yaml

    cfg = yaml.safe_load((ROOT / "launch" / "configs" / "libero_spatial_lora.yaml").read_text())
    assert Workload().lora_rank == cfg["engine"]["lora"]["rank"]
    assert (
        Workload().micro_batch
        == yaml.safe_load((ROOT / "launch" / "configs" / "libero_10_full.yaml").read_text())["train"][
            "micro_batch_size"
        ]
    )

"""LoRA under bf16 autocast stores the frozen Gemma weights in bf16 (engine/lora.store_frozen_bf16).

In-process: with the token embedding kept aside, the bf16-stored path is bit-identical to the fp32 one
(autocast rounds those weights before every matmul anyway). A worker (this file run as a script; 1 rank
under plain python, 2 under torchrun) builds real DeepSpeed engines on CPU, frozen_dtype=float32 (the old
layout) and auto, ZeRO-2 and ZeRO-3, and records dtypes, parameter bytes, losses, sampled actions and one
optimizer step. bf16 tolerance here: max |a - b| / max |b| <= 2e-2 per element, 5e-3 on the mean loss
(the only rounding left is the token embedding's, ~2^-9 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ELEMENT_TOL, MEAN_TOL = 2e-2, 5e-3  # measured: <= 1.3e-2 and <= 1e-3
CONFIGS = ("zero2.json", "zero3.json")
B = 2


def _data(model_type: str = "pi0"):
    from conftest import random_batch

    from ript_ds.model.arch import PI0Arch

    arch = PI0Arch.tiny(model_type=model_type)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(B, arch.chunk_size, arch.max_action_dim, generator=g)
    return random_batch(arch, b=B, seed=1), noise, torch.tensor([0.3, 0.8]), torch.tensor([1, 0])


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max()).item()


def _bf16_names() -> set[str]:
    """What set_precision(bfloat16) casts: the parameters that should be stored in bf16 (base names)."""
    from conftest import tiny_policy

    policy = tiny_policy().set_precision(torch.bfloat16)
    return {n for n, p in policy.named_parameters() if p.dtype == torch.bfloat16}


def _base_name(peft_name: str) -> str:
    return peft_name.replace(".base_layer.", ".")


# ---------------------------------------------------------------------------------------- in-process
def _tiny(model_type: str):
    from conftest import randomize

    from ript_ds.model.arch import PI0Arch
    from ript_ds.model.pi05 import make_policy

    torch.manual_seed(0)
    return randomize(make_policy(PI0Arch.tiny(model_type=model_type)), 0)


def _lora_outputs(model_type: str, bf16: bool, keep_embedding: bool = False):
    from ript_ds.config import LoraCfg
    from ript_ds.engine.lora import wrap_lora
    from ript_ds.model.pi0 import precision

    policy = _tiny(model_type)
    model = wrap_lora(policy, LoraCfg(enabled=True, rank=4), bf16=bf16)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:  # non-zero adapters, so their path is exercised too
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    if keep_embedding:
        embed = policy.model.vlm.language_model.embed_tokens.weight
        embed.data = _tiny(model_type).model.vlm.language_model.embed_tokens.weight.data
    batch, noise, time, cond = _data(model_type)
    with precision("cpu", "bfloat16"):
        loss = policy.loss(batch, noise, time, cond)
        loss.mean().backward()
        with torch.no_grad():
            actions = policy.sample_actions(batch, noise, guidance=1.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return policy, loss.detach(), actions, grads


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_bf16_storage_changes_only_the_embedding_rounding(model_type):
    _, loss32, actions32, grads32 = _lora_outputs(model_type, False)
    policy, loss16, actions16, grads16 = _lora_outputs(model_type, True, keep_embedding=True)
    assert policy.compute_dtype == torch.float32  # the residual stream stays fp32
    q = policy.model.vlm.language_model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A["default"].weight.dtype == torch.float32
    assert torch.equal(loss16, loss32) and torch.equal(actions16, actions32)
    assert grads16.keys() == grads32.keys() and all(torch.equal(grads16[k], grads32[k]) for k in grads32)
    _, loss16, actions16, _ = _lora_outputs(model_type, True)  # the engine's path: embedding rounded too
    assert 0 < _rel(loss16, loss32) <= ELEMENT_TOL and _rel(actions16, actions32) <= ELEMENT_TOL


def test_estimator_stores_the_frozen_gemma_base_in_bf16(capsys):
    from conftest import load_script

    from ript_ds.memory.activations import BF16, FP32, parameter_inventory
    from ript_ds.model.arch import PI0Arch

    cli = load_script("tools/estimate_memory.py")
    arch = PI0Arch()
    targets = cli.lora_targets(arch, cli.Workload())
    params = parameter_inventory(arch, targets, 32)
    by_name = {p.name: p for p in params}
    assert by_name["model.vlm.language_model.embed_tokens.weight"].storage == BF16
    assert by_name["model.dit.layers.0.mlp.down_proj.weight"].storage == BF16
    for fp32 in ("model.vlm.vision_tower.encoder.layers.0.mlp.fc1.weight", "model.dit.norm.weight"):
        assert by_name[fp32].storage == FP32
    assert all(p.storage == FP32 for p in params if p.trainable)
    assert all(p.storage == FP32 for p in parameter_inventory(arch))  # full fine-tuning: fp32 masters
    argv = ["--ds-config", "ds_configs/zero2.json", "--world-sizes", "1", "--lora", "on"]
    assert cli.main([*argv, "--checkpointing", "on", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["bytes"]["params"] == sum(p.numel * p.storage for p in params)
    assert row["gib"]["total"] < 14 and row["fits"]  # a pi0 LoRA run on one 24 GB GPU, with room


# ---------------------------------------------------------------------------------------- worker
def _param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage this rank holds: the ZeRO-3 partition where there is one."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        total += t.numel() * t.element_size()
    return total


def _stored_dtypes(model: torch.nn.Module) -> dict[str, str]:
    out = {}
    for name, p in model.named_parameters():
        t = getattr(p, "ds_tensor", None)
        out[name] = str((p.data if t is None else t).dtype)
    return out


def _engine_case(config: str, frozen: str, out: Path) -> dict:
    from conftest import tiny_policy

    from ript_ds.config import EngineCfg, LoraCfg, TrainCfg
    from ript_ds.engine import dist
    from ript_ds.engine.deepspeed import DeepSpeedEngine, all_params_gathered
    from ript_ds.model.arch import PI0Arch
    from ript_ds.model.pi0 import PI0Policy, precision

    train = TrainCfg(micro_batch_size=B, grad_accum_steps=1, lr=1e-3, grad_clip=1.0)
    lora = LoraCfg(enabled=True, rank=4, frozen_dtype=frozen)
    engine = DeepSpeedEngine(
        lambda: PI0Policy(PI0Arch.tiny()),
        train,
        EngineCfg(deepspeed_config=str(ROOT / "ds_configs" / config), lora=lora),
        bf16=True,
        weights=tiny_policy(0).state_dict(),
    )
    rec = {"param_bytes": _param_bytes(engine.module), "dtypes": _stored_dtypes(engine.module)}
    batch, noise, time, cond = _data()  # every rank the same batch: a 2-rank step equals a 1-rank one
    engine.train()
    before = engine.full_state_dict()
    loss = engine(batch, noise, time, cond)
    engine.backward(loss.mean())
    engine.step()
    after = engine.full_state_dict()
    rec["loss"] = loss.detach().flatten().tolist()
    rec["changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
    rec["trainable"] = sorted(k for k, p in engine.wrapped.named_parameters() if p.requires_grad)
    rec["loss_after"] = engine(batch, noise, time, cond).detach().flatten().tolist()
    with engine.rollout_context() as policy, precision(engine.device, "bfloat16"):
        rec["actions"] = policy.sample_actions(batch, noise, guidance=1.0).flatten().tolist()
        rec["gathered"] = all_params_gathered(engine.wrapped)
    rec["dtypes_after"] = _stored_dtypes(engine.module)
    ckpt = out / f"ckpt_{config.removesuffix('.json')}_{frozen}"  # adapters only (frozen weights left out)
    engine.save(ckpt, "iter_000001", {"iteration": 1})
    rec["resume"] = []
    for _ in range(2):  # the same step after the save and after loading it back
        engine.backward(engine(batch, noise, time, cond).mean())
        engine.step()
        rec["resume"].append(engine(batch, noise, time, cond).detach().flatten().tolist())
        engine.load(ckpt, "iter_000001")
    dist.barrier()
    return rec


def worker(out: Path) -> None:
    from conftest import tiny_policy

    from ript_ds.engine import dist
    from ript_ds.model.normalization import NormStats
    from ript_ds.model.weights import save_canonical

    dist.init_distributed(60.0)
    if dist.is_main():
        save_canonical(tiny_policy(0), out / "base", NormStats.identity(8, 7))
    result = {}
    for config in CONFIGS:
        for frozen in ("float32", "auto") if dist.world_size() == 1 else ("auto",):
            result[f"{config}:{frozen}"] = _engine_case(config, frozen, out)
    name = f"world{dist.world_size()}_rank{dist.rank()}.json"
    (out / name).write_text(json.dumps(result))


def _launch(out: Path, ranks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    if ranks == 1:
        cmd = [sys.executable, __file__, str(out)]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd += [__file__, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((out / f"world{ranks}_rank0.json").read_text())


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("lora_bf16")
    return _launch(out, 1), out


@pytest.mark.parametrize("config", CONFIGS)
def test_frozen_gemma_weights_are_bf16_and_the_rest_fp32(one_rank, config):
    runs, _ = one_rank
    bf16 = _bf16_names()
    for key in ("dtypes", "dtypes_after"):
        dtypes = runs[f"{config}:auto"][key]
        for name, dtype in dtypes.items():
            expect = "torch.bfloat16" if _base_name(name) in bf16 else "torch.float32"
            assert dtype == expect, (name, dtype)
        assert all(d == "torch.float32" for d in runs[f"{config}:float32"][key].values())
    assert any("lora_A" in n for n in dtypes) and "cond_embed.weight" in dtypes


@pytest.mark.parametrize("config", CONFIGS)
def test_parameter_bytes_drop_by_half_of_the_bf16_part(one_rank, config):
    from conftest import tiny_policy

    runs, _ = one_rank
    numel = {n: p.numel() for n, p in tiny_policy().named_parameters()}
    expected = 2 * sum(numel[n] for n in _bf16_names())
    fp32, auto = runs[f"{config}:float32"]["param_bytes"], runs[f"{config}:auto"]["param_bytes"]
    print(config, "param bytes", fp32, "->", auto)
    assert fp32 - auto == expected


@pytest.mark.parametrize("config", CONFIGS)
def test_outputs_match_the_fp32_frozen_path_and_a_step_trains_only_adapters(one_rank, config):
    runs, _ = one_rank
    ref, auto = runs[f"{config}:float32"], runs[f"{config}:auto"]
    for key in ("loss", "loss_after", "actions"):
        print(config, key, _rel(auto[key], ref[key]))
        assert _rel(auto[key], ref[key]) <= ELEMENT_TOL, key
    for key in ("loss", "loss_after"):
        mean, ref_mean = sum(auto[key]) / len(auto[key]), sum(ref[key]) / len(ref[key])
        assert abs(mean - ref_mean) <= MEAN_TOL * abs(ref_mean), key
    trainable = set(auto["trainable"])
    assert all("lora_" in n or n.endswith("cond_embed.weight") for n in trainable)
    assert auto["changed"] and set(auto["changed"]) <= trainable
    assert auto["gathered"] and auto["loss_after"] != auto["loss"]
    assert auto["resume"][0] == auto["resume"][1]  # LoRA checkpoints resume exactly over the bf16 base


def test_merged_export_is_fp32_and_samples_like_the_engine(one_rank, tmp_path):
    from conftest import load_script

    from ript_ds.model.pi0 import precision
    from ript_ds.model.weights import load_checkpoint

    runs, out = one_rank
    export = load_script("tools/export.py")
    tag = out / "ckpt_zero2_auto" / "iter_000001"
    argv = [str(tag), "--merge-lora", "--out", str(tmp_path / "x"), "--base", str(out / "base")]
    assert export.main(argv) == 0
    policy = load_checkpoint(tmp_path / "x").policy
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    batch, noise, *_ = _data()
    with torch.no_grad(), precision("cpu", "bfloat16"):
        actions = policy.sample_actions(batch, noise, guidance=1.0).flatten()
    assert _rel(actions, runs["zero2.json:auto"]["actions"]) <= ELEMENT_TOL


@pytest.mark.multirank
def test_two_ranks_match_one(one_rank, tmp_path):
    runs, _ = one_rank
    two = _launch(tmp_path, 2)
    for config in CONFIGS:
        one, other = runs[f"{config}:auto"], two[f"{config}:auto"]
        assert _rel(other["loss"], one["loss"]) <= 1e-5
        assert _rel(other["loss_after"], one["loss_after"]) <= 1e-4
        assert _rel(other["actions"], one["actions"]) <= 1e-4 and other["gathered"]
        assert other["dtypes_after"] == one["dtypes_after"]
    # ZeRO-3 partitions every parameter (bf16 ones included) over the two ranks; ZeRO-2 keeps them whole
    assert two["zero2.json:auto"]["param_bytes"] == runs["zero2.json:auto"]["param_bytes"]
    ratio = two["zero3.json:auto"]["param_bytes"] / runs["zero3.json:auto"]["param_bytes"]
    assert 0.49 <= ratio <= 0.52, ratio


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    worker(Path(sys.argv[1]))

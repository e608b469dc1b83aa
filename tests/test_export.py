"""tools/export.py and tools/inspect_ckpt.py on real DeepSpeed checkpoints (1 rank, CPU).

A worker (this file run as a script) builds tiny engines (full fine-tuning and LoRA), takes a step, saves
and records the engine module's own loss / sampled actions; the tests export and compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_single_rank_worker
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _data():
    from conftest import random_batch

    from ript_ds.model.arch import PI0Arch

    arch = PI0Arch.tiny()
    batch = random_batch(arch, b=2, seed=1)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, arch.chunk_size, arch.max_action_dim, generator=g)
    return batch, noise, torch.tensor([0.3, 0.8])


def _outputs(policy) -> dict[str, torch.Tensor]:
    batch, noise, time = _data()
    with torch.no_grad():
        loss = policy.loss(batch, noise, time)
        actions = policy.sample_actions(batch, noise)
    return {"loss": loss.contiguous(), "actions": actions.contiguous()}


def worker(out: Path) -> None:
    from conftest import tiny_policy

    from ript_ds.config import EngineCfg, LoraCfg, TrainCfg
    from ript_ds.engine.deepspeed import DeepSpeedEngine
    from ript_ds.model.arch import PI0Arch
    from ript_ds.model.normalization import NormStats
    from ript_ds.model.pi0 import PI0Policy
    from ript_ds.model.weights import save_canonical

    base = tiny_policy(0)
    save_canonical(base, out / "base", NormStats.identity(8, 7))
    for name, lora in (("full", False), ("lora", True)):
        train = TrainCfg(micro_batch_size=2, grad_accum_steps=1, lr=1e-2, grad_clip=1.0)
        engine_cfg = EngineCfg(
            deepspeed_config=str(ROOT / "ds_configs" / "zero2.json"), lora=LoraCfg(enabled=lora, rank=4)
        )
        engine = DeepSpeedEngine(
            lambda: PI0Policy(PI0Arch.tiny()), train, engine_cfg, weights=tiny_policy(0).state_dict()
        )
        batch, noise, time = _data()
        engine.train()
        engine.backward(engine(batch, noise, time, torch.tensor([1, 0])).mean())
        engine.step()
        engine.save(out / name / "checkpoints", "iter_000001", {"iteration": 1, "metrics": {"loss": 0.5}})
        with engine.rollout_context() as policy:
            save_file(_outputs(policy), str(out / f"{name}_ref.safetensors"))


def _tool(name: str):
    from conftest import load_script

    return load_script(f"tools/{name}.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    run_single_rank_worker(__file__, out, timeout=300)
    return out


def _max_diff(exported: Path, ref_file: Path) -> tuple[float, float]:
    from ript_ds.model.weights import load_checkpoint

    loaded = load_checkpoint(exported)
    ours, ref = _outputs(loaded.policy), load_file(str(ref_file))
    # The loss is compared relative to its size (elements reach ~10, where float32 spacing is ~1e-6 and a
    # merged LoRA weight W + s*B@A rounds differently from W x + s*B(A x)); actions absolutely.
    loss_diff = ((ours["loss"] - ref["loss"]).abs() / ref["loss"].abs().clamp(min=1.0)).max().item()
    return loss_diff, (ours["actions"] - ref["actions"]).abs().max().item()


def test_full_finetune_export_matches_engine(trained, tmp_path):
    export = _tool("export")
    ckpts = trained / "full" / "checkpoints"
    assert (
        export.main(
            [
                str(ckpts),
                "--tag",
                "iter_000001",
                "--out",
                str(tmp_path / "x"),
                "--lerobot",
                str(tmp_path / "lr"),
                "--base",
                str(trained / "base"),
            ]
        )
        == 0
    )
    loss_diff, action_diff = _max_diff(tmp_path / "x", trained / "full_ref.safetensors")
    print("parity", loss_diff, action_diff)
    assert loss_diff <= TOL and action_diff <= TOL, (loss_diff, action_diff)
    base = load_file(str(trained / "base" / "model.safetensors"))
    mine = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert not torch.equal(base["action_out_proj.weight"], mine["action_out_proj.weight"])  # trained
    assert (tmp_path / "x" / "norm_stats.json").exists() and (tmp_path / "x" / "pi0_arch.json").exists()
    lr_diff = _max_diff(tmp_path / "lr", trained / "full_ref.safetensors")
    assert max(lr_diff) <= TOL, lr_diff


def test_lora_merge_export_matches_engine(trained, tmp_path, capsys):
    export = _tool("export")
    tag = trained / "lora" / "checkpoints" / "iter_000001"
    assert export.main([str(tag), "--out", str(tmp_path / "no"), "--base", str(trained / "base")]) == 2
    assert "--merge-lora" in capsys.readouterr().err
    assert export.main([str(tag), "--merge-lora", "--out", str(tmp_path / "x")]) == 2  # no base weights
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base" in err[0]
    assert (
        export.main([str(tag), "--merge-lora", "--out", str(tmp_path / "x"), "--base", str(trained / "base")])
        == 0
    )
    loss_diff, action_diff = _max_diff(tmp_path / "x", trained / "lora_ref.safetensors")
    print("parity", loss_diff, action_diff)
    assert loss_diff <= TOL and action_diff <= TOL, (loss_diff, action_diff)
    keys = load_file(str(tmp_path / "x" / "model.safetensors")).keys()
    assert not any("lora" in k or "base_layer" in k for k in keys)


def test_export_bad_input_exits_2(tmp_path, capsys):
    assert _tool("export").main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: ")


def test_inspect_ckpt(trained, capsys):
    inspect = _tool("inspect_ckpt")
    assert inspect.main([str(trained / "lora" / "checkpoints" / "iter_000001"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lora"]["rank"] == 4 and "q_proj" in info["lora"]["targets"]
    assert info["client_state"] == {"iteration": 1, "metrics": {"loss": 0.5}} and info["global_steps"] == 1
    assert info["parameters_trainable"] == info["parameters_saved"]
    assert inspect.main([str(trained / "full" / "checkpoints" / "iter_000001"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lora"] is None and info["parameters_saved"] > info["parameters_trainable"] > 0
    assert inspect.main([str(trained / "base")]) == 0
    text = capsys.readouterr().out
    assert 'layout: "canonical"' in text and "parameters:" in text
    assert inspect.main([str(trained / "nothing")]) == 2


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    worker(Path(sys.argv[1]))

"""PI0.5 through the DeepSpeed engine as the trainer builds it (build_engine), 1 rank on CPU: a pi0.5
checkpoint loads at ZeRO-0 and ZeRO-3 (the ZeRO-3 factory builds the model type the checkpoint holds), a
fresh pi0.5 keeps its zero adaptive norms under zero.Init, and an optimizer step runs, LoRA included.
One plain-python process builds every engine (DeepSpeed's start-up is paid once) and writes a JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_single_rank_worker

ROOT = Path(__file__).resolve().parents[1]
DENSE = "model.dit.layers.0.input_layernorm.dense.weight"


def _run(engine, arch) -> dict:
    import torch
    from conftest import random_batch

    batch = random_batch(arch, b=2)
    g = torch.Generator().manual_seed(0)
    noise, time = torch.randn(2, arch.chunk_size, arch.max_action_dim, generator=g), torch.tensor([0.3, 0.7])
    engine.train()
    loss = engine(batch, noise, time, torch.tensor([0, 1])).mean()
    engine.backward(loss)
    norm = engine.step()
    # LoRA runs name the base weights with peft's prefix
    state = {k.removeprefix("base_model.model."): v for k, v in engine.full_state_dict().items()}
    return {
        "type": type(engine.module).__name__,
        "loss": float(loss),
        "grad_norm": norm,
        "dense_abs_sum": float(state[DENSE].abs().sum()),
        "time_mlp": state["embed_action_time.time_mlp_in.weight"].flatten()[:4].tolist(),
    }


def worker(out: Path) -> None:
    from test_model_pi05 import tiny_pi05

    from ript_ds.config import ExperimentCfg, LoraCfg, ModelCfg, TrainCfg
    from ript_ds.engine.deepspeed import build_engine
    from ript_ds.model.arch import PI0Arch
    from ript_ds.model.pi05 import make_policy
    from ript_ds.model.weights import load_checkpoint, save_canonical

    trained = tiny_pi05(4)
    save_canonical(trained, out / "pi05")
    arch = trained.arch
    result = {"reference_time_mlp": trained.embed_action_time.time_mlp_in.weight.flatten()[:4].tolist()}
    for ds in ("zero0.json", "zero3.json"):
        cfg = ExperimentCfg(
            model=ModelCfg(checkpoint=str(out / "pi05")), train=TrainCfg(micro_batch_size=2, lr=0.0)
        )
        factory = lambda: load_checkpoint(out / "pi05").policy  # noqa: E731 (the trainer's build_policy)
        engine = build_engine(factory, cfg, str(ROOT / "ds_configs" / ds))
        result[f"loaded_{ds}"] = _run(engine, arch)
        fresh = ExperimentCfg(model=ModelCfg(), train=TrainCfg(micro_batch_size=2, lr=0.0))
        pi05 = PI0Arch.tiny(model_type="pi05")
        engine = build_engine(lambda arch=pi05: make_policy(arch), fresh, str(ROOT / "ds_configs" / ds))
        result[f"fresh_{ds}"] = _run(engine, pi05)
    lora = ExperimentCfg(model=ModelCfg(checkpoint=str(out / "pi05")), train=TrainCfg(micro_batch_size=2))
    lora.engine.lora = LoraCfg(enabled=True, rank=4)
    engine = build_engine(
        lambda: load_checkpoint(out / "pi05").policy, lora, str(ROOT / "ds_configs/zero0.json")
    )
    result["lora"] = _run(engine, arch)
    (out / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engine_pi05")
    run_single_rank_worker(__file__, out)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("ds", ["zero0.json", "zero3.json"])
def test_a_pi05_checkpoint_trains_in_the_engine(report, ds):
    loaded = report[f"loaded_{ds}"]
    assert loaded["type"] == "PI05Policy" and loaded["grad_norm"] > 0 and loaded["dense_abs_sum"] > 0
    # lr 0: the step leaves the loaded weights as they were
    assert loaded["time_mlp"] == pytest.approx(report["reference_time_mlp"], abs=1e-7)
    assert report["loaded_zero0.json"]["loss"] == pytest.approx(report["loaded_zero3.json"]["loss"], rel=1e-5)


@pytest.mark.parametrize("ds", ["zero0.json", "zero3.json"])
def test_a_fresh_pi05_keeps_its_zero_adaptive_norms(report, ds):
    fresh = report[f"fresh_{ds}"]
    assert fresh["type"] == "PI05Policy" and fresh["grad_norm"] > 0
    assert fresh["dense_abs_sum"] == 0.0  # zero-initialised (zero.Init alone would leave nn.Linear's init)


def test_lora_on_pi05(report):
    assert report["lora"]["type"] == "PI05Policy" and report["lora"]["grad_norm"] > 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    worker(Path(sys.argv[1]))

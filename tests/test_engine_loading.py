"""Weights into the DeepSpeed engine through build_engine (the trainer's path), at every ZeRO stage:
a trained condition embedding survives, a fresh one is zero, a damaged checkpoint is refused with the
same strict checks as model/weights.py, and model.num_inference_steps reaches the built policy.

One plain-python process (1 rank, CPU, gloo) builds all the engines, so DeepSpeed's start-up is paid
once; it writes a JSON the tests read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_single_rank_worker

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("zero0.json", "zero2.json", "zero3.json")


def _engine_report(cfg, ds: str) -> dict:
    from ript_ds.build import build_policy
    from ript_ds.engine.deepspeed import build_engine

    engine = build_engine(lambda: build_policy(cfg)[0], cfg, str(ROOT / "ds_configs" / ds))
    state = engine.full_state_dict()
    return {
        "cond_embed": state["cond_embed.weight"].tolist(),
        "state": {k: v.flatten()[:4].tolist() for k, v in state.items()},
        "steps": engine.module.arch.num_inference_steps,
    }


def _error(cfg, ds: str) -> str | None:
    try:
        _engine_report(cfg, ds)
    except Exception as err:  # the test asserts on the type and message
        return f"{type(err).__name__}: {err}"
    return None


def worker(out: Path) -> None:
    import torch
    from conftest import tiny_policy
    from safetensors.torch import load_file, save_file

    from ript_ds.config import ExperimentCfg, ModelCfg, TrainCfg
    from ript_ds.model.weights import save_canonical

    trained = tiny_policy(3)
    with torch.no_grad():
        trained.cond_embed.weight.copy_(torch.arange(trained.cond_embed.weight.numel()).view(2, -1) * 0.01)
    save_canonical(trained, out / "exported")
    reference = {k: v.flatten()[:4].tolist() for k, v in trained.state_dict().items()}

    def cfg(checkpoint: Path | None, **model) -> ExperimentCfg:
        c = ExperimentCfg(model=ModelCfg(checkpoint=None if checkpoint is None else str(checkpoint), **model))
        c.train = TrainCfg(micro_batch_size=2, lr=1e-3)
        return c

    result: dict = {"reference": reference, "trained_cond": trained.cond_embed.weight.tolist()}
    for ds in STAGES:
        result[f"loaded_{ds}"] = _engine_report(cfg(out / "exported", num_inference_steps=3), ds)
        result[f"fresh_{ds}"] = _engine_report(cfg(None), ds)
    state = load_file(str(out / "exported" / "model.safetensors"))
    damaged = {
        "missing": {k: v for k, v in state.items() if k != "action_out_proj.weight"},
        "unexpected": {**state, "extra.weight": torch.zeros(2)},
        # broadcastable into the parameter: a plain copy_ would have spread it silently
        "shape": {**state, "model.dit.norm.weight": torch.ones(1)},
    }
    for name, tensors in damaged.items():
        directory = out / name
        save_canonical(trained, directory)
        save_file(tensors, str(directory / "model.safetensors"))
        result[f"error_{name}"] = _error(cfg(directory), "zero3.json")
    (out / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engine_loading")
    run_single_rank_worker(__file__, out)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("ds", STAGES)
def test_checkpoint_weights_and_cond_embed_survive_every_stage(report, ds):
    loaded = report[f"loaded_{ds}"]
    assert loaded["cond_embed"] == report["trained_cond"]
    assert loaded["state"] == report["reference"]


@pytest.mark.parametrize("ds", STAGES)
def test_fresh_cond_embed_is_zero_at_every_stage(report, ds):
    assert all(v == 0.0 for row in report[f"fresh_{ds}"]["cond_embed"] for v in row)


@pytest.mark.parametrize("ds", STAGES)
def test_configured_denoising_steps_reach_the_engine_policy(report, ds):
    assert report[f"loaded_{ds}"]["steps"] == 3  # the checkpoint was saved with 10
    assert report[f"fresh_{ds}"]["steps"] == 10


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "missing keys: action_out_proj.weight (1 in all)"),
        ("unexpected", "unexpected keys: extra.weight (1 in all)"),
        ("shape", "shape mismatch (checkpoint vs model): model.dit.norm.weight (1,) vs (32,)"),
    ],
)
def test_zero3_loading_is_as_strict_as_load_checkpoint(report, name, message):
    error = report[f"error_{name}"]
    assert error is not None and message in error, error
    assert error.startswith("ConfigError: model.checkpoint:"), error


if __name__ == "__main__":
    logging_level = os.environ.get("RIPT_TEST_LOG", "WARNING")
    import logging

    logging.basicConfig(level=logging_level)
    worker(Path(sys.argv[1]))

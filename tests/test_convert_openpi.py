"""openpi JAX PI0 -> canonical / lerobot: parity with openpi's own outputs on the tiny fixture."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import OPENPI_FIXTURE, load_script, require
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from ript_ds.model.openpi_jax import OpenpiJaxError, arch_from_params, normalize_keys, to_canonical_openpi
from ript_ds.model.pi0 import PI0Batch, PI0Policy
from ript_ds.model.weights import load_checkpoint, load_into

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
LOSS_TOL, ACTION_TOL = 1e-4, 2e-4


def _tool(name: str):
    return load_script(f"tools/{name}.py")


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(require(OPENPI_FIXTURE) / "io.safetensors"))


def _batch(io: dict[str, torch.Tensor]) -> PI0Batch:
    return PI0Batch(
        images=torch.stack([io[f"image/{c}"].permute(0, 3, 1, 2) for c in CAMERAS], dim=1),  # NHWC -> NCHW
        image_masks=torch.stack([io[f"image_mask/{c}"] for c in CAMERAS], dim=1).bool(),
        tokens=io["tokenized_prompt"].long(),
        token_masks=io["tokenized_prompt_mask"].bool(),
        state=io["state"].float(),
        actions=io["actions"].float(),
    )


def _diffs(policy: PI0Policy, io: dict[str, torch.Tensor]) -> tuple[float, float]:
    batch = _batch(io)
    with torch.no_grad():
        policy.train()
        loss = policy.loss(batch, io["loss/noise"], io["loss/time"]).mean(dim=-1)  # per (B, H)
        policy.eval()
        actions = policy.sample_actions(batch, io["sample/noise"], num_steps=10)
    return (loss - io["loss/per_element"]).abs().max().item(), (
        actions - io["sample/actions"]
    ).abs().max().item()


def _chunk(io) -> int:
    return io["actions"].shape[1]


def test_mapping_matches_openpi_outputs(io):
    flat = load_numpy(str(require(OPENPI_FIXTURE) / "params_flat.safetensors"))
    arch = arch_from_params(normalize_keys(flat), chunk_size=_chunk(io))
    ref = json.loads((OPENPI_FIXTURE / "arch.json").read_text())
    assert arch.vision.num_heads == ref["siglip"]["num_heads"] and arch.expert.mlp_dim == 96
    assert arch.vlm.num_heads == ref["paligemma_gemma"]["num_heads"] and arch.vocab_size == 1024
    policy = PI0Policy(arch)
    load_into(policy, to_canonical_openpi(flat), source="fixture")
    with torch.no_grad():
        prefix, pad = policy.embed_prefix(_batch(io))
    assert (prefix - io["loss/prefix_embs"]).abs().max().item() < 1e-5
    assert torch.equal(pad, io["loss/prefix_pad_mask"])
    loss_diff, action_diff = _diffs(policy, io)
    assert loss_diff < LOSS_TOL and action_diff < ACTION_TOL, (loss_diff, action_diff)


def test_mapping_is_strict():
    flat = load_numpy(str(require(OPENPI_FIXTURE) / "params_flat.safetensors"))
    with pytest.raises(OpenpiJaxError, match="map to nothing"):
        to_canonical_openpi({**flat, "time_mlp_in/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(OpenpiJaxError, match="missing"):
        to_canonical_openpi({k: v for k, v in flat.items() if "q_einsum_1" not in k})
    # the training layout's `/value` leaves are the same parameters
    assert normalize_keys({f"{k}/value": v for k, v in flat.items()}).keys() == flat.keys()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, io) -> dict:
    convert = _tool("convert_openpi_jax")
    out = tmp_path_factory.mktemp("openpi")
    ckpt = out / "ckpt"
    shutil.copytree(require(OPENPI_FIXTURE) / "params", ckpt / "params")
    stats = {
        "norm_stats": {
            "state": {"mean": [0.5] * 8, "std": [2.0] * 8, "q01": [-1.0] * 8, "q99": [1.0] * 8},
            "actions": {"mean": [0.1] * 7, "std": [3.0] * 7, "q01": [-2.0] * 7, "q99": [2.0] * 7},
        }
    }
    (ckpt / "assets" / "libero").mkdir(parents=True)
    (ckpt / "assets" / "libero" / "norm_stats.json").write_text(json.dumps(stats))
    chunk = str(_chunk(io))
    rc = convert.main(
        [str(ckpt), "--out", str(out / "canon"), "--lerobot-out", str(out / "lr"), "--chunk-size", chunk]
    )
    assert rc == 0
    rc = convert.main(
        [str(OPENPI_FIXTURE / "train_layout"), "--out", str(out / "train"), "--chunk-size", chunk]
    )
    assert rc == 0
    return {"out": out, "convert": convert}


@pytest.mark.parametrize("name", ["canon", "train", "lr"])
def test_tool_outputs_reload_with_parity(converted, io, name):
    loaded = load_checkpoint(converted["out"] / name)
    assert loaded.layout == {"canon": "canonical", "train": "canonical", "lr": "lerobot>=0.4"}[name]
    loss_diff, action_diff = _diffs(loaded.policy, io)
    assert loss_diff < LOSS_TOL and action_diff < ACTION_TOL, (name, loss_diff, action_diff)
    if name != "train":
        stats = loaded.norm_stats
        assert stats is not None and stats.eps == 1e-6 and stats.mode == "mean_std"
        np.testing.assert_allclose(stats.state.mean, [0.5] * 8)
        np.testing.assert_allclose(stats.actions.q99, [2.0] * 7)


def test_lerobot_output_is_identical_to_canonical(converted, io):
    a = load_checkpoint(converted["out"] / "canon").policy.state_dict()
    b = load_checkpoint(converted["out"] / "lr").policy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = load_file(str(converted["out"] / "lr" / "model.safetensors")).keys()
    assert any(k.startswith("model.paligemma_with_expert.paligemma.model.language_model.") for k in keys)
    assert (converted["out"] / "lr" / "policy_preprocessor_step_0_normalizer_processor.safetensors").exists()


def test_bad_input_exits_2(converted, tmp_path, capsys):
    convert = converted["convert"]
    assert convert.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert convert.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("convert_openpi_jax: ") for line in err)


def test_missing_convert_extra_is_one_line(converted, monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_orbax(name, *args, **kwargs):
        if name.startswith("orbax"):
            raise ImportError("No module named 'orbax'", name="orbax")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_orbax)
    rc = converted["convert"].main([str(OPENPI_FIXTURE), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install -e '.[convert]'" in err[0]

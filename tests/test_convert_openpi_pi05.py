"""openpi JAX PI0.5 -> canonical / lerobot: parity with openpi's own outputs on pi05_openpi_jax_tiny."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES, load_script, require
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from test_convert_openpi import ACTION_TOL, LOSS_TOL, _batch, _diffs

from ript_ds.model.convention import load_convention
from ript_ds.model.openpi_jax import (
    OpenpiJaxError,
    arch_from_params,
    model_type_of,
    normalize_keys,
    to_canonical_openpi,
)
from ript_ds.model.pi0 import count_parameters
from ript_ds.model.pi05 import PI05Policy, make_policy
from ript_ds.model.weights import load_checkpoint, load_into

PI05_JAX = FIXTURES / "pi05_openpi_jax_tiny"
POLICY_FIXTURE = FIXTURES / "openpi_policy_tiny_a"
NORM = "model.dit.layers.{}.{}.dense.{}"


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(require(PI05_JAX) / "io.safetensors"))


@pytest.fixture(scope="module")
def flat() -> dict[str, np.ndarray]:
    return load_numpy(str(require(PI05_JAX) / "params_flat.safetensors"))


def _policy(flat, io) -> PI05Policy:
    arch = arch_from_params(normalize_keys(flat), chunk_size=io["actions"].shape[1])
    policy = make_policy(arch)
    load_into(policy, to_canonical_openpi(flat), source="fixture")
    return policy


def test_arch_and_parameter_count_from_the_leaves(flat, io):
    ref = json.loads((PI05_JAX / "arch.json").read_text())
    arch = arch_from_params(normalize_keys(flat), chunk_size=10)
    assert model_type_of(normalize_keys(flat)) == "pi05" and arch.model_type == "pi05"
    assert arch.expert.mlp_dim == ref["action_expert_gemma"]["mlp_dim"] == 96
    assert arch.vision.num_heads == ref["siglip"]["num_heads"] and arch.vocab_size == 1024
    policy = _policy(flat, io)
    shapes = json.loads((require(POLICY_FIXTURE) / "meta.json").read_text())["pi05_param_shapes"]
    openpi_count = sum(int(np.prod(s)) for s in shapes.values())
    assert openpi_count == ref["param_count"] == 246_640
    # every openpi leaf, re-laid out, plus our zero-initialised condition embedding (2 x expert width)
    assert count_parameters(policy) == openpi_count + 2 * arch.expert.width


def test_mapping_matches_openpi_outputs(flat, io):
    policy = _policy(flat, io)
    batch = _batch(io)
    t = io["loss/time"]
    with torch.no_grad():
        prefix, pad = policy.embed_prefix(batch)
        cond = policy.time_condition(t)
        suffix = policy.embed_suffix(batch.state, io["loss/x_t"], t, None)
        suffix_out = policy._joint_forward(prefix, pad, suffix, cond)
    assert (prefix - io["loss/prefix_embs"]).abs().max() < 1e-5 and torch.equal(
        pad, io["loss/prefix_pad_mask"]
    )
    assert (cond - io["loss/adarms_cond"]).abs().max() < 2e-5
    assert (suffix - io["loss/suffix_embs"]).abs().max() < 1e-5
    assert (suffix_out - io["loss/suffix_out"]).abs().max() < 1e-4
    loss_diff, action_diff = _diffs(policy, io)
    assert loss_diff < LOSS_TOL and action_diff < ACTION_TOL, (loss_diff, action_diff)


def test_the_adaptive_norm_kernels_are_transposed(flat, io):
    """(in, 3 * width) kernels -> Linear weights (3 * width, in); the stacked layer axis is the first."""
    state = to_canonical_openpi(flat)
    kernel = flat["PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/kernel"]  # (L, 32, 96)
    np.testing.assert_array_equal(state[NORM.format(1, "post_attention_layernorm", "weight")], kernel[1].T)
    bias = flat["PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/bias"]
    np.testing.assert_array_equal(state[NORM.format(0, "input_layernorm", "bias")], bias[0])
    np.testing.assert_array_equal(
        state["model.dit.norm.dense.weight"], flat["PaliGemma/llm/final_norm_1/Dense_0/kernel"].T
    )
    np.testing.assert_array_equal(state["embed_action_time.time_mlp_in.weight"], flat["time_mlp_in/kernel"].T)


def test_mapping_is_strict(flat):
    with pytest.raises(OpenpiJaxError, match="map to nothing"):
        to_canonical_openpi({**flat, "state_proj/kernel": np.zeros((32, 32), np.float32)})
    with pytest.raises(OpenpiJaxError, match=r"missing .*pre_ffw_norm_1/Dense_0/bias"):
        to_canonical_openpi({k: v for k, v in flat.items() if "pre_ffw_norm_1/Dense_0/bias" not in k})
    # pi0.5 adaptive leaves left in a tree that lacks the final one are not silently read as pi0
    no_final = {k: v for k, v in flat.items() if "final_norm_1" not in k}
    with pytest.raises(OpenpiJaxError, match="missing"):
        to_canonical_openpi(no_final)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, io) -> dict:
    """The tool as users run it, on a copy in a folder whose name does not say pi05 (openpi's own
    converter guesses the model from the path; ours reads the leaves)."""
    convert = load_script("tools/convert_openpi_jax.py")
    out = tmp_path_factory.mktemp("openpi05")
    ckpt = out / "some_checkpoint"
    shutil.copytree(require(POLICY_FIXTURE) / "pi05_ckpt" / "params", ckpt / "params")
    shutil.copytree(POLICY_FIXTURE / "pi05_ckpt" / "assets", ckpt / "assets")
    args = [str(ckpt), "--out", str(out / "canon"), "--lerobot-out", str(out / "lr")]
    assert convert.main([*args, "--openpi-config", "pi05_libero"]) == 0
    assert (
        convert.main([str(PI05_JAX / "train_layout"), "--out", str(out / "train"), "--chunk-size", "10"]) == 0
    )
    return {"out": out, "convert": convert, "ckpt": ckpt}


@pytest.mark.parametrize("name", ["canon", "train", "lr"])
def test_tool_outputs_reload_with_parity(converted, io, name):
    loaded = load_checkpoint(converted["out"] / name)
    assert isinstance(loaded.policy, PI05Policy) and loaded.policy.arch.chunk_size == 10
    assert loaded.layout == {"canon": "canonical", "train": "canonical", "lr": "lerobot>=0.4"}[name]
    loss_diff, action_diff = _diffs(loaded.policy, io)
    assert loss_diff < LOSS_TOL and action_diff < ACTION_TOL, (name, loss_diff, action_diff)
    if name != "train":
        conv = load_convention(converted["out"] / name)
        assert conv.model_type == "pi05" and conv.preset == "pi05_libero" and conv.max_token_len == 200
        assert loaded.norm_stats.mode == "quantile"


def test_lerobot_output_is_lerobots_pi05_layout(converted):
    keys = set(load_file(str(converted["out"] / "lr" / "model.safetensors")))
    expert = "model.paligemma_with_expert.gemma_expert."
    assert {expert + "model.norm.dense.weight", "model.time_mlp_in.weight", expert + "lm_head.weight"} <= keys
    assert not any(
        "state_proj" in k or "action_time_mlp" in k or (k.endswith("layernorm.weight") and expert in k)
        for k in keys
    )
    assert json.loads((converted["out"] / "lr" / "config.json").read_text())["type"] == "pi05"


def test_a_pi0_config_on_pi05_weights_is_refused(converted, tmp_path, capsys):
    rc = converted["convert"].main(
        [str(converted["ckpt"]), "--out", str(tmp_path / "o"), "--openpi-config", "pi0_libero"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pi0_libero is a pi0 config" in err[0] and "pi05 model" in err[0]
